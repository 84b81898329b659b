"""Every privacy decision of a run, in one place (what the clients need of them: common/privacy.py).

The rules, in the order a run meets them, and where the other side acts on them:

Before round 1

1. **Nothing in the clear** (:func:`withholds_statistics`): under any DP mechanism or secure
   aggregation no node sends statistics, nor its shard's path and hash; the shard query's ``private``
   flag tells the nodes (clients/client_app.py ``query`` obeys it).
2. **What the nodes are asked for** (:func:`wants_moments`): column sums and scatter in the clear only
   without privacy; under secure aggregation without DP (:func:`secure_statistics`) the same sums go
   through SecAgg+ (server/securestats.py), so the server learns only the pooled ones.
3. **The yardstick and what training may use** (:func:`choose_statistics`): the securely summed
   statistics serve both; under DP the pooled least-squares optimum comes from ``statistics-uri`` if
   given (computed outside the federation), and training (standardization, ``learning-rate = auto``)
   uses it only when declared public.
4. **Standardization under privacy** (:func:`build_transform`): from the securely summed statistics;
   under central DP in the clear from statistics released once with Gaussian noise and accounted in
   ε (:func:`releases_statistics`, server/dpstats.py) unless public ones are declared; else raw
   variables unless the statistics are public.

The strategy

5. **Equal weights** (:func:`equal_weights`): under DP every client weighs 1, in FedAvg and in SecAgg+.
   **Secure aggregation** (:func:`secure_rounds`): every round's updates go through SecAgg+
   (server/secure.py), so the server sees only their weighted mean.
6. **Which wrapper** (:func:`wrap`): ``central-server-clip`` / ``central-client-clip``: Flower's
   ``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping`` around FedAvg (the
   latter puts its clipping norm in every train task; the clients clip with Flower's
   ``fixedclipping_mod``, or before masking under SecAgg+, clients/secure.py); ``dp-clipping =
   adaptive``: :class:`ServerSideAdaptiveClipping`; ``local``: no wrapper, the round's config carries
   :func:`local_dp_config` and each client clips and noises its own update (clients/client_app.py ``fit``).
   Every mechanism is accounted by Flower's ``RdpAccountant`` (:func:`make_accountant`): client-level,
   add-or-remove-one, **no sampling amplification**: Flower's fixed-size sampling without replacement is
   not Poisson, and its wrappers accept only ``no-amplification`` accounting, so every round is charged
   as a full Gaussian release with noise multiplier z whatever ``fraction-train`` is. The reported ε is
   therefore valid (an upper bound) for any ``fraction-train``; with ``fraction-train < 1`` it is
   conservative. Under ``local`` one Gaussian release per round (each client releases at most once a
   round): ε is per client, an upper bound for a client that took part in every round.

Each round (:class:`RoundPrivacy`)

7. **The budget** (:meth:`RoundPrivacy.check_budget`, and the wrappers themselves): training stops
   before the round whose release would take ε past ``dp-max-epsilon``; the previous round's model is the result.
8. **The noise source** (:meth:`RoundPrivacy.seed_noise`): Flower's wrappers draw from NumPy's global
   RNG, seeded per round from ``dp-noise-seed``.
9. **What a round releases, and what a failed reply does**: with a central mechanism in the clear, a
   round with any error reply (or fewer replies than sampled) releases nothing and is not accounted
   (Flower's wrappers, :class:`ServerSideAdaptiveClipping`); a round not aggregated for
   ``min-train-nodes`` releases nothing (:meth:`RoundPrivacy.void`); under secure aggregation the
   server adds the central noise to the secure aggregate and accounts it only when every sampled
   update is in it (:meth:`RoundPrivacy.secure_update`); under ``local`` a round in which any client's
   update arrived counts as one release (:meth:`RoundPrivacy.account`).
10. **What the history says** (:meth:`RoundPrivacy.row`): ε so far, the adaptive clipping norm.

At the end

11. **The manifest** (:func:`summary`); the accountant's state is part of every checkpoint
    (server/resume.py), so a resumed run never resets ε.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, SamplingMethod

from fedlinear import flower_fixes
from fedlinear.common import privacy as common_privacy
from fedlinear.common import dpstats, protocol, scaling
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import progress

flower_fixes.apply()  # Flower 1.42's clipping divides by a zero update norm

MECHANISMS = {
    "central-server-clip": "central DP, server-side fixed clipping (Flower DifferentialPrivacyServerSideFixedClipping)",
    "central-client-clip": "central DP, client-side fixed clipping (Flower fixedclipping_mod + "
    "DifferentialPrivacyClientSideFixedClipping)",
    "local": "local DP: each client clips its update to C and adds N(0, (2Cz)^2) per coordinate",
}


# -- before round 1 ----------------------------------------------------------------------------------


def withholds_statistics(cfg: RunConfig) -> bool:
    """Rule 1: whether no node sends statistics, nor its shard's path and hash (``RunConfig.private``)."""
    return cfg.private


