// Live metrics: the server's own /metrics, scraped every second (live.js), as rates and charts over
// a rolling window: throughput, batch and queue, latencies, prefix-cache hit rate, per-task rates.

import { clear, fmtInt, fmtNum, fmtSeconds, h, notice } from "./dom.js";
import { lineChart, numTick } from "./chart.js";
import * as live from "./live.js";

const WINDOWS = [[60, "1 min"], [300, "5 min"], [900, "15 min"]];
const TOP_TASKS = 5;
const SMOOTH = 10;  // per-task rates: a moving average over this many scrapes
let windowS = 300;

const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(v >= 0.995 || v < 0.1 ? 0 : 1)}%`);
const ms = (v) => fmtSeconds(v);

function card(id, title, chart, note = null) {
  const value = h("span", { class: "chart-value", id: `${id}-value` });
  const sub = h("span", { class: "chart-sub muted small", id: `${id}-sub` });
  const el = h("section", { class: "card chart-card", id },
    h("div", { class: "chart-head" }, h("h2", { text: title }), value), sub, chart.el,
    note ? h("div", { class: "muted small chart-note", text: note }) : null);
  return { el, chart, value, sub };
}

export function mount(view) {
  const picker = h("div", { class: "segmented", role: "group", "aria-label": "Window" },
    WINDOWS.map(([s, label]) => h("button", { type: "button", class: s === windowS ? "on" : "",
      dataset: { window: s }, onclick: () => { windowS = s; picker.querySelectorAll("button")
        .forEach((b) => b.classList.toggle("on", Number(b.dataset.window) === s)); update(); } }, label)));
  const status = h("div", { class: "muted small", id: "metrics-status" });
  const tiles = h("div", { class: "tiles", id: "tiles" });
  const banner = h("div", {});
  const charts = {
    tps: card("chart-throughput", "Throughput", lineChart({
      series: [{ label: "generated tok/s" }, { label: "prompt tok/s" }],
      format: (v) => fmtNum(v, 0), tick: numTick })),
    req: card("chart-requests", "Requests finished", lineChart({ series: [{ label: "req/s" }],
      format: (v) => fmtNum(v, 1), tick: numTick })),
    batch: card("chart-batch", "Running batch and queue", lineChart({
      series: [{ label: "running" }, { label: "queued" }],
      format: (v) => fmtNum(v, 0), tick: numTick, minMax: 4 })),
    ttft: card("chart-ttft", "Time to first token", lineChart({ series: [{ label: "mean" }], format: ms }),
      "Mean per second of the requests that finished in it."),
    itl: card("chart-itl", "Inter-token latency", lineChart({ series: [{ label: "mean" }], format: ms }),
      "Mean time between a request's output tokens."),
    hit: card("chart-cache", "Prefix-cache hit rate",
      lineChart({ series: [{ label: "hit rate" }], format: pct, fixedMax: 1 }),
      "A hit reuses a task's computed prefix KV; a miss computes it from the soft prompt."),
  };
  const taskChart = lineChart({ series: Array.from({ length: TOP_TASKS }, (_, i) => ({ label: `#${i + 1}` })),
    format: (v) => fmtNum(v, 2), tick: numTick });
  const taskLegend = h("div", { class: "legend", id: "task-legend" });
  const taskTable = h("div", { class: "table-wrap" });
  view.append(
    h("div", { class: "page-head" }, h("div", {}, h("h1", { text: "Metrics" }), status),
      h("div", { class: "page-actions" }, picker)),
    banner, tiles,
    h("div", { class: "chart-grid" }, Object.values(charts).map((c) => c.el)),
    h("section", { class: "card", id: "per-task" },
      h("div", { class: "chart-head" }, h("h2", { text: "Requests per task" }),
      h("span", { class: "muted small", text: `busiest ${TOP_TASKS}, req/s (${SMOOTH} s average)` })),
    taskChart.el, taskLegend, taskTable));
  taskChart.el.querySelector(".legend")?.remove();

  function update() {
    const { points } = live.recent(windowS);
    const last = points.at(-1);
    const err = live.error();
    clear(banner, err ? notice({ kind: "error", title: "Could not read /metrics",
      body: `${err.message}; retrying every second.` }) : null);
    status.textContent = last ? `updated ${new Date(last.t).toLocaleTimeString()} · every ${live.POLL_MS / 1000} s`
      : "collecting the first samples…";
    const g = live.latest()?.gauges || {};
    const avg = (key, n = 5) => {
      const vs = points.slice(-n).map((p) => p[key]).filter((v) => v !== null && v !== undefined);
      return vs.length ? vs.reduce((a, b) => a + b, 0) / vs.length : null;
    };
    const lookups = (g.prefix_cache_hits_total ?? 0) + (g.prefix_cache_misses_total ?? 0);
    clear(tiles,
      tile("Generated tok/s", fmtNum(avg("genTps") ?? 0, 1), "5 s average", "tile-tps"),
      tile("Requests/s", fmtNum(avg("reqRate") ?? 0, 2), "5 s average"),
      tile("Running", fmtInt(last?.running ?? g.running_batch_size ?? 0), "rows in the batch"),
      tile("Queued", fmtInt(last?.queue ?? g.queue_depth ?? 0), "waiting to start"),
      tile("Prefix-cache hits", lookups ? pct(g.prefix_cache_hits_total / lookups) : "–",
        `${fmtInt(lookups)} lookups since start`),
      tile("Tasks", fmtInt(g.tasks ?? 0), `${fmtInt(g.prefix_cache_entries ?? 0)} prefixes cached`));
    const series = (...keys) => points.map((p) => ({ t: p.t, v: keys.map((k) => p[k]) }));
    charts.tps.chart.update(series("genTps", "promptTps"), windowS);
    charts.req.chart.update(series("reqRate"), windowS);
    charts.batch.chart.update(series("running", "queue"), windowS);
    charts.ttft.chart.update(series("ttft"), windowS);
    charts.itl.chart.update(series("itl"), windowS);
    charts.hit.chart.update(series("hitRate"), windowS);
    charts.tps.value.textContent = `${fmtNum(last?.genTps ?? 0, 1)} tok/s`;
    charts.req.value.textContent = `${fmtNum(last?.reqRate ?? 0, 2)}/s`;
    charts.batch.value.textContent = `${last?.running ?? 0} running · ${last?.queue ?? 0} queued`;
    for (const kind of ["ttft", "itl"]) {
      const p50 = live.quantile(kind, 0.5, windowS), p95 = live.quantile(kind, 0.95, windowS);
      charts[kind].value.textContent = p50 === null ? "–" : `p50 ${ms(p50)}`;
      charts[kind].sub.textContent = p95 === null ? "no requests in the window" : `p95 ${ms(p95)} over the window`;
    }
    charts.hit.value.textContent = pct(last?.hitRate ?? null);
    renderTasks(points);
  }

  function renderTasks(points) {
    const counts = live.taskCounts(windowS);
    const total = live.latest()?.byTask || new Map();
    const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, TOP_TASKS).map(([t]) => t);
    const smoothed = points.map((p, i) => {
      const span = points.slice(Math.max(0, i - SMOOTH + 1), i + 1);
      return { t: p.t, v: top.map((task) => span.reduce((s, q) => s + (q.byTask.get(task) || 0), 0) / span.length) };
    });
    taskChart.update(smoothed, windowS);
    clear(taskLegend, top.map((t, i) => h("span", { class: `key k${i}` }, t)));
    if (!counts.size) {
      clear(taskTable, h("p", { class: "muted pad", text: "No requests finished in this window yet." }));
      return;
    }
    const max = Math.max(...counts.values());
    const minutes = Math.min(windowS, Math.max(1, (Date.now() - (points[0]?.t ?? Date.now())) / 1000)) / 60;
    const rows = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 20).map(([task, n]) => h("tr", {},
      h("td", { class: "mono", text: task }),
      h("td", { class: "num", text: fmtInt(n) }),
      h("td", { class: "bar-cell" }, h("span", { class: "bar", dataset: { share: String(n / max) } })),
      h("td", { class: "num", text: fmtNum(n / minutes, 1) }),
      h("td", { class: "num muted", text: fmtInt(total.get(task) || 0) })));
    clear(taskTable, h("table", { class: "table compact", id: "task-rates" },
      h("thead", {}, h("tr", {}, h("th", { text: "Task" }),
        h("th", { class: "num", text: `last ${WINDOWS.find(([s]) => s === windowS)[1]}` }), h("th", { text: "" }),
        h("th", { class: "num", text: "per min" }), h("th", { class: "num", text: "since start" }))),
      h("tbody", {}, rows)));
    for (const bar of taskTable.querySelectorAll(".bar")) {
      bar.style.width = `${Math.max(2, Number(bar.dataset.share) * 100)}%`;  // CSSOM: allowed by the CSP
    }
  }

  const off = live.subscribe(update);
  const onResize = () => update();
  window.addEventListener("resize", onResize);
  update();
  return () => { off(); window.removeEventListener("resize", onResize); };
}

function tile(label, value, note, id) {
  return h("div", { class: "tile", id }, h("div", { class: "tile-label", text: label }),
    h("div", { class: "tile-value", text: value }), h("div", { class: "tile-note muted small", text: note }));
}
