"""Prometheus text metrics, no dependency: counters, gauges, latency histograms."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class Histogram:
    def __init__(self):
        self.counts = [0] * len(_BUCKETS)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, v)] += 1
        self.total += v
        self.n += 1

    def render(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        cum = 0
        for b, c in zip(_BUCKETS, self.counts):
            cum += c
            le = "+Inf" if b == float("inf") else repr(b)
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        out += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return out


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = defaultdict(int)  # (task, finish_reason) -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.e2e = Histogram()
        self.itl = Histogram()

    def on_finish(self, req, out) -> None:
        """Engine listener: a request finished (engine thread)."""
        now = time.monotonic()
        with self._lock:
            self.requests[(req.task or "", out.finish_reason or "")] += 1
            self.prompt_tokens += out.num_prompt_tokens
            self.generation_tokens += len(out.token_ids)
            self.e2e.observe(now - req.arrival)
            if req.first_token_time is not None:
                self.ttft.observe(req.first_token_time - req.arrival)
                if len(out.token_ids) > 1:
                    self.itl.observe((now - req.first_token_time) / (len(out.token_ids) - 1))

    def render(self, *, waiting: int, running: int, tasks: int, extra: dict[str, float] | None = None) -> str:
        with self._lock:
            lines = ["# HELP polyprompt_requests_total Finished requests by task and finish reason.",
                     "# TYPE polyprompt_requests_total counter"]
            for (task, reason), c in sorted(self.requests.items()):
                lines.append(f'polyprompt_requests_total{{task="{_label(task)}",finish_reason="{_label(reason)}"}} {c}')
            lines += [
                "# TYPE polyprompt_prompt_tokens_total counter", f"polyprompt_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE polyprompt_generation_tokens_total counter",
                f"polyprompt_generation_tokens_total {self.generation_tokens}",
                "# TYPE polyprompt_queue_depth gauge", f"polyprompt_queue_depth {waiting}",
                "# TYPE polyprompt_running_batch_size gauge", f"polyprompt_running_batch_size {running}",
                "# TYPE polyprompt_tasks gauge", f"polyprompt_tasks {tasks}",
            ]
            for k, v in (extra or {}).items():
                lines += [f"# TYPE polyprompt_{k} gauge", f"polyprompt_{k} {v}"]
            lines += self.ttft.render("polyprompt_time_to_first_token_seconds", "Time to first token.")
            lines += self.itl.render("polyprompt_inter_token_latency_seconds", "Mean time between output tokens.")
            lines += self.e2e.render("polyprompt_request_latency_seconds", "End-to-end request latency.")
        return "\n".join(lines) + "\n"
