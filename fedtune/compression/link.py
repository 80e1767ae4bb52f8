"""The server's side of compression: compressed updates back to values, compressed downlink deltas, and the
dense fp32 bytes a run is compared against.

``Link`` sits in the round driver between the strategy and the dispatcher, so the simulator and the gRPC
server do the same thing:

- ``up``: a reply holding a compressed delta (``reply.delta``) becomes values, global + delta, before the
  strategy sees it; a delta that this method cannot have sent (random-k with the wrong count, another shape,
  a tensor not sent) is a failed reply naming the problem.
- ``down`` (``compress.downlink``): the server keeps one reference state R, what every client that answered the
  last round holds. Each round it compresses G - R (G the new global) with the same method, sends that delta to
  those clients (in the method's wire encoding, ``extra["state_encoding"]``, with a digest of the R it applies
  to) and R <- R + sent; every other client (it missed a round, or the server restarted) gets R in full. What is
  not sent of G stays in G - R and goes out later (error feedback on the downlink). A client rebuilds R bit for
  bit (``receive_downlink``, which checks the digest) and trains from it; its update is read against G. Before
  round 1 of a fresh run every client holds the adapter it built from the shared seed (``LoadedModel.initial``),
  which is the server's starting state, so round 1 sends a delta too; a client whose initial adapter differs
  fails that round on the digest and gets R in full the next. R in full travels ``dense`` (lossless) whatever
  ``client.encoding`` says. R is not checkpointed: after a restart every client gets R in full once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import xxhash

from fedtune.adapters import lora_pairs
from fedtune.compression.compressors import PACKED, compress_state, expand_state, unpack
from fedtune.compression.config import CompressConfig, wire_encoding
from fedtune.compression.mask import MASK_ROUND, gather, mask_problem, scatter
from fedtune.compression.rank import MAX_RANK, trim
from fedtune.transport.messages import instructions_wire_size, reply_wire_size
from fedtune.types import ClientReply, Instructions, State, failed_reply

DELTA_FROM = "delta_from"
"""``Instructions.extra`` key: the state is a delta from the reference of this round."""
REF_ROUND = "ref_round"
"""``Instructions.extra`` key: the state (full, or rebuilt from the delta) is the reference of this round."""
TRAINING = ("train", "secagg_upload")
"""Phases whose clients train from the instructions' state (and may be sent a pruning mask)."""
MASKED_DELTA = "delta_masked"
"""``Instructions.extra`` key: the downlink delta holds only the entries of the pruning mask the instructions
train with (``mask_round``), in ``gather``'s order; every other entry of the reference is unchanged."""
HELD = "downlink"
"""The client's state key of the reference it holds: ``{"round": tensor, "state": {...}}``."""


def _failed(reply: ClientReply, reason: str) -> ClientReply:
    out = failed_reply(reply.client_id, reply.round, reason)
    out.bytes_up, out.bytes_down = reply.bytes_up, reply.bytes_down
    return out


def rebuild(reply: ClientReply, ins: Instructions, c: CompressConfig) -> ClientReply:
    """``reply`` with values (``ins.state`` + its delta) when it holds a compressed delta; otherwise as it came."""
    if not reply.ok or not reply.delta or reply.state is None:
        return reply
    try:
        full = expand_state(reply.state, ins.state, c, int(ins.extra.get("seed", ins.round)))
    except ValueError as exc:
        return _failed(reply, f"rejected update: {exc}")
    values = {name: (ins.state[name].float() + d.float()).to(ins.state[name].dtype) for name, d in full.items()}
    return dataclasses.replace(reply, state=values, delta=False)


def state_digest(state: State) -> str:
    """xxh3-128 of the tensors' names, dtypes, shapes and bytes, in name order (hex)."""
    h = xxhash.xxh3_128()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return str(h.hexdigest())


