"""The one exception type for errors a user can cause (bad data, bad config, bad URI).

Every message names the thing at fault (file and line, bucket and key, config key) and says what
was expected. Edges (the CLI, the ClientApp, the ServerApp) turn it into a one-line message.
"""


class FedLinearError(Exception):
    """An error the user can fix: the message is meant to be shown as is, on one line."""


def one_line(exc: BaseException) -> str:
    """Render an exception as a single line suitable for a terminal or a Flower error reply."""
    text = str(exc) if isinstance(exc, FedLinearError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())
