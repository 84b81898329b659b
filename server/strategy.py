"""Strategies for fedlinear: Flower's own, made deterministic, built in one place from the config.

``build_strategy`` is the factory that later wrappers (differential privacy, robust aggregation,
secure aggregation) plug into. The strategies are Flower's classes with one mixin that

* samples nodes with a seeded RNG over the nodes that passed the pre-round query, in a stable
  order (by client key), so one seed fixes client sampling in simulation and deployment alike;
* leaves aggregation to Flower's own FedAvg ``aggregate_train``; the server orders the replies by
  client key first (:func:`fixed_order`), so float sums, and hence the final weights, do not depend
  on which node answered first, and records the error replies, so a failing client is reported.

``strategy`` picks the class (docs/how-to/strategies.md): FedAvg, FedProx, FedAvgM, the adaptive server
optimizers FedAdam / FedYogi / FedAdagrad (Reddi et al.), and the robust rules FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan, all Flower 1.42's own classes. Around them:

* the mixin's ``configure_train`` does what the bypassed Flower ``configure_train`` did: the round's
  ``config`` (what the server resolved for the round: learning rate, standardization, ...) goes into
  every task with ``server-round``, FedProx's ``proximal-mu`` into every train config, FedAvgM /
  FedOpt remember the global weights the round starts from (their pseudo-gradient is taken against
  them);
* the server optimizers' result is cast back to the model's float32 (FedAdam's bias-corrected step
  is a NumPy float64 and would promote the global model), so a checkpoint holds exactly the live
  model, and their state (momentum, ``m_t``, ``v_t``) goes into every checkpoint
  (:meth:`Strategies.state_dict`) so a resumed run is bit-identical;
* the robust rules see each reply as an update ``w_reply - w_global`` in float64 (every rule is
  translation-equivariant, so the aggregate is the same in exact arithmetic) and weigh every party
  the same: Flower computes Krum's squared distances as ``|a|² + |b|² - 2a·b`` in the replies'
  float32, which cancels to noise when the weights are large next to their spread; and they get
  copies of the replies (FedMedian / FedTrimmedAvg / Bulyan empty the replies they read);
* Bulyan selects its θ = n − 2f candidates by Krum applied recursively, as the paper does
  (El Mhamdi et al. 2018); Flower's default takes the θ best Krum scores of one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedlinear.common import protocol, scaffold
from fedlinear.common.config import RunConfig
from fedlinear.common.errors import FedLinearError
from fedlinear.server import privacy


class DeterministicMixin:
    """Seeded sampling over known nodes and order-independent aggregation for Flower strategies."""

    seed: int = 0
    # node id -> stable client key, set by the server after the pre-round query
    eligible: dict[int, int]

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
        config[protocol.KEY_SERVER_ROUND] = server_round  # what FedAvg's configure_* (bypassed here) do
        if train:
            self._remember_global(arrays)
            if isinstance(self, FedProx):  # what FedProx.configure_train (bypassed here) does
                config[protocol.KEY_PROXIMAL_MU] = float(self.proximal_mu)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN if train else MessageType.EVALUATE)

    def _remember_global(self, arrays: ArrayRecord) -> None:
        """The global weights of this round, for the server optimizers' pseudo-gradient (what
        FedOpt.configure_train does; FedAvgM's only does it once, we do it every round, so a round
        the server changed the model some other way, or a resumed run, starts from the model sent)."""
        if isinstance(self, FedOpt):
            self.current_arrays = {k: array.numpy() for k, array in arrays.items()}
        elif isinstance(self, FedAvgM):
            self.current_arrays = arrays

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, train=True)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure(server_round, arrays, config, grid, train=False)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Evaluation losses weighted by the examples evaluated, whatever weighs the train replies
        (evaluate replies carry no ``unit-weight``: Flower would refuse them under DP or a robust rule)."""
        weighted_by, self.weighted_by_key = self.weighted_by_key, protocol.METRIC_NUM_EXAMPLES
        try:
            return super().aggregate_evaluate(server_round, replies)
        finally:
            self.weighted_by_key = weighted_by


