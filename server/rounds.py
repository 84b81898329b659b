"""The rounds of an iterative strategy, shaped like Flower's ``Strategy.start``.

Before round 1 (:meth:`Rounds.__init__`): where the run starts (fresh, or after the last checkpoint,
:mod:`server.resume`), the standardization transform and the learning rate the clients train with,
the yardstick (:mod:`server.evaluation`), the strategy (:mod:`server.strategy`), and round 0's row.

Each round (:meth:`Rounds.play`), in the phases of ``Strategy.start``:

1. configure train: the strategy samples the nodes and builds their train tasks from the round's
   config, as ``Strategy.start`` passes ``train_config``: what every client needs for the round
   (the resolved learning rate, the standardization transform, the local DP settings) travels in
   it and nowhere else; the strategy adds ``server-round`` (and FedProx ``proximal-mu``), Flower's
   client-side clipping wrapper its clipping norm;
2. train (ClientApp side): the tasks go out in the clear, and the replies are checked before
   anything else sees them (:mod:`server.replies`), or they go through SecAgg+ (:mod:`server.secure`);
3. aggregate train: unless fewer than ``min-train-nodes`` valid updates came back;
4. evaluate (ClientApp side): only when ``fraction-evaluate`` > 0;
5. evaluate (ServerApp side): the yardstick metrics of the new global model;
6. record: the history row first, then the checkpoint; stop on divergence, after
   ``max-failed-rounds`` rounds without an update, or at the target.

After the last round (:meth:`Rounds.finish`): the target's outcome, then :func:`server.finish.complete`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedlinear.common import model as lm
from fedlinear.common import protocol, scaling
from fedlinear.common import target as targets
from fedlinear.common.config import RunConfig
from fedlinear.common.dataset import Dataset
from fedlinear.common.errors import FedLinearError, one_line, untrusted_text
from fedlinear.common.runstore import RunStore
from fedlinear.server import continuation, evaluation, exchange, finish, privacy, progress, replies, resume, secure, yardstick
from fedlinear.server.nodes import Parties
from fedlinear.server.strategy import build_strategy, fixed_order


def to_record(weights: lm.LinearWeights) -> ArrayRecord:
    """The global weights as the ArrayRecord a train or evaluate task carries."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in weights.as_dict().items()})


def from_record(record: ArrayRecord) -> lm.LinearWeights:
    return lm.LinearWeights.from_dict({name: record[name].numpy() for name in lm.WEIGHT_NAMES if name in record})


def initial_weights(
    num_features: int, seed: int, transform: scaling.Transform, fit_intercept: bool = True
) -> lm.LinearWeights:
    """Keras' Glorot-uniform start, with the coordinates the transform leaves out at zero."""
    weights = lm.initial_weights(num_features, seed, fit_intercept)
    weights.kernel[transform.unused, 0] = 0.0
    return weights


def exact_mean(cfg: RunConfig) -> bool:
    """Whether a round's aggregate is the example-weighted mean of the replies in the clear (FedAvg's and
    FedProx's, without equal weights): then one full-batch step a round is one gradient step on the pooled
    data. Not under secure aggregation: SecAgg+'s clipping range bounds each update, and a full-batch
    step at 1 / (λmax + λmin) is the largest update there is (the first round's goes all the way)."""
    return cfg.strategy in ("fedavg", "fedprox") and not privacy.equal_weights(cfg) and not privacy.secure_rounds(cfg)


def resolve_local_work(
    cfg: RunConfig, pooled: scaling.PooledStats | None, transform: scaling.Transform, sizes: list[int]
) -> scaling.LocalWork:
    """The step size and batch size of local training (``learning-rate`` and ``batch-size``, ``auto``
    resolved: :func:`common.scaling.auto_local_work`) and how they were chosen."""
    return scaling.auto_local_work(
        pooled, transform, sizes, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        local_epochs=cfg.local_epochs, rounds=cfg.num_server_rounds, exact_mean=exact_mean(cfg),
        fit_intercept=cfg.fit_intercept,
    )  # fmt: skip


def resolve_learning_rate(
    cfg: RunConfig, pooled: scaling.PooledStats | None, transform: scaling.Transform, sizes: list[int]
) -> tuple[float, str]:
    """The step size of local SGD (``learning-rate``, ``auto`` resolved) and how it was chosen."""
    work = resolve_local_work(cfg, pooled, transform, sizes)
    return work.learning_rate, work.note


