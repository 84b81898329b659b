"""The SavedModel without TensorFlow: a per-shape template that TensorFlow wrote once, with new weights.

For a given shape (d features, with or without a bias) :func:`common.export.export_savedmodel` always
writes the same graph; only the variables differ. So the first export of a shape on a machine (TensorFlow,
once) leaves a *template* in the cache (``$XDG_CACHE_HOME`` or ``~/.cache``, then
``fedlinear/savedmodel/<key>``), and every later export of that shape copies it and writes the new weights
itself, without importing TensorFlow:

- ``variables/variables.data-00000-of-00001``: the raw little-endian float32 bytes of ``kernel`` and
  ``bias`` at the offsets the index gives (the rest, the object graph, does not depend on the weights);
- ``variables/variables.index`` (TensorFlow's tensor bundle: a LevelDB-format table of
  ``BundleEntryProto``): each variable's entry holds a masked CRC-32C of its bytes, and each block of the
  table ends with a masked CRC-32C of the block; both are rewritten (the blocks must be uncompressed);
- ``fingerprint.pb`` (``FingerprintDef``): ``checkpoint_hash`` is FarmHash ``Fingerprint64`` of the index
  file (TensorFlow's ``HashCheckpointIndexFile``); ``uuid`` is a random 128-bit number in decimal, new for
  every save (TensorFlow draws one per save too); the other hashes cover ``saved_model.pb`` only.
- ``saved_model.pb`` is copied unchanged.

The result is byte-for-byte what TensorFlow writes for the same weights in a fresh process, except
``fingerprint.pb``'s ``uuid`` (random in both). A TensorFlow export that is not a process's first differs
from it in ``saved_model.pb`` (TensorFlow numbers its functions per process: ``__inference_serve_17`` vs
``_35``); the model is the same.

The cache key holds TensorFlow's and protobuf's versions (read from the installed distributions, without
importing them), :data:`FORMAT`, a hash of the model's definition (the source of
:func:`common.export.save_local`), d and the bias. A template is only kept when writing the weights
it was made with reproduces TensorFlow's files exactly; it is written to a temporary directory and renamed
into place, so two runs creating one at once are safe (the second rename loses and is discarded).
Anything unexpected (no template, a layout not as parsed here, a size that does not match) raises
:class:`Unusable`, and the caller exports with TensorFlow as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np

from fedlinear.common.model import LinearWeights

FORMAT = 1  # bump when what this module writes changes
DATA = os.path.join("variables", "variables.data-00000-of-00001")
INDEX = os.path.join("variables", "variables.index")
FILES = ("saved_model.pb", "fingerprint.pb", DATA, INDEX)
DIRS = ("assets", "variables")  # TensorFlow writes an empty assets/ too
META = "template.json"
VARIABLE_KEYS = {"kernel": b"kernel/.ATTRIBUTES/VARIABLE_VALUE", "bias": b"bias/.ATTRIBUTES/VARIABLE_VALUE"}
TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER = 48
CREATE_TIMEOUT_S = 600.0  # TensorFlow's import and one export on a very busy machine


class Unusable(Exception):
    """No template can write this model (the caller exports with TensorFlow)."""


# ----------------------------------------------------------------------------------------------------
# Where templates live, and their key
# ----------------------------------------------------------------------------------------------------


CACHE_ENV = "FEDLINEAR_SAVEDMODEL_CACHE"  # the templates' directory instead of the default, or "off" (none)


def cache_root() -> str:
    """Where templates live: :data:`CACHE_ENV` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/fedlinear/savedmodel``; :class:`Unusable` if :data:`CACHE_ENV` is ``off``."""
    chosen = os.environ.get(CACHE_ENV, "")
    if chosen == "off":
        raise Unusable(f"{CACHE_ENV}=off")
    if chosen:
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedlinear", "savedmodel")


def _distribution_version(*names: str) -> str | None:
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return None


def tensorflow_version() -> str | None:
    """The installed TensorFlow's version, from its distribution's metadata (TensorFlow is not imported)."""
    return _distribution_version("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos")


def definition_hash(definition: Callable[..., Any]) -> str:
    """A hash of the model's definition (the function that builds and saves it: its source)."""
    return hashlib.sha256(inspect.getsource(definition).encode()).hexdigest()[:16]


