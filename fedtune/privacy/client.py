"""The client side of secure aggregation: one handler per phase (``fedtune.client.phases``), so gRPC nodes,
every simulator pool and the Flower ClientApp run the same code.

The round's secrets (key pairs, self-mask seed, the shares held for neighbours) live in the client's state
under ``"secagg"`` between the phases of one round and are deleted when it unmasks. In ``secagg_upload``
the client trains as in ``train`` (``fit`` and the update pipeline), clips its update to the bound the
server sent (under a shared pruning mask, ``mask.density``, only the mask's entries: fewer words), turns it into fixed point with the server's scale, appends the count word of adaptive clipping
(``(b - 1/2) C``) when asked, adds its share of discrete Gaussian noise under distributed DP, and masks it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.client.phases import ClientContext, register_phase, train_phase
from fedtune.compression.mask import sent_reference
from fedtune.privacy.distributed import client_noise
from fedtune.privacy.secagg import Advert, SecAggClient, quantize
from fedtune.privacy.wire import PHASES, blob, sim_identity, sim_public
from fedtune.types import ClientReply, Instructions, State, failed_reply


def _identity(ctx: ClientContext, cid: str) -> Any:
    """This client's Ed25519 identity: its node key from ``client.keys_dir`` (``fedtune keys``), or without
    keys (simulation, plaintext loopback) one derived from the run's seed."""
    keys = ctx.cfg.client.keys_dir
    if keys is None:
        return sim_identity(ctx.cfg.seed, cid)
    from fedtune.transport.keys import load_node_key

    return load_node_key(Path(keys) / "nodes" / f"{cid}.key")


def _trusted(ctx: ClientContext, ids: list[str]) -> dict[str, bytes]:
    """The public identities this client trusts for ``ids``: ``client.keys_dir/allowlist.txt`` (the sites'
    public keys, given to every site out of band, never relayed by the server), or the seed's."""
    keys = ctx.cfg.client.keys_dir
    if keys is None:
        return {c: sim_public(ctx.cfg.seed, c) for c in ids}
    from fedtune.transport.keys import read_allowlist

    path = Path(keys) / "allowlist.txt"
    if not path.is_file():
        raise ValueError(f"secure aggregation needs {path}: the other sites' public keys (the allowlist.txt "
                         "made by `fedtune keys`), to check the keys the server relays")
    entries = read_allowlist(path)
    return {c: entries[c].public_key for c in ids if c in entries and not entries[c].revoked}


def _client(ctx: ClientContext, ins: Instructions) -> SecAggClient:
    saved = ctx.state.get("secagg")
    if not isinstance(saved, dict) or saved.get("round") != ins.round or saved.get("cid") != ins.client_id:
        raise ValueError(f"no secure-aggregation keys of round {ins.round} (this client missed an earlier phase)")
    return SecAggClient.from_plain(saved, _identity(ctx, ins.client_id))


def _guard(handler: Any) -> Any:
    """A phase handler whose ``ValueError`` (a tampered or inconsistent message) becomes a failed reply."""
    def run(ctx: ClientContext, ins: Instructions) -> ClientReply:
        try:
            reply: ClientReply = handler(ctx, ins)
            return reply
        except (ValueError, KeyError, TypeError) as exc:  # from the network: a failed reply, never a crash
            return failed_reply(ins.client_id, ins.round, f"{ins.phase}: {exc!s:.300}")
    return run


def advertise(ctx: ClientContext, ins: Instructions) -> ClientReply:
    client = SecAggClient(ins.client_id, ins.round, _identity(ctx, ins.client_id))
    ctx.state["secagg"] = client.to_plain()
    return ClientReply(ins.client_id, ins.round, blob(client.advertise().to_plain()), num_examples=1)


def share(ctx: ClientContext, ins: Instructions) -> ClientReply:
    client = _client(ctx, ins)
    adverts = {str(c): Advert.from_plain(a) for c, a in dict(ins.extra["secagg_adverts"]).items()}
    trusted = _trusted(ctx, list(adverts))
    xs = {str(c): int(x) for c, x in dict(ins.extra["secagg_xs"]).items()}
    sent = client.share_keys(adverts, trusted, xs, int(ins.extra["secagg_t"]))
    ctx.state["secagg"] = client.to_plain()
    return ClientReply(ins.client_id, ins.round, blob({to: b.hex() for to, b in sent.items()}), num_examples=1)


