// The rolling window of /metrics scrapes, kept for the whole session (not only while the Metrics page
// is open), so opening it shows the last minutes at once. Counters become rates between scrapes.

import { metricsText } from "./api.js";
import { parseProm, quantileBetween, summarize } from "./prom.js";

export const POLL_MS = 1000;
export const WINDOW_S = 15 * 60;

const scrapes = [];   // [{t, s}] raw summaries, oldest first
const points = [];    // [{t, ...rates}] one per scrape after the first
const listeners = new Set();
let timer = null;
let lastError = null;

function rate(a, b, dt) {
  return b >= a ? (b - a) / dt : null;  // a counter that went down: the server restarted
}

function meanBetween(ha, hb) {
  if (!ha || !hb) return null;
  const n = hb.count - ha.count;
  return n > 0 ? (hb.sum - ha.sum) / n : null;
}

function derive(a, b) {
  const dt = (b.t - a.t) / 1000;
  const sa = a.s, sb = b.s;
  const hits = rate(sa.gauges.prefix_cache_hits_total ?? 0, sb.gauges.prefix_cache_hits_total ?? 0, 1);  // a delta
  const misses = rate(sa.gauges.prefix_cache_misses_total ?? 0, sb.gauges.prefix_cache_misses_total ?? 0, 1);
  const lookups = (hits ?? 0) + (misses ?? 0);
  const byTask = new Map();
  for (const [task, n] of sb.byTask) {
    const r = rate(sa.byTask.get(task) ?? 0, n, dt);
    if (r) byTask.set(task, r);
  }
  return {
    t: b.t,
    genTps: rate(sa.gauges.generation_tokens_total ?? 0, sb.gauges.generation_tokens_total ?? 0, dt),
    promptTps: rate(sa.gauges.prompt_tokens_total ?? 0, sb.gauges.prompt_tokens_total ?? 0, dt),
    reqRate: rate(sa.requests, sb.requests, dt),
    queue: sb.gauges.queue_depth ?? null,
    running: sb.gauges.running_batch_size ?? null,
    ttft: meanBetween(sa.hist.ttft, sb.hist.ttft),
    itl: meanBetween(sa.hist.itl, sb.hist.itl),
    e2e: meanBetween(sa.hist.e2e, sb.hist.e2e),
    hitRate: lookups > 0 ? (hits ?? 0) / lookups : null,
    byTask,
  };
}

async function scrape() {
  try {
    const s = summarize(parseProm(await metricsText()));
    const now = { t: Date.now(), s };
    const prev = scrapes[scrapes.length - 1];
    scrapes.push(now);
    if (prev) points.push(derive(prev, now));
    const cutoff = now.t - WINDOW_S * 1000;
    while (scrapes.length > 2 && scrapes[0].t < cutoff) scrapes.shift();
    while (points.length && points[0].t < cutoff) points.shift();
    lastError = null;
  } catch (e) {
    lastError = e;
  }
  for (const fn of listeners) fn();
  timer = setTimeout(scrape, POLL_MS);
}

export function start() {
  if (timer === null) timer = setTimeout(scrape, 0);
}

/** Call `fn` after every scrape; returns the unsubscribe function. */
export function subscribe(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export const error = () => lastError;
export const latest = () => scrapes[scrapes.length - 1]?.s ?? null;

/** The derived points and the first/last raw scrape within the last `seconds`. */
export function recent(seconds) {
  const cutoff = Date.now() - seconds * 1000;
  const pts = points.filter((p) => p.t >= cutoff);
  const first = scrapes.find((x) => x.t >= cutoff - POLL_MS * 1.5) ?? scrapes[0];
  return { points: pts, first: first?.s ?? null, last: latest() };
}

/** Quantile `q` of a histogram (`ttft`, `itl`, `e2e`) over the last `seconds`. */
export function quantile(kind, q, seconds) {
  const { first, last } = recent(seconds);
  return first && last ? quantileBetween(first.hist[kind], last.hist[kind], q) : null;
}

/** `{task: requests finished}` over the last `seconds`, from the counters at both ends. */
export function taskCounts(seconds) {
  const { first, last } = recent(seconds);
  const out = new Map();
  if (!last) return out;
  for (const [task, n] of last.byTask) {
    const d = n - (first?.byTask.get(task) ?? 0);
    if (d > 0) out.set(task, d);
  }
  return out;
}