def key(num_features: int, bias: bool, definition: str) -> str:
    """The template's name in the cache (``definition``: :func:`definition_hash`); :class:`Unusable` if
    TensorFlow is not installed."""
    tf, pb = tensorflow_version(), _distribution_version("protobuf")
    if tf is None:
        raise Unusable("TensorFlow is not installed")
    return f"tf{tf}-pb{pb}-f{FORMAT}-{definition}-d{int(num_features)}-{'bias' if bias else 'nobias'}-float32"


def template_dir(num_features: int, bias: bool, definition: str) -> str:
    return os.path.join(cache_root(), key(num_features, bias, definition))


def available(num_features: int, bias: bool, definition: str) -> bool:
    """Whether a template for this shape is in the cache (it is checked again when used)."""
    try:
        return os.path.isfile(os.path.join(template_dir(num_features, bias, definition), META))
    except Unusable:
        return False


def enabled() -> bool:
    """Whether templates can be made here (TensorFlow is installed, the cache is not turned off)."""
    try:
        cache_root()
    except Unusable:
        return False
    return tensorflow_version() is not None


# ----------------------------------------------------------------------------------------------------
# The few protobuf and LevelDB-table fields this needs, parsed by hand
# ----------------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Unusable("a truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, int, int, int]]:
    """A protobuf message's fields: (number, wire type, start of the field, start of its value, end)."""
    end = len(buf) if end is None else end
    out, pos = [], start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value_start = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, value_start = _varint(buf, pos)
            pos = value_start + length
        elif wire == 5:
            pos += 4
        else:
            raise Unusable(f"protobuf wire type {wire}")
        if pos > end:
            raise Unusable("a truncated protobuf field")
        out.append((number, wire, field_start, value_start, pos))
    return out


def _masked_crc32c(data: bytes) -> int:
    try:
        import google_crc32c
    except ImportError:
        raise Unusable("google-crc32c is not installed") from None

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _block_entries(index: bytes, offset: int, size: int) -> list[tuple[bytes, int, int]]:
    """A table block's entries: (key, value start, value end) in the file."""
    if offset + size + 5 > len(index) or size < 4:
        raise Unusable("a table block outside the index file")
    (restarts,) = struct.unpack_from("<I", index, offset + size - 4)
    limit = offset + size - 4 - 4 * restarts
    if limit < offset:
        raise Unusable("a table block's restart array does not fit")
    entries, pos, last = [], offset, b""
    while pos < limit:
        shared, pos = _varint(index, pos)
        unshared, pos = _varint(index, pos)
        length, pos = _varint(index, pos)
        if shared > len(last) or pos + unshared + length > limit:
            raise Unusable("a table entry does not fit its block")
        last = last[:shared] + index[pos : pos + unshared]
        pos += unshared
        entries.append((last, pos, pos + length))
        pos += length
    return entries


class Layout:
    """Where the weights and everything that depends on them sit in a template's files."""

    def __init__(self, index: bytes, num_features: int, bias: bool) -> None:
        if len(index) < FOOTER or struct.unpack_from("<Q", index, len(index) - 8)[0] != TABLE_MAGIC:
            raise Unusable("the index is not a LevelDB-format table")
        pos = len(index) - FOOTER
        _meta_offset, pos = _varint(index, pos)
        _meta_size, pos = _varint(index, pos)
        index_offset, pos = _varint(index, pos)
        index_size, pos = _varint(index, pos)
        self.blocks: list[tuple[int, int]] = []  # (offset, size) of each data block
        self.tensors: dict[str, tuple[int, int, int, tuple[int, int]]] = {}  # name: data offset, size, crc pos, block
        header = None
        for _, start, end in _block_entries(index, index_offset, index_size):
            block_offset, p = _varint(index, start)
            block_size, p = _varint(index, p)
            if p != end:
                raise Unusable("an index entry is not a block handle")
            block = (block_offset, block_size)
            if index[block_offset + block_size] != 0:
                raise Unusable("a compressed table block")
            self.blocks.append(block)
            for name, value_start, value_end in _block_entries(index, block_offset, block_size):
                if name == b"":
                    header = (value_start, value_end)
                for variable, wanted in VARIABLE_KEYS.items():
                    if name == wanted:
                        self.tensors[variable] = (*self._entry(index, value_start, value_end), block)
        if header is None:
            raise Unusable("the index has no bundle header")
        for number, wire, _, value_start, end in _fields(index, *header):
            value = _varint(index, value_start)[0] if wire == 0 else None
            if (number, value) not in ((1, 1), (2, 0)) and number != 3:  # one shard, little-endian, version
                raise Unusable(f"bundle header field {number} = {value}")
        expected = {"kernel": 4 * num_features} | ({"bias": 4} if bias else {})
        if {k: v[1] for k, v in self.tensors.items()} != expected:
            raise Unusable(f"the index's variables {sorted(self.tensors)} do not match d = {num_features}")

    @staticmethod
    def _entry(index: bytes, start: int, end: int) -> tuple[int, int, int]:
        """A float32 BundleEntryProto's data offset, size and where its crc32c (fixed32) sits."""
        offset = size = 0
        crc = dtype = None
        for number, wire, _, value_start, _ in _fields(index, start, end):
            if number == 1 and wire == 0:
                dtype = _varint(index, value_start)[0]
            elif number == 2 and wire == 2:
                pass  # the shape: checked through the size
            elif number == 4 and wire == 0:
                offset = _varint(index, value_start)[0]
            elif number == 5 and wire == 0:
                size = _varint(index, value_start)[0]
            elif number == 6 and wire == 5:
                crc = value_start
            else:  # a shard id, slices, anything else: not the layout this writes
                raise Unusable(f"a bundle entry with field {number}")
        if dtype != 1 or crc is None:
            raise Unusable("a variable that is not a checksummed float32 tensor")
        return offset, size, crc