def wants_moments(cfg: RunConfig) -> bool:
    """Rule 2: whether the shard query asks for column sums (and then the scatter)."""
    return not withholds_statistics(cfg) and (cfg.reference == "auto" or cfg.standardize != "none")


def secure_statistics(cfg: RunConfig) -> bool:
    """Rule 2: whether the pooled sums are gathered through SecAgg+ (secure aggregation, no DP, and
    standardization or the yardstick needs them)."""
    return common_privacy.secure_statistics(cfg.dp, cfg.secure_aggregation) and (
        cfg.reference == "auto" or cfg.standardize != "none"
    )


def choose_statistics(
    cfg: RunConfig, from_nodes: scaling.PooledStats | None, num_features: int,
    released: scaling.PooledStats | None = None,
) -> tuple[scaling.PooledStats | None, str, scaling.PooledStats | None]:
    """Rule 3: (statistics for the yardstick, where they came from, statistics the training may use).

    ``released``: the statistics released with noise under central DP (:func:`releases_statistics`),
    which training uses unless public ones are declared; they never serve as the yardstick.

    Without privacy the nodes' sums serve both. Under privacy the nodes send none: the yardstick comes
    from ``statistics-uri`` if given (``fedlinear run`` computes it from the shards on its machine; it
    never reaches the model), and training uses those statistics only when they are declared public.
    """
    if not withholds_statistics(cfg):
        return from_nodes, "pooled least squares from centred additive sums (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) of every node", from_nodes
    if secure_statistics(cfg) and from_nodes is not None:
        return from_nodes, "pooled least squares from centred additive sums (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) summed through SecAgg+: the server learned only the pooled sums", from_nodes
    if not cfg.statistics_uri:
        return None, "none: privacy is on and no statistics-uri was given", released
    local = scaling.PooledStats.load(cfg.statistics_uri, num_features)
    source = (
        f"pooled least squares from {cfg.statistics_uri}, computed outside the federation (by fedlinear run from the "
        "shards on its machine); no node sent statistics"
    )
    return local, source, local if cfg.dp_public_statistics else released


def releases_statistics(cfg: RunConfig) -> bool:
    """Rule 4: whether the standardization statistics are released once with noise before round 1
    (server/dpstats.py): central DP-FedAvg in the clear (the server sees each party's update anyway,
    and adds the noise), ``dp-statistics-share`` > 0, standardization wanted, no public statistics
    declared. Not under secure aggregation (the encodings would reach the server unmasked), ``dp =
    local`` (the server is not trusted to add the noise) nor DP-FedOLS (row-level, clips rows itself)."""
    possible = (
        cfg.dp in common_privacy.CENTRAL
        and not cfg.secure_aggregation
        and cfg.strategy != "fedols"
        and cfg.dp_statistics != "none"
        and cfg.dp_statistics_share > 0
        and cfg.standardize != "none"
        and not (cfg.dp_public_statistics and cfg.statistics_uri)
    )
    return possible and (cfg.dp_statistics == "release" or useful_release(cfg, statistics_noise(cfg)))