class DeterministicFedAvg(DeterministicMixin, FedAvg):
    """Flower's FedAvg with seeded sampling; ``aggregate_train`` is FedAvg's own, untouched (Flower's
    accounted DP wrappers require exactly that), so the server orders replies before calling it."""


class DeterministicFedProx(DeterministicMixin, FedProx):
    """Flower's FedProx: FedAvg's aggregation; ``proximal-mu`` reaches the clients' train config."""


def as_float32(arrays: ArrayRecord | None) -> ArrayRecord | None:
    """The aggregate in the model's dtype (float32), the same bytes a checkpoint stores."""
    if arrays is None:
        return None
    return ArrayRecord({k: Array(np.ascontiguousarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()})


def _encode(value: np.ndarray) -> dict:
    value = np.asarray(value)
    return {"dtype": str(value.dtype), "shape": list(value.shape), "values": value.ravel().tolist()}


def _decode(value: dict) -> np.ndarray:
    return np.asarray(value["values"], dtype=value["dtype"]).reshape(value["shape"])


class ServerOptimizerMixin:
    """FedAvgM and the FedOpt family: Flower's aggregation, its result cast to float32, and the
    optimizer state as JSON for the checkpoint."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = super().aggregate_train(server_round, replies)
        arrays = as_float32(arrays)
        if isinstance(self, FedAvgM) and arrays is not None:
            self.current_arrays = arrays
        return arrays, metrics

    def state_dict(self) -> dict:
        if isinstance(self, FedOpt):
            return {
                name: None if moment is None else {k: _encode(v) for k, v in moment.items()}
                for name, moment in (("m_t", self.m_t), ("v_t", self.v_t))
            }
        return {"momentum": None if self.momentum_vector is None else [_encode(v) for v in self.momentum_vector]}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self, FedOpt):
            for name in ("m_t", "v_t"):
                moment = state.get(name)
                setattr(self, name, None if moment is None else {k: _decode(v) for k, v in moment.items()})
        else:
            momentum = state.get("momentum")
            self.momentum_vector = None if momentum is None else [_decode(v) for v in momentum]


class DeterministicFedAvgM(DeterministicMixin, ServerOptimizerMixin, FedAvgM):
    """Flower's FedAvgM (server SGD with momentum on the pseudo-gradient w_global - mean)."""


class DeterministicFedAdam(DeterministicMixin, ServerOptimizerMixin, FedAdam):
    """Flower's FedAdam."""


class DeterministicFedYogi(DeterministicMixin, ServerOptimizerMixin, FedYogi):
    """Flower's FedYogi."""


class DeterministicFedAdagrad(DeterministicMixin, ServerOptimizerMixin, FedAdagrad):
    """Flower's FedAdagrad."""


class _Copy:
    """A valid reply's content as Flower's aggregation reads it (``has_error()``, ``content``);
    building a real Message needs the serving process's task identity."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


class RobustMixin:
    """The robust rules: Flower's aggregation on float64 updates (copies), equal party weights.

    Each valid reply is handed over as ``w_reply - w_global`` in float64 (the difference of two
    float32 values is exact there); the aggregate update is added back and cast to float32.
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        base = {k: a.numpy().astype(np.float64) for k, a in self.current_global.items()}
        shadows = []
        for msg in replies:
            if msg.has_error():
                shadows.append(msg)
                continue
            record = msg.content[self.arrayrecord_key]
            update = ArrayRecord({k: Array(record[k].numpy().astype(np.float64) - base[k]) for k in record.keys()})
            metrics = {name: MetricRecord(dict(m)) for name, m in msg.content.metric_records.items()}
            shadows.append(_Copy(RecordDict({self.arrayrecord_key: update, **metrics})))
        arrays, metrics = super().aggregate_train(server_round, shadows)
        if arrays is None:
            return None, metrics
        return as_float32(ArrayRecord({k: Array(base[k] + arrays[k].numpy()) for k in arrays.keys()})), metrics

    def _remember_global(self, arrays: ArrayRecord) -> None:
        self.current_global = arrays


class DeterministicFedMedian(RobustMixin, DeterministicMixin, FedMedian):
    """Flower's FedMedian: the coordinatewise median."""


class DeterministicFedTrimmedAvg(RobustMixin, DeterministicMixin, FedTrimmedAvg):
    """Flower's FedTrimmedAvg: per coordinate, int(beta * n) values cut at each end, the rest averaged."""


class DeterministicKrum(RobustMixin, DeterministicMixin, Krum):
    """Flower's Krum: the reply with the smallest sum of squared distances to its n - f - 2 nearest."""


class DeterministicMultiKrum(RobustMixin, DeterministicMixin, MultiKrum):
    """Flower's MultiKrum: the mean of the m best Krum scores; m = 0 in the config means n - f."""

    select_auto: bool = False

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if self.select_auto:
            valid = sum(1 for msg in replies if not msg.has_error())
            self.num_nodes_to_select = max(1, valid - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


def recursive_krum(contents: list[RecordDict], num_malicious_nodes: int, theta: int) -> list[RecordDict]:
    """Bulyan's selection (El Mhamdi et al. 2018, Algorithm 1): apply Krum to the replies not yet
    chosen, move the winner to the selection, repeat until θ are chosen."""
    remaining = list(contents)
    selected: list[RecordDict] = []
    while len(selected) < theta and remaining:
        best = select_multikrum(remaining, num_malicious_nodes=num_malicious_nodes, num_nodes_to_select=1)[0]
        index = next(i for i, content in enumerate(remaining) if content is best)
        selected.append(remaining.pop(index))
    return selected


class DeterministicBulyan(RobustMixin, DeterministicMixin, Bulyan):
    """Flower's Bulyan (n >= 4f + 3) with the paper's recursive Krum selection."""


class DeterministicScaffold(DeterministicMixin, FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II; :mod:`common.scaffold`): every train
    task carries the server control ``c`` and the party's ``c_i``; the party's ``Δc_i`` is checked
    against option II recomputed from its reply's weights; the model moves by ``server-learning-rate``
    x the example-weighted mean update (FedAvg's own mean), ``c`` by the example-weighted ``Δc_i``."""

    controls: scaffold.Controls
    server_learning_rate: float = 1.0
    local_epochs: int = 1
    sizes: dict[int, int]  # client key -> shard size (the shard query)

    def _configure(self, server_round, arrays, config, grid, train):
        messages = super()._configure(server_round, arrays, config, grid, train)
        if not train:
            return messages
        self.round_config = dict(config)  # learning rate and batch size of the round, for option II
        out = []
        for msg in messages:  # one content per node: its own c_i (FedAvg shares one RecordDict)
            key = self.eligible[msg.metadata.dst_node_id]
            control = ArrayRecord({protocol.ARRAY_C: Array(self.controls.c.copy()),
                                   protocol.ARRAY_CI: Array(self.controls.of(key).copy())})  # fmt: skip
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: msg.content[self.configrecord_key],
                                  protocol.RECORD_CONTROL: control})  # fmt: skip
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id))
        return out

    def _remember_global(self, arrays: ArrayRecord) -> None:
        self.current_global = arrays

    def take_controls(self, replies: list[Message], failures: list[dict]) -> list[Message]:
        """Before the weights are checked: each valid reply's ``Δc_i`` taken out of it (so the reply is a
        plain train reply) and kept by node; a reply without a well-formed one is a failure."""
        self.claimed: dict[int, np.ndarray] = {}
        kept = []
        size = self.controls.size
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            nid = msg.metadata.src_node_id
            record = msg.content.array_records.get(protocol.RECORD_CONTROL)
            problem = None
            if record is None or set(record.keys()) != {protocol.ARRAY_DELTA}:
                problem = "SCAFFOLD reply without its control delta"
            else:
                array = record[protocol.ARRAY_DELTA]
                if array.dtype != "float64" or tuple(array.shape) != (size,) or len(array.data) > 8 * size + 4096:
                    problem = f"malformed control delta: {array.dtype} {tuple(array.shape)}, expected float64 ({size},)"
                else:
                    try:
                        self.claimed[nid] = np.asarray(array.numpy(), np.float64)
                    except Exception:  # noqa: BLE001 - undecodable bytes are a bad reply
                        problem = "malformed control delta: cannot be decoded"
            if problem is None:
                del msg.content[protocol.RECORD_CONTROL]
                kept.append(msg)
            else:
                failures.append({"node-id": nid, "client-key": self.eligible.get(nid), "reason": problem})
        return kept

    def check_controls(self, replies: list[Message], failures: list[dict]) -> list[Message]:
        """After the weights passed their checks: each ``Δc_i`` against option II from the reply's weights."""
        x = _vector(self.current_global)
        c = self.controls.c
        rate = float(self.round_config[protocol.KEY_LEARNING_RATE])
        batch = int(self.round_config[protocol.KEY_BATCH_SIZE])
        self.deltas: dict[int, np.ndarray] = {}
        kept = []
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            nid = msg.metadata.src_node_id
            key = self.eligible[nid]
            steps = scaffold.local_steps(self.sizes[key], batch, self.local_epochs)
            expected = scaffold.control_delta(x, _vector(msg.content[self.arrayrecord_key]), c, steps, rate)
            problem = scaffold.check_delta(self.claimed.get(nid, np.zeros(0)), expected)
            if problem is None:
                self.deltas[key] = expected
                kept.append(msg)
            else:
                failures.append({"node-id": nid, "client-key": key, "reason": problem})
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        base = {k: a.numpy().astype(np.float64) for k, a in self.current_global.items()}
        eta = float(self.server_learning_rate)
        arrays = ArrayRecord({k: Array(base[k] + eta * (mean[k].numpy().astype(np.float64) - base[k])) for k in base})
        deltas = {key: d for key, d in getattr(self, "deltas", {}).items()}
        self.controls.update(deltas, self.sizes, sum(self.sizes.values()))
        return as_float32(arrays), metrics

    def state_dict(self) -> dict:
        return self.controls.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controls.load_state_dict(state)


