"""The privacy side of a run: strategy wrappers from Flower 1.42, the accountant, the budget.

* ``central-server-clip`` / ``central-client-clip``: Flower's
  ``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping`` around FedAvg, with
  Flower's ``RdpAccountant`` (Google's dp-accounting underneath). Client-level guarantee, add-or-remove
  one client, **no sampling amplification**: Flower's fixed-size sampling without replacement is not
  Poisson, and its wrappers accept only ``no-amplification`` accounting, so every round is charged as
  a full Gaussian release with noise multiplier z whatever ``fraction-train`` is. The reported ε is
  therefore valid (an upper bound) for any ``fraction-train``; with ``fraction-train < 1`` it is
  conservative.
* ``local``: clients clip and noise their own update (common/privacy.py); the server composes one
  Gaussian release with noise multiplier z per round (each client releases at most once a round), with
  the same accountant: ε is per client, an upper bound for a client that took part in every round.

The accountant's state is part of every checkpoint, so a resumed run never resets ε.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod

from fedlinear import flower_fixes
from fedlinear.common import protocol, scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError

flower_fixes.apply()  # Flower 1.42's clipping divides by a zero update norm

MECHANISMS = {
    "central-server-clip": "central DP, server-side fixed clipping (Flower DifferentialPrivacyServerSideFixedClipping)",
    "central-client-clip": "central DP, client-side fixed clipping (Flower fixedclipping_mod + "
    "DifferentialPrivacyClientSideFixedClipping)",
    "local": "local DP: each client clips its update to C and adds N(0, (2Cz)^2) per coordinate",
}


def make_accountant(cfg: RunConfig, population: int) -> RdpAccountant:
    return RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.dp_delta,
            population_size=max(1, population),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=cfg.dp_max_epsilon or None,
        )
    )


def release_event(cfg: RunConfig, sample_size: int, population: int) -> GaussianPrivacyEvent:
    return GaussianPrivacyEvent(
        noise_multiplier=cfg.dp_noise_multiplier, sample_size=max(1, sample_size), population_size=max(1, population)
    )


def epsilon(accountant: RdpAccountant | None, delta: float) -> float | None:
    if accountant is None or accountant.num_releases == 0:
        return 0.0 if accountant is not None else None
    return float(accountant.get_epsilon(delta))


def summary(cfg: RunConfig, accountant: RdpAccountant | None, stopped: str | None) -> dict[str, Any]:
    """What the manifest says about privacy."""
    if cfg.dp == "none":
        return {"mechanism": "none", "epsilon": None, "delta": None, "secure-aggregation": cfg.private}
    return {
        "mechanism": cfg.dp,
        "description": MECHANISMS[cfg.dp],
        "epsilon": epsilon(accountant, cfg.dp_delta),
        "delta": cfg.dp_delta,
        "noise-multiplier": cfg.dp_noise_multiplier,
        "clipping-norm": cfg.dp_clipping_norm,
        "clipping-space": "standardized variables (the space the clients train in)",
        "releases": accountant.num_releases if accountant is not None else 0,
        "accounting": "RDP (Flower RdpAccountant over Google dp-accounting), Gaussian releases composed, "
        "client-level add-or-remove-one, no sampling amplification (valid for any fraction-train)",
        "max-epsilon": cfg.dp_max_epsilon or None,
        "noise-seed": cfg.dp_noise_seed,
        "noise-seed-warning": "noise derived from the run seed: anyone who knows the seed can remove it"
        if cfg.dp_noise_seed == "seed"
        else "",
        "stopped": stopped,
    }


def choose_statistics(
    cfg: RunConfig, from_nodes: scaling.PooledStats | None, num_features: int
) -> tuple[scaling.PooledStats | None, str, scaling.PooledStats | None]:
    """(statistics for the yardstick, where they came from, statistics the training may use).

    Without privacy the nodes' sums serve both. Under privacy the nodes send none: the yardstick comes
    from ``statistics-uri`` if given (``fedlinear run`` computes it from the shards on its machine; it
    never reaches the model), and training uses those statistics only when they are declared public.
    """
    if not cfg.private:
        return from_nodes, "pooled least squares from centred additive sums (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) of every node", from_nodes
    if not cfg.statistics_uri:
        return None, "none: privacy is on and no statistics-uri was given", None
    local = scaling.PooledStats.load(cfg.statistics_uri, num_features)
    source = (
        f"pooled least squares from {cfg.statistics_uri}, computed outside the federation (by fedlinear run from the "
        "shards on its machine); no node sent statistics"
    )
    return local, source, local if cfg.dp_public_statistics else None


def build_transform(cfg: RunConfig, stats: scaling.PooledStats | None, num_features: int) -> scaling.Transform:
    """The standardization transform; under privacy only from statistics declared public."""
    if cfg.private and stats is None and cfg.standardize != "none":
        if cfg.standardize != "auto":
            raise FedLinearError(
                f"standardize = {cfg.standardize} needs pooled statistics, which no node sends under privacy: "
                "declare statistics public with 'dp-public-statistics' = true and 'statistics-uri', or set 'standardize' = none"
            )
        transform = scaling.Transform.identity(num_features)
        transform.notes = (
            "standardize = auto trains on raw data under privacy: the statistics would leak; declare them public "
            "('dp-public-statistics' = true with 'statistics-uri') to standardize",
        )
        return transform
    transform = scaling.build_transform(cfg.standardize, stats, num_features)
    if cfg.private and stats is not None and transform.kind != "none":
        transform.notes = (*transform.notes, f"standardization statistics declared public ({cfg.statistics_uri}); not covered by ε")
    return transform


class AdaptiveClippingError(ValueError):
    pass


def adaptive_noise_split(noise_multiplier: float, count_stddev: float) -> float:
    """Andrew et al. (2021), Theorem 1: the update noise multiplier ``z_Δ`` such that releasing the
    update sum with ``z_Δ`` and the clipped count with σ_b (sensitivity 1/2: each client adds
    ``b_i − 1/2``) costs exactly one Gaussian release with multiplier ``z``:
    ``z⁻² = z_Δ⁻² + (2σ_b)⁻²``."""
    if noise_multiplier >= 2 * count_stddev:
        raise AdaptiveClippingError(
            f"adaptive clipping cannot reach noise multiplier {noise_multiplier:g} with clipped-count noise "
            f"{count_stddev:g}: need dp-noise-multiplier < 2 x dp-clipped-count-stddev (raise "
            "'dp-clipped-count-stddev' or lower 'dp-noise-multiplier')"
        )
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


class ServerSideAdaptiveClipping:
    """Central DP with server-side adaptive clipping (Andrew et al., "Differentially Private Learning
    with Adaptive Clipping", NeurIPS 2021), our implementation around Flower's FedAvg.

    Each round, for the m sampled clients: ``b_i = 1[‖Δ_i‖ <= C]``, each update clipped to C,
    mean released with noise ``N(0, (z_Δ C / m)²)``; the count released as
    ``b̃ = (Σ(b_i − 1/2) + N(0, σ_b²)) / m + 1/2``; then ``C ← C · exp(−η (b̃ − γ))``: when more than
    the target fraction γ of updates fit under C, C shrinks, when fewer fit, C grows. Flower 1.42's
    adaptive wrappers feed the *clipped* fraction into the same formula, which moves C the wrong way.
    Every round is accounted as one Gaussian release with the configured z (the split above). A round
    with an error reply or a missing client is skipped (nothing released, nothing accounted). C is part
    of the checkpoint (:meth:`state_dict`).
    """

    def __init__(self, base, cfg: RunConfig, num_sampled: int, accountant: RdpAccountant) -> None:
        self.strategy = base
        self.num_sampled = num_sampled
        self.accountant = accountant
        self.noise_multiplier = cfg.dp_noise_multiplier
        self.clipping_norm = cfg.dp_clipping_norm
        self.target = cfg.dp_target_quantile
        self.step = cfg.dp_clip_learning_rate
        self.count_stddev = cfg.dp_clipped_count_stddev or num_sampled / 20.0
        self.update_multiplier = adaptive_noise_split(self.noise_multiplier, self.count_stddev)
        self.population = len(base.eligible)
        self.current = None
        self.last_unclipped_fraction: float | None = None

    def state_dict(self) -> dict[str, float]:
        return {"clipping-norm": self.clipping_norm}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.clipping_norm = float(state["clipping-norm"])

    def configure_train(self, server_round, arrays, config, grid):
        from flwr.serverapp.exception import PrivacyBudgetExhausted

        self.current = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        event = GaussianPrivacyEvent(self.noise_multiplier, max(1, len(messages)), max(1, self.population))
        if messages and self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(event):
            raise PrivacyBudgetExhausted("the next release would exceed max_epsilon")
        return messages

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def aggregate_train(self, server_round, replies):
        import numpy as np
        from flwr.app import Array, ArrayRecord

        replies = list(replies)
        if any(msg.has_error() for msg in replies) or len(replies) != self.num_sampled:
            return None, None  # nothing released, nothing accounted
        current = [self.current[name].numpy().astype(np.float64) for name in self.current]
        unclipped = 0
        for reply in replies:
            record = reply.content[protocol.RECORD_ARRAYS]
            names = list(record.keys())
            values = [record[name].numpy() for name in names]
            deltas = [v.astype(np.float64) - c for v, c in zip(values, current, strict=True)]
            norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
            unclipped += int(norm <= self.clipping_norm)
            scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            reply.content[protocol.RECORD_ARRAYS] = ArrayRecord(
                {n: Array((c + d * scale).astype(v.dtype)) for n, c, d, v in zip(names, current, deltas, values, strict=True)}
            )
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            return None, metrics
        std = self.update_multiplier * self.clipping_norm / self.num_sampled
        noisy = {}
        for name in aggregated.keys():
            value = aggregated[name].numpy()
            noisy[name] = Array((value + np.random.normal(0.0, std, value.shape)).astype(value.dtype))
        m = self.num_sampled
        fraction = (unclipped - m / 2 + np.random.normal(0.0, self.count_stddev)) / m + 0.5
        self.last_unclipped_fraction = float(fraction)
        self.clipping_norm *= float(np.exp(-self.step * (fraction - self.target)))
        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, m, max(1, self.population)))
        return ArrayRecord(noisy), metrics