def participation_floor(cfg: RunConfig, num_eligible: int, num_sampled: int) -> int:
    """``min-train-nodes`` as a count of valid replies; an error when no round could ever reach it."""
    floor = cfg.min_train_count(num_eligible)
    if floor > num_sampled:
        raise FedLinearError(
            f"config key 'min-train-nodes' = {cfg.min_train_nodes:g} asks for {floor} valid updates a round, but only "
            f"{num_sampled} of the {num_eligible} eligible nodes are sampled a round ('fraction-train' = "
            f"{cfg.fraction_train:g}): no round could be aggregated"
        )
    return floor


@dataclasses.dataclass
class Trained:
    """What phase 2 (train, ClientApp side) gave: the valid replies in client-key order (clear path)
    or the secure round's result, and the round's failures so far."""

    ordered: list[Message]
    failures: list[dict]
    secured: secure.SecureRound | None = None

    @property
    def num_valid(self) -> int:
        if self.secured is not None:
            return self.secured.num_aggregated
        return sum(1 for msg in self.ordered if not msg.has_error())

    @property
    def released(self) -> bool:
        """Whether any client's update reached the server (what local DP accounts)."""
        return any(not msg.has_error() for msg in self.ordered) or (
            self.secured is not None and self.secured.num_aggregated > 0
        )


