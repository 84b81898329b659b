"""DP-FedOLS under secure aggregation (``strategy = fedols``, ``dp = central-client-clip``,
``secure-aggregation = true``): the parties' clipped sums go through SecAgg+ (server/dpols.py
``secure_total``, server/secure.py ``secure_sum``, clients/secure.py's ``dpols-gram`` statistic), the
server noises the pooled sum once.

In-process, the real ServerApp against the real ClientApp handlers and mods (test_secure.py's
:class:`SecureGrid`). Checked: the same seed gives the clear path's release up to the fixed-point
rounding, with the very same noise draws and the same ε; no reply the server received holds a party's
clipped sums or their unmasked limbs; a malformed masked vector and a dropout leave that party out and
the run goes on; a node under its own secure config refuses the clear query.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fedlinear.common import dpols, fixedpoint
from fedlinear.common.config import RunConfig
from fedlinear.server import dpols as server_dpols
from fedlinear.server import secure
from tests.inprocess import drive, run_in_process, write_synthetic_shards
from tests.integration.test_secure import SecureGrid, numbers
from tests.integration.test_secure_stats import StatSpy, found_in, masked_replies

DP = {"strategy": "fedols", "dp": "central-client-clip", "dp-noise-multiplier": 1.3}
CLIENTS = 4
SIZES = (300, 400, 500, 600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fedlinear.scripts.cli.run import write_local_statistics

    root = tmp_path_factory.mktemp("dpols-secure")
    uris, test = write_synthetic_shards(root, CLIENTS, max(SIZES), 6, 17, 500, SIZES)
    stats = write_local_statistics(uris, os.path.join(str(root), "stats.npz"), RunConfig())
    return uris, test, stats


def settings(data, **extra):
    uris, test, stats = data
    return {**DP, "test-uri": test, "statistics-uri": stats, "dp-public-statistics": True, "seed": 7, **extra}


class Releases:
    """Every call of :func:`common.dpols.adassp`: the total it noised and its generator's state before."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[np.ndarray, dict]] = []
        real = dpols.adassp

        def adassp(gram, bx, by, z, rng):
            self.calls.append((np.array(gram), copy.deepcopy(rng.bit_generator.state)))
            return real(gram, bx, by, z, rng)

        monkeypatch.setattr(dpols, "adassp", adassp)


def run_secure(uris, run_dir, grid_class=SecureGrid, **config):
    run_config = {"run-dir": str(run_dir), "min-available-nodes": len(uris), "secure-aggregation": True, **config}
    grid = grid_class(uris, run_config)
    store = drive(grid, run_config)
    return grid, store


def test_config_accepts_dp_fedols_with_secure_aggregation():
    cfg = RunConfig.from_run_config({**DP, "secure-aggregation": True})
    assert cfg.private and cfg.secure_aggregation


