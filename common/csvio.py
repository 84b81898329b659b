"""CSV shards: loading with validation, and writing them back.

The format is comma-separated numbers, one sample a line, the target in the last column unless
``target_column`` says otherwise, an optional header line, blank and whitespace-only lines (such as
a trailing newline) ignored. The seed format ``x,y`` is the d=1 case. Files are UTF-8 (a leading
byte-order mark is dropped; any other bad byte is an error naming its line); lines end in LF,
CRLF or an old-Mac CR, and line numbers count physical lines whichever it is. With
``header="auto"`` the first non-blank row is a header only when none of its fields is a number and
none is empty: a first row such as ``1,n/a,3`` or ``1,,3`` is a data row with a bad value (an error
naming line and column), never silently dropped as a header.

Validation happens here, once, at the boundary: every problem raises :class:`FedLinearError` with
the file (URI) and, where there is one, the 1-based line number.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from fedlinear.common import storage
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError, with_reply_text


_HEADER_HINT = "(a first row is a header only when no field is a number or empty: set header to 'yes' or 'no')"


def _number(field: str) -> float | None:
    """The value of a (stripped) field if it is a number as numpy's parser reads one, else None.

    That is ``float()`` restricted to ASCII without underscores (``PyOS_string_to_double``: digits,
    sign, point, exponent, inf/infinity/nan in any case), not ``float()``'s superset (``1_000``,
    non-ASCII digits), so the line-by-line scan accepts exactly what the fast path does.
    """
    if not field.isascii() or "_" in field:
        return None
    try:
        return float(field)
    except ValueError:
        return None


def _is_number(field: str) -> bool:
    return _number(field) is not None


def _fields(line: str) -> list[str]:
    return [f.strip() for f in line.strip().split(",")]


def _is_header(fields: list[str], header: str) -> bool:
    """``yes``: always; ``auto``: only when no field is a number and none is empty; ``no``: never."""
    if header == "yes":
        return True
    return header == "auto" and all(fields) and not any(map(_is_number, fields))


def _shown(field: str) -> str:
    """A field quoted for a message, cut to 40 characters, control characters escaped (one line)."""
    text = field[:40]
    return f"'{text}'" if text.isprintable() else repr(text)


@contextlib.contextmanager
def _text_lines(uri: str, errors: str) -> Iterator[io.TextIOWrapper]:
    """The file/object as text lines, one per physical line.

    Universal newlines (LF, CRLF and old-Mac CR each end one line, also across read
    buffers) and ``utf-8-sig`` (a leading byte-order mark is dropped), streamed: S3 objects are
    not read whole.
    """
    with storage.open_binary(uri) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors=errors, newline=None)
        try:
            yield text
        finally:
            text.detach()  # the stream is closed by open_binary


def _check_utf8(uri: str, lineno: int, line: str) -> None:
    """Raise if the line held bytes that are not UTF-8 (decoded with ``surrogateescape``)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(line[exc.start]) - 0xDC00
        hint = "save it as UTF-8"
        if lineno == 1 and line.startswith(("\udcff\udcfe", "\udcfe\udcff")):
            hint = "it looks like UTF-16: save it as UTF-8"
        raise with_reply_text(
            FedLinearError(f"{uri}: line {lineno}: not valid UTF-8 (byte 0x{byte:02x} at character {exc.start + 1}); {hint}"),
            f"{uri}: line {lineno}: not valid UTF-8",  # the reply to the server names no byte of the file
        ) from None


def _scan(uri: str, lines: Iterable[str], header: str) -> tuple[list[str] | None, int]:
    """Validate line by line; return (header fields or None, number of data rows).

    This is the slow path that finds the exact line of a problem; the fast path is numpy's parser.
    ``lines`` are physical lines (decoded with ``surrogateescape``, so bad bytes are found here).
    """
    columns: list[str] | None = None
    width = None
    rows = 0
    for lineno, line in enumerate(lines, start=1):
        ascii_only = line.isascii()
        if not ascii_only:
            _check_utf8(uri, lineno, line)
        text = line.strip()
        if not text:
            continue
        fields = [f.strip() for f in text.split(",")]
        first = width is None
        if first and _is_header(fields, header):
            columns = fields
            width = len(fields)
            continue
        if width is None:
            width = len(fields)
        if len(fields) != width:
            raise FedLinearError(
                f"{uri}: line {lineno}: expected {width} comma-separated columns, found {len(fields)}"
            )
        if ascii_only and "_" not in text:  # the common case, checked in bulk: float() is then numpy's reading
            try:
                if all(map(math.isfinite, map(float, fields))):
                    rows += 1
                    continue
            except ValueError:
                pass
        hint = f" {_HEADER_HINT}" if first and header == "auto" else ""
        for col, field in enumerate(fields, start=1):
            value = _number(field)
            # the local message shows the value; a reply to the server only where and what (with_reply_text)
            where = f"{uri}: line {lineno}: column {col}"
            if value is None:
                what = "empty value" if not field else f"{_shown(field)} is not a number"
                raise with_reply_text(
                    FedLinearError(f"{where}: {what}{hint}"), f"{where}: {'empty value' if not field else 'not a number'}"
                )
            if not math.isfinite(value):
                raise with_reply_text(FedLinearError(f"{where}: value '{field}' is not finite"), f"{where}: not finite")
        rows += 1
    return columns, rows


