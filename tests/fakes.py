"""Stand-ins for the round driver's seams, shared by the tests: a two-phase strategy and its client phase, a
stateful update transform, and a plain-tensor model and dispatcher for driving rounds without a network.

Importing this module registers ``survey_then_train`` (a strategy), the client phase ``survey`` and the
update transform ``half_feedback``, as a later issue's module would register its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from fedtune.client.phases import ClientContext, register_phase
from fedtune.client.pipeline import register_transform
from fedtune.runs import RunDir
from fedtune.strategies.base import (
    PhaseResult,
    Rng,
    RoundResult,
    make_instructions,
    not_applied,
    select_clients,
)
from fedtune.strategies.fedavg import FedAvg
from fedtune.strategies.specs import REGISTRY, StrategySpec
from fedtune.types import ClientReply, Instructions, State, failed_reply


class SurveyThenTrain(FedAvg):
    """Two phases a round. ``survey``: every sampled client says how many examples it holds; ``train``: fedavg
    among the clients that answered the survey, each told the survey's total (``extra["survey_total"]``)."""

    default_phases = ("survey", "train")

    def configure(self, round: int, client_ids: list[str], global_state: State, rng: Rng, *, phase: str = "train",
                  previous: PhaseResult | None = None) -> dict[str, Instructions]:
        if phase == "survey":
            chosen = select_clients(client_ids, self.cfg, rng)
            return {c: Instructions(round=round, client_id=c, state={}, phase="survey") for c in chosen}
        assert previous is not None and previous.phase == "survey", previous
        state = {k: global_state[k] for k in self.sent_keys(global_state)}
        ins = make_instructions(round, previous.clients_ok, {c: state for c in previous.clients_ok}, self.cfg)
        return {c: dataclasses.replace(i, extra={"survey_total": previous.data["total"]}) for c, i in ins.items()}

    def aggregate(self, round: int, global_state: State, replies: Iterable[ClientReply], *,
                  phase: str = "train") -> RoundResult | PhaseResult:
        if phase != "survey":
            return super().aggregate(round, global_state, replies)
        counts: dict[str, int] = {}
        failures: dict[str, str] = {}
        for reply in replies:
            if reply.error is not None or reply.state is None or "examples" not in reply.state:
                failures[reply.client_id] = reply.error or "no example count"
            else:
                counts[reply.client_id] = int(reply.state["examples"].item())
        if len(counts) < self.cfg.min_replies:
            return not_applied(global_state, list(counts), failures, self.cfg)
        return PhaseResult("survey", sorted(counts), failures, {"total": sum(counts.values())})


REGISTRY["survey_then_train"] = StrategySpec(f"{__name__}:SurveyThenTrain", "test: a survey phase, then fedavg")


def survey(ctx: ClientContext, ins: Instructions) -> ClientReply:
    """The client side of ``survey``: its example count, as a tensor no instruction carried."""
    n = len(ctx.examples)
    ctx.state["surveyed"] = torch.tensor(ins.round)  # phase state lives beside the pipeline's
    return ClientReply(ins.client_id, ins.round, {"examples": torch.tensor([n])}, num_examples=n)


register_phase("survey", survey)


class HalfFeedback:
    """Error feedback with a fixed scale: send half of (update + last residual), keep the other half.

    What is sent plus the new residual equals the update plus the old residual, exactly (a dyadic scale).
    """

    def apply(self, reply: ClientReply, ins: Instructions, state: State) -> tuple[ClientReply, State]:
        assert reply.state is not None
        total = {k: reply.state[k] - ins.state[k] + state.get(k, torch.zeros_like(reply.state[k]))
                 for k in reply.state}
        sent = {k: v * 0.5 for k, v in total.items()}
        values = {k: ins.state[k] + sent[k] for k in sent}
        return dataclasses.replace(reply, state=values), {k: total[k] - sent[k] for k in total}


register_transform("half_feedback", lambda cfg: HalfFeedback())


class FakeModel:
    """The driver's ``Model`` over plain tensors: applying a result replaces the state; "eval_loss" is its sum."""

    def __init__(self, state: State) -> None:
        self.start, self.current = dict(state), dict(state)
        self.base_updates: list[Any] = []
        self.saved: State | None = None

    def initial_state(self) -> State:
        return dict(self.start)

    def restore(self, state: State, base_updates: list[Any]) -> None:
        self.current = dict(state)

    def apply(self, global_state: State, result: RoundResult) -> State:
        if result.applied:
            self.current = dict(result.state)
        return self.current

    def evaluate(self) -> dict[str, float]:
        return {"eval_loss": float(sum(float(v.double().sum()) for v in self.current.values()))}

    def full_model_bytes(self) -> int:
        return 0

    def save(self, run: RunDir, global_state: State) -> None:
        self.saved = dict(global_state)


Client = Callable[[Instructions], ClientReply]


class FakeDispatcher:
    """Clients as functions of their instructions; replies come back in reverse order, and ``drop`` maps a
    (round, phase) to the clients that fail in it. Every instruction it delivered is kept in ``sent``."""

    def __init__(self, clients: Mapping[str, Client], *, reverse: bool = True,
                 drop: Mapping[tuple[int, str], set[str]] | None = None) -> None:
        self.clients, self.reverse, self.drop = dict(clients), reverse, dict(drop or {})
        self.sent: dict[tuple[int, str], dict[str, Instructions]] = {}
        self.closed = False

    def available(self, round: int) -> list[str]:
        return list(self.clients)

    def client_index(self, client_id: str) -> int:
        return list(self.clients).index(client_id)

    def dispatch(self, round: int, phase: str, instructions: dict[str, Instructions]) -> Iterator[ClientReply]:
        self.sent[(round, phase)] = dict(instructions)
        order = list(reversed(instructions)) if self.reverse else list(instructions)
        for cid in order:
            ins = instructions[cid]
            if cid in self.drop.get((round, phase), set()):
                reply = failed_reply(cid, round, "lost: the test dropped it")
            else:
                reply = self.clients[cid](ins)
                reply.bytes_up = 100
            reply.bytes_down = 10
            yield reply

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], round: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True


KEYS = ("m.q.lora_A.weight", "m.q.lora_B.weight")
WEIGHTS = (1, 1, 2, 4)


def start() -> State:
    """The global state the driver tests start from: one LoRA layer, A all 0.5 and B zero."""
    return {KEYS[0]: torch.full((2, 4), 0.5), KEYS[1]: torch.zeros(4, 2)}


def trainer(k: int) -> Client:
    """Client k "trains": it adds a dyadic step per client and round, and holds 1, 1, 2 or 4 examples, so that
    weighted sums and their means stay exact in fp32 whatever the order of the replies."""
    def train(ins: Instructions) -> ClientReply:
        step = (k + 1) * 0.25 + ins.round * 0.125
        return ClientReply(ins.client_id, ins.round, {name: v + step for name, v in ins.state.items()}, WEIGHTS[k])
    return train