def test_same_seed_same_release_as_the_clear_path_up_to_the_fixed_point_rounding(data, tmp_path, monkeypatch):
    """The clear run and the secure run of one seed: the noise generator is in the same state when the
    release draws (identical draws), the noised total differs from the clear sum only by the windows'
    rounding (at most half a grid step per party and entry, plus float64's own rounding of the clear
    sum), the model agrees to 1e-9, and ε is the same number."""
    uris, test, stats = data
    releases = Releases(monkeypatch)
    status, clear = run_in_process(uris, str(tmp_path / "clear"), **settings(data))
    assert status["status"] == "completed", status
    _, store = run_secure(uris, tmp_path / "secure", **settings(data))
    assert store.read_status()["status"] == "completed"
    secure_manifest = store.read_manifest()
    (clear_total, clear_state), (secure_total, secure_state) = releases.calls
    assert clear_state == secure_state  # the same generator state: the same noise draws
    d = clear_total.shape[0] - 2
    bx, by = secure_manifest["fedols"]["feature-bound"], secure_manifest["fedols"]["target-bound"]
    assert (bx, by) == (clear["fedols"]["feature-bound"], clear["fedols"]["target-bound"])
    hi = server_dpols.gram_windows(d, bx, by, max(SIZES))
    lo = hi - fixedpoint.PRECISION_BITS
    step = np.zeros((d + 2, d + 2))
    step[np.triu_indices(d + 2)] = 2.0 ** (lo - 1) * CLIENTS  # half a grid step per party
    step = np.maximum(step, step.T)
    row = np.concatenate([np.full(d, bx), [1.0, by]])
    magnitude = sum(SIZES) * np.outer(row, row)  # bounds Σ_p |G_p| entrywise (clipped rows)
    assert secure_manifest["fedols"]["clipping-space"] == clear["fedols"]["clipping-space"]
    tolerance = step + 4 * CLIENTS * np.finfo(np.float64).eps * magnitude
    difference = np.abs(secure_total - clear_total)
    assert (difference <= tolerance).all(), (difference / tolerance).max()
    print(f"secure vs clear total: max |difference| {difference.max():.3g}, max relative {(difference / np.maximum(magnitude, 1e-300)).max():.3g}")
    assert secure_total[d, d] == clear_total[d, d] == sum(SIZES)  # the count is exact
    np.testing.assert_allclose(secure_manifest["weights"]["kernel"], clear["weights"]["kernel"], rtol=1e-9, atol=1e-12)
    assert secure_manifest["weights"]["bias"] == pytest.approx(clear["weights"]["bias"], rel=1e-9)
    assert secure_manifest["privacy"]["epsilon"] == clear["privacy"]["epsilon"]
    assert secure_manifest["fedols"]["ridge"] == pytest.approx(clear["fedols"]["ridge"], rel=1e-9, abs=1e-12)
    assert secure_manifest["fedols"]["noise-stddevs"] == clear["fedols"]["noise-stddevs"]
    assert "SecAgg+" in secure_manifest["fedols"]["sums"] and "in the clear" in clear["fedols"]["sums"]


def test_the_server_never_holds_a_party_clipped_sum(data, tmp_path, monkeypatch):
    """Every clipped Gram matrix a party computed for the secure sum, and the exact digits it handed
    SecAgg+, are recorded on the client side; no number vector the ServerApp received holds any of them
    (whole, by limb in either order, or as a run of consecutive values), no reply carries an ArrayRecord,
    and the masked limbs are spread over [0, 2**32). As a control, the clear run's replies hold every
    party's clipped sums."""
    uris = data[0]
    spy = StatSpy(monkeypatch)
    grid, store = run_secure(uris, tmp_path / "run", **settings(data))
    assert store.read_status()["status"] == "completed"
    assert [what for what, _ in spy.values] == ["gram"] * CLIENTS
    received = [v.astype(np.float64) for v in numbers(grid.received) if v.size >= 2]
    for _, value in spy.values:
        assert not found_in(received, value), "a party's clipped sums reached the server"
        assert not found_in(received, value[1:]), "a party's clipped sums (all but the first) reached the server"
    for _, digits in spy.digits:
        for flat in (digits.ravel(order="C"), digits.ravel(order="F")):
            assert not found_in(received, flat.astype(np.float64)), "a party's unmasked limbs reached the server"
    assert all(len(record) == 0 for msg in grid.received if msg.has_content() for record in msg.content.array_records.values())
    masked = [v for msg in masked_replies(grid.received) for v in numbers([msg]) if v.dtype.kind in "iu" and v.size >= 16]
    assert len(masked) == CLIENTS and all(v.max() > 2**30 for v in masked)

    grids: list = []
    status, _ = run_in_process(uris, str(tmp_path / "clear"), grids=grids, **settings(data))
    assert status["status"] == "completed"
    clear_received = [m.content["gram"]["gram"].numpy().ravel() for m in grids[0].received if "gram" in m.content.array_records]
    assert len(clear_received) == CLIENTS  # the clear path: each party's (d+2)² clipped sums ...
    for _, value in spy.values:  # ... the very matrices the secure run's parties masked
        size = int(round((np.sqrt(8 * value.size + 1) - 1) / 2))
        full = np.zeros((size, size))
        full[np.triu_indices(size)] = value
        full = full + np.triu(full, 1).T
        assert found_in(clear_received, full.ravel())


class Tampered(SecureGrid):
    """Node 1001's masked vector is replaced at stage 3 by ``Tampered.payload(original bytes list)``."""

    payload = staticmethod(lambda arrays: arrays)

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            configs = reply.content.config_records.get(RECORD_KEY_CONFIGS) if reply.has_content() else None
            if reply.metadata.src_node_id == 1001 and configs is not None and Key.MASKED_PARAMETERS in configs:
                configs[Key.MASKED_PARAMETERS] = type(self).payload(list(configs[Key.MASKED_PARAMETERS]))
        return replies


