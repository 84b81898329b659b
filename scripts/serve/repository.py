"""The models a server serves, their versions, and the hot swap.

Each model has a :class:`Snapshot`: an immutable record of its loaded versions, its labels and the
versions that failed to load. A request reads ``repository.snapshot(name)`` once and is answered from
that object alone, so it is answered wholly by one version even while a poll swaps in the next
snapshot (a single reference assignment).

Polling (every ``--poll-seconds``, like TF Serving's ``--file_system_poll_wait_seconds``) lists the
complete versions of every base path (:func:`common.modelrepo.list_versions`), loads the versions
the policy wants that are not loaded yet, and publishes a new snapshot only after they loaded. A
version that fails to load is recorded (state ``END``, its error in the status endpoint, one log
line) and never replaces a good one; it is retried only when its files change.

Policies (TF Serving's ``model_version_policy``): ``latest`` (default: the newest version that loads,
plus any version a label names), ``all``, ``specific:1,3``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable

from fedlinear.common import modelrepo, storage
from fedlinear.common.errors import FedLinearError, one_line
from fedlinear.scripts.serve import loader


@dataclasses.dataclass(frozen=True)
class Policy:
    kind: str  # latest | all | specific
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Policy:
        kind, _, rest = text.partition(":")
        if kind in ("latest", "all") and not rest:
            return cls(kind)
        if kind == "specific" and rest:
            try:
                versions = tuple(sorted({int(v) for v in rest.split(",")}))
            except ValueError:
                versions = ()
            if versions and min(versions) > 0:
                return cls(kind, versions)
        raise FedLinearError(f"--version-policy: expected latest, all or specific:N[,M...], got '{text}'")


@dataclasses.dataclass(frozen=True)
class Failure:
    version: int
    message: str
    files: tuple  # the listing it failed on (retry when it changes)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one model serves right now (never mutated: replaced whole)."""

    name: str
    versions: dict[int, loader.Servable]
    labels: dict[str, int]
    failures: dict[int, Failure]
    loading: tuple[int, ...] = ()

    @property
    def latest(self) -> loader.Servable | None:
        return self.versions[max(self.versions)] if self.versions else None

    def resolve(self, version: int | None, label: str | None) -> loader.Servable:
        """The servable a request names; FedLinearError("...not found...") otherwise (HTTP 404)."""
        if label is not None:
            if label not in self.labels:
                raise NotFound(f"Unrecognized servable version label: {label} (model {self.name})")
            version = self.labels[label]
        if version is None:
            if not self.versions:
                raise NotFound(f"Servable not found for request: Latest({self.name})")
            return self.latest
        if version not in self.versions:
            raise NotFound(f"Servable not found for request: Specific({self.name}, {version})")
        return self.versions[version]


class NotFound(FedLinearError):
    """A model, version or label that is not served (HTTP 404)."""


@dataclasses.dataclass
class ModelSource:
    name: str
    located: modelrepo.Located
    policy: Policy
    labels: dict[str, int]


def parse_models(items: list[str], policy: Policy, labels: list[str]) -> list[ModelSource]:
    """``MODEL`` / ``NAME=MODEL`` arguments and ``--label [NAME:]LABEL=N`` into sources."""
    sources: list[ModelSource] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or ":" in name:
            name, path = "", item
        uri = path if storage.is_s3(path) else os.path.abspath(os.path.expanduser(path))
        located = modelrepo.locate(uri)
        if not name:
            name = _default_name(located)
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise FedLinearError(f"{item}: model name '{name}' must be letters, digits, '-', '_' or '.' (NAME=PATH)")
        if any(s.name == name for s in sources):
            raise FedLinearError(f"{item}: a second model named '{name}': give each one NAME=PATH")
        sources.append(ModelSource(name, located, policy, {}))
    for text in labels or []:
        target, sep, number = text.rpartition("=")
        model, _, label = target.rpartition(":")
        if not sep or not label or not number.isdigit() or int(number) < 1:
            raise FedLinearError(f"--label: expected [MODEL:]LABEL=VERSION (e.g. stable=1), got '{text}'")
        chosen = [s for s in sources if s.name == model] if model else sources
        if model and not chosen:
            raise FedLinearError(f"--label {text}: no model named '{model}'")
        for source in chosen:
            source.labels[label] = int(number)
    return sources