def _vector(record: ArrayRecord) -> np.ndarray:
    """``[kernel..., bias]`` float64 of a weights record."""
    return np.concatenate([record[name].numpy().astype(np.float64).ravel() for name in ("kernel", "bias")])


STATEFUL = (DeterministicScaffold, DeterministicFedAvgM, DeterministicFedAdam, DeterministicFedYogi, DeterministicFedAdagrad)
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
# Our default server step of each FedOpt strategy (config key eta = 0 means this one), measured on the
# default synthetic data (docs/how-to/strategies.md); Flower's are 0.1, 0.01, 0.1: too slow for 20 rounds here
DEFAULT_ETA = {"fedadam": 0.5, "fedyogi": 0.3, "fedadagrad": 1.0}


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
    """What the server drives: ``strategy`` (the configured strategy, or a DP wrapper around FedAvg),
    ``base`` (the Flower strategy that samples the nodes and builds their tasks) and the privacy
    accountant, if any."""

    strategy: object
    base: DeterministicMixin
    accountant: object | None
    num_sampled: int

    def state_dict(self) -> dict:
        """What a checkpoint must hold for a resumed run to continue exactly: the server optimizer's
        state (FedAvgM momentum, FedAdam/FedYogi/FedAdagrad ``m_t``/``v_t``) and the adaptive
        clipping norm, as JSON-able values."""
        state = {}
        if isinstance(self.base, STATEFUL):
            state["optimizer"] = self.base.state_dict()
        if self.strategy is not self.base and hasattr(self.strategy, "state_dict"):
            state["clipping"] = self.strategy.state_dict()
        return state

    def take_controls(self, replies: list[Message], failures: list[dict]) -> list[Message]:
        """SCAFFOLD: the replies' control deltas taken out and checked (other strategies: unchanged)."""
        if isinstance(self.base, DeterministicScaffold):
            return self.base.take_controls(replies, failures)
        return replies

    def check_controls(self, replies: list[Message], failures: list[dict]) -> list[Message]:
        """SCAFFOLD: each control delta against option II from its reply's checked weights."""
        if isinstance(self.base, DeterministicScaffold):
            return self.base.check_controls(replies, failures)
        return replies

    def load_state_dict(self, state: dict) -> None:
        if "optimizer" in state and isinstance(self.base, STATEFUL):
            self.base.load_state_dict(state["optimizer"])
        if "clipping" in state and self.strategy is not self.base and hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(state["clipping"])


