"""``agg_error`` of a round in time and memory linear in the number of clients: exact, or a streamed sketch.

For every LoRA layer the error is ``||dW_agg - M||_F / ||M||_F`` with ``M = sum_k p_k s_k B_k A_k`` the exact
weighted average of the clients' updates (``p_k = n_k / sum n``, ``s_k`` the LoRA scale of client k's rank).
``||M||^2`` couples every pair of clients, so the exact value (``lowrank.relative_error``: Gram matrices of the
stacked factors) costs O((K r)^2 (d_out + d_in)) and keeps every client's factors: 18 s at K = 64 on
SmolLM2-135M, 50x the average itself. ``ErrorMeter`` offers three ways (``strategy.agg_error_method``):

* ``sketch``: as the replies stream in, each layer's ``M`` is reduced to ``T M Omega`` (b x m numbers),
  summed like the average: ``+= n_k s_k (T B_k)(A_k Omega)``. The server keeps those numbers, not the
  factors; a reply costs about one more read of it. At the end ``||T (dW_agg - M) Omega|| / ||T M Omega||``
  is the estimate. A strategy that is exact by construction gets the same sums twice and reports ~1e-7.
* ``exact``: the Gram form; keeps (references to) every reply's factors.
* ``auto`` (default): exact while the round's stacked rank ``sum_k r_k`` is at most ``EXACT_MAX_RANK``, where
  the Gram form costs no more than the sketch (hand-checkable small rounds stay exact); the sketch past it.

The sketch and its accuracy. ``Omega`` (d_in x m) holds independent random signs (Rademacher probes); ``T``
(b x d_out, b = 4 m) is a CountSketch: every row of the layer goes to a uniformly random bucket with a random
sign. For any matrix X, ``||T X Omega||_F^2 / m`` is an unbiased estimate of ``||X||_F^2`` with

    Var / ||X||_F^4  <=  2 rho (1/m + 1/b) + 4 / (m b),       rho = sum_i s_i^4 / (sum_i s_i^2)^2,

s_i the singular values of X: rho = 1 for a rank-one X (the worst case), 1/n for n equal singular values.
Derivation: given T, Rademacher probes on Y = T X have variance (2/m) sum_{j != j'} (Y^T Y)_{jj'}^2 <=
(2/m) ||Y^T Y||_F^2; over T, ``E ||Y^T Y||_F^2 <= ||X^T X||_F^2 + (2/b) ||X||_F^4`` and ``Var ||T X||_F^2 =
(2/b) sum_{i != i'} <x_i, x_i'>^2 <= (2/b) rho ||X||_F^4`` (x_i the rows of X); ``||X^T X||_F^2 = rho ||X||_F^4``.
With the default m = ``strategy.agg_error_probes`` = 8 (b = 32) the relative standard deviation of each
squared norm is at most 0.57 (rank one), 0.19 for rho = 1/16 and 0.13 for a flat spectrum of high rank. The
reported error is the square root of the ratio of two such estimates made with the same T and Omega: its
relative standard deviation is at most about the same figure (half of it if the two were independent;
positively correlated, as here, less), plus a bias of second order. ``tests/unit/test_agg_error.py`` checks
the estimates over many seeds against the exact values and this bound. The probes are drawn afresh every
round from the round number (a resumed run reports the same values) and shared by the layers of one shape in
a chunk of ``CHUNK_LAYERS``, so the layer estimates of one round are not independent; their mean,
``agg_error``, is at least as accurate as one layer.

Cost per reply and chunk of layers: one concatenation of the A factors and one (m x d_in) product with it
(2 m multiplications per A entry, the only real arithmetic), one concatenation of the B factors and one
scatter-add of their rows into the buckets, and, every ``BATCH`` replies, one batched m x (BATCH r) x 2b
product. ``benchmarks/aggregate.py`` times fedavg with and without it side by side.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence

import torch

from fedtune.adapters import lora_pairs
from fedtune.strategies import lowrank
from fedtune.strategies.base import lora_scale
from fedtune.strategies.config import StrategyConfig
from fedtune.types import State

Pair = lowrank.Pair
EXACT_MAX_RANK = 32
"""``auto`` is exact while the round's stacked rank ``sum_k r_k`` is at most this."""
BUCKETS_PER_PROBE = 4
"""CountSketch buckets ``b`` per input probe ``m``: the scatter costs the same for any b, the m x r x 2b product little."""
CHUNK_LAYERS = 16
"""Layers of one shape sketched together: one concatenation and one product per chunk and reply (kept in cache)."""
BATCH = 4
"""Replies whose small per-layer products are done in one batch (a few MB of pending sketches)."""
_SEED = 0x5EED_A66E