def _default_name(located: modelrepo.Located) -> str:
    parts = [p for p in located.uri.replace("s3://", "").split("/") if p]
    if located.kind == "model" and len(parts) > 1 and parts[-1] == "model":
        parts = parts[:-1]  # RUN_DIR/model: the run's name
    return parts[-1] if parts else "model"


class Repository:
    """Every served model's snapshot, and the poller that keeps them current."""

    def __init__(self, sources: list[ModelSource], say: Callable[[str], None] = print) -> None:
        self.sources = {s.name: s for s in sources}
        self.say = say
        self._snapshots: dict[str, Snapshot] = {s.name: Snapshot(s.name, {}, {}, {}) for s in sources}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    # reading (request threads) ----------------------------------------------------------
    def snapshot(self, name: str) -> Snapshot:
        snap = self._snapshots.get(name)
        if snap is None:
            raise NotFound(f"Servable not found for request: Latest({name})")
        return snap

    def names(self) -> list[str]:
        return list(self._snapshots)

    def ready(self) -> bool:
        return all(snap.versions for snap in self._snapshots.values())

    # polling (one thread) ---------------------------------------------------------------
    def _candidates(self, source: ModelSource) -> dict[int, tuple[str, tuple]]:
        """``{version: (uri, listing)}`` this model's source offers now."""
        located = source.located
        if located.kind != "base":
            return {1: (located.model_uri(), ())}
        children = modelrepo._children(located.uri)
        out = {}
        for version in modelrepo.list_versions(located.uri):
            out[version] = (modelrepo.version_uri(located.uri, version), tuple(sorted(children.get(version, ()))))
        return out

    def _load(self, name, version, offered, versions, failures) -> bool:
        """Load one version into ``versions`` (True) or record its failure in ``failures`` (False)."""
        uri, listing = offered[version]
        failed = failures.get(version)
        if failed is not None and failed.files == listing:
            return False  # failed on these very files: retried once they change
        try:
            versions[version] = loader.load(name, version, uri, say=self.say)
        except Exception as exc:  # noqa: BLE001 - a broken version is reported, never fatal
            message = one_line(exc)
            failures[version] = Failure(version, message, listing)
            keep = f"; still serving version {max(versions)}" if versions else ""
            self.say(f"fedlinear serve: {name} version {version} failed to load: {message}{keep}")
            return False
        failures.pop(version, None)
        self.say(f"fedlinear serve: {name} version {version} loaded from {uri} (engine {versions[version].default.engine})")
        return True

    def poll_model(self, name: str) -> None:
        source, snap = self.sources[name], self._snapshots[name]
        if source.located.kind != "base" and snap.versions:
            return  # a run or model directory is one version, loaded once
        try:
            offered = self._candidates(source)
        except FedLinearError as exc:
            if self.polls == 0:
                raise
            self.say(f"fedlinear serve: {name}: cannot list {source.located.uri}: {one_line(exc)}")
            return
        versions, failures = dict(snap.versions), dict(snap.failures)
        pinned = {v for v in source.labels.values() if v in offered}
        if source.policy.kind == "latest":
            keep = set(pinned)
            for version in sorted(offered, reverse=True):  # the newest version that loads
                if version in versions or self._load(name, version, offered, versions, failures):
                    keep.add(version)
                    break
        elif source.policy.kind == "all":
            keep = set(offered)
        else:
            keep = {v for v in offered if v in source.policy.versions}
        for version in sorted(keep):
            if version not in versions:
                self._load(name, version, offered, versions, failures)
        # a version left by the policy, or removed from the base path, is unloaded (as TF Serving does)
        versions = {v: s for v, s in versions.items() if v in keep}
        failures = {v: f for v, f in failures.items() if v in offered}
        labels = {label: v for label, v in source.labels.items() if v in versions}
        self._snapshots[name] = Snapshot(name, versions, labels, failures)  # the swap: one assignment

    def poll(self) -> None:
        for name in list(self.sources):
            self.poll_model(name)
        self.polls += 1

    def start(self, poll_seconds: float) -> None:
        if poll_seconds <= 0 or not any(s.located.kind == "base" for s in self.sources.values()):
            return

        def loop() -> None:
            while not self._stop.wait(poll_seconds):
                try:
                    self.poll()
                except Exception as exc:  # noqa: BLE001 - the poller must outlive any one failure
                    self.say(f"fedlinear serve: poll failed: {one_line(exc)}")

        self._thread = threading.Thread(target=loop, name="fedlinear-serve-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
