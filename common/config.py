"""The typed run configuration, parsed and validated once from Flower's ``context.run_config``.

Keys live in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (kebab-case) and may be overridden
with ``flwr run --run-config 'key=value ...'`` or ``fedlinear run --set key=value``. Each key is
documented in the ``Attributes`` of :class:`RunConfig`, from which docs/reference/configuration.md is
generated; the defaults below are the single source of truth for anything not given in ``pyproject.toml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from fedlinear.common import privacy
from fedlinear.common.errors import FedLinearError

ENGINES = ("numpy", "keras")
HEADER_MODES = ("auto", "yes", "no")
REFERENCE_MODES = ("auto", "none")
STANDARDIZE_MODES = ("auto", "whiten", "scale", "none")
DP_MODES = ("none", "central-server-clip", "central-client-clip", "local")
NOISE_SEED_MODES = ("seed", "secure")
CLIPPING_MODES = ("fixed", "adaptive")
DP_STATISTICS_MODES = ("auto", "release", "none")
FEDOLS_METHODS = ("qr", "normal")  # common/fedols.py METHODS
STRATEGIES = (
    "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fedols", "scaffold",
)  # fmt: skip
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every knob of a fedlinear run.

    Attributes
    ----------
    num_server_rounds : int (default: 20)
        Federated rounds to run (``num-server-rounds``).
    local_epochs : int (default: 1)
        Passes over the local shard per round (``local-epochs``).
    batch_size : int or "auto" (default: "auto")
        Mini-batch size of local SGD (``batch-size``). ``auto`` lets the server choose the local work
        from the pooled statistics, the shard sizes and the rounds (:func:`common.scaling.auto_local_work`):
        one full-batch gradient step a round (the FedAvg mean of the replies is then exactly a gradient
        step on the pooled data, so heterogeneous parties cannot drift) when that provably converges in
        ``num-server-rounds``, else mini-batches of 32 (the default before ``auto``).
    learning_rate : float or "auto" (default: "auto")
        Step size of local SGD in the standardized space (``learning-rate``); ``auto`` derives it from
        the pooled statistics (stability, SGD noise floor, rounds): see :mod:`common.scaling`.
    fraction_train : float (default: 1.0)
        Fraction of connected nodes sampled for training each round (``fraction-train``).
    fraction_evaluate : float (default: 0.0)
        Fraction of nodes asked for a federated evaluation each round (``fraction-evaluate``);
        0 skips those tasks, since the server evaluates centrally when it has a test set.
    min_available_nodes : int (default: 2)
        Nodes that must be connected before round 1 (``min-available-nodes``).
    seed : int (default: 42)
        Fixes initialisation, client sampling and every client's batch order (``seed``).
    data_uri : str (default: "")
        Where a node's shard is. In simulation a template with ``{partition-id}``; in deployment
        each SuperNode's ``--node-config data-uri=...`` takes precedence (``data-uri``).
    test_uri : str (default: "")
        Held-out test set for centralized evaluation on the server (``test-uri``).
    run_dir : str (default: "")
        Absolute path or ``s3://`` URI for every output; empty means
        ``~/fedlinear-runs/run-<run id>`` (``run-dir``).
    init_from : str (default: "")
        Start from an earlier model instead of a fresh initialisation (``init-from``): a run
        directory, a model directory (``RUN_DIR/model``), a base path of published versions (its
        newest) or ``BASE/N``; absolute path or ``s3://``. The run learns its own standardization
        from its data and starts from the old model carried over exactly (the same function in raw
        space); the manifest's ``lineage`` names the parent with hashes. Not with ``strategy = fedols``
        (closed form: no start point). See docs/how-to/serve.md.
    engine : str (default: "numpy")
        Local training engine, ``numpy`` (no TensorFlow import) or ``keras`` (``engine``).
    target_column : int (default: -1)
        Which CSV column is the target; negative counts from the end (``target-column``).
    header : str (default: "auto")
        ``auto`` takes the first non-blank row as a header only when none of its fields is a
        number and none is empty; ``yes``/``no`` force it (``header``).
    standardize : str (default: "auto")
        The change of variables the clients train in, learned from pooled additive sums before
        round 1 and folded back into the exported model (``standardize``): ``whiten`` (centre and
        decorrelate the features, scale the target), ``scale`` (centre and scale each feature and
        the target), ``none`` (raw data); ``auto`` whitens when the pooled cross-products are known
        (``reference = auto``) and scales otherwise.
    max_failed_rounds : int (default: 3)
        Consecutive rounds without any aggregated client update after which the run stops as
        failed (``max-failed-rounds``).
    min_train_nodes : float (default: 1)
        Valid train replies a round needs to be aggregated (``min-train-nodes``): a number >= 1 is a
        count (an integer), one in (0, 1) a fraction of the eligible parties (those that passed the
        shard query), rounded up. A round with fewer is not aggregated (the model stays) and counts
        toward ``max-failed-rounds``.
    dp : str (default: "none")
        Differential privacy (``dp``): ``central-server-clip`` (the server clips each update to
        ``dp-clipping-norm`` and adds Gaussian noise to the mean; Flower's
        ``DifferentialPrivacyServerSideFixedClipping``), ``central-client-clip`` (clients clip with
        Flower's ``fixedclipping_mod``, the server adds the noise), ``local`` (each client clips its
        update and adds the noise itself), ``none``.
    dp_noise_multiplier : float (default: 1.0)
        Noise standard deviation over sensitivity, z (``dp-noise-multiplier``).
    dp_clipping_norm : float (default: 1.0)
        L2 bound on a client's update, in the standardized variables (``dp-clipping-norm``).
    dp_clipping : str (default: "fixed")
        ``fixed`` clips to ``dp-clipping-norm``; ``adaptive`` (``central-server-clip`` only) starts
        there and moves the norm toward the ``dp-target-quantile`` of the update norms each round by
        Andrew et al.'s geometric rule, with a noised clipped count whose ε share is accounted
        (``dp-clipping``). Refused with DP-FedOLS, which clips rows, not updates.
    dp_target_quantile : float (default: 0.5)
        Adaptive clipping: the fraction of updates that should fall within the norm (``dp-target-quantile``).
    dp_clip_learning_rate : float (default: 0.2)
        Adaptive clipping: the geometric step η of the norm (``dp-clip-learning-rate``).
    dp_clipped_count_stddev : float (default: 0)
        Adaptive clipping: standard deviation σ_b of the noise on the count of unclipped updates;
        0 means Andrew et al.'s default, sampled clients / 20, raised to ``dp-noise-multiplier`` when smaller (with few clients no split exists below it) (``dp-clipped-count-stddev``).
    dp_delta : float (default: 1e-5)
        The δ at which ε is reported (``dp-delta``).
    dp_max_epsilon : float (default: 0)
        Privacy budget: training stops before the round whose release would exceed it; 0 means no
        budget (``dp-max-epsilon``). DP-FedOLS, which releases once, is refused before any party is asked
        if that release would exceed it.
    dp_noise_seed : str (default: "seed")
        ``seed`` draws DP noise from ``seed`` (reproducible experiments: anyone who knows the seed can
        remove the noise); ``secure`` draws it from the operating system's entropy (``dp-noise-seed``).
    dp_target_epsilon : float (default: 0)
        A privacy budget to spend exactly (``dp-target-epsilon``): when > 0 the noise multiplier is
        derived from it (and ``dp-delta``) by the run's own RDP accountant, for the releases the run
        makes (``num-server-rounds`` Gaussian releases for an iterative strategy, DP-FedOLS's one
        split in three), and ``dp-noise-multiplier`` is ignored; 0 = use ``dp-noise-multiplier``.
        Refused with ``dp`` = none. A resumed run derives the same multiplier, so it must keep
        ``num-server-rounds`` (the ε fixes the noise for the rounds the run started with).
    dp_feature_bound : float (default: 0)
        DP-FedOLS (``strategy`` = fedols with ``dp``): the L2 bound B_X each party clips a feature row
        to, in the space rows are clipped in (the public standardization when ``dp-public-statistics``
        = true, else raw units) (``dp-feature-bound``); 0 = ``sqrt(d) + 1``, standardized space only.
        Public, not protected by ε. Non-zero is refused outside DP-FedOLS.
    dp_target_bound : float (default: 0)
        DP-FedOLS: the bound B_Y each party clips ``|y|`` to, in the same space (``dp-target-bound``);
        0 = 3 (standard deviations), standardized space only. Public, not protected by ε. Non-zero is
        refused outside DP-FedOLS.
    dp_public_statistics : bool (default: false)
        Under privacy, nodes send no statistics; with ``true`` the pooled statistics in
        ``statistics-uri`` are declared public and used for standardization (not covered by ε)
        (``dp-public-statistics``).
    dp_statistics : str (default: "none")
        Central DP-FedAvg (``dp`` = central-server-clip or central-client-clip, in the clear) without
        public statistics: whether the standardization statistics are released once with noise before
        round 1, accounted in the same ε (common/dpstats.py; ``dp-statistics``): ``release`` always;
        ``none`` never (``standardize`` = auto then trains on raw variables); ``auto`` releases when
        the predicted noise of a released scale is at most 2 bits (a factor 4) for
        ``min-available-nodes`` parties (data-independent, so the choice costs no privacy), else trains
        on raw variables. The manifest's ``privacy.statistics`` says which applied. The default is
        ``none`` because at 4 to 40 parties the released scales measured worse than raw training
        (docs/how-to/privacy.md); ``release`` / ``auto`` are for federations of many more parties.
    dp_statistics_share : float (default: 0.1)
        The share of the run's Gaussian privacy budget (of ``Σ 1/z²``, which RDP composes) the
        statistics release spends (``dp-statistics``); the rounds keep ``dp-noise-multiplier`` and the
        release's multiplier follows: ``1/z_s² = share / (1 − share) · rounds / z²``. In [0, 1); 0
        releases nothing (``dp-statistics-share``).
    dp_statistics_max_scale : float (default: 1e6)
        The declared range ``[1/M, M]`` of the columns' root mean squares for the released statistics
        (``dp-statistics-max-scale``, > 1): a column's scale outside it is clipped to the range's end.
        Public, not protected by ε; a narrower range gives less noisy scales.
    statistics_uri : str (default: "")
        Pooled statistics (``.npz``: count, mean, scatter) computed outside the federation;
        ``fedlinear run`` writes them from the shards on its machine when privacy is on. Read only
        under privacy (otherwise the nodes' own sums are used): for the least-squares yardstick, and
        for standardization when declared public (``statistics-uri``).
    reference : str (default: "auto")
        ``auto`` asks each node for its centred second moments (n, Σ[x y], Σ(z−μ)(z−μ)ᵀ) before
        round 1 so the server knows the pooled least-squares optimum and reports the gap to it;
        ``none`` keeps the cross-products on the nodes (only per-column sums for ``standardize``)
        (``reference``).
    node_wait_timeout : float (default: 120)
        Seconds the server waits for ``min-available-nodes`` before giving up (``node-wait-timeout``).
    round_timeout : float (default: 600)
        Seconds the server waits for replies in one round (``round-timeout``).
    secure_aggregation : bool (default: false)
        Aggregate each round's updates with Flower's SecAgg+ so the server learns only their
        weighted mean (``secure-aggregation``); see :mod:`server.secure`.
    secagg_num_shares : float (default: 1.0)
        SecAgg+ neighbours of each party, itself included (``secagg-num-shares``): <= 1 a fraction
        of the parties sampled in the round (1.0: everyone), > 1 a count (an integer >= 3).
    secagg_reconstruction_threshold : float (default: 0.7)
        Key shares needed to recover a party's secrets (``secagg-reconstruction-threshold``): <= 1
        a fraction of the shares, > 1 a count (an integer >= 2, below an integer
        ``secagg-num-shares``). Higher resists more colluding parties; each party tolerates
        ``shares - threshold`` dropped neighbours.
    secagg_clipping_range : float (default: 8.0)
        Every update coordinate must lie in ``±`` this (``secagg-clipping-range``), in the variables
        the clients train in; a client whose update does not fails the round's task rather than be
        silently clipped. When the pooled statistics are known the rounds use at least 8 x the
        largest coordinate of the initial weights and of the pooled optimum there (so the range
        follows the training variables' scale; see :func:`server.secure.training_clipping_range`).
        Quantization error per coordinate is below ``2 * range / quantization-range``.
    secagg_quantization_range : int (default: 4194304 = 2**22)
        Integer levels an update coordinate is quantized to (``secagg-quantization-range``); the
        number of parties in a round times this must stay below 2**32.
    secagg_timeout : float (default: 120)
        Seconds each of the four SecAgg+ stages waits for replies; a party that has not answered
        by then is dropped from the round (``secagg-timeout``).
    strategy : str (default: "fedavg")
        The server's aggregation, Flower's class of that name (``strategy``): ``fedavg``,
        ``fedprox``, ``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedmedian``,
        ``fedtrimmedavg``, ``krum``, ``multikrum``, ``bulyan``, ``fedols`` (server/fedols.py), or
        ``scaffold`` (Karimireddy et al. 2020, control variates against client drift; ours, Flower has
        none: common/scaffold.py; numpy engine only).
        With ``dp`` or ``secure-aggregation`` only ``fedavg`` (and ``fedols``). See server/strategy.py.
    proximal_mu : float (default: 0.01)
        FedProx's μ, sent to the clients in every train task (``proximal-mu``).
    server_learning_rate : float (default: 1.0)
        FedAvgM's and SCAFFOLD's server step (``server-learning-rate``).
    server_momentum : float (default: 0.5)
        FedAvgM's server momentum, in [0, 1) (``server-momentum``).
    eta : float (default: 0)
        FedAdam / FedYogi / FedAdagrad server step; 0 means the strategy's default in
        ``server.strategy.DEFAULT_ETA`` (``eta``).
    beta_1, beta_2 : float (default: 0.5, 0.99)
        FedAdam / FedYogi moment decays (``beta-1``, ``beta-2``).
    tau : float (default: 0.1)
        FedAdam / FedYogi / FedAdagrad adaptivity, > 0 (``tau``).
    trimmed_beta : float (default: 0.2)
        FedTrimmedAvg's fraction cut at each end, in [0, 0.5) (``trimmed-beta``).
    num_malicious_nodes : int (default: 1)
        f for Krum / MultiKrum / Bulyan (``num-malicious-nodes``).
    num_nodes_to_select : int (default: 0)
        MultiKrum's m; 0 means n - f of the round's valid replies (``num-nodes-to-select``).
    max_update_norm : float (default: 0)
        A train reply whose update (reply - global weights, standardized variables) has an L2 norm
        above this is rejected as that node's failure; 0 = off (``max-update-norm``).
    max_update_norm_factor : float (default: 0)
        Each round, a train reply whose update norm is above this multiple of the median update norm
        of the replies that passed every other check (at least 3 of them) is rejected as that node's
        failure; 0 = off, else finite and > 1 (``max-update-norm-factor``).
    fit_intercept : bool (default: true)
        Whether the model has an intercept (scikit-learn's name; ``fit-intercept``). ``false`` fits a
        model through the origin, ``y = x @ kernel``: the weights, the exported SavedModel and every
        strategy have no bias; standardization scales without centring (root mean square in place of
        the standard deviation); FedOLS solves without centring; the yardstick is the least-squares
        fit through the origin. A run's checkpoints resume only with the same value.
    fedols_method : str (default: "qr")
        ``strategy = fedols``: ``qr`` (each party sends the R of its centred block, TSQR; never forms
        XᵀX) or ``normal`` (the centred, additive normal equations) (``fedols-method``).
    fedols_l2 : float (default: 0)
        ``strategy = fedols``: ridge penalty, minimise ``||y − Xw − b||² + l2 ||w||²`` over the pooled
        raw data; the bias is not penalised (``fedols-l2``).
    target_mse_ratio : float (default: 0)
        A target for the gap to the optimum: test MSE / the pooled least-squares optimum's test MSE
        (``target-mse-ratio``); 0 = none, else a finite number >= 1. Needs that ratio: a test set
        (``test-uri``) and ``reference`` = auto. Reported after the run (common/target.py).
    stop_at_target : bool (default: false)
        End the run after the first round that reaches ``target-mse-ratio``; that round's model is the
        result (``stop-at-target``). Without it the run goes on and only reports.
    """

    num_server_rounds: int = 20
    local_epochs: int = 1
    batch_size: int | str = AUTO
    learning_rate: float | str = AUTO
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    seed: int = 42
    data_uri: str = ""
    test_uri: str = ""
    run_dir: str = ""
    init_from: str = ""
    engine: str = "numpy"
    target_column: int = -1
    header: str = "auto"
    standardize: str = "auto"
    max_failed_rounds: int = 3
    min_train_nodes: float = 1.0
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_clipping: str = "fixed"
    dp_target_quantile: float = 0.5
    dp_clip_learning_rate: float = 0.2
    dp_clipped_count_stddev: float = 0.0
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0
    dp_noise_seed: str = "seed"
    dp_target_epsilon: float = 0.0
    dp_feature_bound: float = 0.0
    dp_target_bound: float = 0.0
    dp_public_statistics: bool = False
    dp_statistics: str = "none"
    dp_statistics_share: float = 0.1
    dp_statistics_max_scale: float = 1e6
    statistics_uri: str = ""
    reference: str = "auto"
    node_wait_timeout: float = 120.0
    round_timeout: float = 600.0
    secure_aggregation: bool = False
    secagg_num_shares: float = 1.0
    secagg_reconstruction_threshold: float = 0.7
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_timeout: float = 120.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 1.0
    server_momentum: float = 0.5
    eta: float = 0.0
    beta_1: float = 0.5
    beta_2: float = 0.99
    tau: float = 0.1
    trimmed_beta: float = 0.2
    num_malicious_nodes: int = 1
    num_nodes_to_select: int = 0
    max_update_norm: float = 0.0
    max_update_norm_factor: float = 0.0
    fit_intercept: bool = True
    fedols_method: str = "qr"
    fedols_l2: float = 0.0
    target_mse_ratio: float = 0.0
    stop_at_target: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        """The kebab-case config keys, in declaration order."""
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse and validate Flower's run config; unknown keys are an error naming the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise FedLinearError(
                    f"unknown config key {_shown(key)}; known keys: {', '.join(cls.keys())}"
                )
            values[name] = _coerce(key, raw, _kind(name))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check ranges and choices; raise FedLinearError naming the offending key."""
        positive = {
            "num-server-rounds": self.num_server_rounds,
            "local-epochs": self.local_epochs,
            "batch-size": 1 if self.batch_size == AUTO else self.batch_size,
            "min-available-nodes": self.min_available_nodes,
            "max-failed-rounds": self.max_failed_rounds,
        }
        for key, value in positive.items():
            if value < 1:
                raise FedLinearError(f"config key '{key}' must be >= 1, got {value}")
        if self.learning_rate != AUTO and not 0 < self.learning_rate < 10:
            raise FedLinearError(f"config key 'learning-rate' must be in (0, 10), got {self.learning_rate}")
        if not 0 < self.fraction_train <= 1:
            raise FedLinearError(f"config key 'fraction-train' must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.fraction_evaluate <= 1:
            raise FedLinearError(
                f"config key 'fraction-evaluate' must be in [0, 1], got {self.fraction_evaluate}"
            )
        for key, value, choices in (
            ("engine", self.engine, ENGINES),
            ("header", self.header, HEADER_MODES),
            ("reference", self.reference, REFERENCE_MODES),
            ("standardize", self.standardize, STANDARDIZE_MODES),
            ("dp", self.dp, DP_MODES),
            ("dp-noise-seed", self.dp_noise_seed, NOISE_SEED_MODES),
            ("dp-clipping", self.dp_clipping, CLIPPING_MODES),
            ("dp-statistics", self.dp_statistics, DP_STATISTICS_MODES),
        ):
            if value not in choices:
                raise FedLinearError(f"config key '{key}' must be one of {', '.join(choices)}, got '{value}'")
        for key, value in (("node-wait-timeout", self.node_wait_timeout), ("round-timeout", self.round_timeout)):
            if not value > 0 or value == float("inf"):  # also refuses NaN
                raise FedLinearError(f"config key '{key}' must be a finite number of seconds > 0, got {value}")
        if not self.dp_noise_multiplier >= 0 or self.dp_noise_multiplier == float("inf"):
            raise FedLinearError(f"config key 'dp-noise-multiplier' must be >= 0, got {self.dp_noise_multiplier}")
        if self.dp != "none" and self.dp_noise_multiplier == 0:
            raise FedLinearError("config key 'dp-noise-multiplier' must be > 0 when 'dp' is not none")
        if not 0 < self.dp_clipping_norm < float("inf"):
            raise FedLinearError(f"config key 'dp-clipping-norm' must be > 0, got {self.dp_clipping_norm}")
        self._validate_ignored_dp_keys()
        if self.dp_clipping == "adaptive" and self.dp not in ("central-server-clip", "none"):
            raise FedLinearError(
                f"config key 'dp-clipping' = adaptive works with 'dp' = central-server-clip (the server must see "
                f"each update's norm), got dp = {self.dp}"
            )
        if getattr(self, "secure_aggregation", False) and self.dp == "central-server-clip":
            raise FedLinearError(
                "config key 'dp' = central-server-clip cannot work with 'secure-aggregation' = true: the server "
                "never sees an individual update to clip; use 'dp' = central-client-clip"
            )
        if not 0 < self.dp_target_quantile < 1:
            raise FedLinearError(f"config key 'dp-target-quantile' must be in (0, 1), got {self.dp_target_quantile}")
        if not 0 < self.dp_clip_learning_rate < float("inf"):
            raise FedLinearError(f"config key 'dp-clip-learning-rate' must be > 0, got {self.dp_clip_learning_rate}")
        if not 0 <= self.dp_clipped_count_stddev < float("inf"):
            raise FedLinearError(
                f"config key 'dp-clipped-count-stddev' must be >= 0 (0: max(clients / 20, dp-noise-multiplier)), got {self.dp_clipped_count_stddev}"
            )
        if not 0 < self.dp_delta < 1:
            raise FedLinearError(f"config key 'dp-delta' must be in (0, 1), got {self.dp_delta}")
        for key, value in (
            ("dp-target-epsilon", self.dp_target_epsilon),
            ("dp-feature-bound", self.dp_feature_bound),
            ("dp-target-bound", self.dp_target_bound),
        ):
            if not 0 <= value < float("inf"):
                raise FedLinearError(f"config key '{key}' must be a finite number >= 0 (0: see its docs), got {value}")
        if not 0 <= self.dp_max_epsilon < float("inf"):
            raise FedLinearError(f"config key 'dp-max-epsilon' must be >= 0 (0: no budget), got {self.dp_max_epsilon}")
        if not 0 <= self.dp_statistics_share < 1:
            raise FedLinearError(f"config key 'dp-statistics-share' must be in [0, 1), got {self.dp_statistics_share}")
        if not 1 < self.dp_statistics_max_scale < float("inf"):
            raise FedLinearError(f"config key 'dp-statistics-max-scale' must be a finite number > 1, got {self.dp_statistics_max_scale}")
        if self.seed < 0:
            raise FedLinearError(f"config key 'seed' must be >= 0, got {self.seed}")
        self._validate_secure_aggregation()
        self._validate_participation()
        self._validate_strategy()
        self._validate_fedols()
        self._validate_target()
        if self.init_from and not (self.init_from.startswith("s3://") or os.path.isabs(self.init_from)):
            raise FedLinearError(
                f"config key 'init-from' must be an absolute path or an s3:// URI, got '{self.init_from}'"
            )
        if self.init_from and self.strategy == "fedols":
            raise FedLinearError("config key 'init-from' has no effect with strategy = fedols (a closed form has no start point)")
        if self.run_dir and not (self.run_dir.startswith("s3://") or os.path.isabs(self.run_dir)):
            raise FedLinearError(
                f"config key 'run-dir' must be an absolute path or an s3:// URI, got '{self.run_dir}'"
            )

    def _validate_strategy(self) -> None:
        """``strategy`` and its knobs (server/strategy.py), ``max-update-norm`` and ``max-update-norm-factor``."""
        if self.strategy not in STRATEGIES:
            raise FedLinearError(f"config key 'strategy' must be one of {', '.join(STRATEGIES)}, got '{self.strategy}'")
        if self.strategy == "scaffold" and self.engine != "numpy":
            raise FedLinearError("config key 'strategy' = scaffold needs 'engine' = numpy (the correction is in its SGD loop)")
        if self.strategy == "scaffold" and not self.fit_intercept:
            raise FedLinearError(
                "config key 'strategy' = scaffold needs 'fit-intercept' = true (its control variates cover the "
                "kernel and the bias)"
            )
        inf = float("inf")
        for key, value, low, high, closed in (
            ("proximal-mu", self.proximal_mu, 0.0, inf, True),
            ("server-momentum", self.server_momentum, 0.0, 1.0, True),
            ("eta", self.eta, 0.0, inf, True),
            ("beta-1", self.beta_1, 0.0, 1.0, True),
            ("beta-2", self.beta_2, 0.0, 1.0, True),
            ("trimmed-beta", self.trimmed_beta, 0.0, 0.5, True),
            ("max-update-norm", self.max_update_norm, 0.0, inf, True),
            ("server-learning-rate", self.server_learning_rate, 0.0, inf, False),
            ("tau", self.tau, 0.0, inf, False),
        ):
            if not (low <= value < high if closed else low < value < high):
                raise FedLinearError(
                    f"config key '{key}' must be in {'[' if closed else '('}{low:g}, {high:g}), got {value}"
                )
        for key, value in (("num-malicious-nodes", self.num_malicious_nodes), ("num-nodes-to-select", self.num_nodes_to_select)):
            if value < 0:
                raise FedLinearError(f"config key '{key}' must be >= 0, got {value}")
        # fedols (server/fedols.py) is not a FedAvg-style strategy: its own module decides what it works with
        if self.strategy not in ("fedavg", "fedols"):
            if self.dp != "none":
                raise FedLinearError(
                    f"config key 'strategy' = {self.strategy} cannot work with 'dp' = {self.dp}: Flower's DP wrappers "
                    "and the accountant assume FedAvg's aggregation; use 'strategy' = fedavg"
                )
            if self.secure_aggregation:
                raise FedLinearError(
                    f"config key 'strategy' = {self.strategy} cannot work with 'secure-aggregation' = true: the server "
                    "only learns the sum of the updates, which is FedAvg; use 'strategy' = fedavg"
                )
        if self.max_update_norm > 0 and self.secure_aggregation:
            raise FedLinearError(
                "config key 'max-update-norm' must be 0 with 'secure-aggregation' = true: the server never sees an "
                "individual update to measure"
            )
        if not (self.max_update_norm_factor == 0 or 1 < self.max_update_norm_factor < inf):
            raise FedLinearError(
                "config key 'max-update-norm-factor' must be 0 (off) or a finite number > 1, "
                f"got {self.max_update_norm_factor}"
            )
        if self.max_update_norm_factor > 0 and self.secure_aggregation:
            raise FedLinearError(
                "config key 'max-update-norm-factor' must be 0 with 'secure-aggregation' = true: the server never "
                "sees an individual update to measure"
            )

    def _validate_fedols(self) -> None:
        """``fedols-method`` / ``fedols-l2``, and what ``strategy`` = fedols cannot work with (server/fedols.py)."""
        if self.fedols_method not in FEDOLS_METHODS:
            raise FedLinearError(
                f"config key 'fedols-method' must be one of {', '.join(FEDOLS_METHODS)}, got '{self.fedols_method}'"
            )
        if not 0 <= self.fedols_l2 < float("inf"):
            raise FedLinearError(f"config key 'fedols-l2' must be a finite number >= 0, got {self.fedols_l2}")
        if self.strategy != "fedols":
            return
        if self.dp != "none":
            self._validate_dp_fedols()
        elif self.secure_aggregation:
            raise FedLinearError(
                "config key 'strategy' = fedols cannot work with 'secure-aggregation' = true: every party's "
                "statistics (scatter matrix or R factor) would be released in the clear; use 'strategy' = fedavg"
            )
        if self.reference == "none":
            raise FedLinearError(
                "config key 'strategy' = fedols needs the parties' cross-products, which 'reference' = none keeps "
                "on the nodes; set 'reference' = auto"
            )

    def _validate_ignored_dp_keys(self) -> None:
        """Refuse a DP key set where nothing reads it (it would be silently ignored)."""
        if self.dp_target_epsilon > 0 and self.dp == "none":
            raise FedLinearError(
                f"config key 'dp-target-epsilon' = {self.dp_target_epsilon:g} has no effect with 'dp' = none: choose a "
                "'dp' mechanism to spend it, or set 'dp-target-epsilon' = 0"
            )
        dp_fedols = self.strategy == "fedols" and self.dp != "none"
        for key, value in (("dp-feature-bound", self.dp_feature_bound), ("dp-target-bound", self.dp_target_bound)):
            if value != 0 and not dp_fedols:
                raise FedLinearError(
                    f"config key '{key}' = {value:g} is read only by DP-FedOLS ('strategy' = fedols with 'dp' = "
                    f"central-client-clip), not with strategy = {self.strategy}, dp = {self.dp}: set '{key}' = 0, or use DP-FedOLS"
                )
        if self.dp_clipping == "adaptive" and dp_fedols:
            raise FedLinearError(
                "config key 'dp-clipping' = adaptive has no effect with 'strategy' = fedols and 'dp': DP-FedOLS clips "
                "each row to 'dp-feature-bound' / 'dp-target-bound', not updates to a norm; set 'dp-clipping' = fixed"
            )

    def _validate_dp_fedols(self) -> None:
        """DP-FedOLS (common/dpols.py): the parties clip their rows, the server noises the sum (central DP)."""
        if self.dp != "central-client-clip":
            raise FedLinearError(
                f"config key 'strategy' = fedols works with 'dp' = central-client-clip (each party clips its rows, "
                f"the server noises the sum once: AdaSSP), not 'dp' = {self.dp}"
            )
        if self.fedols_l2 != 0:
            raise FedLinearError(
                "config key 'fedols-l2' must be 0 with 'strategy' = fedols and 'dp': AdaSSP chooses the ridge itself"
            )
        if not self.fit_intercept:
            raise FedLinearError(
                "config key 'fit-intercept' = false is not available with 'strategy' = fedols and 'dp' yet: "
                "DP-FedOLS releases the sums of [x, 1, y] rows and solves with the intercept; use 'fit-intercept' = true"
            )

    def _validate_target(self) -> None:
        """``target-mse-ratio`` / ``stop-at-target`` (common/target.py): the ratio must be one the run computes."""
        target = self.target_mse_ratio
        if target != 0 and not 1 <= target < float("inf"):  # also refuses NaN
            raise FedLinearError(
                f"config key 'target-mse-ratio' must be 0 (no target) or a finite number >= 1 (test MSE / the "
                f"optimum's), got {target}"
            )
        if self.stop_at_target and target == 0:
            raise FedLinearError("config key 'stop-at-target' = true needs a 'target-mse-ratio' (>= 1) to stop at")
        if target == 0:
            return
        if self.reference == "none":
            raise FedLinearError(
                "config key 'target-mse-ratio' needs the gap to the pooled least-squares optimum, which 'reference' "
                "= none does not compute; set 'reference' = auto or 'target-mse-ratio' = 0"
            )
        if not self.test_uri:
            raise FedLinearError(
                "config key 'target-mse-ratio' needs a test set to measure test MSE / the optimum's on; set "
                "'test-uri' (fedlinear run: --test, or test.csv in --data)"
            )
        if self.strategy == "fedols":
            raise FedLinearError(
                "config key 'target-mse-ratio' is for iterative strategies: 'strategy' = fedols computes the "
                "least-squares optimum itself in one round; set 'target-mse-ratio' = 0"
            )

    def _validate_participation(self) -> None:
        """``min-train-nodes``: an integer count >= 1 or a fraction in (0, 1)."""
        value = self.min_train_nodes
        if not 0 < value < float("inf") or (value >= 1 and not float(value).is_integer()):
            raise FedLinearError(
                f"config key 'min-train-nodes' must be an integer count >= 1 or a fraction in (0, 1), got {value:g}"
            )

    def min_train_count(self, eligible: int) -> int:
        """``min-train-nodes`` as a count of valid replies, for ``eligible`` parties."""
        if self.min_train_nodes >= 1:
            return int(self.min_train_nodes)
        return max(1, math.ceil(self.min_train_nodes * eligible - 1e-9))

    @property
    def private(self) -> bool:
        """Whether a privacy mechanism is on (then no node sends statistics in the clear): common.privacy.is_private."""
        return privacy.is_private(self.dp, getattr(self, "secure_aggregation", False))

    def _validate_secure_aggregation(self) -> None:
        """The ``secagg-*`` keys (checked whether or not ``secure-aggregation`` is on)."""
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if not 0 < shares < float("inf") or (shares > 1 and (not float(shares).is_integer() or shares < 3)):
            raise FedLinearError(
                f"config key 'secagg-num-shares' must be a fraction in (0, 1] or an integer >= 3, got {shares}"
            )
        if not 0 < threshold < float("inf") or (threshold > 1 and (not float(threshold).is_integer() or threshold < 2)):
            raise FedLinearError(
                "config key 'secagg-reconstruction-threshold' must be a fraction in (0, 1] or an integer >= 2, "
                f"got {threshold}"
            )
        if shares > 1 and threshold > 1 and threshold >= shares:
            raise FedLinearError(
                f"config key 'secagg-reconstruction-threshold' ({threshold:g}) must be below 'secagg-num-shares' ({shares:g})"
            )
        if not 0 < self.secagg_clipping_range < float("inf"):
            raise FedLinearError(f"config key 'secagg-clipping-range' must be > 0, got {self.secagg_clipping_range}")
        if not 2 <= self.secagg_quantization_range < 2**31:
            raise FedLinearError(
                f"config key 'secagg-quantization-range' must be in [2, 2**31), got {self.secagg_quantization_range}"
            )
        if not 0 < self.secagg_timeout < float("inf"):
            raise FedLinearError(f"config key 'secagg-timeout' must be a finite number of seconds > 0, got {self.secagg_timeout}")
        if self.secure_aggregation and self.fraction_evaluate > 0:
            raise FedLinearError(
                "config key 'fraction-evaluate' must be 0 with 'secure-aggregation' = true: federated evaluation "
                "sends each node's loss in the clear (the server evaluates centrally on 'test-uri')"
            )

    def as_dict(self) -> dict[str, Any]:
        """The resolved config with kebab-case keys (for the manifest)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def resolved_run_dir(self, run_id: int | str) -> str:
        """The run directory: ``run-dir`` if set, else ``~/fedlinear-runs/run-<run id>``."""
        if self.run_dir:
            return self.run_dir.rstrip("/") if self.run_dir != "/" else self.run_dir
        return os.path.join(os.path.expanduser("~"), "fedlinear-runs", f"run-{run_id}")


