// A Prometheus text-format (0.0.4) parser: enough for any exporter's samples, not only ours —
// names, labels with escapes, values including NaN/+Inf, optional timestamps; comments skipped.

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+-?\d+)?\s*$/;
const LABEL = /\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?/gy;

function unescape(v) {
  return v.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

function parseValue(s) {
  if (s === "+Inf" || s === "Inf") return Infinity;
  if (s === "-Inf") return -Infinity;
  if (s === "NaN") return NaN;
  return Number(s);
}

/** `[{name, labels: {k: v}, value}]` for every sample line of `text`. */
export function parseProm(text) {
  const out = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      LABEL.lastIndex = 0;
      let lm;
      while (LABEL.lastIndex < m[3].length && (lm = LABEL.exec(m[3]))) labels[lm[1]] = unescape(lm[2]);
    }
    out.push({ name: m[1], labels, value: parseValue(m[4]) });
  }
  return out;
}

/** What the console reads from one scrape of polyprompt's /metrics, as plain numbers. */
export function summarize(samples) {
  const s = {
    requests: 0, byTask: new Map(), byReason: new Map(), gauges: {},
    hist: { ttft: null, itl: null, e2e: null },
  };
  const HIST = {
    polyprompt_time_to_first_token_seconds: "ttft",
    polyprompt_inter_token_latency_seconds: "itl",
    polyprompt_request_latency_seconds: "e2e",
  };
  for (const { name, labels, value } of samples) {
    if (name === "polyprompt_requests_total") {
      s.requests += value;
      const t = labels.task || "(base model)";
      s.byTask.set(t, (s.byTask.get(t) || 0) + value);
      const r = labels.finish_reason || "none";
      s.byReason.set(r, (s.byReason.get(r) || 0) + value);
      continue;
    }
    const base = name.replace(/_(bucket|sum|count)$/, "");
    const key = HIST[base];
    if (key) {
      const hst = (s.hist[key] ||= { buckets: [], sum: 0, count: 0 });
      if (name.endsWith("_bucket")) hst.buckets.push([parseValue(labels.le), value]);
      else if (name.endsWith("_sum")) hst.sum = value;
      else hst.count = value;
      continue;
    }
    if (name.startsWith("polyprompt_")) s.gauges[name.slice(11)] = value;
  }
  for (const hst of Object.values(s.hist)) if (hst) hst.buckets.sort((a, b) => a[0] - b[0]);
  return s;
}

/**
 * The q-quantile of the observations between two scrapes of a cumulative histogram, interpolated
 * linearly inside the bucket as Prometheus's histogram_quantile does; null when nothing was observed.
 */
export function quantileBetween(prev, cur, q) {
  if (!prev || !cur || cur.buckets.length !== prev.buckets.length) return null;
  const counts = cur.buckets.map(([le, c], i) => [le, c - prev.buckets[i][1]]);
  const total = counts.length ? counts[counts.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, c] of counts) {
    if (c >= rank) {
      if (!Number.isFinite(le)) return lower;  // in the +Inf bucket: the highest finite bound
      const inBucket = c - below;
      return inBucket > 0 ? lower + (le - lower) * ((rank - below) / inBucket) : le;
    }
    lower = le;
    below = c;
  }
  return lower;
}
