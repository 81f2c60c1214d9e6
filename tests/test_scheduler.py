"""The scheduler alone: fake requests, no model (counts and ids only)."""

from dataclasses import dataclass

import pytest

from server.engine.scheduler import Scheduler, Status, num_known


@dataclass
class SeqState:
    """A fake request: just what the scheduler reads (`scheduler.Seq`)."""

    req_id: str
    num_prompt: int
    max_tokens: int
    num_computed: int = 0
    num_output: int = 0
    status: Status = Status.WAITING


def make(sched, n, *, prompt=4, max_tokens=3, prefix="r"):
    seqs = [SeqState(f"{prefix}{i}", prompt, max_tokens) for i in range(n)]
    for s in seqs:
        sched.add(s)
    return seqs


def run_step(sched, outputs_left):
    """Execute a plan the way the engine does: rows that finish their known tokens sample."""
    plan = sched.schedule()
    sampled, finished = [], set()
    for seq in plan.decode:
        sampled.append(seq)
    for seq, n in plan.prefill:
        if seq.num_computed + n == num_known(seq):
            sampled.append(seq)
    for seq in sampled:
        seq.num_output += 1  # the engine appends the sampled token
        outputs_left[seq.req_id] -= 1
        if outputs_left[seq.req_id] == 0:
            finished.add(seq.req_id)
    sched.on_step_done(plan, finished)
    return plan, finished


def _ids(seqs):
    return [seq.req_id for seq in seqs]


def _rows(prefill):
    return [(seq.req_id, n) for seq, n in prefill]


def test_admits_up_to_max_seqs_and_budget():
    s = Scheduler(max_num_seqs=3, max_num_batched_tokens=100)
    make(s, 5)
    plan = s.schedule()
    assert [seq.req_id for seq, _ in plan.prefill] == ["r0", "r1", "r2"]
    assert [seq.req_id for seq in plan.admitted] == ["r0", "r1", "r2"] and s.num_waiting == 2


def test_long_prompt_is_chunked_and_decodes_go_first():
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=10)
    short = SeqState("short", 2, 5)
    long = SeqState("long", 25, 2)
    s.add(short)
    s.add(long)
    left = {"short": 5, "long": 2}
    plan, _ = run_step(s, left)
    assert _rows(plan.prefill) == [("short", 2), ("long", 8)]
    plan, _ = run_step(s, left)  # short decodes every step while long is chunked
    assert _ids(plan.decode) == ["short"] and _rows(plan.prefill) == [("long", 9)]
    plan, _ = run_step(s, left)
    assert _ids(plan.decode) == ["short"] and _rows(plan.prefill) == [("long", 8)]
    assert s.running["long"].num_output == 1  # prompt complete -> first token sampled
    plan, _ = run_step(s, left)
    assert sorted(_ids(plan.decode)) == ["long", "short"] and plan.num_tokens == 2


def test_new_requests_join_between_decode_steps_and_finished_leave():
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    left = {}
    for seq in make(s, 1, max_tokens=3, prefix="a"):
        left[seq.req_id] = 3
    run_step(s, left)  # a0 prefilled
    for seq in make(s, 2, max_tokens=2, prefix="b"):
        left[seq.req_id] = 2
    plan, _ = run_step(s, left)
    assert _ids(plan.decode) == ["a0"] and _ids(plan.admitted) == ["b0"]  # joins mid-decode; one slot left
    plan, finished = run_step(s, left)
    assert finished == {"a0", "b0"}
    plan, _ = run_step(s, left)
    assert _ids(plan.admitted) == ["b1"]  # the freed slot is reused at once
    assert s.running["b1"].status is Status.RUNNING


def test_steady_load_keeps_the_batch_full():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=256)
    left = {}
    sizes = []
    for step in range(40):
        for seq in make(s, 2, max_tokens=3 + step % 5, prefix=f"s{step}-"):
            left[seq.req_id] = seq.max_tokens
        plan, _ = run_step(s, left)
        sizes.append(len(plan.decode) + len(plan.prefill))
    assert min(sizes[10:]) == 8


def test_abort_waiting_and_running():
    s = Scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    make(s, 2)
    s.schedule()
    assert s.abort("r1").status is Status.FINISHED and s.num_waiting == 0
    assert s.abort("r0") is not None and s.num_running == 0
    assert s.abort("nope") is None and not s.has_work()


def test_rejects_empty_requests():
    s = Scheduler(max_num_seqs=1, max_num_batched_tokens=8)
    with pytest.raises(ValueError):
        s.add(SeqState("x", 0, 4))
