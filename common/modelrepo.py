"""Where exported models live after a run: run directories, model directories and versioned base paths.

Three kinds of ``MODEL`` URI (local path or ``s3://``), told apart by what is there:

* a **model directory**: a SavedModel (``saved_model.pb``), e.g. ``RUN_DIR/model``;
* a **run directory**: ``manifest.json`` + ``model/`` (what ``fedlinear run --out`` writes);
* a **base path** in TensorFlow Serving's layout: numbered children ``BASE/1``, ``BASE/2``, ... each a
  SavedModel (what ``fedlinear run --publish BASE`` writes, and what TF Serving's ``--model_base_path``
  reads).

A published version is ``BASE/N/`` holding the SavedModel plus :data:`VERSION_INFO`
(``fedlinear-version.json``: the raw-space weights, the standardization, the parent run and lineage,
SHA-256 hashes of every model file). Publishing is atomic, so a reader never sees half a version:

* locally the version is assembled in a hidden staging directory beside the versions, the number
  ``N`` is claimed with ``mkdir BASE/N`` (which fails if another publisher took it) and the staging
  directory is renamed over the empty claim in one ``rename(2)``: ``BASE/N`` is empty (not a
  version: no ``saved_model.pb``) or complete;
* on S3, which has no rename, the files are uploaded under ``BASE/N/`` (``saved_model.pb`` last, as
  :func:`common.s3.publish_dir` does) and :data:`VERSION_INFO` is written **after every other
  object**: a version counts on S3 only once its ``fedlinear-version.json`` exists (its file list and
  hashes are then checked against the objects). A crashed upload leaves a prefix without it, which
  readers skip and the next publish does not reuse.

Nothing here imports TensorFlow or Flower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError

VERSION_INFO = "fedlinear-version.json"
SAVED_MODEL = "saved_model.pb"
MANIFEST = "manifest.json"
_VERSION_NAME = re.compile(r"^[0-9]{1,18}$")


@dataclasses.dataclass(frozen=True)
class Located:
    """What a ``MODEL`` URI is: ``kind`` in ``model | run | base``; ``uri`` the URI given (normalised)."""

    kind: str
    uri: str

    def model_uri(self) -> str:
        return storage.join(self.uri, "model") if self.kind == "run" else self.uri


def _strip(uri: str) -> str:
    return uri.rstrip("/") if len(uri) > 1 else uri


def _relative(files: list[str], base: str) -> list[str]:
    root = _strip(base) + "/"
    return [f[len(root) :] if f.startswith(root) else os.path.relpath(f, base) for f in files]


def locate(uri: str) -> Located:
    """Classify ``uri`` (one line naming it, and what was expected, when it is none of the three)."""
    uri = _strip(uri)
    if storage.is_s3(uri):
        names = set(_relative(storage.list_tree(uri + "/"), uri))
    else:
        if not os.path.isdir(uri):
            raise FedLinearError(f"{uri}: no such directory (expected a run directory, a model directory or a base path)")
        names = {n.replace(os.sep, "/") for n in _relative(storage.list_tree(uri), uri)}
    if SAVED_MODEL in names:
        return Located("model", uri)
    if f"model/{SAVED_MODEL}" in names:
        return Located("run", uri)
    if any(_VERSION_NAME.match(n.split("/", 1)[0]) for n in names if "/" in n) or not names:
        return Located("base", uri)
    raise FedLinearError(
        f"{uri}: not a model: no {SAVED_MODEL}, no model/{SAVED_MODEL} (run directory) and no numbered "
        "version folders BASE/1, BASE/2, ... (base path)"
    )


def version_uri(base: str, version: int) -> str:
    return storage.join(_strip(base), str(version))


def _children(base: str) -> dict[int, set[str]]:
    """Numbered children of a base path and the file names (relative) under each."""
    out: dict[int, set[str]] = {}
    if storage.is_s3(base):
        for rel in _relative(storage.list_tree(_strip(base) + "/"), base):
            head, _, rest = rel.partition("/")
            if rest and _VERSION_NAME.match(head):
                out.setdefault(int(head), set()).add(rest)
        return out
    if not os.path.isdir(base):
        return out
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if _VERSION_NAME.match(name) and os.path.isdir(path):
            out[int(name)] = set(os.listdir(path))
    return out


def list_versions(base: str) -> list[int]:
    """The complete versions under a base path, ascending.

    Locally a numbered folder with ``saved_model.pb`` (publishing renames it into place whole); on S3 a
    numbered prefix with :data:`VERSION_INFO` (written last) or, for trees written by other tools,
    ``saved_model.pb`` only when no version there carries the marker (see :func:`common.s3.publish_dir`).
    """
    children = _children(base)
    if not storage.is_s3(base):
        return sorted(v for v, names in children.items() if SAVED_MODEL in names)
    marked = {v for v, names in children.items() if VERSION_INFO in names}
    if marked:
        return sorted(marked)
    return sorted(v for v, names in children.items() if SAVED_MODEL in names)


def model_digest(local_dir: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a SavedModel directory (``VERSION_INFO`` excluded)."""
    out = {}
    for root, _dirs, names in os.walk(local_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            if rel == VERSION_INFO:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda h=handle: h.read(1 << 20), b""):
                    digest.update(block)
            out[rel] = digest.hexdigest()
    return dict(sorted(out.items()))


