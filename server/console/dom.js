// Small DOM and formatting helpers. Text always goes in as text nodes (never innerHTML), so a task's
// name, description or generated text can never become markup.

export function h(tag, props = {}, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  let value = null;
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "value" && !svg) value = String(v);  // a property (a textarea has no value attribute), set last
    else if (k === "class") el.setAttribute("class", Array.isArray(v) ? v.filter(Boolean).join(" ") : v);
    else if (k === "text") el.textContent = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k in el && !svg && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  if (value !== null) el.value = value;  // after the children: a <select>'s options must exist first
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const nf = new Intl.NumberFormat("en-US");
export const fmtInt = (n) => (n === null || n === undefined ? "–" : nf.format(n));

export function fmtNum(v, digits = 2) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (a >= 1e4) return `${(v / 1e3).toFixed(1)}k`;
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  return v.toFixed(digits);
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  if (s === 0) return "0";
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : s < 0.1 ? 1 : 0)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

export function fmtBytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtAgo(iso) {
  if (!iso) return "–";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso;
  const s = Math.max(0, (Date.now() - t) / 1000);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  if (s < 86400 * 30) return `${Math.round(s / 86400)} d ago`;
  return new Date(t).toLocaleDateString();
}

export const fmtDate = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

/** A <time> showing "3 min ago" with the exact time as its tooltip. */
export const ago = (iso) => h("time", { datetime: iso || "", title: fmtDate(iso), text: fmtAgo(iso) });

export function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

export function toast(message, kind = "ok") {
  const box = document.getElementById("toasts");
  const el = h("div", { class: ["toast", `toast-${kind}`], role: kind === "error" ? "alert" : "status" }, message);
  box.append(el);
  setTimeout(() => el.classList.add("toast-out"), kind === "error" ? 6000 : 3500);
  setTimeout(() => el.remove(), kind === "error" ? 6400 : 3900);
}

/** A page-level state: a title, a line of explanation, and optional actions (empty or error). */
export function notice({ title, body, kind = "empty", actions = [] }) {
  return h("div", { class: ["notice", `notice-${kind}`], role: kind === "error" ? "alert" : null },
    h("div", { class: "notice-title", text: title }),
    body ? h("div", { class: "notice-body" }, body) : null,
    actions.length ? h("div", { class: "notice-actions" }, actions) : null);
}

export function button(label, onclick, { kind = "secondary", ...rest } = {}) {
  return h("button", { type: "button", class: ["btn", `btn-${kind}`], onclick, ...rest }, label);
}

/** A modal <dialog> built from `content(close)`; resolves with what `close(value)` is given. */
export function modal(title, content, { wide = false } = {}) {
  return new Promise((resolve) => {
    const dlg = h("dialog", { class: ["modal", wide && "modal-wide"] });
    const close = (value) => { dlg.close(); dlg.remove(); resolve(value); };
    dlg.append(h("div", { class: "modal-head" }, h("h2", { text: title }),
      h("button", { type: "button", class: "icon-btn", "aria-label": "Close", onclick: () => close(null) }, "×")),
    content(close));
    dlg.addEventListener("cancel", (e) => { e.preventDefault(); close(null); });
    document.body.append(dlg);
    dlg.showModal();
    const first = dlg.querySelector("input, textarea, select, .btn-primary");
    if (first) first.focus();
  });
}

export function copyable(text, shown = text) {
  const el = h("button", { type: "button", class: "copy mono", title: `${text} (click to copy)` }, shown);
  el.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      toast("Copied");
    } catch {
      toast("Copy is not allowed here", "error");
    }
  });
  return el;
}
