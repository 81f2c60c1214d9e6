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
got a new token and which finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqState:
    """What the scheduler knows of one request."""

    req_id: str
    num_prompt: int  # the user's prompt tokens (virtual tokens excluded)
    max_tokens: int
    num_computed: int = 0  # prompt + output tokens whose keys/values are in the cache
    num_output: int = 0
    status: Status = Status.WAITING

    @property
    def num_known(self) -> int:
        return self.num_prompt + self.num_output

    @property
    def num_todo(self) -> int:
        return self.num_known - self.num_computed


@dataclass
class StepPlan:
    """One step's work: `(req_id, num_tokens)` per row, decode rows first."""

    decode: list[str] = field(default_factory=list)
    prefill: list[tuple[str, int]] = field(default_factory=list)
    admitted: list[str] = field(default_factory=list)  # subset of prefill's ids, new this step

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)

    def rows(self) -> list[str]:
        return self.decode + [rid for rid, _ in self.prefill]

    def only(self, keep: set[str]) -> "StepPlan":
        """The same step for the rows in `keep` (a failed row is re-run alone or left out)."""
        return StepPlan([r for r in self.decode if r in keep], [(r, n) for r, n in self.prefill if r in keep],
                        [r for r in self.admitted if r in keep])

    def halves(self) -> tuple["StepPlan", "StepPlan"]:
        rows = self.rows()
        first = set(rows[: len(rows) // 2])
        return self.only(first), self.only(set(rows) - first)


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[SeqState] = deque()
        self.running: dict[str, SeqState] = {}  # insertion order = admission order

    # ------------------------------------------------------------------ intake
    def add(self, seq: SeqState) -> None:
        if seq.num_prompt < 1 or seq.max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 1")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort(self, req_id: str) -> SeqState | None:
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

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        prefilling = []
        for seq in self.running.values():
            if seq.num_todo == 1:
                plan.decode.append(seq.req_id)
            elif seq.num_todo > 1:
                prefilling.append(seq)
        budget -= len(plan.decode)
        for seq in prefilling:
            if budget <= 0:
                break
            n = min(seq.num_todo, budget)
            plan.prefill.append((seq.req_id, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running[seq.req_id] = seq
            n = min(seq.num_todo, budget)
            plan.prefill.append((seq.req_id, n))
            plan.admitted.append(seq.req_id)
            budget -= n
        return plan

    def on_step_done(self, plan: StepPlan, sampled: set[str], finished: set[str]) -> None:
        """Record the step: tokens computed, one new token for each id in `sampled`."""
        for req_id in plan.decode:
            self.running[req_id].num_computed += 1
        for req_id, n in plan.prefill:
            self.running[req_id].num_computed += n
        for req_id in sampled:
            self.running[req_id].num_output += 1
        for req_id in finished:
            seq = self.running.pop(req_id)
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
