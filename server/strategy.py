"""Strategies for fedlinear: Flower's own, made deterministic, built in one place from the config.

``build_strategy`` is the factory that later wrappers (differential privacy, robust aggregation,
secure aggregation) plug into. The strategies are Flower's classes with one mixin that

* samples nodes with a seeded RNG over the nodes that passed the pre-round query, in a stable
  order (by client key), so one seed fixes client sampling in simulation and deployment alike;
* leaves aggregation to Flower's own FedAvg ``aggregate_train``; the server orders the replies by
  client key first (:func:`fixed_order`), so float sums, and hence the final weights, do not depend
  on which node answered first, and records the error replies, so a failing client is reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.errors import FedLinearError

UNIT_WEIGHT = "unit-weight"  # a metric every train reply carries, 1: equal client weights under DP


class DeterministicMixin:
    """Seeded sampling over known nodes and order-independent aggregation for Flower strategies."""

    seed: int = 0
    # node id -> stable client key, set by the server after the pre-round query
    eligible: dict[int, int]
    last_failures: list[dict]
    # config values added to every train message (the resolved learning rate)
    train_config: dict
    # config values added to every train and evaluate message (the standardization transform)
    task_config: dict
    # records added to every train and evaluate message
    extra_records: dict

    def _sample(self, grid: Grid, server_round: int, fraction: float, minimum: int, stream: int) -> list[int]:
        connected = set(grid.get_node_ids())
        nodes = sorted((key, nid) for nid, key in self.eligible.items() if nid in connected)
        if not nodes:
            return []
        size = sample_size(len(nodes), fraction, minimum)
        rng = np.random.default_rng([self.seed, server_round, stream])
        chosen = sorted(rng.choice(len(nodes), size=size, replace=False))
        return [nodes[i][1] for i in chosen]

    def _configure(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, train: bool
    ) -> Iterable[Message]:
        fraction = self.fraction_train if train else self.fraction_evaluate
        if fraction == 0.0:
            return []
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        node_ids = self._sample(grid, server_round, fraction, minimum, 1 if train else 2)
        config["server-round"] = server_round
        for key, value in getattr(self, "task_config", {}).items():
            config[key] = value
        if train:
            for key, value in getattr(self, "train_config", {}).items():
                config[key] = value
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        for name, extra in getattr(self, "extra_records", {}).items():
            record[name] = extra  # e.g. the standardization transform, for train and evaluate alike
        return self._construct_messages(record, node_ids, MessageType.TRAIN if train else MessageType.EVALUATE)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, train=True)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, train=False)


class DeterministicFedAvg(DeterministicMixin, FedAvg):
    """Flower's FedAvg with seeded sampling; ``aggregate_train`` is FedAvg's own, untouched (Flower's
    accounted DP wrappers require exactly that), so the server orders replies before calling it."""


def fixed_order(replies: Iterable[Message], eligible: dict[int, int]) -> tuple[list[Message], list[dict]]:
    """Replies sorted by client key (so float sums do not depend on arrival order) and the failures
    among them (error replies), each ``{"node-id", "client-key", "reason"}``."""
    replies = list(replies)
    failures = [
        {"node-id": msg.metadata.src_node_id, "client-key": eligible.get(msg.metadata.src_node_id), "reason": msg.error.reason}
        for msg in replies
        if msg.has_error()
    ]

    def key(msg: Message) -> tuple[int, int]:
        return (eligible.get(msg.metadata.src_node_id, 1 << 62), msg.metadata.src_node_id)

    return sorted(replies, key=key), failures


def sample_size(num_nodes: int, fraction: float, minimum: int = 1) -> int:
    """How many nodes :meth:`DeterministicMixin._sample` picks from ``num_nodes``."""
    return min(num_nodes, max(int(num_nodes * fraction), minimum, 1))


@dataclasses.dataclass
class Strategies:
    """What the server drives: ``strategy`` (FedAvg, or a DP wrapper around it), ``base`` (the FedAvg
    that samples and carries the per-task config) and the privacy accountant, if any."""

    strategy: object
    base: DeterministicFedAvg
    accountant: object | None
    num_sampled: int


def build_strategy(cfg: RunConfig, eligible: dict[int, int]) -> Strategies:
    """The strategy for this run: Flower's FedAvg, wrapped by Flower's DP wrappers when asked."""
    base = DeterministicFedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        # under DP every client counts the same (Flower's accounted wrappers require equal weights)
        weighted_by_key=UNIT_WEIGHT if cfg.dp != "none" else "num-examples",
    )
    base.seed = cfg.seed
    base.eligible = dict(eligible)
    base.last_failures = []
    base.train_config = {}
    base.task_config = {}
    base.extra_records = {}
    num_sampled = sample_size(len(eligible), cfg.fraction_train)
    strategy, accountant = base, None
    if cfg.dp != "none":
        from server import privacy

        accountant = privacy.make_accountant(cfg, len(eligible))
    if cfg.dp == "central-server-clip" and cfg.dp_clipping == "adaptive":
        from server import privacy

        try:
            strategy = privacy.ServerSideAdaptiveClipping(base, cfg, num_sampled, accountant)
        except privacy.AdaptiveClippingError as exc:
            raise FedLinearError(str(exc)) from None
    elif cfg.dp in ("central-server-clip", "central-client-clip"):
        from flwr.serverapp.strategy import (
            DifferentialPrivacyClientSideFixedClipping,
            DifferentialPrivacyServerSideFixedClipping,
        )

        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if cfg.dp == "central-server-clip"
            else DifferentialPrivacyClientSideFixedClipping
        )
        strategy = wrapper(
            base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, num_sampled, accountant=accountant
        )
    return Strategies(strategy, base, accountant, num_sampled)
