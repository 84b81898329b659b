"""``fedlinear run``'s checks that can refuse, all made before the first byte is written into the run directory.

In order: the run config (:class:`common.config.RunConfig`) and DP-FedOLS's budget, a run directory that already holds a completed
run, a checkpoint of a run with other settings or, for shards the user gave, trained on other shards
(:mod:`server.resume`: the same rules the ServerApp applies again with the data in hand), and, for the synthesised default data, a ``data/`` that already holds other
data. Only then is the lock taken and the data written (:meth:`SyntheticData.publish`). A refused
invocation leaves the run directory as it found it: no shard, no ``.lock``, no ``logs/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any

from fedlinear.common import storage
from fedlinear.common.errors import FedLinearError
from fedlinear.common.runstore import RunStore
from fedlinear.common.shards import CLIENT_FILE

# What `fedlinear run` synthesises when it is given no data.
SYNTH_FEATURES = 10
SYNTH_SAMPLES = 1000
SYNTH_NOISE = 0.1
SYNTH_TEST_SAMPLES = 2000


def refuse_completed(store: RunStore, out: str) -> dict[str, Any] | None:
    """Refuse a run directory whose status.json says completed; return the status found (None: none)."""
    previous = store.read_status()
    if previous is not None and previous.get("status") == "completed":
        raise FedLinearError(f"{out} already holds a completed run (status.json); choose another --out or remove it")
    return previous


def refuse_other_checkpoint(
    store: RunStore, cfg, num_features: int | None, shards: list[str] | None = None, test_uri: str = ""
) -> None:
    """Refuse a checkpoint of a run with other trajectory settings, after more rounds than this run has,
    or, given the ``shards`` this run trains on (user shards: ``--data``, ``--shard``, a template), trained
    on other data: the ServerApp's own rule (:func:`server.resume.refuse_other_data`) on the identity the
    nodes would describe (:func:`shard_identity`), so a refused run writes nothing."""
    from fedlinear.server import resume

    latest = store.read_latest_checkpoint()
    if latest is None:
        return
    pointer, _ = latest
    data = None
    if shards:
        data, num_features = shard_identity(shards, test_uri, cfg)
    resume.refuse_other_trajectory(store, pointer, cfg, num_features)
    if data is not None:
        resume.refuse_other_data(store, pointer, data)
    resume.refuse_fewer_rounds(store, pointer, cfg)


def shard_identity(shards: list[str], test_uri: str, cfg) -> tuple[dict[str, Any], int]:
    """(:func:`server.resume.data_identity` of these shards as ``fedlinear run``'s nodes describe them,
    the number of features). Each node's client key is its partition id, i.e. its place in ``shards``;
    the fingerprints are included whatever the privacy settings (the rule compares them only where the
    checkpoint recorded them, which a private run does not)."""
    import json

    from fedlinear.common import protocol
    from fedlinear.common.csvio import load_csv
    from fedlinear.server import resume

    described, features = {}, 0
    for i, uri in enumerate(shards):
        data = load_csv(uri, target_column=cfg.target_column, header=cfg.header)
        features = data.num_features
        described[i] = {
            protocol.SHARD_CLIENT_KEY: i,
            protocol.SHARD_NUM_EXAMPLES: data.num_examples,
            protocol.SHARD_FINGERPRINTS: [json.dumps(storage.fingerprint(src), sort_keys=True) for src in data.sources],
        }
    test = load_csv(test_uri, cfg.target_column, cfg.header) if test_uri else None
    return resume.data_identity(described, test), features


def refuse_over_budget(cfg) -> None:
    """Refuse a DP-FedOLS run whose one release would spend more than ``dp-max-epsilon`` (server/dpols.py)."""
    from fedlinear.server import dpols

    dpols.refuse_over_budget(cfg)


class SyntheticData:
    """The synthetic data ``fedlinear run`` trains on when given none: made in a private temporary
    directory first, compared with what ``RUN_DIR/data`` already holds, and written there only after every
    check has passed (:meth:`publish`). Data already there that is byte-for-byte what this run makes is
    kept as it is (a resumed run); other data there is refused, never overwritten or mixed with."""

    def __init__(self, data: str, clients: int, seed: int, heterogeneity) -> None:
        self.data, self.clients, self.seed, self.heterogeneity = data, clients, seed, heterogeneity
        self.shards = [storage.join(data, CLIENT_FILE.format(i=i)) for i in range(clients)]
        self.test_uri = storage.join(data, "test.csv")
        self.template = storage.join(data, CLIENT_FILE.format(i="{partition-id}"))
        self._tmp: str | None = None
        self._lines: list[str] = []
        self._missing: list[str] = []

    def stage(self) -> None:
        """Synthesise into a temporary directory and compare with ``data/``; refuse other data there."""
        from fedlinear.common.shards import write_synthetic

        self._tmp = tempfile.mkdtemp(prefix="fedlinear-synth-")
        self._lines = write_synthetic(
            self._tmp, self.clients, SYNTH_SAMPLES, SYNTH_FEATURES, SYNTH_NOISE, self.seed, SYNTH_TEST_SAMPLES,
            self.heterogeneity,
        )  # fmt: skip
        made = sorted(os.listdir(self._tmp))
        present = self._present()
        extra = sorted(set(present) - set(made))
        differ = [name for name in made if name in present and storage.read_bytes(present[name]) != self._bytes(name)]
        if extra or differ:
            self.discard()
            what = f"{extra[0]} is not part of it" if extra else f"{differ[0]} differs"
            raise FedLinearError(
                f"{self.data} holds other data than this run synthesises ({what}: another --clients, seed or "
                "heterogeneity option?); a run directory holds one run: choose another --out or remove it"
            )
        self._missing = [name for name in made if name not in present]

    def publish(self) -> None:
        """Write what ``data/`` lacks (everything, for a new run; nothing, for a resumed one)."""
        assert self._tmp is not None, "stage() first"
        try:
            if not self._missing:
                print(f"no --data given: the synthetic data already in {self.data} is what this run makes; kept as is")
                return
            print(
                f"no --data given: writing synthetic data (d={SYNTH_FEATURES}, {SYNTH_SAMPLES} samples per client, "
                f"noise {SYNTH_NOISE:g}) to {self.data}"
            )
            # shards and test set first, truth.json last: a data/ cut short by a crash is completed next time
            for name in sorted(self._missing, key=lambda name: name == "truth.json"):
                storage.write_bytes(storage.join(self.data, name), self._bytes(name))
            for line in self._lines:
                print(line.replace(self._tmp, self.data))
        finally:
            self.discard()

    def discard(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _bytes(self, name: str) -> bytes:
        with open(os.path.join(self._tmp, name), "rb") as handle:
            return handle.read()

    def _present(self) -> dict[str, str]:
        """The files ``data/`` holds now, by name (none if it does not exist)."""
        prefix = self.data if not storage.is_s3(self.data) else self.data.rstrip("/") + "/"
        with contextlib.suppress(FedLinearError):  # a local data/ that does not exist
            return {uri.rsplit("/", 1)[-1]: uri for uri in storage.list_uris(prefix)}
        return {}
