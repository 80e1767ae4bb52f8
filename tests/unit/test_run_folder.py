"""Run folders are never overwritten silently, and an interrupted run keeps its last completed adapter
(issue 17, item 5)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from fedtune.cli import main

ROOT = Path(__file__).parents[2]
TINY = str(ROOT / "simulations" / "tiny.toml")
SIM = ["sim.num_clients=2", "sim.rounds=2", "sim.partitioner=iid", "eval.samples=0", "data.max_records=40"]


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_train_refuses_a_folder_holding_a_run_unless_overwrite(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *tiny_overrides, "eval.samples=0", f"out={out}"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", *tiny_overrides, "eval.samples=0", "train.lr=0.1", f"out={out}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"out={out} already holds a run (config.toml, metrics.jsonl, adapter)" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    assert main(["train", "--overwrite", *tiny_overrides, "eval.samples=0", "train.lr=0.1", f"out={out}"]) == 0
    assert "lr = 0.1" in (out / "config.toml").read_text()


def test_simulate_refuses_a_folder_holding_a_run_and_points_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"round": 0}\n')
    (out / "notes.txt").write_text("mine")
    assert main(["simulate", TINY, *SIM, f"out={out}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already holds a run (metrics.jsonl, adapter)" in err
    assert f"fedtune simulate --resume {out}" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_interrupted_train_keeps_the_adapter_of_the_last_completed_step(tiny_overrides, tmp_path, monkeypatch):
    from fedtune import local

    real = local.train_local

    def interrupted_after_step_2(*args, progress, **kw):
        def step_done(step: int, total: int, loss: float) -> None:
            progress(step, total, loss)
            if step == 2:
                raise KeyboardInterrupt
        return real(*args, progress=step_done, **kw)

    monkeypatch.setattr(local, "train_local", interrupted_after_step_2)
    cut = tmp_path / "cut"
    # a constant learning rate: the first 2 of 4 steps are the steps of a 2-step run
    assert main(["train", *tiny_overrides, "eval.samples=0", "train.max_steps=4", "train.schedule=constant",
                 f"out={cut}"]) == 130
    monkeypatch.setattr(local, "train_local", real)
    ref = tmp_path / "ref"
    assert main(["train", *tiny_overrides, "eval.samples=0", "train.max_steps=2", "train.schedule=constant",
                 f"out={ref}"]) == 0
    got, want = adapter(cut), adapter(ref)
    assert got.keys() == want.keys()
    assert all((got[k] == want[k]).all() for k in got)


def test_interrupted_simulation_keeps_the_adapter_of_the_last_completed_round(tmp_path, monkeypatch):
    from fedtune import rounds

    real = rounds._play

    def interrupted_in_round_2(rnd, *args, **kw):
        if rnd == 2:
            raise KeyboardInterrupt
        return real(rnd, *args, **kw)

    monkeypatch.setattr(rounds, "_play", interrupted_in_round_2)
    cut = tmp_path / "cut"
    assert main(["simulate", TINY, *SIM, f"out={cut}"]) == 130
    monkeypatch.setattr(rounds, "_play", real)
    one = tmp_path / "one"
    assert main(["simulate", TINY, *SIM, "sim.rounds=1", f"out={one}"]) == 0
    got, want = adapter(cut), adapter(one)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
