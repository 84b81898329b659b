"""The privacy rules both sides need, Flower-free: whether a run is private, how clients weigh, the
local DP settings a train task carries, clipping an update and local DP noise.

The server's decisions (which Flower wrapper, what the nodes are asked for, what a round releases,
the accountant) are in server/privacy.py, which lists every rule of a run and where it is applied.

Private (:func:`is_private`): under any DP mechanism or secure aggregation no node sends statistics,
nor its shard's path and hash, in the clear (the shard query says so to the nodes). Equal weights
(:func:`equal_weights`): under DP every client counts the same in the aggregate.

Local DP (``dp = "local"``): each client clips its update ``Δ = w_new − w_global`` (all arrays
flattened together) to L2 norm ``C`` and adds Gaussian noise with standard deviation ``z · 2C`` to
every coordinate before the update leaves the machine. Two datasets of one client can move a
clipped update anywhere within the ball of radius ``C``, so the L2 sensitivity of the released
update is ``2C`` and each release is a Gaussian mechanism with noise multiplier ``z``; the server
composes the rounds with an RDP accountant (server/privacy.py).

Noise source (``dp-noise-seed``): ``seed`` derives it from (run seed, round, client), so an
experiment is reproducible, and anyone who knows the seed (it is in manifest.json) can subtract the
noise: the guarantee then holds only against parties who do not know the seed. ``secure`` draws a
fresh 128-bit seed from the operating system for every release.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlinear.common import protocol

LOCAL_DP_STREAM = 0x10CA1
CENTRAL_DP_STREAM = 0xCE7A1
NO_DP = "none"
LOCAL = "local"
CENTRAL = ("central-server-clip", "central-client-clip")


def is_private(dp: str, secure_aggregation: bool) -> bool:
    """Whether a privacy mechanism is on: then no node sends statistics, nor its shard's path and
    hash, in the clear, and the server's yardstick comes from outside the federation if at all."""
    return dp != NO_DP or bool(secure_aggregation)


def secure_statistics(dp: str, secure_aggregation: bool) -> bool:
    """Whether the pooled statistics (standardization, the yardstick) are summed through SecAgg+:
    under secure aggregation without DP (server/securestats.py). The server then learns the pooled
    count, mean and centred scatter, and no party's."""
    return dp == NO_DP and bool(secure_aggregation)


def equal_weights(dp: str) -> bool:
    """Whether every client weighs the same in the aggregate (FedAvg's weights, SecAgg+'s): under DP,
    whose noise is calibrated to a mean of equally weighted, clipped updates (and Flower's accounted
    wrappers require equal weights)."""
    return dp != NO_DP


@dataclasses.dataclass(frozen=True)
class LocalDp:
    """``dp = local``: what every train task carries so its client clips and noises its own update.

    The server puts these in the round's config (:meth:`to_config`); the client releases its update
    with them (:meth:`from_config`, :func:`local_dp_release`) and with nothing else: a task without
    them is trained without local noise.
    """

    clipping_norm: float
    noise_multiplier: float
    noise_seed: str  # "seed" or "secure" (dp-noise-seed)

    def to_config(self) -> dict[str, Any]:
        return {
            protocol.KEY_LOCAL_DP_CLIPPING_NORM: self.clipping_norm,
            protocol.KEY_LOCAL_DP_NOISE_MULTIPLIER: self.noise_multiplier,
            protocol.KEY_DP_NOISE_SEED: self.noise_seed,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LocalDp | None:
        if protocol.KEY_LOCAL_DP_CLIPPING_NORM not in config:
            return None
        return cls(
            float(config[protocol.KEY_LOCAL_DP_CLIPPING_NORM]),
            float(config[protocol.KEY_LOCAL_DP_NOISE_MULTIPLIER]),
            str(config[protocol.KEY_DP_NOISE_SEED]),
        )


def noise_rng(mode: str, *words: int) -> np.random.Generator:
    """The generator DP noise is drawn from: seeded by ``words`` or from OS entropy (``secure``)."""
    if mode == "secure":
        return np.random.default_rng(secrets.randbits(128))
    return np.random.default_rng([int(w) & 0xFFFFFFFF for w in words])


def clip_update(new: list[np.ndarray], old: list[np.ndarray], clipping_norm: float) -> tuple[list[np.ndarray], float]:
    """``old + Δ · min(1, C / ‖Δ‖)`` per array (float64 arithmetic), and the update's norm before clipping."""
    deltas = [np.asarray(n, np.float64) - np.asarray(o, np.float64) for n, o in zip(new, old, strict=True)]
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return [np.asarray(o, np.float64) + d * scale for o, d in zip(old, deltas, strict=True)], norm


def local_dp_release(
    new: list[np.ndarray],
    old: list[np.ndarray],
    clipping_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], float]:
    """Clip the update to ``C`` and add ``N(0, (z · 2C)²)`` to every coordinate; return the new
    weights (in the dtypes of ``new``) and the update's norm before clipping."""
    clipped, norm = clip_update(new, old, clipping_norm)
    std = noise_multiplier * 2.0 * clipping_norm
    out = [(c + rng.normal(0.0, std, size=np.shape(c))).astype(np.asarray(n).dtype) for c, n in zip(clipped, new, strict=True)]
    return out, norm


def seed_global_numpy(mode: str, *words: int) -> None:
    """Seed NumPy's global RNG, which Flower 1.42's DP wrappers draw their noise from
    (``flwr.supercore.differential_privacy.add_gaussian_noise_inplace`` calls ``np.random.normal``)."""
    if mode == "secure":
        np.random.seed([secrets.randbits(32) for _ in range(4)])
    else:
        np.random.seed(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(4))