def _fingerprint(template: bytes, index: bytes) -> bytes:
    """``fingerprint.pb`` for a new ``variables.index``: a new checkpoint_hash and a new uuid."""
    try:
        import farmhash  # the cityhash distribution's FarmHash
    except ImportError:
        raise Unusable("cityhash (FarmHash) is not installed") from None

    fields = _fields(template)
    if sorted(f[0] for f in fields) != [1, 2, 3, 4, 5, 6, 7]:
        raise Unusable(f"fingerprint.pb has fields {[f[0] for f in fields]}")
    out = bytearray()
    for number, wire, field_start, _, end in fields:
        if number == 5 and wire == 0:
            out += b"\x28" + _encode_varint(farmhash.Fingerprint64(index))
        elif number == 7 and wire == 2:
            uuid = str(secrets.randbits(128)).encode()
            out += b"\x3a" + _encode_varint(len(uuid)) + uuid
        elif number in (5, 7):
            raise Unusable(f"fingerprint.pb field {number} has wire type {wire}")
        else:
            out += template[field_start:end]
    return bytes(out)


# ----------------------------------------------------------------------------------------------------
# Writing a model from a template, and making one
# ----------------------------------------------------------------------------------------------------


def _read(directory: str) -> dict[str, bytes]:
    files = {}
    for name in FILES:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                files[name] = f.read()
        except OSError as exc:
            raise Unusable(f"{name}: {exc.strerror or type(exc).__name__}") from None
    found = {os.path.relpath(os.path.join(r, f), directory) for r, _, fs in os.walk(directory) for f in fs}
    if found - set(FILES) - {META}:
        raise Unusable(f"unexpected files {sorted(found - set(FILES) - {META})}")
    dirs = {os.path.relpath(os.path.join(r, d), directory) for r, ds, _ in os.walk(directory) for d in ds}
    if dirs != set(DIRS):
        raise Unusable(f"directories {sorted(dirs)}, not {list(DIRS)}")
    return files


def render(files: dict[str, bytes], weights: LinearWeights) -> dict[str, bytes]:
    """The template's files with ``weights`` in place of the ones it was written with."""
    kernel = np.asarray(weights.kernel, dtype=np.float32)
    num_features, bias = kernel.shape[0], weights.bias is not None
    if kernel.shape != (num_features, 1):
        raise Unusable(f"kernel of shape {kernel.shape}")
    layout = Layout(files[INDEX], num_features, bias)
    values = {"kernel": kernel.astype("<f4").tobytes()}
    if bias:
        values["bias"] = np.asarray(weights.bias, dtype=np.float32).reshape(1).astype("<f4").tobytes()
    data, index = bytearray(files[DATA]), bytearray(files[INDEX])
    for name, raw in values.items():
        offset, size, crc_at, _ = layout.tensors[name]
        if offset + size > len(data) or size != len(raw):
            raise Unusable(f"{name}: {size} bytes at {offset} do not fit the data file")
        data[offset : offset + size] = raw
        struct.pack_into("<I", index, crc_at, _masked_crc32c(raw))
    for offset, size in {v[3] for v in layout.tensors.values()}:
        struct.pack_into("<I", index, offset + size + 1, _masked_crc32c(bytes(index[offset : offset + size + 1])))
    out = dict(files)
    out[DATA], out[INDEX] = bytes(data), bytes(index)
    out["fingerprint.pb"] = _fingerprint(files["fingerprint.pb"], out[INDEX])
    return out


