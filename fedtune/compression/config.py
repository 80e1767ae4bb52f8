"""The ``compress.*`` config section and which combinations it refuses (torch-free: the config system reads it).

Compression is a transform of the client update pipeline: list ``"compress"`` in ``client.pipeline`` (last:
the transforms after it would see a compressed delta instead of trained values) and choose ``compress.method``.
Uploads then travel as deltas from the global state, in the method's own wire encoding (``wire_encoding``);
``client.encoding`` still governs everything else.

What works with what (refused combinations are config errors naming the reason):

- every strategy aggregates the values the server rebuilds (global + delta), so fedavg, the server optimizers,
  robust aggregation and ffa (which sends only B) take compressed updates as they take dense ones;
- error feedback needs the trained tensors to mean the same thing from one round to the next: ``svd`` re-bases
  the global factors every round (a new SVD basis) and ``flora`` / ``fedex`` fold each round's factors into the
  base and restart them, so a residual carried over would be added to unrelated factors: refused unless
  ``compress.error_feedback = false``; heterogeneous ranks (``strategy.client_ranks``) change a client's tensor
  shapes between rounds: refused with compression;
- secure aggregation sums fixed-point vectors over a support every client shares: per-client supports
  (``topk``, ``threshold``, and ``randk``, whose indices come from each client's own seed) cannot be summed that
  way (and the indices would show the server where each client's update is large); the quantizers' codes would
  be re-encoded as secure aggregation's 32-bit words, saving nothing. A shared global mask (``mask.density`` with
  ``mask.score = "global"``) can: each client's vector holds only the mask's entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["topk", "randk", "threshold", "sign", "int8", "int4"]
UPLINK_ENCODING: dict[str, str] = {
    "topk": "sparse_coo", "threshold": "sparse_coo", "randk": "fp32",  # randk: the k values only
    "sign": "sign", "int8": "int8_pow2", "int4": "int4_pow2",
}
"""The wire encoding each method's output travels in: lossless on what the method produces."""
SPARSE = ("topk", "threshold", "randk")
QUANTIZERS = ("int8", "int4")
BLOCK = 256
"""Values per scale of ``int8`` / ``int4``, and of ``sign`` by default (``compress.block``): the block of their wire
codecs, which must be the same for the codec to carry the compressor's output bit for bit."""
SIGN_BLOCKS = tuple(2**i for i in range(5, 11))
"""The block sizes ``sign`` takes (``compress.block``): powers of two from 32 to 1024, each a wire encoding
(``sign`` for 256, else ``sign_b<block>``)."""


def sign_encoding(block: int) -> str:
    """The wire encoding of ``sign`` with ``block`` values per scale."""
    return "sign" if block == BLOCK else f"sign_b{block}"