def _parse_one(uri: str, header: str) -> tuple[np.ndarray, list[str] | None]:
    """Parse one CSV file/object into a float64 matrix (rows, columns).

    Fast path: strict UTF-8 text lines, whitespace-only lines dropped, straight into numpy's
    parser. Anything it does not take (a bad byte, a bad value, a ragged row, a non-finite
    number) sends the file through :func:`_scan`, which names the line.
    """
    columns = None
    with _text_lines(uri, "strict") as text:
        try:
            lines = itertools.filterfalse(str.isspace, text)
            first = next(lines, None)
            if first is None:
                raise FedLinearError(f"{uri}: empty file, expected comma-separated numbers one sample a line")
            fields = _fields(first)
            columns = fields if _is_header(fields, header) else None
            body = lines if columns is not None else itertools.chain([first], lines)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
                matrix = np.loadtxt(body, delimiter=",", dtype=np.float64, ndmin=2, comments=None)
            ok = matrix.size > 0 and bool(np.isfinite(matrix).all())
        except ValueError:  # numpy's parse errors and UnicodeDecodeError
            ok = False
    if ok and (columns is None or matrix.shape[1] == len(columns)):
        return matrix, columns
    # Something is off: re-read line by line to name the line (raises), or report no data rows.
    with _text_lines(uri, "surrogateescape") as text:
        columns, rows = _scan(uri, text, header)
    if rows == 0:
        raise FedLinearError(f"{uri}: no data rows (only a header line)")
    raise FedLinearError(f"{uri}: could not parse as comma-separated numbers")  # pragma: no cover


def load_matrix(uri: str, header: str = "auto") -> tuple[np.ndarray, list[str] | None, list[str]]:
    """Parse and validate every number in a CSV file/object or prefix: (matrix, header, source URIs)."""
    parts = []
    columns = None
    uris = storage.expand(uri)
    for part_uri in uris:
        matrix, cols = _parse_one(part_uri, header)
        if parts and matrix.shape[1] != parts[0].shape[1]:
            raise FedLinearError(
                f"{part_uri}: has {matrix.shape[1]} columns but {uris[0]} has {parts[0].shape[1]}"
            )
        parts.append(matrix)
        columns = columns or cols
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return matrix, columns, uris


def load_csv(uri: str, target_column: int = -1, header: str = "auto") -> Dataset:
    """Load and validate one CSV shard (a path, an ``s3://`` object, or a prefix/directory of them).

    Parameters
    ----------
    uri : str
        Local path, ``s3://bucket/key``, or a directory / prefix ending in ``/`` whose files are
        concatenated in name order (all must have the same number of columns).
    target_column : int (default: -1)
        Index of the target column; negative counts from the end.
    header : str (default: "auto")
        ``auto`` treats the first non-blank line as a header when none of its fields is a number
        and none is empty; ``yes``/``no`` force it.
    """
    matrix, columns, uris = load_matrix(uri, header)
    width = matrix.shape[1]
    if width < 2:
        raise FedLinearError(f"{uri}: found {width} column, need at least 2 (features..., target)")
    if not -width <= target_column < width:
        raise FedLinearError(
            f"config key 'target-column' is {target_column} but {uri} has only {width} columns"
        )
    target = target_column % width
    x = np.delete(matrix, target, axis=1)
    y = matrix[:, target]
    names = None
    if columns is not None:
        names = tuple(c for i, c in enumerate(columns) if i != target) + (columns[target],)
    return Dataset(x=np.ascontiguousarray(x), y=np.ascontiguousarray(y), sources=tuple(uris), columns=names)


def to_csv_bytes(x: np.ndarray, y: np.ndarray | None = None) -> bytes:
    """Serialise features (and target, last) as header-less CSV with round-trip float precision.

    The bytes ``np.savetxt(..., delimiter=",", fmt="%.17g")`` writes, formatted in one ``%`` operation
    instead of savetxt's one per row (which cost ~5 us a row: 5 s for 1000 synthetic shards of 1000
    rows); a matrix savetxt would format otherwise (complex, structured, object, not 2-D) goes
    through savetxt itself. tests/unit/test_data_files.py compares the two.
    """
    matrix = np.asarray(x if y is None else np.column_stack([x, y]))
    if matrix.ndim != 2 or matrix.dtype.kind not in "biuf":
        buf = io.StringIO()
        np.savetxt(buf, matrix, delimiter=",", fmt="%.17g")
        return buf.getvalue().encode("ascii")
    rows, columns = matrix.shape
    line = ",".join(["%.17g"] * columns) + "\n"
    block = max(1, _CSV_BLOCK_VALUES // max(columns, 1))  # rows formatted at once: bounded memory for any size
    return b"".join(
        ((line * len(part)) % tuple(part.ravel().tolist())).encode("ascii")
        for part in (matrix[start : start + block] for start in range(0, rows, block))
    )


_CSV_BLOCK_VALUES = 1 << 16