def _write(files: dict[str, bytes], directory: str) -> None:
    for name in DIRS:
        os.makedirs(os.path.join(directory, name), exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)


def write_local(weights: LinearWeights, directory: str, definition: str) -> None:
    """Write the SavedModel of ``weights`` into the new local ``directory`` from the cached template."""
    num_features, bias = int(np.asarray(weights.kernel).shape[0]), weights.bias is not None
    source = template_dir(num_features, bias, definition)
    try:
        with open(os.path.join(source, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise Unusable(f"no template for d = {num_features} ({'bias' if bias else 'no bias'})") from None
    if not isinstance(meta, dict) or meta.get("key") != os.path.basename(source) or meta.get("format") != FORMAT:
        raise Unusable(f"{source}: a template that is not this one")
    _write(render(_read(source), weights), directory)


def export(weights: LinearWeights, uri: str, definition: str) -> None:
    """Write the SavedModel to ``uri`` (local dir or ``s3://``) from the template; :class:`Unusable` if none fits."""
    from fedlinear.common import storage

    with tempfile.TemporaryDirectory(prefix="fedlinear-export-") as tmp:
        path = os.path.join(tmp, "model")
        write_local(weights, path, definition)
        storage.publish_dir(path, uri)


def _equal_but_uuid(rendered: dict[str, bytes], written: dict[str, bytes]) -> bool:
    def without_uuid(fingerprint: bytes) -> bytes:
        return b"".join(fingerprint[s:e] for n, _, s, _, e in _fields(fingerprint) if n != 7)

    return all(rendered[n] == written[n] for n in FILES if n != "fingerprint.pb") and without_uuid(
        rendered["fingerprint.pb"]
    ) == without_uuid(written["fingerprint.pb"])


def probe_weights(num_features: int, bias: bool) -> LinearWeights:
    """The weights a template is made with (any will do; distinct values catch a misplaced offset)."""
    kernel = (np.arange(1, num_features + 1, dtype=np.float32) * np.float32(0.5) - np.float32(0.25)).reshape(-1, 1)
    return LinearWeights(kernel=kernel, bias=np.array([-1.5], np.float32) if bias else None)


def adopt(directory: str, weights: LinearWeights, definition: str, tensorflow: str) -> str:
    """Keep the SavedModel TensorFlow ``tensorflow`` (its ``__version__``) just wrote to the local ``directory``
    (its process's first export: later ones number their functions differently) with ``weights`` as the
    template of its shape, if writing ``weights`` from it reproduces it exactly; the template's path.
    :class:`Unusable` if it is not kept."""
    if tensorflow != tensorflow_version():
        raise Unusable(f"TensorFlow {tensorflow} is not the installed distribution's {tensorflow_version()}")
    num_features, bias = int(np.asarray(weights.kernel).shape[0]), weights.bias is not None
    target = template_dir(num_features, bias, definition)
    written = _read(directory)
    if not _equal_but_uuid(render(written, weights), written):
        raise Unusable("writing the weights again does not reproduce TensorFlow's files")
    if os.path.isdir(target):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=cache_root())
    try:
        _write(written, staging)
        meta = {"key": os.path.basename(target), "format": FORMAT, "tensorflow": tensorflow,
                "num-features": num_features, "bias": bias}  # fmt: skip
        with open(os.path.join(staging, META), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(staging, target)
        except OSError:  # another run made it first: theirs is as good
            if not os.path.isdir(target):
                raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def create_in_subprocess(num_features: int, bias: bool, nice: bool = False, timeout: float = CREATE_TIMEOUT_S) -> None:
    """Make the template in a fresh interpreter (TensorFlow's first export there, so its function names are
    a fresh process's), at a lower priority if ``nice``; :class:`Unusable` with the reason if it could not."""
    argv = [sys.executable, "-m", "fedlinear.common.export", "template", str(int(num_features))]
    argv += ([] if bias else ["--no-bias"]) + (["--nice"] if nice else [])
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unusable(f"cannot make the template ({type(exc).__name__})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise Unusable(f"cannot make the template: {last[:300]}")