def _arrays(payload):
    from fedlinear.common import npy

    return [npy.loads(b) for b in payload]


TAMPERS = {
    "wrong shape": (lambda p: p[:1] + [ndarray_to_bytes(_arrays(p)[1][:-1])], "is int64"),
    "float limbs": (lambda p: p[:1] + [ndarray_to_bytes(_arrays(p)[1].astype(np.float64))], "is float64"),
    "one array missing": (lambda p: p[:1], "1 arrays, expected 2"),
    "a broadcasting scalar": (lambda p: p[:1] + [ndarray_to_bytes(np.array([5], np.int64))], "expected int64"),
    "values beyond the modulus": (lambda p: p[:1] + [ndarray_to_bytes(_arrays(p)[1] + 2**33)], "outside [0, 2**32)"),
    "oversized bytes": (lambda p: p[:1] + [p[1] + b"\0" * (1 << 20)], "not the .npy bytes"),
    "not an array": (lambda p: p[:1] + [b"\x93NUMPY garbage"], "cannot be decoded"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_malformed_masked_vector_leaves_that_party_out_and_the_run_goes_on(data, tmp_path, tamper):
    uris = data[0]
    payload, reason = TAMPERS[tamper]

    class Grid(Tampered):
        pass

    Grid.payload = staticmethod(payload)
    _, store = run_secure(uris, tmp_path / "run", grid_class=Grid, **settings(data, **{"secagg-timeout": 5}))
    assert store.read_status()["status"] == "completed", store.read_status()
    history = store.read_history()
    row = history["rounds"][0]
    assert [f["node-id"] for f in row["failures"]] == [1001]
    assert "malformed masked vector" in row["failures"][0]["reason"] and reason in row["failures"][0]["reason"]
    assert history["fedols"]["parties"] == 3 and history["fedols"]["num-examples"] == sum(SIZES) - SIZES[1]


def test_a_party_lost_in_the_sum_is_left_out_and_the_rest_go_on(data, tmp_path):
    """As the first of the secure statistics' sums: a node that dies before sharing its keys is left out,
    the total is the other three's (its count checked), and the release goes on."""
    uris = data[0]

    class Grid(SecureGrid):
        def __init__(self, u, run_config):
            super().__init__(u, run_config, silent={1003: "setup"}, silent_round=0)

    _, store = run_secure(uris, tmp_path / "run", grid_class=Grid, **settings(data, **{"secagg-timeout": 5}))
    assert store.read_status()["status"] == "completed"
    history = store.read_history()
    assert [f["node-id"] for f in history["rounds"][0]["failures"]] == [1003]
    assert "secagg-timeout" in history["rounds"][0]["failures"][0]["reason"]
    assert history["fedols"]["parties"] == 3 and history["fedols"]["num-examples"] == sum(SIZES[:3])


def test_a_node_under_secure_aggregation_refuses_the_clear_gram_query(data):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from tests.inprocess import InProcessGrid

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    uris = data[0]
    grid = InProcessGrid(uris[:1], {"data-uri": uris[0], **DP, "secure-aggregation": True})
    request = {"stage": "dpols-gram", "dp-feature-bound": 4.0, "dp-target-bound": 8.0}
    msg = Message(RecordDict({"config": ConfigRecord(request)}), dst_node_id=1000, message_type=MessageType.QUERY)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "secure-aggregation" in reply.error.reason and not reply.has_content()


def test_masked_vector_problem_accepts_an_honest_shape_only():
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Parameters, Status
    from flwr.compat.common import recorddict_compat as compat

    fitres = FitRes(Status(Code.OK, ""), Parameters([], ""), 1, {})
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    vector = [np.array([7], np.int64), np.arange(12, dtype=np.int64).reshape(3, 4)]
    content[RECORD_KEY_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in vector]})
    reply = Message(content, dst_node_id=0, message_type="train")
    assert secure.masked_vector_problem(reply, [(3, 4)]) is None
    assert "expected int64 (4, 3)" in secure.masked_vector_problem(reply, [(4, 3)])