class _Chunk:
    """Up to ``CHUNK_LAYERS`` layers of one shape (d_out, d_in): their probes and running sketches.

    The sketches are kept transposed and unsigned, ``(Omega^T A^T)(T2 B)^T`` (m x 2b per layer), where ``T2``
    sends row i of B to slot h(i) or b + h(i) by its sign: one subtraction at the end gives
    ``(T B A Omega)^T`` and none is needed per reply. The m x r x 2b products of ``BATCH`` replies are done
    together (one batched product with an inner size of ``BATCH`` r), as tiny ones cost mostly call overhead.
    """

    def __init__(self, layers: list[tuple[str, str, str]], d_out: int, d_in: int, m: int, seed: int,
                 device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        b = BUCKETS_PER_PROBE * m
        self.prefixes = [prefix for prefix, _, _ in layers]
        self.a_keys = [ka for _, ka, _ in layers]
        self.b_keys = [kb for _, _, kb in layers]
        # (the factors of a reply, as tuples, in one C call each)
        self.get_a, self.get_b = _getter(self.a_keys), _getter(self.b_keys)
        self.b = b
        # Omega^T (m x d_in) of random signs, drawn on the CPU so that every device gets the same ones.
        self.omega_t = (torch.randint(0, 2, (m, d_in), generator=gen) * 2 - 1).float().to(device)
        bucket = torch.randint(0, b, (d_out,), generator=gen)
        negative = torch.randint(0, 2, (d_out,), generator=gen)
        self.slots = (bucket + b * negative).to(device)
        self.y2 = torch.zeros(len(layers), m, 2 * b, dtype=torch.float32, device=device)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (alpha * za, zb, r) not yet in y2

    def add(self, bs: list[torch.Tensor], as_: list[torch.Tensor], alpha: Callable[[int], float]) -> None:
        """``y2[l] += alpha(r_l) (Omega^T A_l^T)(T2 B_l)^T`` for every layer l of the chunk (one reply)."""
        r = as_[0].shape[0]
        if any(a.shape[0] != r for a in as_):  # layers of different ranks: one layer at a time
            for i, (b, a) in enumerate(zip(bs, as_, strict=True)):
                self.y2[i].add_(self._product(b, a), alpha=alpha(a.shape[0]))
            return
        self.pending.append(self._sides(bs, as_, alpha(r)))
        if len(self.pending) == BATCH:
            self.flush()

    def _sides(self, bs: list[torch.Tensor], as_: list[torch.Tensor],
               alpha: float) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(alpha Omega^T A^T, T2 B, r)`` of every layer at once, (m x n r) and (2b x n r), for one rank r.

        One concatenation per side (it stays in cache) instead of 2 n small products: A_l Omega of every layer
        in one product, the rows of every B_l into their slots in one scatter (row i of B_l is a row here).
        """
        za = (self.omega_t @ _float(torch.cat(as_)).T).mul_(alpha)
        zb = self._slots(_float(torch.cat(bs, dim=1)))
        return za, zb, as_[0].shape[0]

    def sketch_all(self, terms: list[Sequence[Pair]]) -> torch.Tensor:
        """``(Omega^T a^T)(T2 b)^T`` summed over each layer's factored terms (layers x m x 2b)."""
        out = torch.zeros_like(self.y2)
        ranks = {a.shape[0] for ts in terms for _, a in ts}
        if len(ranks) == 1 and all(len(ts) == 1 for ts in terms):  # one term per layer, one rank: batched
            za, zb, r = self._sides([ts[0][0] for ts in terms], [ts[0][1] for ts in terms], 1.0)
            n = len(terms)
            return out.baddbmm_(za.view(-1, n, r).transpose(0, 1), zb.view(-1, n, r).permute(1, 2, 0))
        for i, ts in enumerate(terms):
            for b, a in ts:
                out[i].add_(self._product(b, a))
        return out

    def _product(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``(Omega^T a^T)(T2 b)^T`` (m x 2b) of one factored term ``b @ a``, never formed."""
        return (self.omega_t @ _float(a).T) @ self._slots(_float(b)).T

    def flush(self) -> None:
        """Add the pending replies' products to ``y2``: per layer, (m x sum r) @ (sum r x 2b)."""
        if not self.pending:
            return
        n = len(self.prefixes)
        za = torch.cat([z.view(-1, n, r) for z, _, r in self.pending], dim=2)  # m x n x (sum r)
        zb = torch.cat([z.view(-1, n, r) for _, z, r in self.pending], dim=2)  # 2b x n x (sum r)
        self.y2.baddbmm_(za.transpose(0, 1), zb.permute(1, 2, 0))
        self.pending.clear()

    def _slots(self, b: torch.Tensor) -> torch.Tensor:
        """The rows of a (d_out x c) matrix summed into their 2b slots: 2b x c."""
        return b.new_zeros(2 * self.b, b.shape[1]).index_add_(0, self.slots, b)

    def signed(self, y2: torch.Tensor) -> torch.Tensor:
        """``(T B A Omega)^T`` (layers x m x b) from the unsigned slot sums."""
        return y2[..., : self.b] - y2[..., self.b :]


class Sketch:
    """The running sketches ``sum_k n_k s_k T B_k A_k Omega`` of every LoRA layer of a state, for one round."""

    def __init__(self, global_state: State, cfg: StrategyConfig, round: int) -> None:
        self.cfg = cfg
        groups: dict[tuple[int, int], list[tuple[str, str, str]]] = {}
        for prefix, (ka, kb) in lora_pairs(global_state).items():
            shape = (global_state[kb].shape[0], global_state[ka].shape[1])
            groups.setdefault(shape, []).append((prefix, ka, kb))
        device = next(iter(global_state.values())).device if global_state else torch.device("cpu")
        self.chunks: list[_Chunk] = []
        for (d_out, d_in), layers in groups.items():
            for start in range(0, len(layers), CHUNK_LAYERS):
                seed = (_SEED + 1_000_003 * round + len(self.chunks)) % 2**63
                chunk = _Chunk(layers[start : start + CHUNK_LAYERS], d_out, d_in, cfg.agg_error_probes, seed, device)
                self.chunks.append(chunk)
        self.total = 0.0

    def add(self, state: State, fallback: State, weight: float) -> None:
        """Stream one reply of weight ``n_k``: its LoRA factors, an A it lacks (ffa) read from ``fallback``."""
        cfg = self.cfg

        def alpha(rank: int) -> float:
            return weight * lora_scale(cfg, rank)
        for chunk in self.chunks:
            try:
                as_ = chunk.get_a(state)
            except KeyError:
                as_ = tuple(state[k] if k in state else fallback[k] for k in chunk.a_keys)
            chunk.add(list(chunk.get_b(state)), list(as_), alpha)
        self.total += weight

    def squared_norms(self, agg: Mapping[str, Sequence[Pair]]) -> dict[str, tuple[float, float]]:
        """Unbiased estimates of ``(||sum agg[prefix] - M||_F^2, ||M||_F^2)`` per layer (``agg`` scales folded in)."""
        out: dict[str, tuple[float, float]] = {}
        for chunk in self.chunks:
            chunk.flush()
            if not any(p in agg for p in chunk.prefixes):
                continue
            got = chunk.signed(chunk.sketch_all([agg.get(p, ()) for p in chunk.prefixes])).double()
            m = chunk.omega_t.shape[0]
            ref = chunk.signed(chunk.y2).double() / self.total
            diff = ((got - ref).square().sum((1, 2)) / m).tolist()
            norm = (ref.square().sum((1, 2)) / m).tolist()
            out.update({p: (diff[i], norm[i]) for i, p in enumerate(chunk.prefixes) if p in agg})
        return out

    def relative_errors(self, agg: Mapping[str, Sequence[Pair]]) -> dict[str, float]:
        """Estimated ``||sum agg[prefix] - M|| / ||M||`` per layer (``agg`` terms with their scales folded in)."""
        return {prefix: _ratio(diff, norm) for prefix, (diff, norm) in self.squared_norms(agg).items()}


class ErrorMeter:
    """``agg_error`` of one round, fed reply by reply; exact or sketched as ``cfg.agg_error_method`` says.

    Usage: ``meter = ErrorMeter.for_round(cfg, round, global_state)`` (None when this round reports no error),
    ``meter.add(reply.state, n_k)`` for every valid reply, then ``meter.errors({prefix: agg_terms})``.
    A factor missing from a reply (ffa sends only B) is read from ``global_state``.
    """

    def __init__(self, cfg: StrategyConfig, round: int, global_state: State) -> None:
        self.cfg = cfg
        self.round = round
        self.global_state = global_state
        self.first_a = next(iter(lora_pairs(global_state).values()), ("", ""))[0]
        self.sketch: Sketch | None = None
        self.held: list[tuple[State, float]] | None = []  # None once streaming into the sketch
        self.stacked_rank = 0
        self.estimated = False
        """True once ``errors`` has answered from the sketch rather than the exact Gram form."""

    @classmethod
    def for_round(cls, cfg: StrategyConfig, round: int, global_state: State) -> ErrorMeter | None:
        """A meter when round ``round`` reports ``agg_error`` (``compute_error`` and every ``agg_error_every``)."""
        if not cfg.compute_error or round % cfg.agg_error_every != 0:
            return None
        return cls(cfg, round, global_state)

    def add(self, state: State, weight: float) -> None:
        """One valid reply's state (its own rank and scale) with weight ``n_k``."""
        first = state.get(self.first_a, self.global_state.get(self.first_a))
        self.stacked_rank += 0 if first is None else first.shape[0]
        method = self.cfg.agg_error_method
        if self.held is not None and (method == "sketch" or (method == "auto" and self.stacked_rank > EXACT_MAX_RANK)):
            self.sketch = Sketch(self.global_state, self.cfg, self.round)
            for held_state, held_weight in self.held:
                self.sketch.add(held_state, self.global_state, held_weight)
            self.held = None
        if self.sketch is not None:
            self.sketch.add(state, self.global_state, weight)
        else:
            assert self.held is not None
            self.held.append((state, weight))  # references: the replies' own tensors, not copies

    def errors(self, agg: Mapping[str, Sequence[Pair]]) -> dict[str, float]:
        """Per layer ``||sum agg[prefix] - M|| / ||M||``; ``agg`` terms have their LoRA scales folded in."""
        if self.sketch is not None:
            self.estimated = True
            return self.sketch.relative_errors(agg)
        assert self.held is not None
        total = sum(weight for _, weight in self.held)
        keys = lora_pairs(self.global_state)
        out: dict[str, float] = {}
        for prefix, terms in agg.items():
            ka, kb = keys[prefix]
            ref = []
            for state, weight in self.held:
                a = state.get(ka, self.global_state[ka])
                ref.append((state[kb].float() * (weight * lora_scale(self.cfg, a.shape[0]) / total), a.float()))
            out[prefix] = lowrank.relative_error(terms, ref)
        return out


def _getter(keys: list[str]) -> Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, ...]]:
    """``state -> tuple(state[k] for k in keys)``, as one ``itemgetter`` call (a tuple even for one key)."""
    get = operator.itemgetter(*keys)
    return (lambda state: (get(state),)) if len(keys) == 1 else get


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _ratio(diff_sq: float, ref_sq: float) -> float:
    """``sqrt(diff_sq / ref_sq)``; 0 when both are 0, inf when only the reference is."""
    if ref_sq <= 0.0:
        return 0.0 if diff_sq <= 0.0 else float("inf")
    return (max(diff_sq, 0.0) / ref_sq) ** 0.5
