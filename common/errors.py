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


# The longest text another party may put into a log line or history.json (an error reason, a path).
MAX_UNTRUSTED_TEXT = 300


def untrusted_text(value: object, limit: int = MAX_UNTRUSTED_TEXT) -> str:
    """Text another party supplied (an error reason, a shard path), safe to print and to store.

    One line, nothing but printable characters: control characters (ESC and so terminal escape
    sequences, CR, backspace, NUL), Unicode format characters (bidirectional overrides) and
    separators become ``?``; line breaks and tabs become a space and runs of whitespace collapse,
    so the text can neither start a line of its own (a fake ``[fedlinear]`` progress line) nor
    repaint the terminal. At most ``limit`` characters, with ``...`` when cut.
    """
    text = value if isinstance(value, str) else str(value)
    text = text[: 4 * limit + 16]  # bound the work on a huge reason
    cleaned = "".join(
        " " if ch in "\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029" else (ch if ch.isprintable() else "?") for ch in text
    )
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def with_reply_text(exc: FedLinearError, text: str) -> FedLinearError:
    """``exc``, with the wording a reply to *another* party carries instead of its message.

    For an error whose message shows content of a file (a value of a malformed CSV line): the
    user at this machine sees the message; a ClientApp's error reply to the server carries ``text``
    (file, line, column and what was wrong, never the content; :func:`clients.errors.error_reply`).
    """
    exc.reply_text = text  # type: ignore[attr-defined]
    return exc
