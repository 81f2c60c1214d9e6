// The console's shell: who is signed in (and as what), the server line, the live strip, and a hash
// router over the three pages. Pages export mount(view, ctx, params) and return their cleanup.

import { ApiError, adminKeyRequired, api, getKey, setKey, userKeyRequired } from "./api.js";
import { button, clear, fmtInt, fmtNum, h, modal } from "./dom.js";
import * as live from "./live.js";
import * as metrics from "./metrics.js";
import * as playground from "./playground.js";
import * as tasks from "./tasks.js";

const PAGES = { tasks, playground, metrics };
const view = document.getElementById("view");
const ctx = {
  role: null,          // "admin" | "user" once the key (or no key) is accepted
  health: null,        // GET /health: model, device, dtype, tasks
  get isAdmin() { return this.role === "admin"; },
  refreshHealth,
};
let cleanup = null;

async function roleFor(key) {
  return (await api("/v1/auth", { key, probe: true })).role;
}

/** The key form; resolves once a key is accepted. `inline` fills the page (no access without one). */
function keyForm({ reason, onDone, cancel }) {
  const input = h("input", { type: "password", id: "api-key", name: "api-key", autocomplete: "current-password",
    placeholder: "Bearer key", required: true, "aria-describedby": "key-help" });
  const err = h("div", { class: "form-error", role: "alert", hidden: true });
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Sign in");
  const form = h("form", { class: "form key-form", novalidate: true },
    h("p", { class: "muted", id: "key-help" }, reason),
    h("label", { for: "api-key" }, "API key"), input, err,
    h("div", { class: "form-actions" }, cancel ? button("Cancel", cancel) : null, submit));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) { err.textContent = "Enter a key."; err.hidden = false; return; }
    submit.disabled = true;
    try {
      const role = await roleFor(key);
      setKey(key);
      onDone(role);
    } catch (ex) {
      err.textContent = ex instanceof ApiError && ex.status === 401
        ? "This key is not accepted by the server." : `Could not check the key: ${ex.message}`;
      err.hidden = false;
      input.select();
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

function signInPage(reason) {
  if (cleanup) { cleanup(); cleanup = null; }
  ctx.role = null;
  renderWho();
  clear(view, h("section", { class: "signin" },
    h("div", { class: "card signin-card" }, h("h1", { text: "Sign in" }),
      keyForm({ reason, onDone: (role) => { ctx.role = role; renderWho(); route(); } }))));
  view.querySelector("input")?.focus();
}

async function elevate() {
  const role = await modal("Use a different key", (close) => keyForm({
    reason: "Admin actions (create, upload, activate, delete) need the admin key.",
    onDone: close, cancel: () => close(null),
  }));
  if (role) { ctx.role = role; renderWho(); route(); }
}

function renderWho() {
  const who = document.getElementById("who");
  document.body.classList.toggle("locked", !ctx.role);
  if (!ctx.role) return clear(who);
  const keyed = Boolean(getKey());
  const label = ctx.role === "admin" ? (keyed ? "admin key" : "no keys set") : (keyed ? "user key" : "no key");
  clear(who,
    h("div", { class: "who-line", title: ctx.role === "admin" ? "may change tasks" : "may read and generate" },
      h("span", { class: ["role", `role-${ctx.role}`], dataset: { role: ctx.role } }, ctx.role),
      h("span", { class: "muted small", text: label })),
    h("div", { class: "who-actions" },
      ctx.role !== "admin" && adminKeyRequired
        ? button("Use admin key", elevate, { kind: "ghost", id: "elevate" }) : null,
      keyed ? button("Sign out", () => { setKey(""); location.hash = "#/tasks"; boot(); },
        { kind: "ghost", id: "sign-out" })
        : null));
}

async function refreshHealth() {
  const box = document.getElementById("server-info");
  try {
    ctx.health = await api("/health");
    clear(box,
      h("div", { class: "server-model", title: "base model", text: ctx.health.model }),
      h("div", { class: "muted small" }, `${ctx.health.device} · ${ctx.health.dtype} · `,
        h("span", { id: "task-total", text: `${ctx.health.tasks} tasks` })));
  } catch (e) {
    clear(box, h("div", { class: "bad small", text: `server unreachable: ${e.message}` }));
  }
  return ctx.health;
}

function renderLive() {
  const box = document.getElementById("live");
  const g = live.latest()?.gauges;
  if (live.error()) return clear(box, h("span", { class: "dot dot-bad" }), "metrics unavailable");
  if (!g) return clear(box, h("span", { class: "dot" }), "connecting…");
  const p = live.recent(5).points.at(-1);  // rates need two scrapes
  const running = g.running_batch_size ?? 0;
  clear(box, h("span", { class: ["dot", running ? "dot-busy" : "dot-ok"] }),
    h("span", {}, h("b", { text: p ? fmtNum(p.genTps ?? 0, 1) : "–" }), " tok/s"),
    h("span", {}, h("b", { text: String(running) }), " running"),
    h("span", {}, h("b", { text: String(g.queue_depth ?? 0) }), " queued"));
  const count = document.getElementById("task-total");
  if (count && g.tasks !== undefined) count.textContent = `${fmtInt(g.tasks)} task${g.tasks === 1 ? "" : "s"}`;
}

function parseHash() {
  const [path, query = ""] = (location.hash.replace(/^#\/?/, "") || "tasks").split("?");
  const [page, ...rest] = path.split("/");
  return { page: PAGES[page] ? page : "tasks", rest: rest.map(decodeURIComponent), query: new URLSearchParams(query) };
}

function route() {
  if (!ctx.role) return;
  const { page, rest, query } = parseHash();
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (cleanup) { cleanup(); cleanup = null; }
  clear(view);
  document.title = `${page[0].toUpperCase()}${page.slice(1)} · polyprompt`;
  cleanup = PAGES[page].mount(view, ctx, { rest, query }) || null;
  view.focus({ preventScroll: true });
}

async function boot() {
  const key = getKey();
  if (!key && userKeyRequired) {
    return signInPage("This server needs an API key. The console keeps it for this tab only.");
  }
  try {
    ctx.role = await roleFor(key);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      setKey("");
      return signInPage("The stored key is no longer accepted. Enter a current one.");
    }
    clear(view, h("div", { class: "notice notice-error" }, `The server cannot be reached: ${e.message}`,
      h("div", { class: "notice-actions" }, button("Retry", boot, { kind: "primary" }))));
    return;
  }
  renderWho();
  route();
}

window.addEventListener("hashchange", route);
window.addEventListener("pp-auth-lost", (e) => {
  if (!ctx.role) return;
  setKey("");
  signInPage(`The server refused the key (${e.detail || "401"}). Sign in again.`);
});
live.subscribe(renderLive);
live.start();
refreshHealth();
boot();