# dp-statistics = auto: release when the target's released scale is predicted within this many bits (1 σ).
USEFUL_BITS = 1.0


def useful_release(cfg: RunConfig, noise_multiplier: float) -> bool:
    """``dp-statistics = auto``: whether the release's predicted noise on the target's scale (which
    multiplies every error of the model in raw units), for ``min-available-nodes`` parties, is at most
    :data:`USEFUL_BITS` (common.dpstats.scale_noise_bits). It depends only on the config (not on the
    data, nor on the number of features, unknown before the shard query): deciding costs no privacy,
    and ``dp-target-epsilon`` is calibrated with the same decision."""
    return predicted_bits(cfg, noise_multiplier) <= USEFUL_BITS


def predicted_bits(cfg: RunConfig, noise_multiplier: float) -> float:
    """The predicted standard deviation, in bits, of the released target scale."""
    return dpstats.scale_noise_bits(cfg.min_available_nodes, noise_multiplier, cfg.dp_statistics_max_scale)


def statistics_mode(cfg: RunConfig) -> str:
    """Which statistics the training uses under DP: ``released`` (noisy, in ε), ``public`` (declared,
    not in ε), ``none`` (raw variables); ``secure`` / ``clear`` without DP."""
    if cfg.dp == common_privacy.NO_DP:
        return "secure" if secure_statistics(cfg) else ("none" if cfg.private else "clear")
    if releases_statistics(cfg):
        return "released"
    if cfg.dp_public_statistics and cfg.statistics_uri:
        return "public"
    return "none"


def statistics_noise(cfg: RunConfig, noise_multiplier: float | None = None) -> float:
    """The statistics release's noise multiplier: ``dp-statistics-share`` of the run's budget
    (common.dpstats.statistics_noise) next to :func:`releases_of` rounds at ``noise_multiplier``."""
    z = cfg.dp_noise_multiplier if noise_multiplier is None else noise_multiplier
    return dpstats.statistics_noise(z, releases_of(cfg), cfg.dp_statistics_share)


def statistics_event(noise_multiplier: float, parties: int) -> GaussianPrivacyEvent:
    """The statistics release as the accountant sees it: one Gaussian release over all ``parties``."""
    return GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=max(1, parties), population_size=max(1, parties))


def build_transform(cfg: RunConfig, stats: scaling.PooledStats | None, num_features: int) -> scaling.Transform:
    """Rule 4: the standardization transform; under privacy only from statistics declared public."""
    private = withholds_statistics(cfg)
    if private and stats is None and cfg.standardize != "none":
        if cfg.standardize != "auto":
            raise FedLinearError(
                f"standardize = {cfg.standardize} needs pooled statistics, which no node sends under privacy: "
                "declare statistics public with 'dp-public-statistics' = true and 'statistics-uri', or set 'standardize' = none"
            )
        transform = scaling.Transform.identity(num_features)
        transform.notes = (
            "standardize = auto trains on raw data under privacy: the statistics would leak; declare them public "
            "('dp-public-statistics' = true with 'statistics-uri') to standardize" + raw_reason(cfg),
        )
        return transform
    transform = scaling.build_transform(cfg.standardize, stats, num_features, cfg.fit_intercept)
    if private and secure_statistics(cfg) and transform.kind != "none":
        transform.notes = (*transform.notes, "from the pooled statistics summed through SecAgg+ (no party's own sums reached the server)")
    elif private and stats is not None and transform.kind != "none" and statistics_mode(cfg) == "released":
        transform.notes = (*transform.notes, "from statistics released once with Gaussian noise (common/dpstats.py), covered by ε")
    elif private and stats is not None and transform.kind != "none":
        transform.notes = (*transform.notes, f"standardization statistics declared public ({cfg.statistics_uri}); not covered by ε")
    return transform


