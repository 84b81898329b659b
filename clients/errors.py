"""How a ClientApp task fails: an error reply with a one-line reason, so only this task fails."""

from __future__ import annotations

import logging
import traceback

from flwr.app import Error, Message

from common.errors import FedLinearError, one_line

ERROR_CODE_USER = 4001  # a FedLinearError: bad shard, bad config
ERROR_CODE_INTERNAL = 4002  # anything else


def error_reply(msg: Message, exc: Exception, what: str = "client task") -> Message:
    """The reply to ``msg`` for a task that raised ``exc`` (an unexpected error is logged here in full)."""
    if isinstance(exc, FedLinearError):
        return Message(Error(code=ERROR_CODE_USER, reason=one_line(exc)), reply_to=msg)
    logging.getLogger("fedlinear").error("%s failed:\n%s", what, traceback.format_exc())
    return Message(Error(code=ERROR_CODE_INTERNAL, reason=one_line(exc)), reply_to=msg)