def wire_encoding(c: CompressConfig) -> str:
    """The wire encoding ``c``'s output travels in (its method's, ``sign`` at its block size)."""
    return sign_encoding(c.block) if c.method == "sign" else UPLINK_ENCODING[c.method]


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CompressConfig:
    method: Method = _opt("topk", "what a client sends of its update (client.pipeline must list \"compress\"): "
                          "topk (largest magnitudes), randk (random entries from a seed the server shares: "
                          "indices not sent), threshold (magnitudes >= compress.threshold), sign (one bit each "
                          "and a scale per block of 256), int8 / int4 (codes with a power-of-two scale per block)")
    fraction: float = _opt(0.01, "topk / randk: fraction of each tensor's entries sent (or of all entries, "
                                 "compress.scope=global)")
    count: int = _opt(0, "topk / randk: entries sent per tensor (or in all, scope=global) instead of a fraction; "
                         "0: use compress.fraction")
    scope: Literal["tensor", "global"] = _opt("tensor", "topk: the k largest per tensor, or over all tensors")
    threshold: float = _opt(1e-3, "threshold: entries whose magnitude (update plus residual) is at least this")
    stochastic: bool = _opt(False, "int8 / int4: stochastic rounding (unbiased) instead of rounding to nearest")
    error_feedback: bool = _opt(True, "keep what was not sent and add it to the next round's update")
    downlink: bool = _opt(False, "the server sends each client the compressed delta from the state it holds "
                                 "(same method; full state to a client that missed a round)")
    energy: float = _opt(0.9, "rank pruning (\"rank_prune\" in client.pipeline): per LoRA layer, keep the fewest "
                              "SVD components of the client's scale * B @ A whose squared singular values hold at "
                              "least this fraction of the layer's total")
    min_rank: int = _opt(1, "rank pruning: keep at least this many components per layer")
    pack: bool = _opt(False, "send a compressed delta (up, and down with compress.downlink) as one flat tensor of "
                             "every tensor in name order instead of one wire tensor each: a LoRA adapter has many "
                             "small tensors, and each wire tensor's header (name, shape, digest: about 130 bytes) "
                             "is a fifth of a sign-compressed q_proj factor's message")
    block: int = _opt(BLOCK, "sign: values per scale (a power of two from 32 to 1024); smaller blocks follow the "
                             "update's magnitudes more closely at 4 bytes more per block")

    def validate(self) -> list[str]:
        p = []
        if not 0 < self.fraction <= 1:
            p.append(f"compress.fraction: got {self.fraction}, must be in (0, 1]")
        if self.count < 0:
            p.append(f"compress.count: got {self.count}, must be >= 0 (0: use compress.fraction)")
        if not self.threshold >= 0:
            p.append(f"compress.threshold: got {self.threshold}, must be >= 0")
        if self.stochastic and self.method not in QUANTIZERS:
            p.append(f"compress.stochastic: only int8 / int4 round, not compress.method={self.method}")
        if self.scope == "global" and self.method != "topk":
            p.append(f"compress.scope: global applies to topk only, not compress.method={self.method}")
        if not 0 < self.energy <= 1:
            p.append(f"compress.energy: got {self.energy}, must be in (0, 1]")
        if self.min_rank < 1:
            p.append(f"compress.min_rank: got {self.min_rank}, must be >= 1")
        if self.block not in SIGN_BLOCKS:
            p.append(f"compress.block: got {self.block}, must be a power of two from {SIGN_BLOCKS[0]} to "
                     f"{SIGN_BLOCKS[-1]}")
        elif self.block != BLOCK and self.method != "sign":
            p.append(f"compress.block: only sign takes a block size (int8 / int4 use {BLOCK}), not "
                     f"compress.method={self.method}")
        if self.downlink and self.method == "randk":
            p.append("compress.downlink: randk cannot compress the downlink (its indices come from each client's "
                     "seed); choose another compress.method")
        return p


def compress_problems(cfg: Any) -> list[str]:
    """What ``compress.*`` rules out in the rest of ``cfg`` (a ``fedtune.config.Config``), with the reason."""
    pipeline, c, name = list(cfg.client.pipeline), cfg.compress, cfg.strategy.name
    p = list(c.validate()) + _rank_problems(cfg) + cfg.mask.problems(cfg)
    if ("compress" in pipeline or c.downlink) and cfg.sim.backend == "flower":
        p.append("sim.backend: flower's records do not carry compressed deltas (client.pipeline \"compress\", "
                 "compress.downlink); use sim.backend=inproc")
    if "compress" not in pipeline:
        return p
    if pipeline[-1] != "compress":
        p.append(f"client.pipeline: \"compress\" must come last ({pipeline}): a transform after it would see a "
                 "compressed delta instead of the trained values")
    if c.error_feedback and name in ("svd", "flora", "fedex"):
        p.append(f"compress.error_feedback: strategy.name={name} re-bases or restarts the adapter factors every "
                 "round, so a residual carried to the next round would be added to unrelated factors; set "
                 "compress.error_feedback=false or use fedavg / ffa / a server optimizer")
    if cfg.strategy.client_ranks is not None:
        p.append("strategy.client_ranks: heterogeneous ranks change a client's tensor shapes between rounds; "
                 "compression (client.pipeline \"compress\") needs the global shapes")
    return p


def uplink_encoding(cfg: Any) -> str:
    """The wire encoding of updates: the compressor's own with ``compress`` in ``client.pipeline``, else
    ``client.encoding`` (nodes send in it, the server and the simulator count in it)."""
    return wire_encoding(cfg.compress) if "compress" in cfg.client.pipeline else str(cfg.client.encoding)


