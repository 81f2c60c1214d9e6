// Tasks: a searchable list paged by the server (one page of rows per request, however many tasks
// there are), and one task's page: its versions, activate (roll back or forward), upload, delete.

import { api } from "./api.js";
import { ago, button, clear, debounce, fmtInt, h, notice, toast } from "./dom.js";
import { createDialog, deleteDialog, uploadDialog } from "./task_dialogs.js";
import { versionsTable } from "./versions.js";

export const PAGE_SIZE = 50;
const state = { q: "", offset: 0 };  // kept across visits: back from a task returns to the same page

export function mount(view, ctx, { rest }) {
  return rest.length && rest[0] ? mountTask(view, ctx, rest[0]) : mountList(view, ctx);
}

function mountList(view, ctx) {
  let ctl = null;
  const search = h("input", { type: "search", class: "search", id: "task-search",
    placeholder: "Search name or description",
    value: state.q, "aria-label": "Search tasks", autocomplete: "off" });
  const count = h("span", { class: "muted", id: "task-count" });
  const body = h("div", { class: "table-wrap" });
  const pager = h("div", { class: "pager" });
  const header = h("div", { class: "page-head" },
    h("div", {}, h("h1", { text: "Tasks" }), count),
    h("div", { class: "page-actions" },
      ctx.isAdmin ? button("New task", () => createDialog(ctx), { kind: "primary", id: "new-task" }) : null));
  view.append(header, h("div", { class: "card" }, h("div", { class: "toolbar" }, search), body, pager));

  async function load() {
    ctl?.abort();
    ctl = new AbortController();
    body.classList.add("busy");
    const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.offset) });
    if (state.q) params.set("q", state.q);
    try {
      const page = await api(`/v1/tasks?${params}`, { signal: ctl.signal });
      if (page.data.length === 0 && state.offset > 0 && page.total > 0) {  // the page emptied (deletions)
        state.offset = Math.max(0, Math.floor((page.total - 1) / PAGE_SIZE) * PAGE_SIZE);
        return load();
      }
      render(page);
    } catch (e) {
      if (e.name === "AbortError") return;
      clear(body, notice({ kind: "error", title: "Could not load the tasks", body: e.message,
        actions: [button("Retry", load, { kind: "primary" })] }));
      clear(pager);
    } finally {
      body.classList.remove("busy");
    }
  }

  function render(page) {
    count.textContent = state.q ? `${fmtInt(page.total)} matching “${state.q}”` : `${fmtInt(page.total)} tasks`;
    if (!page.data.length) {
      clear(body, state.q
        ? notice({ title: `No task matches “${state.q}”`, body: "Search looks in names and descriptions, any case.",
          actions: [button("Clear search", () => { search.value = ""; state.q = ""; state.offset = 0; load(); })] })
        : notice({ title: "No tasks yet", body: ctx.isAdmin
          ? ["Create one here and upload a PEFT prompt-tuning adapter to it, or train one with ",
            h("code", { text: "polyprompt train" }), "."]
          : "An admin creates tasks; they appear here as soon as they exist.",
        actions: ctx.isAdmin ? [button("New task", () => createDialog(ctx), { kind: "primary" })] : [] }));
      clear(pager);
      return;
    }
    const rows = page.data.map((t) => h("tr", { class: "row-link", dataset: { task: t.name }, tabindex: 0,
      onclick: () => { location.hash = `#/tasks/${encodeURIComponent(t.name)}`; },
      onkeydown: (e) => { if (e.key === "Enter") location.hash = `#/tasks/${encodeURIComponent(t.name)}`; } },
    h("td", {}, h("a", { class: "task-name", href: `#/tasks/${encodeURIComponent(t.name)}`, text: t.name })),
    h("td", { class: "desc", title: t.description, text: t.description || "—" }),
    h("td", { class: "num" }, t.active_version
      ? h("span", { class: "badge badge-active", text: `v${t.active_version}` })
      : h("span", { class: "badge", text: "none" })),
    h("td", { class: "num", text: String(t.versions.length) }),
    h("td", { class: "num mono", text: `${t.num_virtual_tokens} × ${t.hidden_size}` }),
    h("td", { class: "num" }, ago(t.updated_at))));
    clear(body, h("table", { class: "table", id: "task-table" },
      h("thead", {}, h("tr", {}, h("th", { text: "Name" }), h("th", { text: "Description" }),
        h("th", { class: "num", text: "Active" }), h("th", { class: "num", text: "Versions" }),
        h("th", { class: "num", text: "Shape" }), h("th", { class: "num", text: "Updated" }))),
      h("tbody", {}, rows)));
    const from = page.offset + 1, to = page.offset + page.data.length;
    const pages = Math.ceil(page.total / PAGE_SIZE);
    const at = Math.floor(page.offset / PAGE_SIZE) + 1;
    clear(pager,
      h("span", { class: "muted", id: "page-info", text: `${fmtInt(from)}–${fmtInt(to)} of ${fmtInt(page.total)}` }),
      h("span", { class: "pager-buttons" },
        pages > 1 ? h("span", { class: "muted small", text: `page ${fmtInt(at)} of ${fmtInt(pages)}` })
          : null,
        button("← Previous", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); load(); },
          { disabled: page.offset === 0, id: "prev-page" }),
        button("Next →", () => { state.offset += PAGE_SIZE; load(); },
          { disabled: !page.has_more, id: "next-page" })));
    if (!window.__ppFirstRows) {  // for the browser test: when rows were first on screen
      window.__ppFirstRows = performance.now();
      performance.mark("pp-first-rows");
    }
  }

  search.addEventListener("input", debounce(() => { state.q = search.value.trim(); state.offset = 0; load(); }, 180));
  load();
  return () => ctl?.abort();
}

