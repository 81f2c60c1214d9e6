// Hand-written SVG time-series charts: one or more lines over a rolling time window, gaps where a
// value is unknown, a nice y scale, and a hover read-out. Colours come from CSS (.s0, .s1, …).

import { h } from "./dom.js";

const PAD = { l: 46, r: 10, t: 10, b: 22 };

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

/** An axis label for `v` on a scale up to `max`: as many decimals as the scale's steps need. */
export function numTick(v, max) {
  if (v === 0) return "0";
  return max >= 1e4 ? `${Number((v / 1e3).toPrecision(3))}k` : String(Number(v.toPrecision(3)));
}

function fmtAge(s) {
  if (s < 1) return "now";
  return s >= 60 ? `−${Math.round(s / 60)} min` : `−${Math.round(s)} s`;
}

/**
 * A line chart. `series`: [{label}]; `format(v)` for axis and read-out; `fixedMax` pins the y scale
 * (e.g. 1 for a rate). `update(points, windowS)` redraws: points are [{t, v: [value per series]}].
 */
export function lineChart({ series, format = String, tick = null, fixedMax = null, minMax = 0, height = 160 }) {
  const axis = tick || format;
  const svg = h("svg:svg", { class: "chart-svg", height, role: "img" });
  const tip = h("div", { class: "chart-tip", hidden: true });
  const legend = series.length > 1
    ? h("div", { class: "legend" }, series.map((s, i) => h("span", { class: `key k${i}` }, s.label)))
    : null;
  const el = h("div", { class: "chart", dataset: { points: "0", last: "" } }, svg, tip, legend);
  let state = null;

  function draw(points, windowS) {
    const w = Math.max(240, el.clientWidth || 480);
    const now = Date.now();
    const x0 = now - windowS * 1000;
    const iw = w - PAD.l - PAD.r, ih = height - PAD.t - PAD.b;
    let top = 0;
    for (const p of points) for (const v of p.v) if (v !== null && Number.isFinite(v)) top = Math.max(top, v);
    const ymax = fixedMax ?? niceMax(Math.max(top * 1.1, minMax));
    const X = (t) => PAD.l + ((t - x0) / (windowS * 1000)) * iw;
    const Y = (v) => PAD.t + ih - (Math.min(v, ymax) / ymax) * ih;
    svg.setAttribute("viewBox", `0 0 ${w} ${height}`);
    svg.setAttribute("width", w);
    const kids = [];
    for (const f of [0, 0.5, 1]) {
      const y = PAD.t + ih - f * ih;
      kids.push(h("svg:line", { class: "grid", x1: PAD.l, x2: w - PAD.r, y1: y, y2: y }));
      kids.push(h("svg:text", { class: "axis", x: PAD.l - 6, y: y + 4, "text-anchor": "end" }, axis(ymax * f, ymax)));
    }
    for (const [f, anchor] of [[0, "start"], [0.5, "middle"], [1, "end"]]) {
      kids.push(h("svg:text", { class: "axis", x: PAD.l + f * iw, y: height - 6, "text-anchor": anchor },
        fmtAge(windowS * (1 - f))));
    }
    series.forEach((_, i) => {
      let d = "";
      let area = "";
      let run = [];
      const flush = () => {
        if (run.length) {
          d += run.map(([x, y], j) => `${j ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
          if (i === 0 && run.length > 1) {
            area += `M${run[0][0].toFixed(1)},${Y(0)}`
              + run.map(([x, y]) => `L${x.toFixed(1)},${y.toFixed(1)}`).join("")
              + `L${run[run.length - 1][0].toFixed(1)},${Y(0)}Z`;
          }
        }
        run = [];
      };
      for (const p of points) {
        const v = p.v[i];
        if (v === null || v === undefined || !Number.isFinite(v) || p.t < x0) flush();
        else run.push([X(p.t), Y(v)]);
      }
      flush();
      if (area) kids.push(h("svg:path", { class: "area", d: area }));
      kids.push(h("svg:path", { class: `line s${i}`, d: d || "M0,0" }));
    });
    const cursor = h("svg:line", { class: "cursor", y1: PAD.t, y2: PAD.t + ih, x1: 0, x2: 0, visibility: "hidden" });
    kids.push(cursor);
    svg.replaceChildren(...kids);
    state = { points, X, cursor, w };
    const last = [...points].reverse().find((p) => p.v[0] !== null && p.v[0] !== undefined);
    el.dataset.points = String(points.length);
    el.dataset.last = last ? String(last.v[0]) : "";
    const names = series.map((s) => s.label).join(", ");
    svg.setAttribute("aria-label", `${names}: latest ${last ? format(last.v[0]) : "none"}`);
  }

  svg.addEventListener("mousemove", (ev) => {
    if (!state || !state.points.length) return;
    const box = svg.getBoundingClientRect();
    const x = ((ev.clientX - box.left) / box.width) * state.w;
    let best = null;
    for (const p of state.points) if (!best || Math.abs(state.X(p.t) - x) < Math.abs(state.X(best.t) - x)) best = p;
    const bx = state.X(best.t);
    state.cursor.setAttribute("x1", bx);
    state.cursor.setAttribute("x2", bx);
    state.cursor.setAttribute("visibility", "visible");
    tip.replaceChildren(h("div", { class: "tip-time", text: new Date(best.t).toLocaleTimeString() }),
      ...series.map((s, i) => h("div", {}, h("span", { class: `key k${i}` }, s.label), " ",
        h("b", { text: best.v[i] === null || best.v[i] === undefined ? "–" : format(best.v[i]) }))));
    tip.hidden = false;
    tip.classList.toggle("tip-left", bx > state.w / 2);
  });
  svg.addEventListener("mouseleave", () => {
    tip.hidden = true;
    if (state) state.cursor.setAttribute("visibility", "hidden");
  });
  return { el, update: draw };
}

/** A small inline line for a short series (e.g. loss per epoch); null values are skipped. */
export function sparkline(values, { width = 96, height = 24, label = "" } = {}) {
  const vs = values.map((v, i) => [i, v]).filter(([, v]) => v !== null && v !== undefined && Number.isFinite(v));
  const svg = h("svg:svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": label });
  if (vs.length < 2) return svg;
  const lo = Math.min(...vs.map(([, v]) => v)), hi = Math.max(...vs.map(([, v]) => v));
  const n = values.length - 1 || 1;
  const d = vs.map(([i, v], j) => `${j ? "L" : "M"}${((i / n) * (width - 4) + 2).toFixed(1)},`
    + `${(height - 2 - ((v - lo) / (hi - lo || 1)) * (height - 4)).toFixed(1)}`).join("");
  svg.append(h("svg:path", { class: "line s0", d }));
  return svg;
}
