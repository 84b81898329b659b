"""Strategies for fedlinear: Flower's own, made deterministic, built in one place from the config.

``build_strategy`` is the factory that later wrappers (differential privacy, robust aggregation,
secure aggregation) plug into. The strategies are Flower's classes with one mixin that

* samples nodes with a seeded RNG over the nodes that passed the pre-round query, in a stable
  order (by client key), so one seed fixes client sampling in simulation and deployment alike;
* aggregates replies in a fixed order (by client key), so float sums, and hence the final
  weights, do not depend on which node answered first;
* records the nodes whose replies were errors, so a failing client is reported, not fatal.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig


class DeterministicMixin:
    """Seeded sampling over known nodes and order-independent aggregation for Flower strategies."""

    seed: int = 0
    # node id -> stable client key, set by the server after the pre-round query
    eligible: dict[int, int]
    last_failures: list[dict]
    # config values added to every train message (the resolved learning rate)
    train_config: dict
    # records added to every train and evaluate message (the standardization transform)
    extra_records: dict

    def _sample(self, grid: Grid, server_round: int, fraction: float, minimum: int, stream: int) -> list[int]:
        connected = set(grid.get_node_ids())
        nodes = sorted((key, nid) for nid, key in self.eligible.items() if nid in connected)
        if not nodes:
            return []
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum, 1))
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

    def _in_fixed_order(self, replies: Iterable[Message]) -> list[Message]:
        replies = list(replies)
        self.last_failures = [
            {
                "node-id": msg.metadata.src_node_id,
                "client-key": self.eligible.get(msg.metadata.src_node_id),
                "reason": msg.error.reason,
            }
            for msg in replies
            if msg.has_error()
        ]

        def key(msg: Message) -> tuple[int, int]:
            return (self.eligible.get(msg.metadata.src_node_id, 1 << 62), msg.metadata.src_node_id)

        return sorted(replies, key=key)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self._in_fixed_order(replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return super().aggregate_evaluate(server_round, self._in_fixed_order(replies))


class DeterministicFedAvg(DeterministicMixin, FedAvg):
    """Flower's FedAvg with seeded sampling and fixed-order aggregation."""


def build_strategy(cfg: RunConfig, eligible: dict[int, int]):
    """The strategy for this run (FedAvg today; wrappers and alternatives plug in here)."""
    strategy = DeterministicFedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    strategy.seed = cfg.seed
    strategy.eligible = dict(eligible)
    strategy.last_failures = []
    strategy.train_config = {}
    strategy.extra_records = {}
    return strategy
