"""Compressed federations on the tiny Llama: residuals that survive a resume, bytes that are the encoded sizes
(with their ratio to dense fp32), and the same bytes and result over gRPC as in the simulator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_seams import adapter, federate, rounds, simulate

from fedtune.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration
SIGN = ("client.pipeline=[compress]", "compress.method=sign", "train.lr=5e-2")


def test_residuals_are_checkpointed_and_a_resumed_run_is_exact(tmp_path: Path) -> None:
    opts = ("client.pipeline=[compress]", "compress.method=topk", "compress.fraction=0.05", "train.lr=5e-2")
    simulate(tmp_path / "straight", *opts, "sim.rounds=3")
    simulate(tmp_path / "resumed", *opts, "sim.rounds=2")
    simulate(tmp_path / "resumed", *opts, "sim.rounds=3", resume=True)
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = load_checkpoint(tmp_path / "straight").clients
    residual = kept["client-0"]["pipeline"]["compress"]
    assert residual and all(v.dtype == torch.float64 and float(v.abs().max()) > 0 for v in residual.values())
    # 95% of each update stays behind: the residual is most of what the client trained
    off = adapter(simulate(tmp_path / "off", *opts, "sim.rounds=3", "compress.error_feedback=false").run_dir)
    assert any(not torch.equal(a[k], off[k]) for k in a), "error feedback must change the result"


def test_bytes_are_the_encoded_sizes_and_the_ratio_is_against_dense_fp32(tmp_path: Path) -> None:
    big = ("sim.rounds=2", "adapter.r=32", "adapter.alpha=64", "train.lr=5e-2")  # 2048-value tensors
    dense = rounds(simulate(tmp_path / "dense", *big))
    sign = rounds(simulate(tmp_path / "sign", *big, *SIGN))
    down = rounds(simulate(tmp_path / "down", *big, *SIGN, "compress.downlink=true"))
    numels = [v.numel() for v in adapter(tmp_path / "dense").values()]
    # per client: 4 bytes a value dense, 1 bit a value and a 4-byte scale per 256 as sign (headers differ by a
    # few bytes a tensor: the encoding's name, the block size, the downlink's extra JSON)
    saved = 3 * sum(4 * n - math.ceil(n / 8) - 4 * math.ceil(n / 256) for n in numels)
    slack = 3 * (8 * len(numels) + 120)
    for d, s, w in zip(dense, sign, down, strict=True):
        assert d["clients_ok"] == s["clients_ok"] == w["clients_ok"] == 3
        assert abs((d["bytes_up"] - s["bytes_up"]) - saved) <= slack, (d["bytes_up"] - s["bytes_up"], saved)
        assert s["bytes_down"] == d["bytes_down"]  # without compress.downlink the global goes down in full
        assert abs((d["bytes_down"] - w["bytes_down"]) - saved) <= slack  # with it, deltas from round 1 on
        # the reference is the same exchange in fp32 (its metadata names "fp32" where the dense run says "dense")
        assert s["dense_fp32_bytes"] == d["dense_fp32_bytes"] == w["dense_fp32_bytes"]
        assert d["dense_fp32_bytes"] - (d["bytes_up"] + d["bytes_down"]) == -2 * 3 * len(numels)
        assert s["compression_ratio"] == pytest.approx(s["dense_fp32_bytes"] / (s["bytes_up"] + s["bytes_down"]))
        assert d["compression_ratio"] == pytest.approx(1.0, abs=1e-3) and w["bytes_up"] == s["bytes_up"]
        assert w["compression_ratio"] > 15


def test_compressed_runs_over_grpc_match_the_simulator(tmp_path: Path) -> None:
    opts = (*SIGN, "compress.downlink=true", "sim.partitioner=iid", "sim.rounds=2", "federation.rounds=2")
    sim = simulate(tmp_path / "sim", *opts)
    grpc = federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["clients_ok"], g["failures"]) == (3, {})
        assert (g["bytes_up"], g["bytes_down"], g["dense_fp32_bytes"]) == (
            s["bytes_up"], s["bytes_down"], s["dense_fp32_bytes"])
        assert g["eval_loss"] == pytest.approx(s["eval_loss"], abs=1e-5)
    for name in ("client-0", "client-1", "client-2"):  # each node kept its residual and its downlink reference
        node = torch.load(tmp_path / name / "client_state.pt", weights_only=True)
        assert int(node["downlink"]["round"]) == 2 and node["pipeline"]["compress"]


@pytest.mark.slow
def test_a_masked_run_over_grpc_matches_the_simulator(tmp_path: Path) -> None:
    opts = ("mask.density=0.25", "mask.explore_steps=1", "mask.refresh_every=2", "client.pipeline=[compress]",
            "compress.method=int4", "train.lr=5e-2", "sim.partitioner=iid", "sim.rounds=3", "federation.rounds=3")
    sim = simulate(tmp_path / "sim", *opts)
    grpc = federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["clients_ok"], g["failures"]) == (3, {})
        assert (g["bytes_up"], g["bytes_down"], g["dense_fp32_bytes"]) == (
            s["bytes_up"], s["bytes_down"], s["dense_fp32_bytes"])
        assert g["mask_round"] == s["mask_round"] and g["mask_density"] == 0.25
    assert [r["mask_round"] for r in rounds(sim)] == [1, 1, 3]
    assert rounds(sim)[1]["bytes_down"] < rounds(sim)[0]["bytes_down"]  # no exploration, no mask in round 2
    a, b = adapter(sim.run_dir), adapter(tmp_path / "server")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("client-0", "client-1", "client-2"):  # each node kept the mask of round 3
        node = torch.load(tmp_path / name / "client_state.pt", weights_only=True)
        assert int(node["mask"]["round"]) == 3


@pytest.mark.slow
def test_rank_pruned_runs_over_grpc_match_the_simulator(tmp_path: Path) -> None:
    opts = ("strategy.name=svd", "client.pipeline=[rank_prune]", "compress.energy=0.6", "strategy.svd_energy=0.8",
            "train.lr=5e-2", "sim.partitioner=iid", "sim.rounds=2", "federation.rounds=2")
    sim = simulate(tmp_path / "sim", *opts)
    grpc = federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["clients_ok"], g["failures"]) == (3, {})
        assert (g["bytes_up"], g["bytes_down"], g["dense_fp32_bytes"]) == (
            s["bytes_up"], s["bytes_down"], s["dense_fp32_bytes"])
        # dense_fp32_bytes counts the same exchange at the full rank: the pruned ranks are what travels
        assert s["compression_ratio"] > 1.1
    first, second = rounds(sim)
    assert second["bytes_down"] < first["bytes_down"]  # round 2's global adapter goes down trimmed
    a, b = adapter(sim.run_dir), adapter(tmp_path / "server")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_grad_weight_scores_fix_another_mask_than_update_scores(tmp_path: Path) -> None:
    opts = ("mask.density=0.25", "mask.explore_steps=1", "train.lr=5e-2", "sim.rounds=1")
    runs = {s: simulate(tmp_path / s, *opts, f"mask.score={s}") for s in ("update", "grad_weight")}
    masks = {}
    for s, r in runs.items():
        (row,) = rounds(r)
        assert (row["clients_ok"], row["failures"], row["mask_density"]) == (3, {}, 0.25)
        masks[s] = load_checkpoint(r.run_dir).strategy["mask"]
    assert masks["update"].keys() == masks["grad_weight"].keys()
    assert any(not torch.equal(masks["update"][k], masks["grad_weight"][k]) for k in masks["update"])


@pytest.mark.slow
def test_a_shared_mask_under_secure_aggregation_over_grpc_matches_the_simulator(tmp_path: Path) -> None:
    opts = ("privacy.secagg=true", "privacy.clip_norm=10", "mask.density=0.25", "mask.score=global",
            "train.lr=5e-2", "sim.partitioner=iid", "sim.rounds=2", "federation.rounds=2")
    sim, grpc = simulate(tmp_path / "sim", *opts), federate(tmp_path, *opts)
    pairs = list(zip(rounds(sim), rounds(grpc), strict=True))
    assert all((g["clients_ok"], g["failures"]) == (3, {}) == (s["clients_ok"], s["failures"]) for s, g in pairs)
    # the key-exchange messages hold fresh random numbers as JSON (a share's digits vary): a few bytes differ
    assert all(abs(g[k] - s[k]) <= 64 for s, g in pairs for k in ("bytes_up", "bytes_down", "dense_fp32_bytes"))
    assert all(g["eval_loss"] == pytest.approx(s["eval_loss"], abs=1e-5) for s, g in pairs)
    first, second = rounds(grpc)
    # round 1 trains dense and fixes the mask; round 2's masked vectors hold a quarter of the words
    assert second["mask_density"] == 0.25 and second["mask_round"] == 1
    assert second["bytes_up"] < 0.5 * first["bytes_up"]
    assert second["compression_ratio"] > first["compression_ratio"]  # the global adapter still goes down dense
    a, b = adapter(sim.run_dir), adapter(tmp_path / "server")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    for name in ("client-0", "client-1", "client-2"):  # each node holds the mask, and no round secrets
        node = torch.load(tmp_path / name / "client_state.pt", weights_only=True)
        assert int(node["mask"]["round"]) == 1 and "secagg" not in node


@pytest.mark.slow
def test_packed_deltas_with_a_global_mask_over_grpc_match_the_simulator(tmp_path: Path) -> None:
    """compress.pack: each message one packed sign vector (up: of the mask's entries; down: of every tensor),
    the same bytes and adapter over gRPC as in the simulator, and fewer bytes than one wire tensor each."""
    opts = (*SIGN, "compress.downlink=true", "compress.pack=true", "mask.density=0.25", "mask.score=global",
            "sim.partitioner=iid", "sim.rounds=2", "federation.rounds=2")
    sim, grpc = simulate(tmp_path / "sim", *opts), federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["clients_ok"], g["failures"]) == (3, {}) == (s["clients_ok"], s["failures"])
        assert (g["bytes_up"], g["bytes_down"], g["dense_fp32_bytes"]) == (
            s["bytes_up"], s["bytes_down"], s["dense_fp32_bytes"])
        assert g["eval_loss"] == pytest.approx(s["eval_loss"], abs=1e-5)
    a, b = adapter(sim.run_dir), adapter(tmp_path / "server")
    assert all(torch.equal(a[k], b[k]) for k in a)
    unpacked = rounds(simulate(tmp_path / "unpacked", *[o for o in opts if o != "compress.pack=true"]))
    assert [r["mask_round"] for r in unpacked] == [r["mask_round"] for r in rounds(sim)] == [1, 1]
    for p, u in zip(rounds(sim), unpacked, strict=True):
        assert p["bytes_up"] < u["bytes_up"] and p["bytes_down"] < u["bytes_down"]