# -- the strategy ------------------------------------------------------------------------------------


def equal_weights(cfg: RunConfig) -> bool:
    """Rule 5: whether every client weighs 1 in the aggregate (common.privacy.equal_weights)."""
    return common_privacy.equal_weights(cfg.dp)


def secure_rounds(cfg: RunConfig) -> bool:
    """Rule 5: whether the rounds' updates go through SecAgg+ instead of in the clear."""
    return bool(cfg.secure_aggregation)


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


def wrap(base, cfg: RunConfig, num_sampled: int, population: int) -> tuple[Any, RdpAccountant | None]:
    """Rule 6: (the strategy the server drives: ``base`` or a DP wrapper around it, the accountant or None)."""
    if cfg.dp == common_privacy.NO_DP:
        return base, None
    accountant = make_accountant(cfg, population)
    if cfg.dp == "central-server-clip" and cfg.dp_clipping == "adaptive":
        try:
            return ServerSideAdaptiveClipping(base, cfg, num_sampled, accountant), accountant
        except AdaptiveClippingError as exc:
            raise FedLinearError(str(exc)) from None
    if cfg.dp in common_privacy.CENTRAL:
        from flwr.serverapp.strategy import (
            DifferentialPrivacyClientSideFixedClipping,
            DifferentialPrivacyServerSideFixedClipping,
        )

        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if cfg.dp == "central-server-clip"
            else DifferentialPrivacyClientSideFixedClipping
        )
        return wrapper(base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled, accountant=accountant), accountant
    return base, accountant  # local: the clients noise, the server accounts (RoundPrivacy.account)


def local_dp_config(cfg: RunConfig) -> dict[str, Any]:
    """Rule 6, ``dp = local``: what every train task's config carries so its client clips and noises."""
    if cfg.dp != common_privacy.LOCAL:
        return {}
    return common_privacy.LocalDp(cfg.dp_clipping_norm, cfg.dp_noise_multiplier, cfg.dp_noise_seed).to_config()


def releases_of(cfg: RunConfig) -> int:
    """Gaussian releases with ``dp-noise-multiplier`` the run makes: ``num-server-rounds`` for an iterative
    strategy, 1 for DP-FedOLS (three releases with ``Σ 1/z_i² = 1/z²``, exactly one with z: common/dpols.py)."""
    return 1 if cfg.strategy == "fedols" else cfg.num_server_rounds


def epsilon_of(cfg: RunConfig, noise_multiplier: float, releases: int, with_statistics: bool = False) -> float:
    """ε at ``dp-delta`` of ``releases`` Gaussian releases with ``noise_multiplier``, on the run's accountant
    (Flower's RdpAccountant, no amplification); ``with_statistics``: plus the statistics release
    (:func:`statistics_noise` at that multiplier)."""
    accountant = make_accountant(RunConfig(dp_delta=cfg.dp_delta), 1)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), releases)
    if with_statistics:
        accountant.compose(GaussianPrivacyEvent(statistics_noise(cfg, noise_multiplier), 1, 1))
    return float(accountant.get_epsilon(cfg.dp_delta))


def noise_for_epsilon(cfg: RunConfig, target: float, releases: int, with_statistics: bool = False) -> float:
    """The noise multiplier z whose releases spend ``target`` ε at ``dp-delta`` (at most it: the smallest such
    z to a relative 1e-9, by bisection on the run's own accountant, :func:`epsilon_of`); ``with_statistics``:
    the statistics release included (its multiplier follows z, :func:`statistics_noise`)."""
    lo, hi = 1e-3, 1.0
    if epsilon_of(cfg, lo, releases, with_statistics) <= target:
        return lo
    while epsilon_of(cfg, hi, releases, with_statistics) > target:
        lo, hi = hi, hi * 2.0
        if hi > 1e9:
            raise FedLinearError(f"config key 'dp-target-epsilon' = {target:g} is out of reach at 'dp-delta' = {cfg.dp_delta:g}")
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if epsilon_of(cfg, mid, releases, with_statistics) <= target else (mid, hi)
    return hi