def tree_hash(files: dict[str, str]) -> str:
    """One SHA-256 for a model: over its sorted ``path sha256`` lines."""
    return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def read_json(uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        value = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FedLinearError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FedLinearError(f"{uri}: expected a JSON object")
    return value


def run_info(run_dir: str) -> dict[str, Any]:
    """What a version records about the run that produced it (from ``manifest.json``)."""
    manifest = read_json(storage.join(run_dir, MANIFEST)) or {}
    keep = ("run-id", "num-features", "weights", "exported-weights", "standardization", "lineage", "final", "reference")
    info = {k: manifest[k] for k in keep if k in manifest}
    info["run-dir"] = run_dir
    return info


def publish(model_dir: str, base: str, info: dict[str, Any]) -> tuple[int, str]:
    """Publish the local SavedModel directory ``model_dir`` as the next version under ``base``.

    Returns ``(version, uri)``. ``info`` (JSON-able) goes into :data:`VERSION_INFO` with the version
    number, the time and the model's file hashes.
    """
    base = _strip(base)
    if not os.path.isfile(os.path.join(model_dir, SAVED_MODEL)):
        raise FedLinearError(f"{model_dir}: not a SavedModel (no {SAVED_MODEL}), nothing to publish")
    files = model_digest(model_dir)
    for attempt in range(1000):
        existing = _children(base)
        version = max(existing, default=0) + 1 + (attempt if storage.is_s3(base) else 0)
        record = {
            "version": version, "published-at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **info, "files": files, "model-sha256": tree_hash(files),
        }  # fmt: skip
        text = json.dumps(record, indent=2) + "\n"
        if storage.is_s3(base):
            uri = version_uri(base, version)
            if version in existing:
                continue
            storage.publish_dir(model_dir, uri)  # saved_model.pb last
            storage.write_text(storage.join(uri, VERSION_INFO), text)  # the marker: last of all
            return version, uri
        os.makedirs(base, exist_ok=True)
        target = os.path.join(base, str(version))
        try:
            os.mkdir(target)  # claims the number: fails if another publisher took it
        except FileExistsError:
            continue
        staging = tempfile.mkdtemp(dir=base, prefix=f".publish-{version}-")
        try:
            shutil.rmtree(staging)
            shutil.copytree(model_dir, staging)
            with open(os.path.join(staging, VERSION_INFO), "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_tree(staging)  # the files are on disk before the rename makes them a version
            os.replace(staging, target)  # an empty directory is replaced whole, in one rename
            storage._fsync_dir(base)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if os.path.isdir(target) and not os.listdir(target):
                os.rmdir(target)
            raise
        return version, target
    raise FedLinearError(f"{base}: could not claim a free version number")


def _fsync_tree(root: str) -> None:
    for path, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        storage._fsync_dir(path)


@dataclasses.dataclass(frozen=True)
class Origin:
    """A model a run continues from (``init-from``): where it is, its version, its recorded facts."""

    uri: str  # the SavedModel directory
    kind: str  # model | run | base
    given: str
    version: int | None
    info: dict[str, Any]  # fedlinear-version.json, or the run's manifest facts, or {}

    def lineage(self, files: dict[str, str]) -> dict[str, Any]:
        """The manifest's ``lineage`` entry for a run started from this model."""
        parent = {
            "init-from": self.given,
            "model": self.uri,
            "kind": self.kind,
            "version": self.version,
            "run-id": self.info.get("run-id"),
            "run-dir": self.info.get("run-dir"),
            "model-sha256": tree_hash(files) if files else None,
            "files": files,
        }
        ancestors = list((self.info.get("lineage") or {}).get("ancestors", []))
        previous = self.info.get("lineage") or {}
        if previous.get("parent"):
            ancestors = [previous["parent"], *ancestors]
        return {"parent": parent, "ancestors": [{k: v for k, v in a.items() if k != "files"} for a in ancestors]}


def origin(uri: str, version: int | None = None) -> Origin:
    """Resolve ``init-from``: a run directory, a model directory, a base path (its newest version) or
    ``BASE/N``."""
    located = locate(uri)
    if located.kind == "base":
        versions = list_versions(located.uri)
        if not versions:
            raise FedLinearError(f"{uri}: a base path with no published version (no {located.uri}/N/{SAVED_MODEL})")
        chosen = versions[-1] if version is None else version
        model = version_uri(located.uri, chosen)
        return Origin(model, "base", uri, chosen, read_json(storage.join(model, VERSION_INFO)) or {})
    if located.kind == "run":
        return Origin(located.model_uri(), "run", uri, None, run_info(located.uri))
    info = read_json(storage.join(located.uri, VERSION_INFO))
    name = located.uri.rsplit("/", 1)[-1]
    if info is not None:  # BASE/N given directly
        return Origin(located.uri, "base", uri, int(info.get("version", name if name.isdigit() else 0)) or None, info)
    parent = located.uri.rsplit("/", 1)[0]
    if name == "model" and storage.exists(storage.join(parent, MANIFEST)):  # RUN_DIR/model
        return Origin(located.uri, "run", uri, None, run_info(parent))
    return Origin(located.uri, "model", uri, None, {})


def publish_run(run_dir: str, base: str) -> tuple[int, str]:
    """Publish a finished run's ``model/`` as the next version under ``base`` (with the run's facts)."""
    with storage.local_copy_of_dir(storage.join(run_dir, "model")) as path:
        return publish(path, base, run_info(run_dir))
