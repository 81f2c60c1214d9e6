// A task's versions, newest first: source, shape, sha, creation time, and the training metrics the
// training script keeps in each version's meta (train/eval loss, accuracy, epochs, history).

import { ago, button, copyable, fmtInt, h } from "./dom.js";
import { sparkline } from "./chart.js";

const SOURCES = { train: "trained", upload: "uploaded", bulk: "imported" };
const num = (v) => typeof v === "number" && Number.isFinite(v);
const loss = (v) => (num(v) ? v.toFixed(3) : "–");

function sourceLabel(v) {
  if (v.source.startsWith("init:")) return `initial (${v.source.slice(5)})`;
  return SOURCES[v.source] || v.source;
}

/** The training metrics in `meta` as a few readable lines (nothing for versions that were not trained). */
function training(meta) {
  const parts = [];
  if (num(meta.train_loss)) {
    parts.push(h("div", {}, h("span", { class: "muted", text: "train " }),
      num(meta.train_loss_start) ? `${loss(meta.train_loss_start)} → ${loss(meta.train_loss)}`
        : loss(meta.train_loss)));
  }
  if (num(meta.eval_loss)) {
    parts.push(h("div", {}, h("span", { class: "muted", text: "eval " }),
      num(meta.initial_eval_loss) ? `${loss(meta.initial_eval_loss)} → ${loss(meta.eval_loss)}`
        : loss(meta.eval_loss),
      num(meta.eval_accuracy)
        ? h("span", { class: "muted", text: ` · acc ${(meta.eval_accuracy * 100).toFixed(1)}%` }) : null));
  }
  const facts = [];
  if (num(meta.epochs)) facts.push(`${meta.epochs} epochs${num(meta.best_epoch) ? `, best ${meta.best_epoch}` : ""}`);
  if (num(meta.train_examples)) facts.push(`${fmtInt(meta.train_examples)} examples`);
  if (facts.length) parts.push(h("div", { class: "muted small", text: facts.join(" · ") }));
  const hist = Array.isArray(meta.history) ? meta.history.filter((r) => r && typeof r === "object") : [];
  if (hist.length > 1) {
    const key = hist.some((r) => num(r.eval_loss)) ? "eval_loss" : "train_loss";
    parts.push(h("div", { class: "spark-line" }, sparkline(hist.map((r) => r[key]), { label: `${key} per epoch` }),
      h("span", { class: "muted small", text: `${key.replace("_", " ")} / epoch` })));
  }
  if (!parts.length && meta.init) {
    const text = meta.init_text ? `from text “${meta.init_text}”` : `${meta.init} init`;
    parts.push(h("span", { class: "muted", text }));
  }
  if (!parts.length && meta.peft_config && typeof meta.peft_config === "object") {
    const base = meta.peft_config.base_model_name_or_path;
    parts.push(h("span", { class: "muted", text: base ? `PEFT adapter for ${base}` : "PEFT adapter" }));
  }
  return parts.length ? parts : [h("span", { class: "muted", text: "–" })];
}

function metaDetails(meta) {
  const keys = Object.keys(meta || {});
  if (!keys.length) return null;
  return h("details", { class: "meta" }, h("summary", { text: `meta (${keys.length} keys)` }),
    h("pre", { class: "mono", text: JSON.stringify(meta, null, 2) }));
}

export function versionsTable(task, { admin, activate }) {
  const versions = [...task.versions].sort((a, b) => b.version - a.version);
  if (!versions.length) {
    return h("p", { class: "muted pad", text: "This task has no versions yet: upload an adapter." });
  }
  const rows = versions.map((v) => h("tr", { class: v.is_active ? "row-active" : "", dataset: { version: v.version } },
    h("td", {}, h("div", { class: "ver" }, h("b", { text: `v${v.version}` }),
      v.is_active ? h("span", { class: "badge badge-active", text: "active" }) : null)),
    h("td", { text: sourceLabel(v) }),
    h("td", { class: "mono", text: `${v.num_virtual_tokens} × ${v.hidden_size}` }),
    h("td", {}, copyable(v.sha256, v.sha256.slice(0, 12))),
    h("td", {}, ago(v.created_at)),
    h("td", { class: "training" }, training(v.meta || {}), metaDetails(v.meta)),
    h("td", { class: "num" }, v.is_active ? h("span", { class: "muted small", text: "serving" })
      : admin ? button(v.version < (task.active_version || 0) ? "Roll back" : "Activate", () => activate(v.version),
        { class: "btn btn-secondary btn-small", dataset: { activate: v.version } }) : null)));
  return h("div", { class: "table-wrap" }, h("table", { class: "table versions", id: "versions" },
    h("thead", {}, h("tr", {}, ["Version", "Source", "Shape", "SHA-256", "Created", "Training", ""]
      .map((t, i) => h("th", { class: i === 6 ? "num" : null, text: t })))),
    h("tbody", {}, rows)));
}