def _rank_problems(cfg: Any) -> list[str]:
    """What rank pruning (client side: ``rank_prune`` in ``client.pipeline``; server side:
    ``strategy.svd_energy``) rules out, with the reason."""
    from fedtune.strategies.specs import REGISTRY

    pipeline, p = list(cfg.client.pipeline), []
    spec = REGISTRY.get(cfg.strategy.name)
    if "rank_prune" in pipeline:
        if spec is not None and not spec.client_ranks:
            names = ", ".join(n for n, x in REGISTRY.items() if x.client_ranks)
            p.append(f"client.pipeline: \"rank_prune\" sends each layer at its own rank, which only a strategy "
                     f"that aggregates factors of any rank takes ({names}), not strategy.name={cfg.strategy.name}")
        if "compress" in pipeline:
            p.append("client.pipeline: \"rank_prune\" and \"compress\" together: compress sends deltas of the "
                     "global tensors' shapes, rank pruning changes them; choose one")
        elif pipeline[-1] != "rank_prune":
            p.append(f"client.pipeline: \"rank_prune\" must come last ({pipeline}): a transform after it would "
                     "see factors of another rank")
        if cfg.sim.backend == "flower":
            p.append("sim.backend: flower's records carry tensors of the global shapes; rank_prune needs "
                     "sim.backend=inproc")
    if cfg.strategy.svd_energy > 0 and cfg.compress.downlink:
        p.append("strategy.svd_energy: the pruned global adapter travels trimmed to each layer's rank, "
                 "compress.downlink sends deltas of the full shapes; set one of them off")
    return p


@dataclass(frozen=True)
class MaskConfig:
    density: float = _opt(1.0, "global pruning mask (AutoFLIP-style): fraction of each tensor's entries clients "
                               "train and send; 1: no mask")
    explore_steps: int = _opt(2, "mask: local steps of the exploration phase each sampled client runs to score "
                                 "the entries before the mask is fixed")
    refresh_every: int = _opt(0, "mask: explore again and fix a new mask every this many rounds; 0: never")
    score: Literal["update", "grad_weight", "global"] = _opt(
        "update", "mask: importance of an entry, averaged over the explorers by examples: update (its squared "
                  "change over the exploration steps) or grad_weight (|gradient x value| on one batch at the "
                  "explored weights); or global: no exploration phase, the round that fixes the mask trains dense "
                  "and the score is the squared change of the global adapter over it (the server needs only the "
                  "aggregate: the score secure aggregation allows)")

    def problems(self, cfg: Any) -> list[str]:
        """Ranges, and what a mask rules out in the rest of ``cfg``, each with the reason."""
        p = []
        if not 0 < self.density <= 1:
            p.append(f"mask.density: got {self.density}, must be in (0, 1] (1: no mask)")
        if self.explore_steps < 1:
            p.append(f"mask.explore_steps: got {self.explore_steps}, must be >= 1")
        if self.refresh_every < 0:
            p.append(f"mask.refresh_every: got {self.refresh_every}, must be >= 0 (0: never)")
        if self.density >= 1:
            return p
        from fedtune.strategies.specs import REGISTRY

        spec, s = REGISTRY.get(cfg.strategy.name), cfg.strategy
        if spec is not None and (not spec.linear or s.robust != "none"):
            p.append(f"mask.density: strategy.name={s.name} (robust={s.robust}) cannot take masked updates: svd, "
                     "flora and fedex combine whole factors (the product of masked factors is not a masked "
                     "product), robust aggregators take statistics over whole replies; use fedavg, fedprox, ffa "
                     "or a server optimizer")
        if cfg.privacy.dp != "off":
            p.append("mask.density: privacy.dp with a mask is not built (DP's clipping and noise cover the whole "
                     "adapter, and the exploration phase would send each client's per-entry scores in the clear); "
                     "set mask.density=1 or privacy.dp=off")
        elif cfg.privacy.secagg and self.score != "global":
            p.append(f"mask.score: {self.score} sends each client's per-entry scores to the server in the clear, "
                     "which privacy.secagg exists to prevent; set mask.score=global (the mask is fixed from the "
                     "securely summed update of a dense round)")
        if cfg.sim.backend == "flower" or cfg.sim.batch_clients > 1 or cfg.sim.mode != "federated":
            p.append("mask.density: the mask's phases run on the round driver with sim.backend=inproc, "
                     "sim.batch_clients=1 and sim.mode=federated")
        if "rank_prune" in cfg.client.pipeline:
            p.append("mask.density: a mask fixes entries of the factors, rank pruning changes their shapes; "
                     "remove \"rank_prune\" from client.pipeline")
        return p

