"""Configuration: frozen dataclasses per section, loaded from TOML or YAML plus dotted overrides.

Every problem is collected before anything heavy happens and raised as one ``ConfigError`` whose message
has one line per problem, each naming the key to change and the allowed values. Unknown keys are errors.
Every field carries its help text in ``metadata["help"]``; ``fedtune config --help``-style listings and the
README reference are generated from it (``describe()``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin

import tomli_w

from fedtune.client.pipeline import pipeline_problems
from fedtune.compression.config import CompressConfig, MaskConfig, compress_problems
from fedtune.gossip.config import GossipConfig, gossip_problems
from fedtune.privacy.config import PrivacyConfig, privacy_problems
from fedtune.sections import (
    ClientConfig,
    FederationConfig,
    ServerConfig,
    SimConfig,
)
from fedtune.strategies.config import StrategyConfig
from fedtune.strategies.specs import REGISTRY, StrategySpec

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by ``fedtune info --config-help`` and in the README)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


QuantMode = Literal["nf4", "fp4", "int8", "none"]
AdapterMethod = Literal["lora", "rslora", "dora", "vera", "lora_fa"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("smollm2-135m", "built-in name (smollm2-135m, tiny-llama, minilm-l6), a local HF folder, "
                    "a Hugging Face id, or a .gguf file")
    gguf_file: str | None = opt(None, "GGUF file name inside model.name when model.name is a folder of GGUF files")
    task: Literal["causal_lm", "seq_cls"] = opt("causal_lm", "causal_lm (instruction tuning) or seq_cls "
                                                 "(sequence classification, encoder models)")
    num_labels: int | None = opt(None, "number of classes for task=seq_cls (default: from the data)")
    device: str = opt("auto", "auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = opt(False, "allow model code from the model folder (Hugging Face trust_remote_code)")


@dataclass(frozen=True)
class QuantConfig:
    mode: QuantMode = opt("none", "weight quantization of the frozen base: nf4, fp4, int8 (bitsandbytes) or none")
    double_quant: bool = opt(False, "nested quantization of the 4-bit scales (nf4/fp4 only)")
    compute_dtype: Literal["bf16", "fp32", "fp16"] = opt("bf16", "dtype of matmuls and of non-quantized weights")


@dataclass(frozen=True)
class AdapterConfig:
    method: AdapterMethod = opt("lora", "lora, rslora (scale alpha/sqrt(r)), dora, vera, or lora_fa "
                                "(frozen A drawn from adapter.seed, only B trained: FFA-LoRA)")
    r: int = opt(8, "adapter rank (> 0)")
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) for rslora)")
    dropout: float = opt(0.0, "dropout on the adapter input, in [0, 1)")
    target_modules: list[str] = opt(["q_proj", "v_proj"], "module names to adapt, or [\"all-linear\"]")
    seed: int = opt(0, "seed of the adapter initialisation, shared by all sites so layouts and frozen parts agree")


@dataclass(frozen=True)
class DataConfig:
    path: str | None = opt(None, "JSONL file of training records; unset uses the built-in corpus data.builtin")
    builtin: Literal["chatterbot"] = opt("chatterbot", "built-in corpus used when data.path is unset")
    prompt_field: str = opt("prompt", "JSONL field holding the prompt (or question)")
    response_field: str = opt("response", "JSONL field holding the response (or answer)")
    messages_field: str = opt("messages", "JSONL field holding a chat message list (used when present)")
    category_field: str | None = opt("category", "field naming a record's category (non-IID splits, labels)")
    text_field: str = opt("text", "JSONL text field for task=seq_cls")
    label_field: str = opt("label", "JSONL label field for task=seq_cls")
    categories: list[str] = opt([], "keep only these categories (empty: all)")
    eval_fraction: float = opt(0.1, "fraction of records held out for evaluation, in [0, 1)")
    max_records: int | None = opt(None, "use at most this many records (after shuffling with seed)")
    packing: bool = opt(False, "pack several short examples into one sequence of train.seq_len")
    system_prompt: str | None = opt(None, "system message put before every conversation (chat models)")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = opt(20, "optimizer steps of local training (per client per round in a federation)")
    epochs: float | None = opt(None, "train this many epochs instead of max_steps (when set)")
    lr: float = opt(2e-4, "peak learning rate")
    batch_size: int = opt(4, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    seq_len: int = opt(128, "maximum tokens per example (longer ones are truncated)")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "sgd"] = opt(
        "adamw", "adamw (torch), adamw8bit / paged_adamw8bit (bitsandbytes), sgd")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    schedule: Literal["constant", "cosine", "linear"] = opt("constant", "learning-rate schedule after warm-up")
    warmup_steps: int = opt(0, "linear warm-up steps")
    max_grad_norm: float | None = opt(1.0, "clip the gradient norm to this (unset: no clipping)")
    prox_mu: float = opt(0.0, "FedProx proximal term mu/2 ||w - w_ref||^2 against the round's global adapter")
    bf16: bool = opt(True, "bf16 autocast for non-quantized models (quantized ones use quant.compute_dtype)")
    log_every: int = opt(1, "write a metrics.jsonl line every this many steps")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = opt(8, "examples per evaluation batch")
    max_batches: int | None = opt(None, "evaluate on at most this many batches of examples spread evenly over the held-out "
                                  "set (unset: the whole held-out set)")
    samples: int = opt(1, "number of held-out prompts to answer with generation, before and after training")
    max_new_tokens: int = opt(32, "tokens generated per sample answer")


@dataclass(frozen=True)
class Config:
    seed: int = opt(0, "seed of data splits, sampling, dropout and training order")
    out: str = opt("runs/latest", "output folder: config.toml, metrics.jsonl, adapter/")
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " (or unset)"
    if get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to ``tp`` (strings from the command line included) or record a problem."""
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        sub: list[str] = []
        for a in args:
            out = _coerce(value, a, key, sub)
            if len(sub) == 0:
                return out
            sub.clear()
        problems.append(f"{key}: got {value!r}, expected {_type_name(tp)}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            problems.append(f"{key}: got {value!r}, allowed values: {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        items = _coerce(value, types.GenericAlias(list, (get_args(tp)[0],)), key, problems)
        return tuple(items) if isinstance(items, list) else items
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
            value = [v.strip("'\"") for v in value]
        if not isinstance(value, list | tuple):
            problems.append(f"{key}: got {value!r}, expected {_type_name(tp)}")
            return []
        return [_coerce(v, item_tp, key, problems) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return _build(tp, value, key + ".", problems)
    problems.append(f"{key}: got {value!r}, expected {_type_name(tp)}")
    return None


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            problems.append(f"{prefix}{k}: unknown key; valid keys in this section: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            before = len(problems)
            value = _coerce(data[f.name], hints[f.name], prefix + f.name, problems)
            section = dataclasses.is_dataclass(hints[f.name]) and isinstance(value, hints[f.name])
            if len(problems) == before or section:  # a bad value keeps the default so later checks still run
                kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a None from a failed coercion is already reported
        if not problems:
            problems.append(f"{prefix.rstrip('.') or 'config'}: {exc}")
        return cls()


def _parse_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else the plain string."""
    if text.lstrip("+-").lower() in ("nan", "inf"):
        return text  # a word (sim.corrupt_kind=nan); float fields still convert it
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{dotted}: {p} is not a section"])
    node[parts[-1]] = value


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) config file into a plain dict.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML/YAML.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:
        raise ConfigError([f"{p}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'TOML'}: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a table of sections"])
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load defaults, then ``path`` (TOML/YAML, optional), then ``key=value`` overrides; validate everything.

    Raises:
        ConfigError: listing every problem at once (unknown keys, wrong types, bad values, missing files).
    """
    tree: dict[str, Any] = read_file(path) if path else {}
    problems: list[str] = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"{item!r}: overrides are key=value (for example train.lr=1e-4)")
            continue
        key, text = item.split("=", 1)
        _set_dotted(tree, key.strip(), _parse_value(text.strip()))
    cfg = _build(Config, tree, "", problems)
    cfg = _adapter_for_strategy(cfg, tree)
    problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _adapter_for_strategy(cfg: Config, tree: dict[str, Any]) -> Config:
    """The adapter method the strategy needs (ffa: lora_fa) when the config leaves ``adapter.method`` unset."""
    spec = REGISTRY.get(cfg.strategy.name)
    adapter = tree.get("adapter")
    chosen = isinstance(adapter, dict) and "method" in adapter
    if spec is None or spec.adapter_method is None or chosen or cfg.adapter.method == spec.adapter_method:
        return cfg
    log.warning("strategy.name=%s: adapter.method set to %s (it needs that method; adapter.method was left at its "
                "default %s)", cfg.strategy.name, spec.adapter_method, cfg.adapter.method)
    method = cast(AdapterMethod, spec.adapter_method)
    return dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, method=method))


def _strategy_problems(cfg: Config, spec: StrategySpec | None) -> list[str]:
    """What the chosen strategy's declarations rule out in the other sections."""
    if spec is None:
        return []  # cfg.strategy.validate names the unknown strategy
    p, name, method = [], cfg.strategy.name, cfg.adapter.method
    if spec.adapter_method is not None and method != spec.adapter_method:
        p.append(f"adapter.method: strategy.name={name} needs adapter.method={spec.adapter_method}, not {method!r}")
    if spec.lora_only and method not in ("lora", "rslora", "lora_fa"):
        p.append(f"adapter.method: strategy.name={name} works on LoRA factors (lora, rslora, lora_fa), not {method!r}")
    if not spec.quantized_base and cfg.quant.mode != "none":
        p.append(f"quant.mode: strategy.name={name} folds its updates into the base weights, which a "
                 f"{cfg.quant.mode} base cannot hold: set quant.mode = \"none\", or strategy.name = \"flora\" or \"svd\"")
    return p


def validate(cfg: Config) -> list[str]:
    """Cross-field and range checks; one message per problem, naming the key."""
    p: list[str] = []
    a, t, d, q = cfg.adapter, cfg.train, cfg.data, cfg.quant
    if a.r <= 0:
        p.append(f"adapter.r: got {a.r}, must be a positive integer")
    if a.alpha <= 0:
        p.append(f"adapter.alpha: got {a.alpha}, must be > 0")
    if not 0 <= a.dropout < 1:
        p.append(f"adapter.dropout: got {a.dropout}, must be in [0, 1)")
    if not a.target_modules:
        p.append("adapter.target_modules: empty; name modules (e.g. [\"q_proj\", \"v_proj\"]) or [\"all-linear\"]")
    if t.max_steps <= 0 and t.epochs is None:
        p.append(f"train.max_steps: got {t.max_steps}, must be > 0 (or set train.epochs)")
    if t.epochs is not None and t.epochs <= 0:
        p.append(f"train.epochs: got {t.epochs}, must be > 0")
    if t.lr <= 0:
        p.append(f"train.lr: got {t.lr}, must be > 0")
    for key in ("batch_size", "grad_accum", "seq_len", "log_every"):
        if getattr(t, key) <= 0:
            p.append(f"train.{key}: got {getattr(t, key)}, must be a positive integer")
    if t.seq_len < 8 and t.seq_len > 0:
        p.append(f"train.seq_len: got {t.seq_len}, must be at least 8")
    if t.prox_mu < 0:
        p.append(f"train.prox_mu: got {t.prox_mu}, must be >= 0")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps: got {t.warmup_steps}, must be >= 0")
    if d.path is not None and not Path(d.path).is_file():
        p.append(f"data.path: file {d.path!r} does not exist")
    if not 0 <= d.eval_fraction < 1:
        p.append(f"data.eval_fraction: got {d.eval_fraction}, must be in [0, 1)")
    if q.double_quant and q.mode not in ("nf4", "fp4"):
        p.append(f"quant.double_quant: only applies to quant.mode nf4 or fp4, not {q.mode!r}")
    if a.method == "vera" and a.target_modules == ["all-linear"]:
        p.append("adapter.target_modules: vera needs modules of one shape family; name them (e.g. [\"q_proj\", \"v_proj\"])")
    if cfg.eval.batch_size <= 0:
        p.append(f"eval.batch_size: got {cfg.eval.batch_size}, must be a positive integer")
    p.extend(_strategy_problems(cfg, REGISTRY.get(cfg.strategy.name)))
    p.extend(cfg.strategy.validate())
    p.extend(pipeline_problems(list(cfg.client.pipeline)))
    p.extend(compress_problems(cfg))
    p.extend(cfg.sim.validate())
    p.extend(cfg.federation.validate())
    p.extend(cfg.client.validate())
    p.extend(cfg.server.validate())
    p.extend(gossip_problems(cfg.sim.mode, cfg.gossip, nodes=cfg.sim.num_clients, seed=cfg.seed,
                             adapter_method=a.method, clients_per_round=cfg.sim.clients_per_round))
    p.extend(privacy_problems(cfg))
    return p


# The train.* keys a server sends every round as the local-training instructions; seq_len (how a site
# tokenizes its own data) and log_every (its own logging) stay each site's.
INSTRUCTED_TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("seq_len", "log_every"))


