"""Compressors with error feedback (``fedtune.compression``): conservation, hand-computed outputs, the wire
carrying exactly what was sent, random-k's shared indices, and the server rebuilding values."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.compression.compressors import compress, k_of, randk_indices
from fedtune.compression.config import CompressConfig, wire_encoding
from fedtune.compression.feedback import CompressTransform
from fedtune.compression.link import rebuild
from fedtune.transport.codec import decode_state, encode_state
from fedtune.transport.messages import reply_wire_size
from fedtune.types import ClientReply, Instructions

METHODS = ["topk", "randk", "threshold", "sign", "int8", "int4"]
SETTINGS = [CompressConfig(method=m) for m in METHODS] + [
    CompressConfig(method="topk", scope="global", fraction=0.1), CompressConfig(method="topk", count=3),
    CompressConfig(method="int8", stochastic=True), CompressConfig(method="int4", stochastic=True),
    CompressConfig(method="threshold", threshold=0.5), CompressConfig(method="sign", block=32),
    CompressConfig(method="sign", block=1024), CompressConfig(method="sign", pack=True, block=64),
    CompressConfig(method="topk", pack=True, fraction=0.05), CompressConfig(method="randk", pack=True, fraction=0.2),
    CompressConfig(method="int4", pack=True)]
EXACT = {"topk", "randk", "threshold"}  # entries copied: sent + residual is the accumulator bit for bit


def _state(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 300, generator=g) * scale,
            "a.lora_B.weight": torch.randn(17, 4, generator=g) * scale, "b.bias": torch.randn(3, generator=g)}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]),
       which=st.sampled_from(range(len(SETTINGS))))
def test_sent_plus_new_residual_is_update_plus_old_residual(seed: int, scale: float, which: int) -> None:
    c = SETTINGS[which]
    start, trained, old = _state(seed, 1.0), _state(seed + 1, scale), _state(seed + 2, scale / 3)
    ins = Instructions(round=1, client_id="c", state=start, extra={"seed": seed})
    reply = ClientReply("c", 1, trained, 5)
    old64 = {k: v.double() for k, v in old.items()}
    out, residual = CompressTransform(c).apply(reply, ins, old64)
    assert out.delta and out.state is not None
    got = out.state
    if c.pack:  # one vector of the tensors in name order, cut back here by their shapes
        assert list(got) == ["packed"] and got["packed"].dim() == 1
        got = dict(zip(sorted(start), got["packed"].split([start[k].numel() for k in sorted(start)])
                       if c.method != "randk" else [got["packed"]] * len(start), strict=True))
    for name in start:
        acc = trained[name].double() - start[name].double() + old64[name]
        sent = got[name].reshape(acc.shape) if c.pack and c.method != "randk" else got[name]
        if c.method == "randk" and c.pack:
            total = sum(v.numel() for v in start.values())
            full = torch.zeros(total, dtype=torch.float32)
            full[randk_indices(total, k_of(total, c), seed, "packed")] = sent
            at = sum(start[k].numel() for k in sorted(start) if k < name)
            sent = full[at:at + acc.numel()].reshape(acc.shape)
        elif c.method == "randk":
            full = torch.zeros(acc.numel(), dtype=torch.float32)
            full[randk_indices(acc.numel(), k_of(acc.numel(), c), seed, name)] = sent
            sent = full.reshape(acc.shape)
        total = sent.double() + residual[name]
        if c.method in EXACT or (c.method in ("int8", "int4") and not c.stochastic):
            assert torch.equal(total, acc), (c, name)
        else:  # sign and stochastic rounding: to one float64 rounding of the residual
            assert torch.allclose(total, acc, rtol=0, atol=1e-15 * float(acc.abs().max() + sent.abs().max())), c


@pytest.mark.parametrize("c", SETTINGS, ids=str)
def test_the_wire_carries_exactly_what_was_sent(c: CompressConfig) -> None:
    acc = {k: v.double() for k, v in _state(3, 0.02).items()}
    sent, _ = compress(acc, c, seed=7)
    back = decode_state(encode_state(sent, wire_encoding(c)))
    assert all(torch.equal(back[k], sent[k]) for k in sent), c


def test_topk_keeps_the_largest_magnitudes_per_tensor_or_over_all() -> None:
    acc = {"x": torch.tensor([0.1, -5.0, 0.3, 2.0], dtype=torch.float64),
           "y": torch.tensor([[-1.0, 0.2], [4.0, 0.0]], dtype=torch.float64)}
    sent, _ = compress(acc, CompressConfig(method="topk", count=2), seed=0)
    assert sent["x"].tolist() == [0.0, -5.0, 0.0, 2.0] and sent["y"].tolist() == [[-1.0, 0.0], [4.0, 0.0]]
    sent, _ = compress(acc, CompressConfig(method="topk", count=3, scope="global"), seed=0)
    assert sent["x"].tolist() == [0.0, -5.0, 0.0, 2.0] and sent["y"].tolist() == [[0.0, 0.0], [4.0, 0.0]]
    sent, _ = compress(acc, CompressConfig(method="topk", fraction=0.25), seed=0)  # round(0.25 * 4) = 1
    assert sent["x"].tolist() == [0.0, -5.0, 0.0, 0.0] and int(torch.count_nonzero(sent["y"])) == 1
    sent, _ = compress(acc, CompressConfig(method="threshold", threshold=1.0), seed=0)
    assert sent["x"].tolist() == [0.0, -5.0, 0.0, 2.0] and sent["y"].tolist() == [[-1.0, 0.0], [4.0, 0.0]]


def test_sign_sends_the_block_mean_magnitude_and_int8_a_power_of_two_scale() -> None:
    x = torch.tensor([1.0, -3.0, 0.5, -0.5], dtype=torch.float64)
    sent, _ = compress({"x": x}, CompressConfig(method="sign"), seed=0)
    assert sent["x"].tolist() == [1.25, -1.25, 1.25, -1.25]  # mean |x| = 5 / 4
    sent, _ = compress({"x": x}, CompressConfig(method="int8"), seed=0)
    # max 3 / 127 -> scale 2^-5 (the smallest power of two >= 0.0236): codes 32, -96, 16, -16
    assert sent["x"].tolist() == [1.0, -3.0, 0.5, -0.5]
    y = torch.tensor([1.0, 0.3], dtype=torch.float64)
    sent, _ = compress({"y": y}, CompressConfig(method="int4"), seed=0)
    # max 1 / 7 -> scale 2^-2: codes 4 and round(1.2) = 1
    assert sent["y"].tolist() == [1.0, 0.25]


def test_sign_takes_one_scale_per_block_of_compress_block_and_pays_4_bytes_a_block() -> None:
    x = torch.cat([torch.full((32,), 0.5), torch.full((32,), -2.0), torch.tensor([1.0, -3.0])]).double()
    x[0] = -1.5  # first block: mean |x| = (1.5 + 31 * 0.5) / 32
    c = CompressConfig(method="sign", block=32)
    sent, _ = compress({"x": x}, c, seed=0)
    s0 = (1.5 + 31 * 0.5) / 32
    assert sent["x"].tolist() == [-s0] + [s0] * 31 + [-2.0] * 32 + [2.0, -2.0]  # the last, short block: 2 values
    assert wire_encoding(c) == "sign_b32" and wire_encoding(CompressConfig(method="sign")) == "sign"
    sizes = {b: len(next(iter(encode_state({"x": torch.ones(4096)}, wire_encoding(CompressConfig(
        method="sign", block=b))))).data) for b in (32, 256, 1024)}
    assert sizes == {32: 512 + 4 * 128, 256: 512 + 4 * 16, 1024: 512 + 4 * 4}  # 1 bit a value, 4 bytes a block


def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.full((100, 256), 0.3, dtype=torch.float64)
    x[:, 0] = 1.0  # every block of 256 has scale 2^-2: 0.3 lies between codes 1 and 2 (0.25, 0.5)
    sent, _ = compress({"x": x}, CompressConfig(method="int4", stochastic=True), seed=1)
    vals = sent["x"][:, 1:]
    assert set(vals.unique().tolist()) == {0.25, 0.5}
    assert float(vals.double().mean()) == pytest.approx(0.3, abs=0.005)
    nearest, _ = compress({"x": x}, CompressConfig(method="int4"), seed=1)
    assert set(nearest["x"][:, 1:].unique().tolist()) == {0.25}


def test_randk_sends_values_only_and_the_server_puts_them_back() -> None:
    c = CompressConfig(method="randk", fraction=0.1)
    start, trained = _state(0, 1.0), _state(1, 1.0)
    ins = Instructions(round=2, client_id="c", state=start, extra={"seed": 1234})
    out, _ = CompressTransform(c).apply(ClientReply("c", 2, trained, 5), ins, {})
    assert out.state is not None and out.state["a.lora_A.weight"].shape == (120,)  # 10% of 1200, no indices
    values = rebuild(out, ins, c)
    assert values.ok and not values.delta and values.state is not None
    for name in start:
        d = values.state[name] - start[name]
        idx = randk_indices(d.numel(), k_of(d.numel(), c), 1234, name)
        assert int(torch.count_nonzero(d)) <= idx.numel()
        assert torch.allclose(d.reshape(-1)[idx], (trained[name] - start[name]).reshape(-1)[idx], atol=1e-6)
    # another seed picks other indices: the server must use the client's
    assert not torch.equal(randk_indices(1200, 120, 1234, "a"), randk_indices(1200, 120, 1235, "a"))


def test_the_server_refuses_a_delta_it_cannot_read() -> None:
    c = CompressConfig(method="randk", fraction=0.1)
    start = _state(0, 1.0)
    ins = Instructions(round=1, client_id="c", state=start, extra={"seed": 5})
    good = {k: torch.zeros(k_of(v.numel(), c)) for k, v in start.items()}
    wrong_count = dataclasses.replace(ClientReply("c", 1, {**good, "b.bias": torch.zeros(2)}, 1), delta=True)
    out = rebuild(wrong_count, ins, c)
    assert not out.ok and "randk sent 2 values" in (out.error or "") and "expected (1,)" in (out.error or "")
    unknown = dataclasses.replace(ClientReply("c", 1, {**good, "z.weight": torch.zeros(1)}, 1), delta=True)
    assert "'z.weight', which was not sent" in (rebuild(unknown, ins, c).error or "")
    shaped = dataclasses.replace(ClientReply("c", 1, {"b.bias": torch.zeros(4)}, 1), delta=True)
    assert "shape (4,), expected (3,)" in (rebuild(shaped, ins, CompressConfig(method="sign")).error or "")


@pytest.mark.parametrize("method", ["sign", "topk", "randk"])
def test_a_packed_delta_is_one_tensor_the_server_cuts_back_into_the_clients_values(method: str) -> None:
    c, plain = CompressConfig(method=method, fraction=0.2, pack=True), CompressConfig(method=method, fraction=0.2)
    start = {f"l{i}.{m}.lora_{f}.weight": torch.randn(4, 64, generator=torch.Generator().manual_seed(i))
             for i in range(20) for m in ("q", "v") for f in ("A", "B")}
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in start.items()}
    ins = Instructions(round=1, client_id="c", state=start, extra={"seed": 3})
    out, residual = CompressTransform(c).apply(ClientReply("c", 1, trained, 5), ins, {})
    assert out.state is not None and list(out.state) == ["packed"]
    values = rebuild(out, ins, c)
    assert values.ok and values.state is not None and set(values.state) == set(start)
    for k in start:  # the server's values plus the client's residual are what it trained, to float32 rounding
        assert torch.allclose(values.state[k].double() + residual[k], trained[k].double(), atol=1e-6), k
    # the bytes: one wire tensor's header instead of 80 (the payload differs only in sign's block boundaries)
    sizes = {name: reply_wire_size(dataclasses.replace(o, state=o.state), "train", wire_encoding(cc))
             for name, (o, cc) in {"packed": (out, c), "plain": (CompressTransform(plain).apply(
                 ClientReply("c", 1, trained, 5), ins, {})[0], plain)}.items()}
    assert sizes["plain"] - sizes["packed"] > 79 * 60, sizes  # a header here: 18-byte name, shape, digest...
    if method == "sign":  # 20,480 values: 1 bit each and 80 blocks' scales, plus one header
        assert 2560 + 4 * 80 < sizes["packed"] < 2560 + 4 * 80 + 150, sizes


def test_the_server_refuses_a_packed_delta_it_cannot_cut() -> None:
    c = CompressConfig(method="sign", pack=True)
    start = _state(0, 1.0)  # 1200 + 68 + 3 values
    ins = Instructions(round=1, client_id="c", state=start, extra={"seed": 5})

    def why(state: dict[str, torch.Tensor]) -> str:
        out = rebuild(dataclasses.replace(ClientReply("c", 1, state, 1), delta=True), ins, c)
        assert not out.ok
        return out.error or ""
    assert "tensor 'packed': shape (1270,), expected (1271,)" in why({"packed": torch.zeros(1270)})
    assert "tensor 'packed': shape (1271, 1), expected (1271,)" in why({"packed": torch.zeros(1271, 1)})
    assert "randk sent 9 values" in (rebuild(dataclasses.replace(ClientReply("c", 1, {"packed": torch.zeros(9)}, 1),
                                                                 delta=True), ins,
                                             CompressConfig(method="randk", pack=True)).error or "")
    assert "expected one packed delta 'packed', got tensors ['a.lora_A.weight']" in why(
        {"a.lora_A.weight": torch.zeros(4, 300)})
    assert "got tensors ['b.bias', 'packed']" in why({"packed": torch.zeros(1271), "b.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="compress.pack sends every tensor the server sent; the update has 2 of 3"):
        CompressTransform(c).apply(ClientReply("c", 1, {k: v for k, v in start.items() if k != "b.bias"}, 1), ins, {})


def test_without_error_feedback_no_residual_is_kept() -> None:
    start, trained = _state(0, 1.0), _state(1, 1.0)
    ins = Instructions(round=1, client_id="c", state=start)
    _, kept = CompressTransform(CompressConfig(method="sign", error_feedback=False)).apply(
        ClientReply("c", 1, trained, 1), ins, {})
    assert kept == {}


def test_a_residual_of_another_shape_fails_the_reply_step() -> None:
    start = _state(0, 1.0)
    ins = Instructions(round=1, client_id="c", state=start)
    with pytest.raises(ValueError, match="residual of 'b.bias' has shape"):
        CompressTransform(CompressConfig()).apply(ClientReply("c", 1, _state(1, 1.0), 1), ins,
                                                  {"b.bias": torch.zeros(5, dtype=torch.float64)})


def _instructions(rnd: int, state: dict[str, torch.Tensor], ids: list[str]) -> dict[str, Instructions]:
    return {cid: Instructions(round=rnd, client_id=cid, state=state, extra={"seed": 1}) for cid in ids}


@pytest.mark.parametrize(("method", "pack"), [("topk", False), ("sign", False), ("int8", False), ("int4", False),
                                             ("threshold", False), ("sign", True), ("topk", True)])
def test_downlink_deltas_rebuild_the_servers_reference_on_the_client(method: str, pack: bool) -> None:
    from fedtune.compression.link import Link, receive_downlink
    from fedtune.transport.loopback import send_instructions

    c = CompressConfig(method=method, fraction=0.05, threshold=0.05, downlink=True, pack=pack)
    link, held = Link(c, uplink=False), {"a": None, "b": None, "c": None}
    g = _state(0, 1.0)
    initial = {"a": g, "b": g, "c": {k: v + 1e-3 for k, v in g.items()}}  # c built another adapter
    sizes, failed = {}, []
    for rnd in range(1, 6):
        ids = ["a", "b", "c"] if rnd != 3 else ["a", "c"]  # b misses round 3
        wire = link.down(rnd, _instructions(rnd, g, ids))
        ok = []
        for cid in ids:
            got, sizes[(rnd, cid)] = send_instructions(wire[cid], "dense")
            try:
                ins, held[cid] = receive_downlink(held[cid], got, initial[cid])
            except ValueError as exc:
                failed.append((rnd, cid, str(exc)))
                continue
            assert all(torch.equal(ins.state[k], link.ref[k]) for k in g), (rnd, cid)  # bit for bit
            ok.append(cid)
        list(link.up([ClientReply(cid, rnd, {}, 1) for cid in ok], {}))
        g = {k: v + 0.01 * _state(rnd, 1.0)[k] for k, v in g.items()}  # the next global moves a little
    assert wire["b"].extra["state_encoding"] != "dense" and link.down(9, _instructions(9, g, ["z"]))["z"].extra[
        "state_encoding"] == "dense"  # R in full is lossless whatever client.encoding says
    full = sizes[(2, "c")]  # c failed round 1 (its round-0 adapter differs): the full state in round 2
    assert failed == [(1, "c", "the state this client holds as round 0 is not the server's (digest differs)")]
    assert sizes[(1, "a")] < full / 3 and sizes[(2, "a")] < full / 3  # deltas, in the compressor's encoding
    assert sizes[(4, "b")] == full  # b missed round 3: the full state again
    assert sizes[(4, "a")] < full / 3 and sizes[(3, "c")] < full / 3
    # the reference follows the global: what is not sent stays in G - R and goes out later
    assert max(float((link.ref[k] - g[k]).abs().max()) for k in g) < 0.2


def test_a_delta_from_a_reference_the_client_does_not_hold_is_refused() -> None:
    from fedtune.compression.link import Link, receive_downlink

    link = Link(CompressConfig(method="topk", fraction=0.5, downlink=True), uplink=False)
    g = _state(0, 1.0)
    first = link.down(1, _instructions(1, g, ["a"]))["a"]
    assert first.extra["delta_from"] == 0
    _, held = receive_downlink(None, first, g)
    list(link.up([ClientReply("a", 1, {}, 1)], {}))
    delta = link.down(2, _instructions(2, {k: v * 2 for k, v in g.items()}, ["a"]))["a"]
    assert delta.extra["delta_from"] == 1 and delta.extra["state_encoding"] == "sparse_coo"
    with pytest.raises(ValueError, match="delta from its round-1 state, this client holds none"):
        receive_downlink(None, delta, g)
    stale = {"round": torch.tensor(0), "state": held["state"]}
    with pytest.raises(ValueError, match="this client holds round 0"):
        receive_downlink(stale, delta)
    tampered = {"round": torch.tensor(1), "state": {k: v * 0 for k, v in held["state"].items()}}
    with pytest.raises(ValueError, match="digest differs"):
        receive_downlink(tampered, delta)


def test_a_packed_downlink_delta_that_does_not_fit_the_held_tensors_is_refused() -> None:
    from fedtune.compression.link import Link, receive_downlink

    link = Link(CompressConfig(method="sign", downlink=True, pack=True), uplink=False)
    g = _state(0, 1.0)
    first = link.down(1, _instructions(1, g, ["a"]))["a"]
    assert list(first.state) == ["packed"] and first.extra["packed"] == 1
    _, held = receive_downlink(None, first, g)
    assert held is not None and all(torch.equal(held["state"][k], link.ref[k]) for k in g)
    for bad, why in [({"packed": torch.zeros(5)}, r"packed delta of shape \(5,\), expected \(1271,\)"),
                     ({"a.lora_A.weight": torch.zeros(4, 300)}, "packed delta holds tensors"),
                     ({"packed": torch.zeros(1271)}, None)]:
        forged = dataclasses.replace(first, state=bad)
        if why is None:  # the right count against another reference: the digest still decides
            assert receive_downlink(None, forged, g)[0].state is not None
            with pytest.raises(ValueError, match="digest differs"):
                receive_downlink(None, forged, {k: v + 1 for k, v in g.items()})
        else:
            with pytest.raises(ValueError, match=why):
                receive_downlink(None, forged, g)


def test_config_refuses_combinations_that_cannot_work_and_says_why() -> None:
    from fedtune.config import ConfigError, load_config

    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as exc:
            load_config(None, list(overrides))
        return str(exc.value)

    on = "client.pipeline=[compress]"
    import fakes  # noqa: F401 - registers the half_feedback transform

    assert "\"compress\" must come last" in problems("client.pipeline=[compress,half_feedback]")
    load_config(None, ["client.pipeline=[half_feedback,compress]"])
    msg = problems(on, "strategy.name=svd")
    assert "compress.error_feedback: strategy.name=svd re-bases or restarts the adapter factors" in msg
    load_config(None, [on, "strategy.name=svd", "compress.error_feedback=false"])  # without a residual it works
    assert "strategy.name=flora" in problems(on, "strategy.name=flora", "quant.mode=none")
    assert "heterogeneous ranks change a client's tensor shapes" in problems(
        on, "compress.error_feedback=false", "strategy.name=svd", "strategy.client_ranks=[2,4]")
    assert "randk cannot compress the downlink" in problems(on, "compress.method=randk", "compress.downlink=true")
    assert "compress.stochastic: only int8 / int4 round" in problems(on, "compress.method=sign",
                                                                    "compress.stochastic=true")
    assert "compress.scope: global applies to topk only" in problems(on, "compress.method=sign", "compress.scope=global")
    assert "compress.fraction: got 0.0" in problems(on, "compress.fraction=0")
    assert "compress.block: got 100, must be a power of two from 32 to 1024" in problems(on, "compress.method=sign",
                                                                                         "compress.block=100")
    assert "compress.block: only sign takes a block size" in problems(on, "compress.method=int8", "compress.block=64")
    assert "sim.backend: flower's records do not carry compressed deltas" in problems(on, "sim.backend=flower")
    cfg = load_config(None, [on, "compress.method=int4"])
    from fedtune.compression.config import uplink_encoding

    assert uplink_encoding(cfg) == "int4_pow2" and uplink_encoding(load_config(None, [])) == "dense"
    assert uplink_encoding(load_config(None, [on, "compress.method=sign", "compress.block=64"])) == "sign_b64"


def test_server_and_nodes_must_agree_on_compression() -> None:
    from fedtune.config import fingerprint, load_config

    plain = fingerprint(load_config(None, []))
    assert plain == fingerprint(load_config(None, ["compress.method=sign"]))  # unused: no need to agree
    sign = fingerprint(load_config(None, ["client.pipeline=[compress]", "compress.method=sign"]))
    assert sign != plain != fingerprint(load_config(None, ["compress.downlink=true"]))
    assert sign != fingerprint(load_config(None, ["client.pipeline=[compress]", "compress.method=int4"]))


@pytest.mark.parametrize("pack", [False, True])
def test_under_a_mask_the_downlink_sends_only_the_masks_entries(pack: bool) -> None:
    """A global pruning mask: the global changes only at its entries, so the downlink delta holds only them (in
    gather's order, packed or not); the client rebuilds the server's reference bit for bit, and every other
    entry keeps the value it had before the mask."""
    from fedtune.compression.link import Link, receive_downlink
    from fedtune.compression.mask import MASK_ROUND
    from fedtune.transport.loopback import send_instructions

    c = CompressConfig(method="sign", downlink=True, pack=pack)
    link, g = Link(c, uplink=False), _state(0, 1.0)
    mask = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(1)) < 0.25 for k, v in g.items()}
    held: dict[str, Any] = {"a": None, "b": None}
    sent: dict[int, int] = {}
    for rnd in (1, 2, 3, 4):  # round 1: the clients' own start; 2: a dense round; 3 and 4 under the mask
        step = {k: 0.01 * _state(10 + rnd, 1.0)[k] for k in g}
        if rnd == 2:
            g = {k: v + step[k] for k, v in g.items()}
        elif rnd > 2:  # only the mask's entries move
            g = {k: torch.where(mask[k], v + step[k], v) for k, v in g.items()}
        ins = _instructions(rnd, g, ["a", "b"])
        if rnd > 2:
            ins = {cid: dataclasses.replace(i, mask=dict(mask), extra={**i.extra, MASK_ROUND: 3}) for cid, i in ins.items()}
        wire = link.down(rnd, ins)
        for cid in ("a", "b"):
            got, _ = send_instructions(wire[cid], "dense")
            assert bool(got.extra.get("delta_masked")) == (rnd > 2)
            sent[rnd] = sum(v.numel() for v in got.state.values())
            back, held[cid] = receive_downlink(held[cid], got, _state(0, 1.0), mask if rnd > 2 else None)
            assert all(torch.equal(back.state[k], link.ref[k]) for k in g), (rnd, cid)
        list(link.up([ClientReply(cid, rnd, {}, 1) for cid in ("a", "b")], {}))
        if rnd == 2:
            before = {k: v.clone() for k, v in link.ref.items()}
    assert sent[2] == sum(v.numel() for v in g.values())  # values sent: every entry, then the mask's only
    assert sent[3] == sent[4] == sum(int(m.sum()) for m in mask.values())
    for k in g:  # outside the mask the reference is round 2's, bit for bit (its residual waits in G - R)
        assert torch.equal(link.ref[k][~mask[k]], before[k][~mask[k]])
        assert not mask[k].any() or not torch.equal(link.ref[k][mask[k]], before[k][mask[k]])
    # a client without the mask (or with another one) cannot rebuild the delta: a failed round, R in full next
    bad = dataclasses.replace(wire["a"], extra={**wire["a"].extra, "delta_from": 4})
    with pytest.raises(ValueError, match="a delta of its mask's entries, and this client holds no mask of round 3"):
        receive_downlink(held["a"], bad, None, None)
    other = {k: torch.ones_like(m) for k, m in mask.items()}
    with pytest.raises(ValueError, match="does not match the tensors|packed delta of shape"):
        receive_downlink(held["a"], bad, None, other)