def receive_downlink(held: dict[str, Any] | None, ins: Instructions, initial: State | None = None,
                     mask: State | None = None) -> tuple[Instructions, dict[str, Any] | None]:
    """The instructions with the reference state rebuilt, and what the client holds now. ``initial``: the
    adapter as built at load time, the client's round-0 reference; ``mask``: the pruning mask the instructions
    train with (a delta of only its entries, ``MASKED_DELTA``).

    Raises:
        ValueError: a delta from a reference this client does not hold, or that does not fit it (it becomes a
            failed reply).
    """
    if DELTA_FROM in ins.extra:
        frm = int(ins.extra[DELTA_FROM])
        packed = bool(ins.extra.get(PACKED))  # compress.pack: one flat vector of the held tensors in name order
        names = set(initial or {}) if packed else set(ins.state)
        if held is None and frm == 0 and initial and names <= set(initial):
            held = {"round": torch.tensor(0), "state": {k: initial[k] for k in names}}
        have = int(held["round"]) if held else None
        if held is None or have != frm:
            raise ValueError(f"the server sent a delta from its round-{frm} state, this client holds "
                             f"{'none' if have is None else 'round ' + str(have)}")
        ref = held["state"]
        masked = bool(ins.extra.get(MASKED_DELTA))
        if masked and (mask is None or mask_problem(mask, ref) is not None):
            raise ValueError("the server sent a delta of its mask's entries, and this client holds no mask of "
                             f"round {ins.extra.get(MASK_ROUND)} that fits its tensors")
        like = gather(ref, mask) if masked and mask is not None else ref
        if packed:
            if set(ins.state) != {PACKED}:
                raise ValueError(f"the server's packed delta holds tensors {sorted(ins.state)[:3]}, not {PACKED!r}")
            delta = unpack(ins.state[PACKED], like)
        elif set(like) != set(ins.state) or any(like[k].shape != ins.state[k].shape for k in like):
            raise ValueError("the server's delta does not match the tensors this client holds")
        else:
            delta = ins.state
        if masked and mask is not None:
            delta = scatter(delta, {k: torch.zeros_like(v) for k, v in ref.items()}, mask)
        if state_digest(ref) != ins.extra.get("ref_digest"):
            raise ValueError(f"the state this client holds as round {frm} is not the server's (digest differs)")
        state = {k: ref[k] + delta[k].to(ref[k].dtype) for k in ref}
    elif REF_ROUND in ins.extra:
        state = {k: v.clone() for k, v in ins.state.items()}
    else:
        return ins, held
    now = {"round": torch.tensor(int(ins.extra[REF_ROUND])), "state": state}
    return dataclasses.replace(ins, state=state), now