def train_instructions(t: TrainConfig) -> dict[str, Any]:
    """The local-training instructions of a ``[train]`` section, as JSON-ready data."""
    return {k: getattr(t, k) for k in INSTRUCTED_TRAIN_KEYS}


def instructed_train(t: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """``t`` with a server's training instructions applied, checked as the config file would be.

    Raises:
        ConfigError: an unknown or site-only key, a wrong type or a bad value, each named.
    """
    problems = [f"train.{k}: not a training instruction (instructed keys: {', '.join(INSTRUCTED_TRAIN_KEYS)})"
                for k in given if k not in INSTRUCTED_TRAIN_KEYS]
    merged = _build(TrainConfig, {**dataclasses.asdict(t), **given}, "train.", problems)
    problems.extend(x for x in validate(dataclasses.replace(Config(), train=merged)) if x.startswith("train."))
    if problems:
        raise ConfigError(problems)
    return merged


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data; ``None`` becomes the string ``"none"`` (TOML has no null), which
    loads back as ``None`` for every field that may be unset."""

    def clean(x: Any) -> Any:
        if x is None:
            return "none"
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    return clean(dataclasses.asdict(cfg))  # tuples become lists, which load back as tuples


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as TOML (the ``config.toml`` of a run folder)."""
    Path(path).write_text(tomli_w.dumps(to_dict(cfg)))


def fingerprint(cfg: Config) -> str:
    """What must agree between a server and its clients (model, quantization, adapter, and how updates are
    transformed and encoded: ``client.pipeline``, ``client.encoding``, ``compress.*`` when used), as canonical
    JSON."""
    agreed: dict[str, Any] = {"model": cfg.model.name, "quant": to_dict(cfg.quant), "adapter": to_dict(cfg.adapter),
                              "client": {"pipeline": list(cfg.client.pipeline), "encoding": cfg.client.encoding},
                              "compress": to_dict(cfg.compress)
                              if {"compress", "rank_prune"} & set(cfg.client.pipeline) or cfg.compress.downlink
                              else None}
    node_side = {"dp": cfg.privacy.dp, "clip_norm": cfg.privacy.clip_norm, "secagg": cfg.privacy.secagg}
    if cfg.privacy.dp != "off" or cfg.privacy.secagg:  # what every node must do alike (dp_clip's bound)
        agreed["privacy"] = node_side
    return json.dumps(agreed, sort_keys=True)


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string right after ``name: type = default``), as litgpt's configs use."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, nxt in itertools.pairwise(body):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field: the config reference."""
    rows = []
    docs = _attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        factory = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory() if callable(factory) else None
        rows.append((prefix + f.name, _type_name(tp), repr(default), f.metadata.get("help", docs.get(f.name, ""))))
    return rows
