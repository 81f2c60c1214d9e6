"""Prometheus metrics with `prometheus_client`, one `CollectorRegistry` per app.

Why per app: tests (and a process embedding several apps) create many runtimes; the global
default registry would refuse the second one's metric names. Why two kinds: what the engine
*does* (requests, tokens, latencies, rejections) is counted as it happens (engine thread,
`on_finish`; request threads, `reject`); what it *is* (queue depth, batch size, caches,
utilisation) is read from the runtime at scrape time (`_RuntimeCollector`), so a gauge is
never stale and costs nothing between scrapes.

Names the operator console (server/console/prom.js) and tests read are kept: the unlabelled
`polyprompt_{time_to_first_token,inter_token_latency,request_latency}_seconds` histograms,
`polyprompt_requests_total{task,finish_reason}`, the token counters and the gauges.

Per-task cardinality: thousands of tasks are expected, so per-task series are only counters
and histograms with few buckets (`_TASK_*_BUCKETS`, 4-5 each: ~25 series per active task);
tasks appear once they have served a request and are dropped when deleted (`forget_tasks`).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.runtime import Runtime

# `*_created` series would double the per-task series for a timestamp no dashboard here uses
disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
_TASK_TTFT_BUCKETS = (0.05, 0.25, 1.0, 5.0, float("inf"))
_TASK_ITL_BUCKETS = (0.01, 0.05, 0.25, float("inf"))
_TASK_E2E_BUCKETS = (0.5, 2.5, 10.0, 60.0, float("inf"))

# why a request was refused before it reached the engine (the series exist from start, at 0)
REJECT_REASONS = ("queue_full", "queue_wait", "too_many_items", "shutting_down", "context_length_exceeded",
                  "model_not_found", "invalid_request")
# the HTTP status each finish reason that is an error gives its client (server/service.py `_error_for`)
ERROR_STATUS = {"error": "500", "timeout": "408", "queue_timeout": "503", "shutdown": "503", "abort": "499"}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._tasks: dict[str, set[str]] = {}  # task label -> its finish reasons seen (for `forget_tasks`)
        self._cache_tasks: set[str] = set()  # task labels with response-cache series
        self.requests = Counter("polyprompt_requests", "Finished requests by task and finish reason.",
                                ["task", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("polyprompt_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("polyprompt_generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.ttft = Histogram("polyprompt_time_to_first_token_seconds", "Time to first token (all tasks).",
                              buckets=_BUCKETS, registry=r)
        self.itl = Histogram("polyprompt_inter_token_latency_seconds",
                             "Mean time between output tokens of a request (all tasks).", buckets=_BUCKETS, registry=r)
        self.e2e = Histogram("polyprompt_request_latency_seconds", "End-to-end request latency (all tasks).",
                             buckets=_BUCKETS, registry=r)
        self.task_tokens = Counter("polyprompt_task_generation_tokens", "Generated tokens by task.", ["task"],
                                   registry=r)
        self.task_ttft = Histogram("polyprompt_task_time_to_first_token_seconds",
                                   "Time to first token by task (few buckets: one series set per task).", ["task"],
                                   buckets=_TASK_TTFT_BUCKETS, registry=r)
        self.task_itl = Histogram("polyprompt_task_inter_token_latency_seconds",
                                  "Mean time between output tokens by task (few buckets).", ["task"],
                                  buckets=_TASK_ITL_BUCKETS, registry=r)
        self.task_e2e = Histogram("polyprompt_task_request_latency_seconds",
                                  "End-to-end request latency by task (few buckets).", ["task"],
                                  buckets=_TASK_E2E_BUCKETS, registry=r)
        self.rejected = Counter("polyprompt_rejected_requests",
                                "Requests refused before reaching the engine, by reason (503s and 4xxs at intake).",
                                ["reason"], registry=r)
        self.errors = Counter("polyprompt_request_errors",
                              "Requests the engine ended without an answer, by finish reason and HTTP status.",
                              ["finish_reason", "status"], registry=r)
        self.cache_hits = Counter("polyprompt_response_cache_hits",
                                  "Deterministic requests (items) answered from the response cache, by task: "
                                  "no engine work, not in polyprompt_requests_total.", ["task"], registry=r)
        self.cache_misses = Counter("polyprompt_response_cache_misses",
                                    "Deterministic requests (items) the response cache did not hold, by task "
                                    "(computed by the engine).", ["task"], registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason, status in ERROR_STATUS.items():
            self.errors.labels(reason, status)

    def attach(self, runtime: Runtime) -> None:
        """Read the runtime's gauges (and the engine's utilisation) at every scrape."""
        self.registry.register(_RuntimeCollector(runtime))

    def on_finish(self, req, out) -> None:
        """Engine listener: a request finished (engine thread)."""
        now = time.monotonic()
        task = req.task or ""
        reason = out.finish_reason or ""
        n_out = len(out.token_ids)
        with self._lock:
            self._tasks.setdefault(task, set()).add(reason)
            self.requests.labels(task, reason).inc()
            self.prompt_tokens.inc(out.num_prompt_tokens)
            self.generation_tokens.inc(n_out)
            self.task_tokens.labels(task).inc(n_out)
            if reason in ERROR_STATUS:
                self.errors.labels(reason, ERROR_STATUS[reason]).inc()
            self.e2e.observe(now - req.arrival)
            self.task_e2e.labels(task).observe(now - req.arrival)
            if req.first_token_time is not None:
                self.ttft.observe(req.first_token_time - req.arrival)
                self.task_ttft.labels(task).observe(req.first_token_time - req.arrival)
                if n_out > 1:
                    itl = (now - req.first_token_time) / (n_out - 1)
                    self.itl.observe(itl)
                    self.task_itl.labels(task).observe(itl)

    def response_cache_lookup(self, task: str, *, hit: bool) -> None:
        """A deterministic item looked up in the response cache (event loop)."""
        with self._lock:
            self._cache_tasks.add(task)
            (self.cache_hits if hit else self.cache_misses).labels(task).inc()

    def reject(self, reason: str) -> None:
        """A request refused at intake (request threads); `reason` is an error code from a fixed set."""
        self.rejected.labels(reason if reason in REJECT_REASONS else "invalid_request").inc()

    def forget_tasks(self, names) -> None:
        """Drop the per-task series of deleted tasks (their totals stay in the unlabelled families)."""
        with self._lock:
            for task in set(names) & set(self._tasks):
                for metric in (self.task_tokens, self.task_ttft, self.task_itl, self.task_e2e):
                    _remove(metric, task)
                for reason in self._tasks.pop(task):
                    _remove(self.requests, task, reason)
            for task in set(names) & self._cache_tasks:
                self._cache_tasks.discard(task)
                _remove(self.cache_hits, task)
                _remove(self.cache_misses, task)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class _RuntimeCollector(Collector):
    """Gauges (and cumulative counters kept elsewhere) read from the runtime at scrape time."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def collect(self):
        rt, eng = self.rt, self.rt.engine
        mem = rt.memory_report()
        pc = mem["prefix_cache"]

        def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"polyprompt_{name}", help_, value=value)

        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"polyprompt_{name}", help_, value=value)

        yield gauge("queue_depth", "Requests waiting for a KV-cache slot.", eng.num_waiting)
        yield gauge("running_batch_size", "Requests holding a KV-cache slot (the running batch).", eng.num_running)
        yield gauge("tasks", "Tasks in the served task table.", len(rt.tasks))
        yield gauge("engine_utilisation", "Busy share of the engine loop over the last ~10 s: time inside its "
                    "step over wall time (0..1).", eng.meter.utilisation())
        yield gauge("target_utilisation", "The busy share this replica aims to stay under (--target-utilisation); "
                    "scale out above it.", rt.settings.target_utilisation)
        yield counter("engine_busy_seconds", "Seconds the engine loop spent inside its step (rate() = utilisation).",
                      eng.meter.busy)
        yield gauge("prefix_cache_entries", "Soft-prompt prefix KV entries cached.", pc["entries"])
        yield gauge("prefix_cache_bytes", "Bytes held by the prefix KV cache.", pc["bytes"])
        yield counter("prefix_cache_hits", "Requests whose prefix KV was already cached.", pc["hits"])
        yield counter("prefix_cache_misses", "Requests whose prefix KV had to be computed.", pc["misses"])
        yield counter("prefix_cache_computed", "Prefix KV computations (for requests and warm-ups).", pc["computed"])
        rc = rt.responses.stats()
        yield gauge("response_cache_entries", "Answers held by the response cache.", rc["entries"])
        yield gauge("response_cache_bytes", "Estimated bytes held by the response cache (cap: --response-cache-mb).",
                    rc["bytes"])
        yield counter("response_cache_evictions", "Response-cache entries evicted to stay under its cap.",
                      rc["evictions"])
        yield gauge("kv_cache_bytes", "Bytes of the KV cache (all slots).", mem["kv_cache_bytes"])
        yield gauge("per_task_prefix_kv_bytes", "Mean prefix KV bytes one task needs.",
                    mem["per_task_prefix_kv_bytes"])
