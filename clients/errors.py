"""How a ClientApp task fails: an error reply with a one-line reason, so only this task fails.

The reason goes to another party (the server): it is one printable line of bounded length
(:func:`common.errors.untrusted_text`) and never shows the content of a file this node read. An
error whose message quotes a file (a malformed CSV value) carries a ``reply_text`` naming only
file, line, column and what was wrong (:func:`common.errors.with_reply_text`); an unexpected error
(not a FedLinearError) is replied to with its type only, its message and traceback go to this
node's log.
"""

from __future__ import annotations

import logging
import traceback

from flwr.app import Error, Message

from fedlinear.common.errors import FedLinearError, one_line, untrusted_text
from fedlinear.common.protocol import ERROR_CODE_INTERNAL, ERROR_CODE_USER


def reply_reason(exc: BaseException, what: str = "client task") -> str:
    """The reason an error reply carries for ``exc``: one line, no file content."""
    if isinstance(exc, FedLinearError):
        return untrusted_text(getattr(exc, "reply_text", None) or one_line(exc))
    return untrusted_text(f"{type(exc).__name__} in the {what} (details in the node's log)")


def error_reply(msg: Message, exc: Exception, what: str = "client task") -> Message:
    """The reply to ``msg`` for a task that raised ``exc`` (an unexpected error is logged here in full)."""
    if isinstance(exc, FedLinearError):
        return Message(Error(code=ERROR_CODE_USER, reason=reply_reason(exc, what)), reply_to=msg)
    logging.getLogger("fedlinear").error("%s failed:\n%s", what, traceback.format_exc())
    return Message(Error(code=ERROR_CODE_INTERNAL, reason=reply_reason(exc, what)), reply_to=msg)
