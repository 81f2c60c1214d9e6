"""One multi-threaded OpenMP team per process (server/engine/openmp.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from server.engine import openmp

TASKS = "/proc/self/task"


def _on_thread(fn):
    """fn() on a new thread; its result (or its exception, raised here)."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised on the caller
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


@pytest.fixture
def default_threads():
    """Whatever a test does to torch's default for new threads is undone after it."""
    before = _on_thread(torch.get_num_threads)
    yield before
    openmp.set_default(before)


def test_claim_keeps_the_callers_team_and_gives_later_threads_one(default_threads):
    def engine_thread():
        n = openmp.claim(3)
        later = _on_thread(torch.get_num_threads)  # a thread whose torch work starts after the claim
        return n, torch.get_num_threads(), later

    n, own, later = _on_thread(engine_thread)
    assert (n, own, later) == (3, 3, 1)


def test_claim_without_a_count_keeps_the_threads_own(default_threads):
    def engine_thread():
        torch.set_num_threads(2)
        return openmp.claim(), torch.get_num_threads()

    assert _on_thread(engine_thread) == (2, 2)
    assert _on_thread(torch.get_num_threads) == 1


@pytest.mark.skipif(not os.path.isdir(TASKS), reason="needs /proc to count the process's threads")
def test_release_ends_the_threads_openmp_workers(default_threads):
    def side_thread():
        torch.set_num_threads(3)
        torch.randn(1 << 22).mul(2).sum()  # big enough for a parallel region: a team of 3 starts
        with_team = len(os.listdir(TASKS))
        released = openmp.release()
        deadline = time.monotonic() + 5
        while len(os.listdir(TASKS)) > with_team - 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return with_team, released, len(os.listdir(TASKS))

    with_team, released, after = _on_thread(side_thread)
    assert released, "libgomp's omp_pause_resource_all is missing or failed"
    assert after <= with_team - 2  # its two workers are gone


def test_the_engine_loop_claims_the_team(tiny_model_dir, default_threads):
    """Engine._loop (serve's engine thread, `--engine-thread`, Ray replicas) keeps its team and
    leaves one OpenMP thread to threads that start torch work later."""
    from transformers import AutoTokenizer

    from server.engine.engine import Engine, EngineConfig
    from server.engine.request import Request
    from server.engine.sampler import SamplingParams
    from server.model import GPT2

    n = torch.get_num_threads()
    if n < 2:
        pytest.skip("LOUD SKIP: torch has one thread here; a claimed team looks like any other")
    openmp.set_default(n)  # as in a fresh process (an earlier engine in this one may have set 1)
    assert _on_thread(torch.get_num_threads) == n
    model = GPT2.from_pretrained(str(tiny_model_dir))
    eng = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), EngineConfig(max_num_seqs=2))
    done = threading.Event()
    eng.add_request(Request("r", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True),
                            on_output=lambda out: done.set() if out.finished else None))
    eng.start()
    try:
        assert done.wait(60), "the engine did not answer"
        assert eng.threads == n
        assert _on_thread(torch.get_num_threads) == 1
    finally:
        eng.shutdown()