def _positive(value: Any, what: str) -> float:
    """A number from the server's instructions that must be finite and > 0; ValueError names it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"the server's {what} must be a finite number > 0, got {str(value)[:40]!r}")
    return float(value)


def _public(metrics: dict[str, float]) -> dict[str, float]:
    """The training metrics the server may see next to a masked vector: not the update's norm (it would tell
    the server whether this client was clipped, which adaptive clipping only reveals as a noisy count)."""
    return {k: v for k, v in metrics.items() if k != "update_norm"}


def _values(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().reshape(-1)


def clipped_delta(values: State, reference: State, keys: list[str], bound: float) -> tuple[np.ndarray, float]:
    """The update ``values - reference`` over ``keys`` as one float64 vector, scaled down to L2 norm ``bound``
    when it is longer, and its norm before (not finite when the update is not).

    Both sides are gathered into one float32 vector each, the values widened to float64 and the reference
    subtracted from them in one numpy pass (the difference of two float32 numbers in float64, as one
    tensor-by-tensor subtraction in float64 gives it, at a quarter of its cost: 240 small mixed-type
    subtractions spent most of their time setting up casts). numpy works on the whole vector in one thread:
    torch's intra-op threads on vector-sized operations stall on a busy machine, and a BLAS dot product's
    rounding would depend on its thread count (a simulated and a real client must send the same words)."""
    if not keys:
        return np.zeros(0, dtype=np.float64), 0.0
    delta = np.concatenate([_values(values[k]) for k in keys]).astype(np.float64)
    np.subtract(delta, np.concatenate([_values(reference[k]) for k in keys]), out=delta)
    norm = math.sqrt(float(np.einsum("i,i->", delta, delta)))
    if norm > bound:
        delta *= bound / norm
    return delta, norm


def _noise_shares(ctx: ClientContext, noise: Any, count: bool, bound: float,
                  participants: int) -> tuple[float, float | None] | str | None:
    """The noise stds the server asks of this client (``[update, count]`` in value units, or None), checked
    against this client's own floor; the refusal as text when they fall short.

    Under ``privacy.dp = "distributed"`` in this client's config, its ``privacy.noise_multiplier`` is the
    least it adds up to: with ``m`` clients each adding std ``sigma`` the sum holds ``sigma sqrt(m)``, and
    ``m`` is at most the ``participants`` the server named, so the asked ``sigma sqrt(participants) / bound``
    must reach the floor (an honest server asks ``z bound / sqrt(m)`` and always passes). The count word of
    adaptive clipping must get at least ``privacy.clip_count_noise`` (when unset, more than
    ``noise_multiplier / 2``, the least config validation allows). A server asking for no noise, or less,
    gets a failed reply saying so, and the round goes on without this client.
    """
    pv = ctx.cfg.privacy
    floor = pv.noise_multiplier if pv.dp == "distributed" else 0.0
    if noise is None:
        if floor > 0:
            return (f"the server asked for no noise, but this client's privacy.dp=distributed adds noise of "
                    f"multiplier {floor:g} at least; refusing to upload")
        return None
    update_std, count_std = noise
    update = _positive(update_std, "noise")
    asked = update * math.sqrt(max(participants, 1)) / bound
    if asked < floor * (1 - 1e-9):
        return (f"the server asked for noise of multiplier {asked:.4g} over its {participants} participants, "
                f"below this client's privacy.noise_multiplier = {floor:g}; refusing to upload")
    if not count:
        return update, None
    counted = _positive(count_std, "count noise")
    count_floor = pv.clip_count_noise if pv.clip_count_noise > 0 else floor / 2
    asked_count = counted * math.sqrt(max(participants, 1)) / bound
    if asked_count < count_floor * (1 - 1e-9):
        return (f"the server asked for count noise of std {asked_count:.4g}, below this client's floor "
                f"{count_floor:g} (privacy.clip_count_noise, else privacy.noise_multiplier / 2); refusing to upload")
    return update, counted


def upload(ctx: ClientContext, ins: Instructions) -> ClientReply:
    client = _client(ctx, ins)
    extra = dict(ins.extra)
    inbox = {str(s): bytes.fromhex(str(b)) for s, b in dict(extra.pop("secagg_inbox")).items()}
    senders = [str(s) for s in extra.pop("secagg_senders")]
    scale, bound = _positive(extra.pop("secagg_scale"), "scale"), _positive(extra.pop("secagg_bound"), "bound")
    count, noise = bool(extra.pop("secagg_count", False)), extra.pop("secagg_noise", None)
    extra.pop("reply_tensors", None)
    reply = train_phase(ctx, dataclasses.replace(ins, phase="train", extra=extra))
    if not reply.ok or reply.state is None:
        return reply
    ref = sent_reference(ctx.state, ins)  # under a shared pruning mask: only its entries
    keys = list(ref)
    delta, norm = clipped_delta(reply.state, ref, keys, bound)
    if not math.isfinite(norm):  # the server cannot screen a masked vector: the client does
        return failed_reply(ins.client_id, ins.round, "secagg_upload: the update is not finite (NaN or Inf); "
                            "nothing was uploaded")
    if count:
        delta = np.append(delta, ((norm <= bound) - 0.5) * bound)
    shares = _noise_shares(ctx, noise, count, bound, client.participants)
    if isinstance(shares, str):
        return failed_reply(ins.client_id, ins.round, f"secagg_upload: {shares}")
    x = quantize(delta, scale, overwrite=True)  # delta is not used again: its memory becomes x's
    if shares is not None:
        x += client_noise(delta.size - count, scale, *shares)
    masked = client.masked(x, inbox, senders)
    ctx.state["secagg"] = client.to_plain()
    return ClientReply(ins.client_id, ins.round, {"masked": torch.from_numpy(masked)},
                       num_examples=reply.num_examples, metrics=_public(reply.metrics))


def unmask(ctx: ClientContext, ins: Instructions) -> ClientReply:
    client = _client(ctx, ins)
    answer = client.unmask([str(c) for c in ins.extra["secagg_survivors"]],
                           [str(c) for c in ins.extra["secagg_dropped"]])
    ctx.state.pop("secagg", None)  # the round's secrets end here
    return ClientReply(ins.client_id, ins.round, blob(answer), num_examples=1)


for _name, _handler in zip(PHASES, (advertise, share, upload, unmask), strict=True):
    register_phase(_name, _guard(_handler))
