"""Iteration-level scheduler: how a request moves from waiting to running to finished.

The scheduler deals in request ids and token counts, never tensors. At every step:

1. every running request that is *decoding* (its prompt is in the KV cache) gets one
   token: the one sampled last step;
2. running requests still *prefilling* a long prompt get their next chunk;
3. waiting requests are admitted first-come first-served while a slot is free and the
   step's token budget lasts; a prompt longer than what is left of the budget starts
   with a chunk and continues next step (chunked prefill).

So new requests join between any two decode steps, finished ones leave at once, and a
long prompt never holds short requests back for more than one budget's worth of work.
After executing the step the engine reports back with `on_step_done`: which requests
finished. The scheduler holds the engine's own request objects (`Seq` is what it reads of
them), so there is one state per request, not two joined by id.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Seq(Protocol):
    """What the scheduler reads and writes of a request (the engine's `Request`; tests use a
    plain fake): its counts and status, never its tensors."""

    req_id: str
    num_computed: int  # prompt + output tokens whose keys/values are in the cache
    status: Status

    @property
    def num_prompt(self) -> int: ...  # the user's prompt tokens (virtual tokens excluded)

    @property
    def num_output(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...


def num_known(seq: Seq) -> int:
    return seq.num_prompt + seq.num_output


def num_todo(seq: Seq) -> int:
    return num_known(seq) - seq.num_computed


@dataclass
class StepPlan:
    """One step's work: `(request, num_tokens)` per row, decode rows first."""

    decode: list[Seq] = field(default_factory=list)
    prefill: list[tuple[Seq, int]] = field(default_factory=list)
    admitted: list[Seq] = field(default_factory=list)  # subset of prefill's requests, new this step

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)

    def rows(self) -> list[Seq]:
        return self.decode + [seq for seq, _ in self.prefill]

    def only(self, keep: set[str]) -> "StepPlan":
        """The same step for the requests whose ids are in `keep` (a failed row is re-run
        alone or left out)."""
        return StepPlan([r for r in self.decode if r.req_id in keep],
                        [(r, n) for r, n in self.prefill if r.req_id in keep],
                        [r for r in self.admitted if r.req_id in keep])

    def halves(self) -> tuple["StepPlan", "StepPlan"]:
        ids = [r.req_id for r in self.rows()]
        first = set(ids[: len(ids) // 2])
        return self.only(first), self.only(set(ids) - first)


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Seq] = deque()
        self.running: dict[str, Seq] = {}  # insertion order = admission order

    # ------------------------------------------------------------------ intake
    def add(self, seq: Seq) -> None:
        if seq.num_prompt < 1 or seq.max_tokens < 0:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 0")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort(self, req_id: str) -> Seq | None:
        """Remove a request wherever it is; returns it (the caller frees its slot)."""
        seq = self.running.pop(req_id, None)
        if seq is None:
            for s in self.waiting:
                if s.req_id == req_id:
                    seq = s
                    self.waiting.remove(s)
                    break
        if seq is not None:
            seq.status = Status.FINISHED
        return seq

    def find(self, req_id: str) -> Seq | None:
        """The running or waiting request with this id."""
        seq = self.running.get(req_id)
        return seq if seq is not None else next((s for s in self.waiting if s.req_id == req_id), None)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        prefilling = []
        for seq in self.running.values():
            todo = num_todo(seq)
            if todo == 1:
                plan.decode.append(seq)
            elif todo > 1:
                prefilling.append(seq)
        budget -= len(plan.decode)
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(num_todo(seq), budget)
            plan.prefill.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running[seq.req_id] = seq
            n = min(num_todo(seq), budget)
            plan.prefill.append((seq, n))
            plan.admitted.append(seq)
            budget -= n
        return plan

    def on_step_done(self, plan: StepPlan, finished: set[str]) -> None:
        """Record the step: its tokens are computed (a row's new output token, if it sampled
        one, was appended by the engine); finished requests leave."""
        for seq in plan.decode:
            seq.num_computed += 1
        for seq, n in plan.prefill:
            seq.num_computed += n
        for req_id in finished:
            seq = self.running.pop(req_id, None)
            if seq is not None:
                seq.status = Status.FINISHED

    # ------------------------------------------------------------------ views
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
