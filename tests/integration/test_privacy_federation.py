"""Privacy in a real federation (tiny Llama): secure aggregation with distributed DP and adaptive clipping over
gRPC with a node killed after it shared its keys, and DP-FedAvg's epsilon in a simulated run's records and run
folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_seams import adapter, federate, rounds, simulate

import fedtune.privacy.client as sa_client
from fedtune.client import phases

pytestmark = pytest.mark.integration
NAMES = tuple(f"client-{i}" for i in range(5))


class Killed(BaseException):
    """Ends a node's thread mid-round: its connection closes, it never answers again."""


def test_secagg_with_distributed_dp_over_grpc_survives_a_node_killed_after_sharing_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = phases.PHASES["secagg_upload"]

    def dies_in_upload(ctx, ins):  # type: ignore[no-untyped-def]
        if ins.client_id == "client-4":
            raise Killed
        return upload(ctx, ins)

    monkeypatch.setitem(phases.PHASES, "secagg_upload", dies_in_upload)
    # every client adds its share of discrete Gaussian noise; the bound adapts from the count in the masked sum
    result = federate(tmp_path, "privacy.secagg=true", "privacy.dp=distributed", "privacy.clip=adaptive",
                      "privacy.clip_count_noise=2", "privacy.noise_multiplier=0.5", "privacy.sample_rate=1",
                      "privacy.accountant=rdp", "client.pipeline=[dp_clip]", "federation.clients_per_round=0",
                      "sim.clients_per_round=0",
                      "privacy.clip_norm=10", "sim.partitioner=iid", "sim.num_clients=5", "federation.rounds=1",
                      "federation.silence_s=15", "federation.heartbeat_s=1", names=NAMES, may_die=Killed)
    (row,) = rounds(result)
    assert row["applied"] and row["clients_ok"] == 4, (row["failures"], row["clients_ok"])
    assert set(row["failures"]) == {"client-4"} and row["agg_error"] is None
    assert row["eval_loss"] != result.rounds[0]["eval_loss"]  # the survivors' sum moved the model
    # client-4 was told to add noise and took its share with it: the round is charged at z sqrt(4/5)
    assert row["dp_noise_multiplier"] == pytest.approx(0.5 * (4 / 5) ** 0.5, rel=1e-3) and row["epsilon"] > 0
    # all 4 unclipped, 5 expected: (4 * 1/2 + N(0, 2^2)) / 5 + 1/2, within 5 sd of 0.9
    assert row["dp_clip_norm"] == 10 and abs(row["dp_unclipped_fraction"] - 0.9) < 2.0
    assert sa_client.PHASES[-1] == "secagg_unmask"


def test_dp_in_a_simulated_run_reports_epsilon_every_round(tmp_path: Path) -> None:
    result = simulate(tmp_path / "dp", "privacy.dp=central", "client.pipeline=[dp_clip]", "privacy.sample_rate=0.5",
                      "privacy.accountant=rdp", "privacy.noise_multiplier=1.0", "sim.num_clients=6", "sim.rounds=2")
    rows = rounds(result)
    assert len(rows) == 2 and 0 < rows[0]["epsilon"] < rows[1]["epsilon"]
    assert json.loads((result.run_dir / "privacy.json").read_text())["epsilon"] == rows[1]["epsilon"]


def test_secagg_over_grpc_computes_what_the_simulator_computes(tmp_path: Path) -> None:
    opts = ("privacy.secagg=true", "privacy.clip_norm=10", "sim.partitioner=iid", "sim.rounds=1",
            "federation.rounds=1")
    sim = simulate(tmp_path / "sim", *opts)
    grpc = federate(tmp_path, *opts)
    for s, g in zip(rounds(sim), rounds(grpc), strict=True):
        assert (g["clients_ok"], g["failures"]) == (3, {}) == (s["clients_ok"], s["failures"])
        assert g["eval_loss"] == pytest.approx(s["eval_loss"], abs=1e-5)
    a, b = adapter(sim.run_dir), adapter(grpc.run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
