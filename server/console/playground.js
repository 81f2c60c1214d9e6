// Playground: one prompt, one set of sampling settings, several tasks. Every task's request starts at
// the same moment (one streamed POST /v1/completions each), so the engine runs them in one batch, and
// each answer streams into its own card with its tokens/s, time to first token and finish reason.

import { api, streamCompletion } from "./api.js";
import { button, clear, debounce, fmtNum, fmtSeconds, h } from "./dom.js";

const state = {
  selected: [],  // task names (or the base model's id)
  info: new Map(),  // name -> {version, n} as last read
  prompt: "The quick brown fox",
  s: { max_tokens: 32, temperature: 0, top_p: 1, top_k: 0, seed: "", ignore_eos: false },
};
let running = null;  // AbortController of the run in flight
// a browser opens at most 6 HTTP/1.1 connections to one server, and each stream holds one for its whole
// run: more tasks would wait in the browser, not in the engine's batch; one connection stays for the rest
export const MAX_TASKS = 5;

export function mount(view, ctx, { query }) {
  const fromLink = (query.get("tasks") || "").split(",").filter(Boolean);
  if (fromLink.length) state.selected = [...new Set(fromLink)].slice(0, MAX_TASKS);
  const chips = h("div", { class: "chips", id: "picked" });
  const limit = h("div", { class: "help", hidden: true, text: `Up to ${MAX_TASKS} tasks at once: each streams over `
    + "its own connection, and browsers open few per server." });
  const picker = taskPicker(ctx, (name) => {
    if (!state.selected.includes(name) && state.selected.length < MAX_TASKS) state.selected.push(name);
    renderChips();
    refreshInfo();
  });
  const prompt = h("textarea", { id: "pg-prompt", rows: 5, class: "prompt", value: state.prompt,
    "aria-label": "Prompt", placeholder: "Type a prompt…" });
  prompt.addEventListener("input", () => { state.prompt = prompt.value; });
  const runBtn = h("button", { type: "submit", class: "btn btn-primary", id: "run" }, "Run");
  const stopBtn = button("Stop", () => running?.abort(), { id: "stop", disabled: true });
  const outputs = h("div", { class: "outputs", id: "outputs" });
  const summary = h("div", { class: "muted small", id: "run-summary" });
  const form = h("form", { class: "card setup" },
    h("div", { class: "field" }, h("label", { for: "task-picker", text: "Tasks" }), chips, picker.el, limit),
    h("div", { class: "field" }, h("label", { for: "pg-prompt", text: "Prompt" }), prompt),
    settings(),
    h("div", { class: "form-actions start" }, runBtn, stopBtn,
      h("span", { class: "muted small", text: "Ctrl+Enter" })));
  form.addEventListener("submit", (e) => { e.preventDefault(); run(); });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); }
  });
  view.append(h("div", { class: "page-head" }, h("div", {}, h("h1", { text: "Playground" }),
    h("span", { class: "muted", text: "The same prompt through different soft prompts, in one batch." }))),
  h("div", { class: "playground" }, form, h("section", { class: "results" }, summary, outputs)));

  function renderChips() {
    clear(chips, state.selected.length ? state.selected.map((name) => {
      const info = state.info.get(name);
      return h("span", { class: "chip", dataset: { task: name } }, h("span", { class: "mono", text: name }),
        info?.version ? h("span", { class: "chip-ver", text: `v${info.version}` }) : null,
        h("button", { type: "button", class: "chip-x", "aria-label": `Remove ${name}`,
          onclick: () => { state.selected = state.selected.filter((x) => x !== name); renderChips(); } }, "×"));
    }) : h("span", { class: "muted small", text: "No task picked yet: search below." }));
    picker.el.hidden = state.selected.length >= MAX_TASKS;
    limit.hidden = !picker.el.hidden;
    if (!running) renderIdle();
  }

  function renderIdle() {
    if (outputs.childElementCount && outputs.dataset.ran) return;
    clear(outputs, h("div", { class: "notice" }, h("div", { class: "notice-title", text: "Pick tasks and run" }),
      h("div", { class: "notice-body", text: "Each task's answer streams here side by side; with temperature 0 "
        + "the answers are greedy and repeatable." })));
  }

  async function refreshInfo() {
    await Promise.all(state.selected.map(async (name) => {
      if (name === ctx.health?.model) return state.info.set(name, { version: null, base: true });
      try {
        const t = await api(`/v1/tasks/${encodeURIComponent(name)}`);
        state.info.set(name, { version: t.active_version });
      } catch { state.info.delete(name); }
    }));
    renderChips();
  }

  async function run() {
    if (running || !state.selected.length) return;
    running = new AbortController();
    runBtn.disabled = true;
    stopBtn.disabled = false;
    outputs.dataset.ran = "1";
    const body = requestBody();
    const cards = state.selected.map((name) => outputCard(name, state.prompt));
    clear(outputs, cards.map((c) => c.el));
    const t0 = performance.now();
    summary.textContent = `Running ${cards.length} request${cards.length > 1 ? "s" : ""}…`;
    const ticker = setInterval(() => cards.forEach((c) => c.tick()), 250);
    // all requests leave now, before any answer is awaited: they share the engine's batch
    const results = await Promise.allSettled(cards.map((c) => c.start(body, running.signal)));
    clearInterval(ticker);
    const wall = (performance.now() - t0) / 1000;
    const tokens = cards.reduce((n, c) => n + c.tokens(), 0);
    const failed = results.filter((r) => r.status === "rejected").length;
    const plural = cards.length > 1 ? "s" : "";
    summary.textContent = `${cards.length} task${plural} · ${tokens} tokens in ${fmtSeconds(wall)}`
      + ` · ${fmtNum(tokens / wall, 1)} tok/s together${failed ? ` · ${failed} failed` : ""}`;
    running = null;
    runBtn.disabled = false;
    stopBtn.disabled = true;
    refreshInfo();
  }

  renderChips();
  refreshInfo();
  return () => picker.close();
}