def resolve_noise(cfg: RunConfig) -> RunConfig:
    """``dp-target-epsilon`` > 0: the config with ``dp-noise-multiplier`` derived so that the run's releases
    (:func:`releases_of`) spend exactly that ε; otherwise ``cfg`` as it is."""
    if cfg.dp == common_privacy.NO_DP or not cfg.dp_target_epsilon:
        return cfg
    import dataclasses

    releases = releases_of(cfg)
    # a release possible at all (and not declined: dp-statistics = none releases nothing)
    stats = cfg.dp_statistics != "none" and releases_statistics(dataclasses.replace(cfg, dp_statistics="release"))
    z = noise_for_epsilon(cfg, cfg.dp_target_epsilon, releases, stats)
    if stats and cfg.dp_statistics == "auto":  # decide at the multiplier the release would get, then pin it
        stats = useful_release(cfg, statistics_noise(cfg, z))
        if not stats:
            z = noise_for_epsilon(cfg, cfg.dp_target_epsilon, releases, False)
        cfg = dataclasses.replace(cfg, dp_statistics="release" if stats else "none")
    progress.say(
        f"privacy: dp-target-epsilon = {cfg.dp_target_epsilon:g} at δ = {cfg.dp_delta:g} over {releases} release(s)"
        + (f" and the statistics release (z_s = {statistics_noise(cfg, z):.6g})" if stats else "")
        + f": noise multiplier z = {z:.6g} (RDP)"
    )
    return dataclasses.replace(cfg, dp_noise_multiplier=z)


def release_event(cfg: RunConfig, sample_size: int, population: int) -> GaussianPrivacyEvent:
    return GaussianPrivacyEvent(
        noise_multiplier=cfg.dp_noise_multiplier, sample_size=max(1, sample_size), population_size=max(1, population)
    )


def epsilon(accountant: RdpAccountant | None, delta: float) -> float | None:
    if accountant is None or accountant.num_releases == 0:
        return 0.0 if accountant is not None else None
    return float(accountant.get_epsilon(delta))


# -- each round --------------------------------------------------------------------------------------