def make_base(cfg: RunConfig, num_sampled: int) -> DeterministicMixin:
    """The Flower strategy class ``strategy`` names, with its knobs from the config."""
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        # under DP every client counts the same (server/privacy.py); the robust rules count parties, not
        # examples (a party's claimed size cannot be trusted)
        "weighted_by_key": protocol.METRIC_UNIT_WEIGHT if privacy.equal_weights(cfg) or cfg.strategy in ROBUST
        else protocol.METRIC_NUM_EXAMPLES,
        "arrayrecord_key": protocol.RECORD_ARRAYS,
        "configrecord_key": protocol.RECORD_CONFIG,
    }  # fmt: skip
    name, f = cfg.strategy, cfg.num_malicious_nodes
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(name)
    if need is not None and num_sampled < need:
        raise FedLinearError(
            f"config key 'strategy' = {name} with 'num-malicious-nodes' = {f} needs at least {need} clients a round "
            f"({'4f + 3' if name == 'bulyan' else '2f + 3'}), got {num_sampled}; "
            "lower 'num-malicious-nodes' or add clients"
        )
    if name == "multikrum" and cfg.num_nodes_to_select > num_sampled:
        raise FedLinearError(
            f"config key 'num-nodes-to-select' ({cfg.num_nodes_to_select}) exceeds the {num_sampled} clients of a round"
        )
    eta = cfg.eta or DEFAULT_ETA.get(name, 0.0)
    if name == "fedprox":
        return DeterministicFedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedavgm":
        return DeterministicFedAvgM(
            **common, server_learning_rate=cfg.server_learning_rate, server_momentum=cfg.server_momentum
        )
    if name in ("fedadam", "fedyogi"):
        kind = DeterministicFedAdam if name == "fedadam" else DeterministicFedYogi
        return kind(**common, eta=eta, beta_1=cfg.beta_1, beta_2=cfg.beta_2, tau=cfg.tau)
    if name == "fedadagrad":
        return DeterministicFedAdagrad(**common, eta=eta, tau=cfg.tau)
    if name == "fedmedian":
        return DeterministicFedMedian(**common)
    if name == "fedtrimmedavg":
        return DeterministicFedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    if name == "krum":
        return DeterministicKrum(**common, num_malicious_nodes=f)
    if name == "multikrum":
        strategy = DeterministicMultiKrum(
            **common, num_malicious_nodes=f, num_nodes_to_select=cfg.num_nodes_to_select or 1
        )
        strategy.select_auto = cfg.num_nodes_to_select == 0
        return strategy
    if name == "bulyan":
        return DeterministicBulyan(**common, num_malicious_nodes=f, selection_rule=recursive_krum)
    if name == "scaffold":
        strategy = DeterministicScaffold(**common)
        strategy.server_learning_rate, strategy.local_epochs = cfg.server_learning_rate, cfg.local_epochs
        return strategy
    # fedavg; fedols runs its own rounds (server/fedols.py) and needs only the sampling
    return DeterministicFedAvg(**common)


def build_strategy(
    cfg: RunConfig, eligible: dict[int, int], sizes: dict[int, int] | None = None, num_features: int = 0
) -> Strategies:
    """The strategy for this run (``strategy``), wrapped for differential privacy when asked (:func:`server.privacy.wrap`)."""
    num_sampled = sample_size(len(eligible), cfg.fraction_train)
    base = make_base(cfg, num_sampled)
    base.seed = cfg.seed
    base.eligible = dict(eligible)
    if isinstance(base, DeterministicScaffold):  # the shard sizes (client key -> n) and the zero controls
        base.sizes = dict(sizes or {})
        base.controls = scaffold.Controls(num_features + 1)
    strategy, accountant = privacy.wrap(base, cfg, num_sampled, len(eligible))  # DP: which wrapper, the accountant
    return Strategies(strategy, base, accountant, num_sampled)
