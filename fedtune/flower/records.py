"""fedtune messages as Flower records: adapter tensors in an ArrayRecord, the rest in a ConfigRecord.

The config travels as dotted ``key=value`` overrides (JSON values), so an actor on any Ray node rebuilds the
exact ``Config`` with ``load_config`` (``None`` values included, which TOML cannot hold).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.config import Config, load_config
from fedtune.types import ClientReply, Instructions, State


def config_overrides(cfg: Config) -> list[str]:
    """``cfg`` as ``key=value`` overrides that ``load_config(None, overrides)`` turns back into ``cfg``."""
    import dataclasses

    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif value is None:
                out.append(f"{prefix}{f.name}=none")
            else:
                value = list(value) if isinstance(value, tuple) else value
                out.append(f"{prefix}{f.name}={json.dumps(value)}")

    walk(cfg, "")
    return out


def config_from_overrides(items: list[str]) -> Config:
    return load_config(None, items)


def state_to_record(state: State) -> tuple[ArrayRecord, list[str]]:
    """An ArrayRecord of ``state`` (numpy has no bfloat16: such tensors travel as fp32, their dtype noted)."""
    dtypes = [str(v.dtype).removeprefix("torch.") for v in state.values()]
    plain = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in state.items()}
    return ArrayRecord.from_torch_state_dict(plain), dtypes


def record_to_state(record: ArrayRecord, dtypes: list[str]) -> State:
    out = record.to_torch_state_dict()
    return {k: v.to(getattr(torch, dt)) if str(v.dtype) != f"torch.{dt}" else v.clone()
            for (k, v), dt in zip(out.items(), dtypes, strict=True)}


def instructions_to_content(ins: Instructions, index: int, cfg_items: list[str], threads: int) -> RecordDict:
    """What the ClientApp needs to run ``fit`` for virtual client ``index`` (whose data it rebuilds)."""
    arrays, dtypes = state_to_record(ins.state)
    meta = ConfigRecord({
        "round": ins.round, "client_id": ins.client_id, "index": index, "rank": -1 if ins.rank is None else ins.rank,
        "train": json.dumps(ins.train or {}), "phase": ins.phase, "dtypes": dtypes, "config": cfg_items,
        "threads": threads,
    })
    return RecordDict({"state": arrays, "meta": meta})


def content_to_instructions(content: RecordDict) -> tuple[Instructions, int, list[str], int]:
    meta: dict[str, Any] = dict(content.config_records["meta"])
    rank = int(meta["rank"])
    ins = Instructions(round=int(meta["round"]), client_id=str(meta["client_id"]),
                       state=record_to_state(content.array_records["state"], list(meta["dtypes"])),
                       train=json.loads(str(meta["train"])), rank=None if rank < 0 else rank, phase=str(meta["phase"]))
    return ins, int(meta["index"]), list(meta["config"]), int(meta["threads"])


def reply_to_content(reply: ClientReply) -> RecordDict:
    meta: dict[str, Any] = {"client_id": reply.client_id, "round": reply.round, "num_examples": reply.num_examples,
                            "rank": -1 if reply.rank is None else reply.rank, "error": reply.error or ""}
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in reply.metrics.items()})})
    if reply.state is not None:
        arrays, dtypes = state_to_record(reply.state)
        content["state"] = arrays
        meta["dtypes"] = dtypes
    content["meta"] = ConfigRecord(meta)
    return content


def content_to_reply(content: RecordDict) -> ClientReply:
    meta: dict[str, Any] = dict(content.config_records["meta"])
    state = None
    if "state" in content.array_records:
        state = record_to_state(content.array_records["state"], list(meta["dtypes"]))
    rank = int(meta["rank"])
    return ClientReply(client_id=str(meta["client_id"]), round=int(meta["round"]), state=state,
                       num_examples=int(meta["num_examples"]), metrics={k: float(v) for k, v in content.metric_records["metrics"].items()},  # type: ignore[arg-type]
                       error=str(meta["error"]) or None, rank=None if rank < 0 else rank)