function mountTask(view, ctx, name) {
  let ctl = new AbortController();
  const crumbs = h("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
    h("a", { href: "#/tasks", text: "Tasks" }), h("span", { text: "/" }), h("span", { text: name }));
  const box = h("div", {}, h("div", { class: "loading", text: "Loading…" }));
  view.append(crumbs, box);

  async function load() {
    ctl.abort();
    ctl = new AbortController();
    try {
      render(await api(`/v1/tasks/${encodeURIComponent(name)}`, { signal: ctl.signal }));
    } catch (e) {
      if (e.name === "AbortError") return;
      clear(box, e.status === 404
        ? notice({ title: `There is no task “${name}”`, body: "It may have been deleted.",
          actions: [button("All tasks", () => { location.hash = "#/tasks"; })] })
        : notice({ kind: "error", title: "Could not load the task", body: e.message,
          actions: [button("Retry", load, { kind: "primary" })] }));
    }
  }

  async function activate(version) {
    try {
      await api(`/v1/tasks/${encodeURIComponent(name)}/activate`, { method: "POST", json: { version } });
      toast(`v${version} of ${name} is active for new requests`);
    } catch (e) {
      toast(`Could not activate v${version}: ${e.message}`, "error");
    }
    load();
  }

  function render(t) {
    const active = t.versions.find((v) => v.is_active);
    const admin = ctx.isAdmin ? [
      button("Upload adapter", async () => { if (await uploadDialog(name)) load(); },
        { id: "upload", kind: "secondary" }),
      button("Delete", () => deleteDialog(name), { id: "delete-task", kind: "danger" }),
    ] : [];
    clear(box,
      h("div", { class: "page-head" },
        h("div", {}, h("h1", { class: "mono-title", text: t.name }),
          h("p", { class: "muted lede", text: t.description || "No description." })),
        h("div", { class: "page-actions" },
          button("Open in playground", () => { location.hash = `#/playground?tasks=${encodeURIComponent(name)}`; },
            { id: "to-playground" }), ...admin)),
      h("div", { class: "facts" },
        fact("Active version", active ? `v${active.version}` : "none", "fact-active"),
        fact("Virtual tokens", `${t.num_virtual_tokens} × ${t.hidden_size}`),
        fact("Base model", t.base_model),
        fact("Created", ago(t.created_at)),
        fact("Updated", ago(t.updated_at))),
      h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", { text: "Versions" }),
        h("span", { class: "muted small", text: ctx.isAdmin
          ? "Activating a version serves it to new requests at once; requests already running finish on theirs."
          : "Only the admin key can activate versions." })),
      versionsTable(t, { admin: ctx.isAdmin, activate })));
  }

  load();
  return () => ctl.abort();
}

function fact(label, value, id) {
  return h("div", { class: "fact", id }, h("div", { class: "fact-label", text: label }),
    h("div", { class: "fact-value" }, value));
}