# Run configs parsed in this process, per distinct mapping: a ClientApp task carries the run config
# every time, and parsing it each time showed up in the per-message cost of 1000-client simulations.
_PARSED: dict[tuple, RunConfig] = {}
_MAX_PARSED = 16


def parsed(run_config: Mapping[str, Any]) -> RunConfig:
    """``RunConfig.from_run_config(run_config)``, parsed once per distinct run config in this process."""
    key = tuple(run_config.items())  # in insertion order (no sort: an equal config built in another order only misses)
    try:
        cfg = _PARSED.get(key)
    except TypeError:  # unhashable values: parse without the cache
        return RunConfig.from_run_config(run_config)
    if cfg is None:
        cfg = RunConfig.from_run_config(run_config)
        if len(_PARSED) >= _MAX_PARSED:
            _PARSED.clear()
        _PARSED[key] = cfg
    return cfg


def _kind(name: str) -> type:
    """The type a field's values are coerced to (``learning-rate`` and ``batch-size`` take a number or "auto")."""
    if name == "batch_size":
        return int
    return float if name == "learning_rate" else type(getattr(RunConfig, name))


def _coerce(key: str, raw: Any, kind: type) -> Any:
    """Convert a TOML/CLI value to the field's type, or raise naming the key."""
    if key in ("learning-rate", "batch-size") and isinstance(raw, str) and raw.strip().lower() == AUTO:
        return AUTO
    if isinstance(raw, bool) and kind is not bool:
        raise FedLinearError(f"config key '{key}' must be a {kind.__name__}, got a boolean")
    if not isinstance(raw, bool | int | float | str):  # what TOML scalars and --set give
        raise FedLinearError(f"config key '{key}' must be a {kind.__name__}, got a {type(raw).__name__}")
    if isinstance(raw, str) and not raw.isprintable():  # messages that show it stay one printable line
        raise FedLinearError(f"config key '{key}' must be printable text, got {_shown(raw)}")
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
                return raw.strip().lower() == "true"
            raise ValueError
        if kind is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            value = int(raw)
            if not -(2**63) <= value < 2**63:  # beyond any count, seed or size; and messages must show it
                raise FedLinearError(f"config key '{key}' must be an int in [-2**63, 2**63), got {_shown(raw)}")
            return value
        if kind is float:
            value = float(raw)
            if value != value:
                raise ValueError
            return value
        if kind is str:
            return str(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
        pass
    raise FedLinearError(f"config key '{key}' must be a {kind.__name__}, got {_shown(raw)}")


def _shown(raw: Any) -> str:
    """A value as shown in a message: its repr, shortened (an int of 5000 digits has no repr)."""
    if isinstance(raw, int) and not isinstance(raw, bool) and abs(raw) >= 10**30:
        return f"an integer of {len(format(raw, 'x')) * 4} bits"
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` strings (``fedlinear run --set``) into a typed override mapping."""
    out: dict[str, Any] = {}
    defaults = RunConfig()
    for item in items or []:
        if "=" not in item:
            raise FedLinearError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        name = key.replace("-", "_")
        if not hasattr(defaults, name):
            raise FedLinearError(f"unknown config key '{key}'; known keys: {', '.join(RunConfig.keys())}")
        out[key] = _coerce(key, value.strip(), _kind(name))
    return out