class RoundPrivacy:
    """The privacy side of the round loop (server/rounds.py): the startup line, the budget, the noise
    source, what each round releases and accounts, and what its history row says (rules 7 to 10).

    ``strategies`` is :class:`server.strategy.Strategies` (the driven strategy, its accountant, the
    sample size); ``population`` the number of eligible clients.
    """

    def __init__(self, cfg: RunConfig, strategies, population: int) -> None:
        self.cfg = cfg
        self.strategy = strategies.strategy
        self.accountant = strategies.accountant
        self.num_sampled = strategies.num_sampled
        self.population = population

    def describe(self) -> str | None:
        """The run's privacy line (None without DP)."""
        cfg = self.cfg
        if cfg.dp == common_privacy.NO_DP:
            return None
        return (
            f"privacy: {MECHANISMS[cfg.dp]}; z = {cfg.dp_noise_multiplier:g}, C = {cfg.dp_clipping_norm:g}, "
            f"δ = {cfg.dp_delta:g}, {self.num_sampled} of {self.population} clients a round"
            + (f", budget ε <= {cfg.dp_max_epsilon:g}" if cfg.dp_max_epsilon else "")
        )

    def initial_row(self) -> dict[str, float]:
        """What round 0's row says: ε = 0 under DP."""
        return {"epsilon": 0.0} if self.accountant is not None else {}

    def check_budget(self, messages: list) -> None:
        """Rule 7 for ``dp = local`` (the central wrappers check it in their configure_train): raise
        PrivacyBudgetExhausted when this round's release would take ε past the budget."""
        cfg, accountant = self.cfg, self.accountant
        if cfg.dp == common_privacy.LOCAL and accountant.config.max_epsilon is not None:
            event = release_event(cfg, len(messages), self.population)
            if messages and accountant.would_exceed(event):
                raise PrivacyBudgetExhausted("the next release would exceed max_epsilon")

    def budget_stop(self, server_round: int) -> str:
        """Why training stopped before ``server_round`` (the budget)."""
        cfg = self.cfg
        return (
            f"training stopped before round {server_round}: its release would take ε past the budget "
            f"dp-max-epsilon = {cfg.dp_max_epsilon:g} (ε spent {epsilon(self.accountant, cfg.dp_delta):.4g} "
            f"at δ = {cfg.dp_delta:g}); the model of round {server_round - 1} is the result"
        )

    def seed_noise(self, server_round: int) -> None:
        """Rule 8: Flower's wrappers draw noise from NumPy's global RNG: seed it per round (dp-noise-seed)."""
        cfg = self.cfg
        if cfg.dp != common_privacy.NO_DP:
            common_privacy.seed_global_numpy(
                cfg.dp_noise_seed, cfg.seed, server_round, common_privacy.CENTRAL_DP_STREAM
            )

    def void(self, server_round: int) -> None:
        """Rule 9: a round that is not aggregated releases nothing (Flower's wrapper accounts a round when
        its updates are aggregated: its pending event goes)."""
        # Flower 1.42 has no public way to drop a pending accounting event; its wrapper keeps them here.
        getattr(self.strategy, "_pending_events", {}).pop(server_round, None)

    def secure_update(self, secured, server_round: int) -> ArrayRecord | None:
        """Rule 9 under secure aggregation: the update the round releases (None: nothing).

        Under ``central-client-clip`` the clients clipped their updates before masking (the server cannot
        clip what it cannot see); the server adds ``N(0, (zC/m)²)`` to the aggregated mean and accounts
        one Gaussian release, exactly as Flower's wrapper does in the clear, and, as there, a round in which
        fewer than the m sampled updates were aggregated releases nothing (the noise is calibrated to m).
        """
        if secured.update is None:
            return None
        cfg = self.cfg
        if cfg.dp not in common_privacy.CENTRAL:
            return secured.update
        self.void(server_round)  # released (below) or voided here: the wrapper never sees this round's replies
        if secured.num_aggregated != self.num_sampled:
            progress.say(
                f"round {server_round}: {secured.num_aggregated} of {self.num_sampled} updates aggregated: "
                "nothing released (the DP noise is calibrated to all sampled clients)"
            )
            return None
        std = cfg.dp_noise_multiplier * cfg.dp_clipping_norm / self.num_sampled
        noisy = ArrayRecord(
            {
                name: Array(value + np.random.normal(0.0, std, value.shape))
                for name, value in ((name, secured.update[name].numpy()) for name in secured.update)
            }
        )
        self.accountant.compose(release_event(cfg, self.num_sampled, self.population))
        return noisy

    def account(self, released: bool, num_messages: int) -> None:
        """Rule 9 under ``dp = local``: a round in which any client's update arrived is one release."""
        if self.cfg.dp == common_privacy.LOCAL and released:
            self.accountant.compose(release_event(self.cfg, num_messages, self.population))

    def row(self) -> dict[str, Any]:
        """Rule 10: what the round's history row says: ε so far, the adaptive clipping norm (for the next round)."""
        out: dict[str, Any] = {}
        if self.accountant is not None:
            out["epsilon"] = epsilon(self.accountant, self.cfg.dp_delta)
        if hasattr(self.strategy, "clipping_norm") and self.cfg.dp_clipping == "adaptive":
            out["clipping-norm"] = self.strategy.clipping_norm
            out["unclipped-fraction"] = self.strategy.last_unclipped_fraction
        return out

    def summary(self, stopped: str | None) -> dict[str, Any]:
        return summary(self.cfg, self.accountant, stopped)


