"""``StrategyConfig``: every knob of server-side aggregation, as it appears under ``[strategy]`` in TOML.

The dataclass is frozen and plain (numbers, strings, a list); ``validate`` reports every problem at once,
each naming the key ``strategy.<field>`` and what it accepts, so the config system can print them together.
Rules that depend on the strategy read its declarations in ``specs.REGISTRY``, never its name. Imports no
torch: reading a config stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.strategies.specs import REGISTRY

STRATEGY_NAMES: tuple[str, ...] = tuple(REGISTRY)
"""The built-in strategies (``specs.REGISTRY`` is the live list: a strategy registered later counts too)."""
ROBUST_NAMES: tuple[str, ...] = ("none", "median", "trimmed_mean", "krum", "multikrum")
AGG_ERROR_METHODS: tuple[str, ...] = ("auto", "exact", "sketch")


@dataclass(frozen=True)
class StrategyConfig:
    """How the server chooses clients and combines their adapters (``[strategy]`` in the run config)."""

    name: str = "fedavg"
    """Aggregation strategy; a name of ``specs.REGISTRY``."""
    fraction: float = 1.0
    """Fraction of the available clients sampled each round (used when ``clients_per_round`` is 0)."""
    clients_per_round: int = 0
    """Exact number of clients sampled each round; 0 means use ``fraction``."""
    min_replies: int = 1
    """Fewest valid replies for a round to be applied; below it the global state is kept."""
    server_lr: float = 1.0
    """Server learning rate (eta) of fedavgm / fedadam / fedyogi / fedadagrad."""
    beta1: float = 0.9
    """First-moment decay of fedadam / fedyogi / fedadagrad (Reddi et al. 2021)."""
    beta2: float = 0.99
    """Second-moment decay of fedadam / fedyogi."""
    tau: float = 1e-3
    """Adaptivity (epsilon) of the adaptive server optimizers; the second moment starts at tau**2."""
    momentum: float = 0.9
    """Server momentum of fedavgm."""
    prox_mu: float = 0.01
    """FedProx proximal weight sent to clients as ``train.prox_mu`` (fedprox only)."""
    robust: str = "none"
    """Robust aggregation used instead of the weighted mean by the averaging strategies."""
    trim_fraction: float = 0.1
    """Fraction of values cut from each end, per coordinate, by ``trimmed_mean``."""
    krum_f: int = 1
    """Number of clients (multi-)Krum assumes may be Byzantine."""
    multikrum_m: int = 0
    """Clients averaged by multi-Krum; 0 means K - krum_f."""
    svd_rank: int = 0
    """Rank of the global adapter kept by ``svd``; 0 means ``r``."""
    svd_energy: float = 0.0
    """``svd``: per layer, keep only the fewest components (at most the global rank) whose squared singular
    values hold this fraction of the average's energy; the rest are zero and not sent. 0: keep the rank."""
    svd_method: str = "exact"
    """``svd``: "exact" (best rank-r: QR + core SVD, or the dense layer's Gram eigendecomposition once the stacked
    factors outgrow the layer) or "randomized" (subspace iteration on the factors; approximate, faster for large K)."""
    svd_power_iters: int = 4
    """``svd_method = "randomized"``: power (subspace) iterations; more for flat spectra."""
    svd_oversample: int = 16
    """``svd_method = "randomized"``: extra columns of the sketch beyond the rank."""
    client_ranks: list[int] | None = None
    """Heterogeneous ranks: client i (in the order the server lists them) trains at client_ranks[i % len]."""
    error_feedback: bool = False
    """``svd``: carry the truncated part of the average into the next round (factored, server side)."""
    quantized_base: bool = False
    """The clients' base weights are quantized; ``fedex`` refuses, ``flora`` keeps a frozen residual."""
    lora_alpha: float = 16.0
    """LoRA alpha; a rank-r adapter is applied with scale alpha/r (alpha/sqrt(r) with ``use_rslora``)."""
    r: int = 8
    """LoRA rank of the global adapter."""
    use_rslora: bool = False
    """Rank-stabilised scale alpha/sqrt(r) instead of alpha/r."""
    compute_error: bool = True
    """Report ``agg_error``: per LoRA layer, ``||dW_agg - sum_k p_k s_k B_k A_k|| / ||sum_k p_k s_k B_k A_k||``."""
    agg_error_every: int = 1
    """Compute ``agg_error`` on the rounds that are multiples of this; the other rounds report none (null)."""
    agg_error_method: str = "auto"
    """How ``agg_error`` is computed: "exact" (Gram matrices of every reply's factors: O(K^2) time, keeps them all),
    "sketch" (random sketch streamed with the replies: O(K) time, a few hundred numbers per layer; each squared
    norm within a relative std of sqrt(2.5/m + 1/m^2) at worst, m = agg_error_probes, far less for updates of
    high rank; see fedtune/strategies/agg_error.py) or "auto" (exact while sum_k r_k <= 32, else the sketch)."""
    agg_error_probes: int = 8
    """``agg_error`` sketch: random-sign probes m per layer (and 4 m row buckets); the cost grows with m."""

    def validate(self) -> list[str]:
        """Every problem with this config, each naming the key ``strategy.<field>``; empty when valid."""
        p: list[str] = []
        if self.name not in REGISTRY:
            p.append(f"strategy.name: unknown {self.name!r}; valid: {', '.join(REGISTRY)}")
        if self.robust not in ROBUST_NAMES:
            p.append(f"strategy.robust: unknown {self.robust!r}; valid: {', '.join(ROBUST_NAMES)}")
        spec = REGISTRY.get(self.name)
        if self.robust != "none" and spec is not None and not spec.robust:
            p.append(f"strategy.robust: only the averaging strategies accept it, not {self.name!r}; use 'none'")
        if not 0.0 < self.fraction <= 1.0:
            p.append(f"strategy.fraction: {self.fraction} must be in (0, 1]")
        if self.clients_per_round < 0:
            p.append(f"strategy.clients_per_round: {self.clients_per_round} must be >= 0 (0 = use fraction)")
        if self.min_replies < 1:
            p.append(f"strategy.min_replies: {self.min_replies} must be >= 1")
        if self.server_lr <= 0:
            p.append(f"strategy.server_lr: {self.server_lr} must be > 0")
        for key in ("beta1", "beta2", "momentum"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                p.append(f"strategy.{key}: {value} must be in [0, 1)")
        if self.tau <= 0:
            p.append(f"strategy.tau: {self.tau} must be > 0")
        if self.prox_mu < 0:
            p.append(f"strategy.prox_mu: {self.prox_mu} must be >= 0")
        if not 0.0 <= self.trim_fraction < 0.5:
            p.append(f"strategy.trim_fraction: {self.trim_fraction} must be in [0, 0.5)")
        if self.krum_f < 0:
            p.append(f"strategy.krum_f: {self.krum_f} must be >= 0")
        if self.multikrum_m < 0:
            p.append(f"strategy.multikrum_m: {self.multikrum_m} must be >= 0 (0 = K - krum_f)")
        if self.svd_rank < 0:
            p.append(f"strategy.svd_rank: {self.svd_rank} must be >= 0 (0 = r)")
        if not 0 <= self.svd_energy <= 1:
            p.append(f"strategy.svd_energy: {self.svd_energy} must be in [0, 1] (0 = keep the global rank)")
        elif self.svd_energy > 0 and (spec is None or not spec.truncates):
            p.append(f"strategy.svd_energy: only a truncating strategy (svd) prunes ranks, not {self.name!r}")
        elif self.svd_energy > 0 and self.svd_method == "randomized":
            p.append("strategy.svd_energy: needs svd_method='exact' (a randomized SVD does not know the energy "
                     "it discards)")
        if self.svd_method not in ("exact", "randomized"):
            p.append(f"strategy.svd_method: unknown {self.svd_method!r}; valid: exact, randomized")
        elif self.svd_method == "randomized" and self.error_feedback:
            p.append("strategy.svd_method: error_feedback needs 'exact' (the randomized remainder is not low rank)")
        if self.svd_power_iters < 0 or self.svd_oversample < 0:
            p.append("strategy.svd_power_iters / strategy.svd_oversample: must be >= 0")
        if self.r < 1:  # r and lora_alpha come from [adapter] (``strategy_config``)
            p.append(f"adapter.r: {self.r} must be >= 1")
        if self.lora_alpha <= 0:
            p.append(f"adapter.alpha: {self.lora_alpha} must be > 0")
        if self.client_ranks is not None:
            if not self.client_ranks or any(int(k) < 1 for k in self.client_ranks):
                p.append(f"strategy.client_ranks: {list(self.client_ranks)} must be a non-empty list of ranks >= 1")
            elif spec is None or not spec.client_ranks:
                names = ", ".join(repr(n) for n, x in REGISTRY.items() if x.client_ranks)
                p.append(f"strategy.client_ranks: heterogeneous ranks need name {names}, not {self.name!r}")
            elif max(self.client_ranks) > self.global_rank:
                raise_with = " (raise strategy.svd_rank)" if spec is not None and spec.truncates else ""
                p.append(f"strategy.client_ranks: {max(self.client_ranks)} exceeds the global rank "
                         f"{self.global_rank}{raise_with}")
        if self.agg_error_every < 1:
            p.append(f"strategy.agg_error_every: {self.agg_error_every} must be >= 1 (1 = every round)")
        if self.agg_error_method not in AGG_ERROR_METHODS:
            p.append(f"strategy.agg_error_method: unknown {self.agg_error_method!r}; valid: {', '.join(AGG_ERROR_METHODS)}")
        if not 1 <= self.agg_error_probes <= 1024:
            p.append(f"strategy.agg_error_probes: {self.agg_error_probes} must be in [1, 1024]")
        if self.error_feedback and (spec is None or not spec.truncates):
            p.append(f"strategy.error_feedback: only a truncating strategy (svd) keeps a remainder, not "
                     f"{self.name!r}; set false")
        if self.quantized_base and spec is not None and not spec.quantized_base:
            p.append(f"quant.mode: strategy.name={self.name} folds its updates into the base weights, which a "
                     "quantized base cannot hold: set quant.mode = \"none\", or strategy.name = \"flora\" or \"svd\"")
        return p

    @property
    def global_rank(self) -> int:
        """Rank of the global adapter: ``svd_rank`` for a truncating strategy (svd) when set, else ``r``."""
        spec = REGISTRY.get(self.name)
        return self.svd_rank if (spec is not None and spec.truncates and self.svd_rank > 0) else self.r
