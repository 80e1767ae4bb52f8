"""fedtune messages as Flower records: tensors in ArrayRecords, the rest in a ConfigRecord.

A task carries the instructions (any phase), the base-weight updates the actor may lack (``flora``, ``fedex``)
and the client's state: its optimizer state and the rest of its per-client state (update pipeline, phase
data), each as ``torch.save`` bytes loaded with ``weights_only=True``; a reply carries the reply and the
client's new state.

The config travels as dotted ``key=value`` overrides (JSON values), so an actor on any Ray node rebuilds the
exact ``Config`` with ``load_config`` (``None`` values included, which TOML cannot hold).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune.config import Config, load_config
from fedtune.types import ClientReply, Instructions, LowRankUpdate, State


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


@dataclass
class Task:
    """One virtual client's work as a message carries it: ``fit``'s inputs plus what the actor must sync.

    ``base_updates`` are the run's base-weight updates ``base_from``, ``base_from + 1``, ... (``flora``,
    ``fedex``); ``run`` names the federation they belong to (see ``fedtune.flower.client_app.sync_base``).
    ``optimizer_state`` is the client's own state from the last round it trained (``sim.keep_optimizer_state``);
    ``client_state`` the rest of its per-client state (``fedtune.client.phases.ClientContext.state``).
    """

    ins: Instructions
    index: int
    cfg_items: list[str]
    threads: int
    run: str = ""
    base_from: int = 0
    base_updates: list[dict[str, LowRankUpdate]] = field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None
    client_state: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """The client's whole state as its phase handlers see it."""
        out = dict(self.client_state or {})
        if self.optimizer_state is not None:
            out["optimizer"] = self.optimizer_state
        return out


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """A client's state as (optimizer state, the rest), the two parts tasks and replies carry."""
    rest = {k: v for k, v in state.items() if k != "optimizer"}
    return state.get("optimizer"), rest or None


def task_to_content(task: Task) -> RecordDict:
    """What the ClientApp needs to run ``fit`` for virtual client ``task.index`` (whose data it rebuilds).

    ``Instructions.base_update`` does not travel: the actor syncs its model from ``task.base_updates``.
    """
    ins = task.ins
    arrays, dtypes = state_to_record(ins.state)
    base = {f"{i}/{prefix}/{part}": getattr(upd, part) for i, updates in enumerate(task.base_updates)
            for prefix, upd in updates.items() for part in ("B", "A")}
    base_arrays, base_dtypes = state_to_record(base)
    meta = ConfigRecord({
        "round": ins.round, "client_id": ins.client_id, "index": task.index, "rank": -1 if ins.rank is None else ins.rank,
        "train": json.dumps(ins.train or {}), "extra": json.dumps(ins.extra), "phase": ins.phase, "dtypes": dtypes,
        "config": task.cfg_items,
        "threads": task.threads, "run": task.run, "base_from": task.base_from, "base_count": len(task.base_updates),
        "base_dtypes": base_dtypes, "optimizer_state": optimizer_state_to_bytes(task.optimizer_state),
        "client_state": optimizer_state_to_bytes(task.client_state),
    })
    return RecordDict({"state": arrays, "base": base_arrays, "meta": meta})


def content_to_task(content: RecordDict) -> Task:
    meta: dict[str, Any] = dict(content.config_records["meta"])
    rank = int(meta["rank"])
    ins = Instructions(round=int(meta["round"]), client_id=str(meta["client_id"]),
                       state=record_to_state(content.array_records["state"], list(meta["dtypes"])),
                       train=json.loads(str(meta["train"])), rank=None if rank < 0 else rank, phase=str(meta["phase"]),
                       extra=json.loads(str(meta["extra"])))
    base_updates: list[dict[str, LowRankUpdate]] = [{} for _ in range(int(meta["base_count"]))]
    base = record_to_state(content.array_records["base"], list(meta["base_dtypes"]))
    for key in base:
        i, rest = key.split("/", 1)
        prefix, part = rest.rsplit("/", 1)
        if part == "B":
            base_updates[int(i)][prefix] = LowRankUpdate(B=base[key], A=base[f"{i}/{prefix}/A"])
    return Task(ins, int(meta["index"]), list(meta["config"]), int(meta["threads"]), run=str(meta["run"]),
                base_from=int(meta["base_from"]), base_updates=base_updates,
                optimizer_state=bytes_to_optimizer_state(meta["optimizer_state"]),
                client_state=bytes_to_optimizer_state(meta["client_state"]))


def optimizer_state_to_bytes(state: dict[str, Any] | None) -> bytes:
    """``torch.save`` of an optimizer ``state_dict`` or other plain state (empty bytes for none)."""
    if state is None:
        return b""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def bytes_to_optimizer_state(data: Any) -> dict[str, Any] | None:
    """The inverse of ``optimizer_state_to_bytes``; ``weights_only``: tensors and plain values, no pickled code."""
    if not data:
        return None
    return torch.load(io.BytesIO(bytes(data)), weights_only=True)  # type: ignore[no-any-return]


def reply_to_content(reply: ClientReply, optimizer_state: dict[str, Any] | None = None,
                     lacks_base: bool = False, client_state: dict[str, Any] | None = None) -> RecordDict:
    """``reply`` (and the client's new optimizer state and other state) as a message; ``lacks_base``: the
    actor's model misses base updates older than the message carried, so the relay should resend the task
    with the whole log."""
    meta: dict[str, Any] = {"client_id": reply.client_id, "round": reply.round, "num_examples": reply.num_examples,
                            "rank": -1 if reply.rank is None else reply.rank, "error": reply.error or "",
                            "optimizer_state": optimizer_state_to_bytes(optimizer_state), "lacks_base": lacks_base,
                            "client_state": optimizer_state_to_bytes(client_state)}
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


def reply_optimizer_state(content: RecordDict) -> dict[str, Any] | None:
    """The client's optimizer state after training, when it keeps one (``sim.keep_optimizer_state``)."""
    return bytes_to_optimizer_state(content.config_records["meta"]["optimizer_state"])


def reply_client_state(content: RecordDict) -> dict[str, Any]:
    """The client's whole state after the phase (optimizer state included), as its handlers left it."""
    meta = content.config_records["meta"]
    state = dict(bytes_to_optimizer_state(meta["client_state"]) or {})
    optimizer = bytes_to_optimizer_state(meta["optimizer_state"])
    if optimizer is not None:
        state["optimizer"] = optimizer
    return state


def reply_lacks_base(content: RecordDict) -> bool:
    """The actor could not train: its model lacks base updates older than the message's ``base_from``."""
    return bool(content.config_records["meta"]["lacks_base"])