# -- at the end --------------------------------------------------------------------------------------


def summary(cfg: RunConfig, accountant: RdpAccountant | None, stopped: str | None) -> dict[str, Any]:
    """Rule 11: what the manifest says about privacy."""
    if cfg.dp == common_privacy.NO_DP:
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
        "target-epsilon": cfg.dp_target_epsilon or None,
        "noise-seed": cfg.dp_noise_seed,
        "noise-seed-warning": "noise derived from the run seed: anyone who knows the seed can remove it"
        if cfg.dp_noise_seed == "seed"
        else "",
        "stopped": stopped,
        "statistics": statistics_summary(cfg),
    }


def statistics_summary(cfg: RunConfig) -> dict[str, Any]:
    """Which standardization statistics the training used under DP, and what they cost."""
    mode = statistics_mode(cfg)
    out: dict[str, Any] = {"source": mode}
    if mode == "released":
        out.update({
            "description": "released once before round 1 with Gaussian noise on each party's bounded, scale-free "
            "encoding (common/dpstats.py); covered by ε (client-level, add-or-remove-one)",
            "noise-multiplier": statistics_noise(cfg),
            "share": cfg.dp_statistics_share,
            "max-scale": cfg.dp_statistics_max_scale,
        })  # fmt: skip
    elif mode == "public":
        out["description"] = f"declared public ({cfg.statistics_uri}); not covered by ε"
    else:
        out["description"] = "none: trained on raw variables" + raw_reason(cfg)
    return out


def raw_reason(cfg: RunConfig) -> str:
    """Why a central DP run trains on raw variables although it could release statistics ("" if not that)."""
    if cfg.dp not in common_privacy.CENTRAL or cfg.secure_aggregation or cfg.strategy == "fedols":
        return ""
    if cfg.dp_statistics == "none":
        return (
            " (dp-statistics = none, the default: 'dp-public-statistics' = true with 'statistics-uri' standardizes "
            "for free with statistics declared public; 'dp-statistics' = release spends part of ε on noisy scales)"
        )
    if cfg.dp_statistics != "auto":
        return ""
    if cfg.dp_statistics_share <= 0 or cfg.standardize == "none" or releases_statistics(cfg):
        return ""
    z_s = statistics_noise(cfg)
    return (
        f" (dp-statistics = auto: released with z_s = {z_s:.3g} to {cfg.min_available_nodes} parties the target's scale "
        f"would be off by {predicted_bits(cfg, z_s):.2g} bits (1 σ), above {USEFUL_BITS:g}: more parties, a larger "
        "'dp-statistics-share', a narrower 'dp-statistics-max-scale', or 'dp-statistics' = release make it useful)"
    )


# -- the adaptive clipping wrapper (rule 6) ----------------------------------------------------------


class AdaptiveClippingError(ValueError):
    pass


def default_count_stddev(num_sampled: int, noise_multiplier: float) -> float:
    """``dp-clipped-count-stddev`` = 0: Andrew et al.'s ``m / 20``, raised to ``z`` when smaller. With few
    clients ``m / 20`` is below ``z / 2`` and no split exists (:func:`adaptive_noise_split`); at
    ``σ_b >= z`` one always does and the update's noise grows by at most ``1 / sqrt(1 − 1/4)`` (15 %)."""
    return max(num_sampled / 20.0, noise_multiplier)


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
        self.count_stddev = cfg.dp_clipped_count_stddev or default_count_stddev(num_sampled, cfg.dp_noise_multiplier)
        self.update_multiplier = adaptive_noise_split(self.noise_multiplier, self.count_stddev)
        self.population = len(base.eligible)
        self.current = None
        self.last_unclipped_fraction: float | None = None

    def state_dict(self) -> dict[str, float]:
        return {"clipping-norm": self.clipping_norm}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.clipping_norm = float(state["clipping-norm"])

    def configure_train(self, server_round, arrays, config, grid):
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
