"""The standardization statistics of a central DP-FedAvg run, released once with Gaussian noise before
round 1 and accounted in the run's ε (the encoding and its sensitivity: common/dpstats.py; when it
applies and the budget split: server/privacy.py :func:`~server.privacy.releases_statistics`).

Every party of the shard query is asked (stage ``dp-statistics``); each reply is validated
(:func:`common.dpstats.check_reply`: shape, finite, inside the bounded encoding) and a party whose
reply fails is left out of the run, as a malformed shard reply is (server/nodes.py), so nothing it
sends can raise the sum's sensitivity. The server, trusted as in central DP (it sees each party's
update too), adds ``N(0, z_s² I)`` to the sum of the ``m`` valid encodings, decodes, and forgets the
encodings; the Gaussian event (``z_s``, ``m`` of ``m`` parties) goes to the run's accountant.
"""

from __future__ import annotations

import dataclasses

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedlinear.common import dpstats, protocol, scaling
from fedlinear.common import privacy as common_privacy
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import nodes, progress


@dataclasses.dataclass(frozen=True)
class Released:
    """The released statistics and the one Gaussian event they cost."""

    stats: scaling.PooledStats
    noise_multiplier: float
    parties: int


def release(grid: Grid, cfg: RunConfig, parties: nodes.Parties, noise_multiplier: float) -> Released:
    """Ask every healthy party for its encoding, validate, sum, noise, decode."""
    k = parties.num_features + 1
    order = parties.in_key_order()

    def request() -> RecordDict:
        return RecordDict({protocol.RECORD_CONFIG: ConfigRecord({protocol.KEY_STAGE: protocol.STAGE_DP_STATISTICS})})

    answers = nodes.ask_each(grid, {nid: request() for nid in order}, cfg.round_timeout, "DP statistics query")
    vectors = []
    for nid in order:
        msg = answers[nid]
        if isinstance(msg, str):
            reason = msg
        else:
            vector = nodes.valid_vector(
                msg.content.array_records.get(protocol.RECORD_DP_STATISTICS), protocol.ARRAY_DP_STATISTICS, (2 * k,)
            )
            reason = dpstats.check_reply(vector, k)
            if reason is None:
                vectors.append(vector)
                continue
        parties.failures.append({"node-id": nid, "reason": reason})
        progress.say(f"node {nid} left out: {reason}")
        del parties.healthy[nid]
    if not vectors:
        raise FedLinearError("no node answered the DP statistics query")
    rng = common_privacy.noise_rng(cfg.dp_noise_seed, cfg.seed, dpstats.STREAM)
    noisy = dpstats.release(vectors, noise_multiplier, rng)
    count = sum(int(info[protocol.SHARD_NUM_EXAMPLES]) for info in parties.healthy.values())
    stats = dpstats.decode(noisy, len(vectors), count, cfg.dp_statistics_max_scale)
    progress.say(
        f"privacy: standardization statistics of {len(vectors)} parties released once with Gaussian noise "
        f"(z_s = {noise_multiplier:.4g}, {cfg.dp_statistics_share:g} of the budget), accounted in ε"
    )
    return Released(stats, noise_multiplier, len(vectors))