class Rounds:
    """One run of an iterative strategy over the parties of the shard query."""

    def __init__(
        self, grid: Grid, context: Context, store: RunStore, cfg: RunConfig, parties: Parties,
        test: Dataset | None, started: float,
    ) -> None:  # fmt: skip
        self.grid, self.context, self.store, self.cfg = grid, context, store, cfg
        self.parties, self.test, self.started = parties, test, started
        data = resume.data_identity(parties.healthy, test)
        start = resume.resume_or_start(store, cfg, parties.num_features, data)
        self._settle_training(start)
        self._build_strategy()
        self._open_history(start)
        self.checkpoints = resume.Checkpoints(
            store, cfg, parties.num_features, data, self.transform, self.learning_rate, self.batch_size
        )
        self.baseline = dict(self.history["rounds"][0])
        self.failed_in_a_row = 0
        self.stopped: str | None = None  # why training stopped before its last round (the privacy budget)
        self.min_train = participation_floor(cfg, len(self.eligible), self.built.num_sampled)  # min-train-nodes as a count

    def _settle_training(self, start: resume.Start) -> None:
        """The transform and the learning rate the clients train with (a resumed run keeps its own), and
        the yardstick of every round."""
        cfg, healthy, num_features = self.cfg, self.parties.healthy, self.parties.num_features
        self.released = None  # central DP: the statistics released with noise (server/dpstats.py), fresh runs only
        if start.transform is None and privacy.releases_statistics(cfg):
            from fedlinear.server import dpstats

            self.released = dpstats.release(self.grid, cfg, self.parties, privacy.statistics_noise(cfg))
        pooled, reference_source, training_stats = privacy.choose_statistics(
            cfg, self.parties.pooled, num_features, self.released.stats if self.released else None
        )
        if start.transform is not None:
            transform = start.transform  # a resumed run keeps the transform it trained in
        else:
            transform = privacy.build_transform(cfg, training_stats, num_features)
        for note in transform.notes:
            progress.say(f"standardization: {note}")
        sizes = [int(info[protocol.SHARD_NUM_EXAMPLES]) for info in healthy.values()]
        if start.learning_rate is not None:
            batch_size = start.batch_size if start.batch_size is not None else int(cfg.batch_size)
            learning_rate, rate_note = start.learning_rate, (
                f"learning rate {start.learning_rate:.4g}, batch size {batch_size} (from the checkpoint)"
            )
        else:
            work = resolve_local_work(cfg, training_stats, transform, sizes)
            learning_rate, rate_note, batch_size = work.learning_rate, work.note, work.batch_size
        from_nodes = pooled is self.parties.pooled  # no privacy: the parties' sums (and R factors)
        stable = self.parties.optimum if from_nodes else yardstick.from_statistics_file(cfg, pooled)
        evaluate = evaluation.Evaluator(self.test, pooled, transform, stable, cfg.fit_intercept)
        if evaluate.optimum is not None and not (from_nodes and stable is not None):
            evaluate.reference["source"] = reference_source
        for note in evaluate.reference.get("notes", []):
            progress.say(f"yardstick: {note}")
        evaluation.check_target(cfg, evaluate, reference_source)  # before round 1: a target needs the ratio
        test_mse = evaluate.reference.get("test-mse")
        progress.say(
            f"{len(healthy)} shards, {num_features} features, {sum(sizes)} samples; "
            f"standardize = {transform.kind}; {rate_note}"
            + (f"; pooled least-squares test MSE {test_mse:.6g}" if test_mse is not None else "")
            + (f"; yardstick by {evaluate.yardstick.method}, condition number {evaluate.yardstick.condition_number:.4g}"
               if evaluate.yardstick is not None else "")
        )
        self.transform, self.learning_rate, self.rate_note, self.evaluate = transform, learning_rate, rate_note, evaluate
        self.training_stats = training_stats
        self.batch_size = batch_size

    def _build_strategy(self) -> None:
        """The strategy (with its DP wrapper), the privacy side of the rounds, and the settings every
        task carries in its ConfigRecord (Strategy.start's ``train_config`` and ``evaluate_config``):
        the one channel by which they reach the clients."""
        cfg = self.cfg
        self.eligible = self.parties.eligible
        sizes = {int(info[protocol.SHARD_CLIENT_KEY]): int(info[protocol.SHARD_NUM_EXAMPLES])
                 for info in self.parties.healthy.values()}  # fmt: skip
        self.built = build_strategy(cfg, self.eligible, sizes, self.parties.num_features)
        self.strategy, self.accountant = self.built.strategy, self.built.accountant
        if self.released is not None:  # the statistics release, in the same ε (a resumed run loads it with the state)
            event = privacy.statistics_event(self.released.noise_multiplier, self.released.parties)
            if self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(event):
                raise FedLinearError(
                    f"the statistics release alone would take ε past 'dp-max-epsilon' = {cfg.dp_max_epsilon:g}: lower "
                    "'dp-statistics-share' or raise the budget"
                )
            self.accountant.compose(event)
        self.privacy = privacy.RoundPrivacy(cfg, self.built, len(self.eligible))
        self.train_config = {
            **protocol.train_config(self.learning_rate, self.transform, self.batch_size),
            **privacy.local_dp_config(cfg),
        }
        self.evaluate_config = protocol.evaluate_config(self.transform)
        self.secure_cfg = cfg
        if privacy.secure_rounds(cfg):  # secure aggregation hook: the clipping range follows the training variables
            start = self._fresh_start()[0]  # the continued model's weights under init-from
            clipping_range, how = secure.training_clipping_range(cfg, self.training_stats, self.transform, start)
            self.secure_cfg = dataclasses.replace(cfg, secagg_clipping_range=clipping_range)
            progress.say(secure.describe(self.secure_cfg) + f"; {how}")
        if self.privacy.describe():
            progress.say(self.privacy.describe())

    def _fresh_start(self) -> tuple[lm.LinearWeights, continuation.Continued | None]:
        """The weights round 1 of this run starts from (a resumed run's too): Keras' Glorot start, or the
        earlier model under ``init-from`` (read once)."""
        if getattr(self, "_start", None) is None:
            cfg = self.cfg
            continued = continuation.start(cfg, self.parties.num_features, self.transform) if cfg.init_from else None
            weights = (
                continued.weights if continued is not None
                else initial_weights(self.parties.num_features, cfg.seed, self.transform, cfg.fit_intercept)
            )  # fmt: skip
            self._start = (weights, continued)
        return self._start

    def _open_history(self, start: resume.Start) -> None:
        """The weights the rounds start from and the history: round 0 (the initial model) for a fresh
        run, the checkpoint's rows for a resumed one (with the accountant and strategy state restored)."""
        cfg, healthy = self.cfg, self.parties.healthy
        weights, self.first_round, history = start.weights, start.first_round, start.history
        if self.first_round > 1:
            progress.say(f"resuming after round {self.first_round - 1} from {self.store.uri('checkpoints', 'latest.json')}")
        else:
            weights, continued = self._fresh_start()
            history = {"run-id": self.context.run_id, "rounds": []}
            if continued is not None:  # continuation: start from an earlier model (server/continuation.py)
                progress.say(continued.note)
                history["lineage"] = continued.lineage
                history["initial-weights"] = {"kernel": continued.raw_kernel, "bias": continued.raw_bias}
            row = {"round": 0, "elapsed-s": time.monotonic() - self.started, "clients-ok": 0, "clients-failed": 0}
            row.update(self.evaluate(weights))
            row.update(self.privacy.initial_row())
            history["rounds"].append(row)
        history["reference"] = self.evaluate.reference
        history["standardization"] = self.transform.to_json()
        history["learning-rate"] = {"value": self.learning_rate, "how": self.rate_note, "batch-size": self.batch_size}
        history["target-mse-ratio"] = cfg.target_mse_ratio  # the outcome (reached-target-at, ...) after the rounds
        if self.accountant is not None and start.accountant_state is not None:
            self.accountant.load_state_dict(start.accountant_state)  # a resumed run never resets ε
        if start.strategy_state is not None:
            self.built.load_state_dict(start.strategy_state)  # momentum / moments, the adaptive clipping norm reached
        history["query-failures"] = self.parties.failures
        shown = (protocol.SHARD_CLIENT_KEY, protocol.SHARD_PARTITION_ID, protocol.SHARD_NUM_EXAMPLES)
        history["parties"] = [  # the report: who took part, by node id, with their shard descriptions
            {"node-id": nid} | {k: healthy[nid][k] for k in shown if k in healthy[nid]}
            for nid in self.parties.in_key_order()
        ]
        history.setdefault("resumed-at", [])
        if self.first_round > 1:
            history["resumed-at"].append(self.first_round - 1)
        self.store.write_history(history)
        self.history, self.weights, self.arrays = history, weights, to_record(weights)

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Every round still to play, then the end of the run."""
        cfg = self.cfg
        first_round = self.first_round
        if cfg.stop_at_target and targets.reached_at(self.history["rounds"], cfg.target_mse_ratio) is not None:
            first_round = cfg.num_server_rounds + 1  # the checkpoint is the round that reached it: done
        for server_round in range(first_round, cfg.num_server_rounds + 1):
            if not self.play(server_round):
                break
        self.finish()

    def play(self, server_round: int) -> bool:
        """One round; False when the run stops after it (or before it: the privacy budget)."""
        messages = self.configure_train(server_round)
        if messages is None:
            return False
        trained = self.train(server_round, messages)
        new_arrays, train_metrics, too_few = self.aggregate_train(server_round, messages, trained)
        row = self.round_row(server_round, messages, trained, new_arrays is not None, train_metrics, too_few)
        if new_arrays is not None:
            self.arrays, self.weights = new_arrays, from_record(new_arrays)
            self.evaluate_clientapp(server_round, row)
        self.evaluate_serverapp(row)
        return self.record(server_round, row, trained.failures)

    # -- the phases ----------------------------------------------------------------------------------

    def configure_train(self, server_round: int) -> list[Message] | None:
        """Phase 1: the round's train tasks; None when the privacy budget stops training before it."""
        try:
            config = ConfigRecord(dict(self.train_config))
            messages = list(self.strategy.configure_train(server_round, self.arrays, config, self.grid))
            self.privacy.check_budget(messages)  # dp = local; the central wrappers check it themselves
        except PrivacyBudgetExhausted:
            self.stopped = self.privacy.budget_stop(server_round)
            progress.say(self.stopped)
            self.history["stopped"] = {"round": server_round - 1, "reason": self.stopped}
            return None
        except ValueError as exc:  # Flower's DP wrapper: fewer nodes connected than the accounted sample
            progress.say(f"round {server_round}: not configured: {one_line(exc)}")
            return []
        return messages

    def train(self, server_round: int, messages: list[Message]) -> Trained:
        """Phase 2: send the tasks and check what comes back (or run them through SecAgg+)."""
        cfg, eligible = self.cfg, self.eligible
        if privacy.secure_rounds(cfg) and messages:  # secure aggregation hook: SecAgg+ instead of clear replies
            sizes_by_node = {nid: int(info[protocol.SHARD_NUM_EXAMPLES]) for nid, info in self.parties.healthy.items()}
            secured = secure.train_round(self.grid, self.secure_cfg, server_round, messages, sizes_by_node)
            return Trained([], secured.failures, secured)
        received = exchange.send_and_receive(self.grid, messages, cfg.round_timeout) if messages else []
        answers, stale = replies.answers_to(messages, received, eligible)  # a late reply of an earlier round is not one
        ordered, failures = fixed_order(answers, eligible)
        failures += stale
        ordered = self.built.take_controls(ordered, failures)  # strategy = scaffold: the control deltas
        ordered = replies.validated(ordered, failures, self.parties.healthy, eligible, self.parties.num_features,
                                    self.arrays, cfg.max_update_norm, cfg.max_update_norm_factor, server_round)  # fmt: skip
        ordered = self.built.check_controls(ordered, failures)
        answered = {msg.metadata.src_node_id for msg in answers} | {f["node-id"] for f in stale}
        failures += [
            {"node-id": msg.metadata.dst_node_id, "client-key": eligible.get(msg.metadata.dst_node_id),
             "reason": f"no reply within 'round-timeout' ({cfg.round_timeout:g} s)"}
            for msg in messages if msg.metadata.dst_node_id not in answered
        ]  # fmt: skip
        return Trained(ordered, failures)

    def aggregate_train(
        self, server_round: int, messages: list[Message], trained: Trained
    ) -> tuple[ArrayRecord | None, Any, bool]:
        """Phase 3: (the new global weights or None, the aggregated train metrics or None, whether the
        round had fewer valid updates than ``min-train-nodes``)."""
        ordered, secured = trained.ordered, trained.secured
        self.privacy.seed_noise(server_round)
        too_few = trained.num_valid < self.min_train  # not aggregated (nor noised, nor accounted centrally)
        if too_few:
            self.privacy.void(server_round)
            new_arrays, train_metrics = None, None
        else:
            new_arrays, train_metrics = self.strategy.aggregate_train(server_round, ordered) if ordered else (None, None)
        if secured is not None and not too_few:  # secure aggregation hook: the aggregate, noised under central DP
            update = self.privacy.secure_update(secured, server_round)
            new_arrays = None if update is None else secure.apply_update(self.arrays, update)
            train_metrics = None if update is None else secured.metrics
        self.privacy.account(trained.released, len(messages))
        return new_arrays, train_metrics, too_few

    def round_row(
        self, server_round: int, messages: list[Message], trained: Trained, aggregated: bool, train_metrics, too_few: bool
    ) -> dict[str, Any]:
        """The round's history row so far (who took part and failed, ε, why nothing was aggregated, the
        train loss), its failures said; counts the rounds in a row without an update."""
        cfg, failures, secured = self.cfg, trained.failures, trained.secured
        row = {
            "round": server_round,
            "clients-ok": sum(1 for msg in trained.ordered if not msg.has_error())
            + (secured.num_aggregated if secured is not None else 0),  # secure aggregation hook
            "clients-failed": len(failures),
            "failures": failures,
        }
        if len(messages) != len(self.eligible):  # the report's party x round grid: who was asked (absent: everyone)
            row["sampled"] = sorted(msg.metadata.dst_node_id for msg in messages)
        for failure in failures:  # party-supplied text: one printable line, bounded (common.errors)
            failure["round"] = server_round
            failure["reason"] = untrusted_text(failure["reason"])
        row.update(self.privacy.row())  # ε so far, the adaptive clipping norm for the next round
        for failure in failures:
            progress.say(f"round {server_round}: node {failure['node-id']} failed: {failure['reason']}")
        if aggregated:
            self.failed_in_a_row = 0
        else:
            self.failed_in_a_row += 1
            if too_few:
                row["not-aggregated"] = (
                    f"{trained.num_valid} valid update(s), fewer than 'min-train-nodes' = {cfg.min_train_nodes:g} "
                    f"({self.min_train})"
                )
                progress.say(f"round {server_round}: not aggregated: {row['not-aggregated']}; the global model is unchanged")
            else:
                row["not-aggregated"] = "no client update"
                progress.say(f"round {server_round}: no client update; the global model is unchanged")
        if train_metrics is not None:
            row["train-loss"] = float(train_metrics[protocol.METRIC_TRAIN_LOSS])
            self.baseline.setdefault("train-loss", row["train-loss"])
        return row

    def evaluate_clientapp(self, server_round: int, row: dict[str, Any]) -> None:
        """Phase 4: federated evaluation of the new global model (only with ``fraction-evaluate`` > 0)."""
        if self.cfg.fraction_evaluate > 0:
            config = ConfigRecord(dict(self.evaluate_config))
            eval_replies = exchange.send_and_receive(
                self.grid, self.strategy.configure_evaluate(server_round, self.arrays, config, self.grid), self.cfg.round_timeout
            )
            eval_metrics = self.strategy.aggregate_evaluate(server_round, eval_replies)
            if eval_metrics is not None:
                row["eval-mse"] = float(eval_metrics[protocol.METRIC_EVAL_MSE])

    def evaluate_serverapp(self, row: dict[str, Any]) -> None:
        """Phase 5: centralized evaluation, the yardstick metrics (:class:`server.evaluation.Evaluator`)."""
        row.update(self.evaluate(self.weights))
        row["elapsed-s"] = time.monotonic() - self.started

    def record(self, server_round: int, row: dict[str, Any], failures: list[dict]) -> bool:
        """Phase 6: history, then checkpoint; False when the run stops here (an error when it fails)."""
        cfg, history = self.cfg, self.history
        history["rounds"].append(row)
        weights = self.weights
        diverged = (
            "has non-finite weights" if not np.isfinite(weights.vector()).all() else evaluation.divergence(row, self.baseline)
        )
        if diverged:
            history["stopped"] = {"round": server_round, "reason": f"diverged: {diverged}"}
            self.store.write_history(history)
            progress.say(progress.progress_line(row))
            raise FedLinearError(
                f"training diverged in round {server_round}: the global model {diverged}; no model was exported. "
                f"Lower 'learning-rate' (now {self.learning_rate:.4g}) or set 'standardize' = auto"
                + (" (now none)" if self.transform.kind == "none" else "")
                + ", and start again in a new run-dir"
            )
        self.store.write_history(history)  # history first: a checkpoint never runs ahead of the history
        self.checkpoints.write(server_round, weights, self.accountant, self.built)
        progress.say(progress.progress_line(row))
        if self.failed_in_a_row >= cfg.max_failed_rounds:
            last = failures[-1]["reason"] if failures else row.get("not-aggregated", "no replies within 'round-timeout'")
            raise FedLinearError(
                f"no client update was aggregated in {self.failed_in_a_row} consecutive rounds "
                f"(config key 'max-failed-rounds' = {cfg.max_failed_rounds}); last failure: {last}. "
                f"Fix the cause and run the same command again to resume after round {server_round}"
            )
        return not (cfg.stop_at_target and targets.reached(row, cfg.target_mse_ratio))  # this round is the result

    # -- the end -------------------------------------------------------------------------------------

    def finish(self) -> None:
        """The target's outcome in the history, then the model, the manifest and the status."""
        cfg, history, weights = self.cfg, self.history, self.weights
        outcome = targets.outcome(history["rounds"], cfg.target_mse_ratio, cfg.stop_at_target)
        history.update(outcome)
        target_lines = targets.summary_lines(history, cfg.num_server_rounds)
        if outcome["stopped-at-target"]:
            history["stopped"] = {"round": history["rounds"][-1]["round"], "reason": "; ".join(target_lines)}
        self.store.write_history(history)
        for line in target_lines:
            progress.say(line)
        raw_kernel, raw_bias = self.transform.to_raw(weights.kernel, weights.bias_value)
        result = finish.Result(
            kernel=raw_kernel,
            bias=raw_bias,
            transform=self.transform,
            learning_rate={"value": self.learning_rate, "how": self.rate_note, "batch-size": self.batch_size},
            method={"privacy": self.privacy.summary(self.stopped)},
            reference=self.evaluate.reference,
            final_row=history["rounds"][-1],
            standardized=weights,
            outcome={**outcome, **({"lineage": history["lineage"]} if "lineage" in history else {})},
            status_message=self.stopped or (history["stopped"]["reason"] if outcome["stopped-at-target"] else ""),
        )
        finish.complete(self.store, self.context, cfg, self.parties, self.test, self.started, result)
