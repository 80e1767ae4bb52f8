"""Config loading: files, overrides, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import ConfigError, describe, load_config, save_config


def test_defaults_load_without_a_file() -> None:
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.adapter.r > 0


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=1e-4", "adapter.r=8", "adapter.target_modules=[q_proj,k_proj]",
                             "model.gradient_checkpointing=true", f"out={tmp_path}"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.r == 8 and isinstance(cfg.adapter.r, int)
    assert cfg.adapter.target_modules == ["q_proj", "k_proj"]
    assert cfg.model.gradient_checkpointing is True


def test_toml_and_yaml_files_agree(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('seed = 3\n[train]\nlr = 0.001\nmax_steps = 7\n[adapter]\nr = 2\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("seed: 3\ntrain:\n  lr: 0.001\n  max_steps: 7\nadapter:\n  r: 2\n")
    a, b = load_config(toml), load_config(yaml)
    assert a == b
    assert a.train.max_steps == 7 and a.seed == 3
    # an override beats the file
    assert load_config(toml, ["train.max_steps=9"]).train.max_steps == 9


def test_every_problem_reported_together(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlr = "fast"\nmax_stepz = 3\n[adapter]\nr = 0\n[data]\npath = "/no/such.jsonl"\n')
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["quant.mode=nf5"])
    text = str(err.value)
    problems = err.value.problems
    assert len(problems) == 5, problems
    assert "train.lr" in text and "expected a number" in text
    assert "train.max_stepz: unknown key" in text
    assert "adapter.r: got 0" in text
    assert "data.path" in text and "does not exist" in text
    assert "quant.mode" in text and "nf4, fp4, int8, none" in text


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=3e-4", "strategy.name=svd", "sim.num_clients=5", "train.max_grad_norm=none"])
    assert cfg.train.max_grad_norm is None
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


def test_reference_lists_every_key_with_help() -> None:
    rows = {key: help_text for key, _, _, help_text in describe()}
    for key in ("strategy.name", "sim.num_clients", "model.name", "quant.mode", "adapter.method", "adapter.r", "adapter.alpha", "data.path",
                "data.prompt_field", "data.response_field", "data.category_field", "train.max_steps", "train.lr",
                "train.batch_size", "train.seq_len", "seed", "out"):
        assert rows.get(key), key


def test_ffa_selects_lora_fa_when_the_adapter_method_is_left_at_its_default(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["strategy.name=ffa"])
    assert cfg.adapter.method == "lora_fa"
    assert "strategy.name=ffa: adapter.method set to lora_fa" in caplog.text
    with pytest.raises(ConfigError, match="adapter.method: strategy.name=ffa needs adapter.method=lora_fa, not 'dora'"):
        load_config(None, ["strategy.name=ffa", "adapter.method=dora"])  # chosen on purpose: refused, not changed


def test_update_pipeline_and_wire_encoding_keys_are_checked_and_fingerprinted() -> None:
    from fedtune.config import fingerprint
    from fedtune.server.coordinator import fingerprint_diff

    with pytest.raises(ConfigError) as err:
        load_config(None, ["client.pipeline=[nosuch]", "client.encoding=zip"])
    assert any(p.startswith("client.pipeline: unknown transform 'nosuch'") for p in err.value.problems)
    assert any(p.startswith("client.encoding: got 'zip', allowed values: dense, fp32") for p in err.value.problems)
    server, node = load_config(None, ["client.encoding=int8"]), load_config(None, [])
    assert fingerprint_diff(fingerprint(server), fingerprint(node)) == ["client.encoding: server has 'int8', node has 'dense'"]