class Link:
    """Compression between the driver and the dispatcher (see the module docstring). ``rank_prune``: replies
    may hold LoRA factors of a smaller rank; ``trim``: send the global factors cut to the components in use
    (``strategy.svd_energy``); a pruning mask (``fedtune.compression.mask``) is sent once per version."""

    def __init__(self, c: CompressConfig, *, uplink: bool, rank_prune: bool = False, trim: bool = False) -> None:
        self.c, self.uplink, self.rank_prune, self.trim = c, uplink, rank_prune, trim
        self.mask_held: dict[str, int] = {}
        """The mask version (``extra["mask_round"]``) each client holds, as far as the server knows."""
        self.ref: State | None = None
        self.ref_round = 0
        self.holders: set[str] = set()
        self.everyone = False
        """Every client holds ``ref`` (round 0 of a fresh run: the adapter built from the seed)."""

    def down(self, rnd: int, instructions: dict[str, Instructions]) -> dict[str, Instructions]:
        """What goes on the wire for ``instructions``: the downlink delta (``compress.downlink``), factors
        trimmed or allowed another rank, the mask only to clients that do not hold it."""
        return {cid: self._shaped(cid, ins) for cid, ins in self._downlink(rnd, instructions).items()}

    def _shaped(self, cid: str, ins: Instructions) -> Instructions:
        if ins.phase not in TRAINING:
            return ins
        extra = dict(ins.extra)
        state = ins.state
        if self.uplink and self.c.pack and ins.phase == "train":
            extra["reply_tensors"] = [PACKED]  # the reply's one tensor, which the instructions do not carry
        if self.trim or self.rank_prune:
            pairs = lora_pairs(state)
            if pairs:
                extra[MAX_RANK] = int(state[next(iter(pairs.values()))[0]].shape[0])
            if self.trim:
                state = trim(state)
        mask = ins.mask
        if mask and MASK_ROUND in extra:
            if self.mask_held.get(cid) == extra[MASK_ROUND]:
                mask = None  # the client holds this version: not sent again
            else:
                extra["mask_encoding"] = "bitmap"
        return dataclasses.replace(ins, state=state, mask=mask, extra=extra)

    def _downlink(self, rnd: int, instructions: dict[str, Instructions]) -> dict[str, Instructions]:
        train = [ins for ins in instructions.values() if ins.phase == "train"]
        if not self.c.downlink or not train:
            return instructions
        g = train[0].state
        if any(set(ins.state) != set(g) for ins in train):
            return instructions  # per-client states (heterogeneous ranks...): sent as they are
        if self.ref is None and rnd == 1:  # a fresh run: every client built the starting state itself
            self.ref, self.ref_round, self.everyone = {k: v.detach().clone() for k, v in g.items()}, 0, True
        old, delta = self.ref, None
        # Under a pruning mask the global changes only at its entries: send G - R there only (the rest of G - R,
        # from before the mask, waits for a round without one). Every client trains with the same mask.
        masks = [ins.mask for ins in train if ins.mask and MASK_ROUND in ins.extra]
        mask = masks[0] if masks and len(masks) == len(train) and all(
            m.keys() == masks[0].keys() and all(torch.equal(m[k], masks[0][k]) for k in m) for m in masks) else None
        if old is not None and set(old) == set(g) and all(old[k].shape == g[k].shape for k in g):
            diff = {k: g[k].double() - old[k].double() for k in g}
            if mask is not None:
                delta, kept = compress_state(gather(diff, mask), self.c, seed=rnd)
                full = scatter(kept, {k: torch.zeros_like(v) for k, v in diff.items()}, mask)
            else:
                delta, full = compress_state(diff, self.c, seed=rnd)
            self.ref = {k: old[k] + full[k].to(old[k].dtype) for k in g}
        else:
            self.ref = {k: v.detach().clone() for k, v in g.items()}
        digest = state_digest(old) if delta is not None and old is not None else ""
        out = {}
        for cid, ins in instructions.items():
            if ins.phase != "train":
                out[cid] = ins
            elif delta is not None and (self.everyone or cid in self.holders):
                assert old is not None
                out[cid] = dataclasses.replace(ins, state=delta, extra={
                    **ins.extra, DELTA_FROM: self.ref_round, REF_ROUND: rnd, "ref_digest": digest,
                    "state_encoding": wire_encoding(self.c), **({PACKED: 1} if self.c.pack else {}),
                    **({MASKED_DELTA: 1} if mask is not None else {})})
            else:  # lossless whatever client.encoding says: the client must hold R bit for bit
                out[cid] = dataclasses.replace(ins, state=self.ref, extra={**ins.extra, REF_ROUND: rnd,
                                                                            "state_encoding": "dense"})
        self.ref_round, self.holders, self.everyone = rnd, set(), False
        return out

    def up(self, replies: Iterable[ClientReply], instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        """The replies with values rebuilt; notes who holds the downlink reference now."""
        for reply in replies:
            ins = instructions.get(reply.client_id)
            carries = ins is not None and bool(ins.mask) and MASK_ROUND in ins.extra and ins.phase in TRAINING
            masked = carries and ins is not None and ins.phase == "train"  # secagg_upload: a sum of masked words
            if ins is not None and self.uplink:
                assert ins.mask is not None or not masked
                reply = rebuild(reply, dataclasses.replace(ins, state=gather(ins.state, ins.mask))
                                if masked and ins.mask is not None else ins, self.c)
            if masked and reply.ok and ins is not None and ins.mask is not None:
                try:
                    reply = dataclasses.replace(reply, state=scatter(reply.state or {}, ins.state, ins.mask),
                                                mask=ins.mask)
                except ValueError as exc:
                    reply = _failed(reply, f"rejected update: {exc}")
            if reply.ok and (ins is None or ins.phase == "train"):  # another phase's state is not the reference
                self.holders.add(reply.client_id)
            if reply.ok and carries and ins is not None:
                self.mask_held[reply.client_id] = int(ins.extra[MASK_ROUND])
            elif not reply.ok:  # whatever it held may be gone (a restarted node): send the mask again
                self.mask_held.pop(reply.client_id, None)
            yield reply


def make_link(cfg: Any) -> Link | None:
    """The run's ``Link`` (a ``fedtune.config.Config``), or None when it neither compresses uploads nor the
    downlink."""
    uplink, rank_prune = "compress" in cfg.client.pipeline, "rank_prune" in cfg.client.pipeline
    trim = cfg.strategy.svd_energy > 0
    if uplink or rank_prune or trim or cfg.compress.downlink or cfg.mask.density < 1:
        return Link(cfg.compress, uplink=uplink, rank_prune=rank_prune, trim=trim)
    return None


def dense_fp32_bytes(ins: Instructions, reply: ClientReply) -> int:
    """Bytes of the same exchange with every tensor dense fp32: the instructions' global state down, the
    reply's values up (the baseline of ``compression_ratio``)."""
    plain = dataclasses.replace(ins, mask=None, extra={k: v for k, v in ins.extra.items()
                                                       if k not in ("state_encoding", "mask_encoding")})
    down = instructions_wire_size(plain, "fp32")
    # The reply's tensors at the shapes it was sent (a pruned rank or a masked update counts in full).
    full = {k: ins.state.get(k, v) for k, v in (reply.state or {}).items()}
    if ins.phase == "secagg_upload" and ins.mask and "masked" in full:  # its words at the mask's entries only
        left_out = sum(m.numel() - int(m.sum()) for m in ins.mask.values())
        full["masked"] = torch.zeros(full["masked"].numel() + left_out, dtype=torch.uint32)
    up = reply_wire_size(dataclasses.replace(reply, state=full, delta=False, mask=None), ins.phase, "fp32") \
        if reply.ok else 0
    return down + up