function numberField(label, key, attrs) {
  const input = h("input", { type: "number", id: `pg-${key}`, value: String(state.s[key]), ...attrs });
  input.addEventListener("input", () => { state.s[key] = input.value; });
  return h("div", { class: "field" }, h("label", { for: input.id, text: label }), input);
}

function settings() {
  const eos = h("input", { type: "checkbox", id: "pg-ignore-eos", checked: Boolean(state.s.ignore_eos) });
  eos.addEventListener("change", () => { state.s.ignore_eos = eos.checked; });
  return h("fieldset", { class: "settings" }, h("legend", { text: "Sampling" }),
    numberField("Max tokens", "max_tokens", { min: 1, max: 1024 }),
    numberField("Temperature", "temperature", { min: 0, max: 2, step: 0.05 }),
    numberField("Top-p", "top_p", { min: 0.01, max: 1, step: 0.01 }),
    numberField("Top-k (0 = off)", "top_k", { min: 0, step: 1 }),
    numberField("Seed", "seed", { placeholder: "none", step: 1 }),
    h("label", { class: "check", for: "pg-ignore-eos" }, eos, "Ignore end-of-text"));
}

function requestBody() {
  const s = state.s;
  const body = { prompt: state.prompt, max_tokens: Number(s.max_tokens) || 16, temperature: Number(s.temperature) || 0,
    top_p: Number(s.top_p) || 1 };
  if (Number(s.top_k) > 0) body.top_k = Number(s.top_k);
  if (String(s.seed).trim() !== "") body.seed = Number(s.seed);
  if (s.ignore_eos) body.ignore_eos = true;
  return body;
}

