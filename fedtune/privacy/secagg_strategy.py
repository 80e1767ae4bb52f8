"""``SecAggStrategy``: secure aggregation as four phases of the round driver around a linear strategy.

    secagg_advertise -> secagg_share -> secagg_upload (local training, clip, fixed point, mask) -> secagg_unmask

The protocol is ``fedtune.privacy.secagg``; this wrapper only moves its messages (``fedtune.privacy.wire``)
and turns the unmasked sum of the clipped deltas into the round's result: through ``DPStrategy.release``
(noise, epsilon) when DP is on, else as the mean ``global + sum / |survivors|`` handed to the wrapped strategy
(every client weighs the same: the server sees no one's example count next to its update). Which clients take
part is the wrapped strategy's choice (its ``configure``, Poisson sampling under DP). A round that loses too
many clients aborts: ``applied`` is False, the global state stays, the reason is in the round's failures.
With DP (``DPStrategy`` inside) the clients clip to the DP bound of the round; with adaptive clipping each
appends one word, ``(b - 1/2) C`` (``b = 1`` when it did not clip), so the server learns only the count of
unclipped clients, in the same sum. With ``privacy.dp = "distributed"`` each client also adds its share of
discrete Gaussian noise (``fedtune.privacy.distributed``) before masking, and the fixed-point scale leaves
room for the noise.
Under a shared pruning mask (``inner`` a ``MaskStrategy`` with ``mask.score = "global"``) each client's vector
holds only the mask's entries (``_support``); the unmasked sum is scattered back, zero outside the mask, so
those entries keep their global values.
``agg_error`` needs the individual updates: with secure aggregation it is not computed (``agg_error`` is null
and ``agg_error_unavailable`` is 1 in the record).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from fedtune.compression.mask import MASK_ROUND, gather, scatter
from fedtune.privacy import distributed
from fedtune.privacy.config import PrivacyConfig
from fedtune.privacy.dp import DPStrategy
from fedtune.privacy.secagg import (
    Advert,
    SecAggAbort,
    SecAggServer,
    default_neighbours,
    dequantize,
    fixed_point_scale,
    threshold,
)
from fedtune.privacy.wire import PHASES, unblob, unflat
from fedtune.rounds import stop_reason
from fedtune.strategies.base import PhaseResult, Rng, RoundResult, Strategy
from fedtune.types import ClientReply, Instructions, State


def tolerance(n: int, privacy: PrivacyConfig) -> tuple[int, int, int]:
    """``(k, t, dropouts)`` of a round that ``n`` clients start: each shares its secrets with ``k``
    neighbours, any ``t`` of them rebuild one, so up to ``k - t`` of a client's neighbours may drop out (a
    client does not count its own share: with 3 clients, k = 2 and t = 2 tolerate none)."""
    k = privacy.secagg_neighbours or default_neighbours(n)
    k = min(k + k % 2, max(n - 1, 1))
    t = threshold(k, privacy.secagg_threshold)
    return k, t, max(k - t, 0)


def tolerance_note(n: int, privacy: PrivacyConfig) -> str:
    """The startup line: how many dropouts secure aggregation with ``n`` clients a round survives."""
    k, t, dropouts = tolerance(n, privacy)
    note = (f"secure aggregation with {n} clients a round: {k} neighbours each, threshold t = {t}, so a round "
            f"survives up to {dropouts} dropout(s) among any client's neighbours")
    if dropouts == 0:
        note += (" - none: one client lost after sharing keys aborts the round (add clients or lower "
                 "privacy.secagg_threshold; t is at least 2)")
    return note


class SecAggStrategy:
    """``inner`` (linear, or a ``DPStrategy``) aggregated by secure aggregation; see the module docstring."""

    def __init__(self, inner: Strategy, privacy: PrivacyConfig, seed: int) -> None:
        if not inner.linear or inner.needs_all_replies:
            raise ValueError(f"privacy.secagg needs a linear strategy; {inner.name!r} is not")
        self.inner, self.privacy, self.seed = inner, privacy, seed
        self.name, self.cfg, self.spec = inner.name, inner.cfg, inner.spec
        self.needs_all_replies, self.base_log = False, inner.base_log
        self.server: SecAggServer | None = None
        self._train: dict[str, Instructions] = {}
        self._scale = 1.0
        self._bound = privacy.clip_norm
        self._noise: tuple[float, float] | None = None
        """Distributed DP's ``(z_update, count_noise)`` of the round, or None."""

    @property
    def linear(self) -> bool:
        return True

    def phases(self, round: int) -> Sequence[str]:
        return PHASES

    def sent_keys(self, global_state: State) -> list[str]:
        return self.inner.sent_keys(global_state)

    def stop_before(self, round: int) -> str | None:
        return stop_reason(self.inner, round)

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        if phase == PHASES[0]:
            self._train = self.inner.configure(round, client_ids, global_state, rng, phase=self.inner.phases(round)[-1])
            self.server = None
            return {c: Instructions(round, c, state={}, phase=phase) for c in self._train}
        srv = self.server
        assert srv is not None, f"{phase} before {PHASES[0]}"
        if phase == PHASES[1]:
            xs = srv.xs()
            return {c: Instructions(round, c, state={}, phase=phase, extra={
                "secagg_adverts": {n: a.to_plain() for n, a in srv.neighbour_adverts(c).items()},
                "secagg_xs": xs, "secagg_t": srv.t}) for c in srv.adverts}
        if phase == PHASES[2]:
            return self._upload(srv, phase)
        return {c: Instructions(round, c, state={}, phase=phase, extra={
            "secagg_survivors": list(srv.uploaded), "secagg_dropped": srv.dropped()}) for c in srv.uploaded}

    def _upload(self, srv: SecAggServer, phase: str) -> dict[str, Instructions]:
        """The masked-upload instructions: fixed-point scale, clipping bound, and with DP the count word and
        each client's share of the noise."""
        dp = self.inner if isinstance(self.inner, DPStrategy) else None
        m = len(srv.shared)
        self._bound = dp.clip if dp is not None else self.privacy.clip_norm
        count = dp is not None and dp.adaptive
        self._noise = dp.noise_split() if dp is not None and self.privacy.dp == "distributed" else None
        room = distributed.headroom(*self._noise) if self._noise else 0.0
        self._scale = fixed_point_scale(self._bound, m + room)
        extra: dict[str, Any] = {"secagg_scale": self._scale, "secagg_bound": self._bound, "secagg_count": count,
                                 "reply_tensors": ["masked"]}
        if self._noise is not None:
            z_update, count_noise = self._noise
            extra["secagg_noise"] = [z_update * self._bound / m ** 0.5,
                                     count_noise * self._bound / m ** 0.5 if count else None]
        return {c: dataclasses.replace(self._train[c], phase=phase, extra={
            **self._train[c].extra, **extra, "secagg_inbox": {s: b.hex() for s, b in srv.inbox(c).items()},
            "secagg_senders": srv.senders(c)}) for c in srv.shared}

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult | PhaseResult:
        failures: dict[str, str] = {}
        got: dict[str, Any] = {}
        for reply in replies:
            if reply.error is not None:
                failures[reply.client_id] = reply.error
                continue
            try:
                got[reply.client_id] = self._read(phase, reply)
            except ValueError as exc:
                failures[reply.client_id] = f"{phase}: {exc}"
        try:
            return self._take(round, global_state, phase, got, failures)
        except SecAggAbort as exc:
            srv = self.server
            tolerated = f" (k = {srv.k}, t = {srv.t}: up to {srv.k - srv.t} dropouts tolerated)" if srv else ""
            failures["secagg"] = f"secure aggregation aborted: {exc}{tolerated}"
            return RoundResult(state=global_state, applied=False, failures=failures, clients_failed=list(failures),
                               metrics={"secagg_aborted": 1.0, "agg_error_unavailable": 1.0})

    def _read(self, phase: str, reply: ClientReply) -> Any:
        """What one reply of ``phase`` carries, checked; ValueError names what is wrong."""
        if phase == PHASES[2]:
            masked = (reply.state or {}).get("masked")
            if masked is None or masked.dtype != torch.uint32 or masked.ndim != 1:
                raise ValueError("no masked uint32 vector in the reply")
            return masked.numpy()
        body = unblob(reply.state)
        if phase == PHASES[0]:
            ad = Advert.from_plain(body)
            if ad.cid != reply.client_id:
                raise ValueError(f"advert names {ad.cid[:64]!r}")
            return ad
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")  # noqa: TRY004 (a failed reply, not a caller bug)
        if phase == PHASES[1]:
            return {str(to): bytes.fromhex(str(b)) for to, b in body.items()}
        return body

    def _take(self, round: int, global_state: State, phase: str, got: dict[str, Any],
              failures: dict[str, str]) -> RoundResult | PhaseResult:
        if phase == PHASES[0]:
            k, t, _ = tolerance(len(got), self.privacy)
            self.server = SecAggServer(round, t, k, self.seed * 7919 + round)
            self.server.take_adverts(got.values())
            return PhaseResult(phase, sorted(got), failures)
        srv = self.server
        assert srv is not None
        if phase == PHASES[1]:
            srv.take_shares(got)
            return PhaseResult(phase, sorted(got), failures)
        dp = self.inner if isinstance(self.inner, DPStrategy) else None
        if phase == PHASES[2]:
            words = sum(v.numel() for v in self._support(global_state)[0].values())
            words += int(dp is not None and dp.adaptive)
            for cid, y in got.items():
                if y.size != words:
                    failures[cid] = f"masked vector of {y.size} words, expected {words}"
                else:
                    srv.add(cid, y)
            return PhaseResult(phase, list(srv.uploaded), failures)
        total = dequantize(srv.unmask(got), self._scale)
        support, mask = self._support(global_state)
        keys = list(support)
        words = sum(v.numel() for v in support.values())
        summed = unflat(total[:words], support, keys)
        if mask:
            summed = scatter(summed, {k: torch.zeros_like(global_state[k], dtype=torch.float32) for k in keys}, mask)
        ok = list(srv.uploaded)
        self.server = None
        if dp is not None:
            count = float(total[words]) / self._bound if dp.adaptive else None
            z = None
            if self._noise is not None:
                z = distributed.noise_multiplier(*self._noise, self._bound, self._scale, words,
                                                 len(srv.shared), len(ok))
            result = dp.release(round, global_state, summed, ok, failures, phase=dp.phases(round)[-1], count=count,
                                noise_multiplier=z)
        else:
            result = self._mean(round, global_state, summed, ok, failures)
        result.metrics["agg_error_unavailable"] = 1.0
        result.metrics["secagg_dropped"] = float(len(self._train) - len(ok))
        result.metrics.update({"secagg_k": float(srv.k), "secagg_t": float(srv.t),
                               "secagg_dropouts_tolerated": float(srv.k - srv.t)})
        return result

    def _support(self, global_state: State) -> tuple[State, State | None]:
        """What each client's vector holds, tensor by tensor (the global tensors sent, or under the round's shared
        pruning mask only its entries), and that mask."""
        sent = {k: global_state[k] for k in self.sent_keys(global_state)}
        ins = next(iter(self._train.values()), None)
        mask = ins.mask if ins is not None and ins.mask and MASK_ROUND in ins.extra else None
        return (gather(sent, mask), mask) if mask else (sent, None)

    def _mean(self, round: int, global_state: State, summed: State, ok: list[str],
              failures: dict[str, str]) -> RoundResult:
        mean = ClientReply("secagg-mean", round, {k: (global_state[k].float() + v / len(ok)).to(global_state[k].dtype)
                                                  for k, v in summed.items()}, num_examples=1)
        result = self.inner.aggregate(round, global_state, [mean], phase=self.inner.phases(round)[-1])
        assert isinstance(result, RoundResult)
        if len(ok) < self.cfg.min_replies:
            result.applied, result.state = False, global_state
        result.clients_ok, result.clients_failed, result.failures = ok, list(failures), failures
        result.agg_error_layers = {}
        for key in ("agg_error", "agg_error_estimated"):
            result.metrics.pop(key, None)
        result.metrics.update({"clients_ok": float(len(ok)), "clients_failed": float(len(failures))})
        return result

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


__all__ = ["SecAggStrategy"]