function outputCard(name, prompt) {
  const text = h("span", { class: "completion" });
  const status = h("span", { class: "status status-run", text: "waiting" });
  const stats = h("div", { class: "out-stats" });
  const version = state.info.get(name)?.version;
  const el = h("article", { class: "card out", dataset: { task: name, state: "running" } },
    h("header", { class: "out-head" }, h("span", {}, h("span", { class: "mono out-name", text: name }),
      version ? h("span", { class: "chip-ver out-ver", text: ` v${version}` }) : null), status),
    h("div", { class: "out-text" }, h("span", { class: "prompt-echo", text: prompt }), text), stats);
  let t0 = 0, tFirst = null, tLast = null, n = 0, finish = null;

  function tick() {
    const now = tLast ?? performance.now();
    const rate = n > 1 && tFirst !== null ? (n - 1) / ((now - tFirst) / 1000) : null;
    clear(stats,
      stat("tokens", String(n)),
      stat("tok/s", rate ? fmtNum(rate, 1) : "–", "tps"),
      stat("TTFT", tFirst !== null ? fmtSeconds((tFirst - t0) / 1000) : "–"),
      finish ? h("span", { class: ["badge", `finish-${finish}`], dataset: { finish }, text: finish }) : null);
  }

  async function start(body, signal) {
    t0 = performance.now();
    try {
      await streamCompletion({ ...body, model: name }, { signal, onDelta: (delta, ids, reason) => {
        const now = performance.now();
        if (ids.length || delta) { if (tFirst === null) tFirst = now; tLast = now; }
        n += ids.length;
        if (delta) text.append(delta);
        if (reason) finish = reason;
        status.textContent = "streaming";
      } });
      el.dataset.state = "done";
      status.textContent = "done";
      status.className = "status status-done";
    } catch (e) {
      const stopped = e.name === "AbortError";
      el.dataset.state = stopped ? "stopped" : "error";
      status.textContent = stopped ? "stopped" : "failed";
      status.className = `status ${stopped ? "status-stop" : "status-err"}`;
      if (!stopped) el.append(h("div", { class: "form-error", role: "alert", text: e.message }));
      throw e;
    } finally {
      tick();
    }
  }

  tick();
  return { el, start, tick, tokens: () => n };
}

function stat(label, value, cls) {
  return h("span", { class: ["stat", cls] }, h("b", { text: value }), ` ${label}`);
}

/** A search box over the tasks (asks the server for 8 matches at a time, so thousands are fine). */
function taskPicker(ctx, onPick) {
  const input = h("input", { type: "search", id: "task-picker", placeholder: "Add a task…", autocomplete: "off",
    role: "combobox", "aria-expanded": "false", "aria-controls": "picker-list" });
  const list = h("ul", { class: "picker-list", id: "picker-list", role: "listbox", hidden: true });
  let ctl = null;
  let items = [];
  const close = () => { list.hidden = true; input.setAttribute("aria-expanded", "false"); ctl?.abort(); };
  const pick = (name) => { onPick(name); input.value = ""; close(); input.focus(); };
  const search = debounce(async () => {
    ctl?.abort();
    ctl = new AbortController();
    const q = input.value.trim();
    try {
      const page = await api(`/v1/tasks?${new URLSearchParams({ limit: "8", q })}`, { signal: ctl.signal });
      items = page.data.map((t) => ({ name: t.name, note: t.description || `v${t.active_version}` }));
      const base = ctx.health?.model;
      if (base && base.toLowerCase().includes(q.toLowerCase())) {
        items.push({ name: base, note: "base model, no soft prompt" });
      }
      clear(list, items.length ? items.map((it) => h("li", { role: "option", dataset: { name: it.name },
        onmousedown: (e) => { e.preventDefault(); pick(it.name); } },
      h("span", { class: "mono", text: it.name }), h("span", { class: "muted small", text: it.note })))
        : h("li", { class: "muted small empty", text: q ? `No task matches “${q}”` : "No tasks yet" }));
      list.hidden = false;
      input.setAttribute("aria-expanded", "true");
    } catch (e) {
      if (e.name !== "AbortError") clear(list, h("li", { class: "bad small", text: e.message }));
    }
  }, 120);
  input.addEventListener("input", search);
  input.addEventListener("focus", search);
  input.addEventListener("blur", () => setTimeout(close, 100));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); if (items[0] && !list.hidden) pick(items[0].name); }
    if (e.key === "Escape") close();
  });
  return { el: h("div", { class: "picker" }, input, list), close };
}
