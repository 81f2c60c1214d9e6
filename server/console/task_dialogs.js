// The admin dialogs of the Tasks page: create a task, upload a PEFT adapter folder's two files, delete.

import { api } from "./api.js";
import { button, fmtBytes, h, modal, toast } from "./dom.js";

const WEIGHTS = "adapter_model.safetensors";
const CONFIG = "adapter_config.json";

function field(label, input, help) {
  return h("div", { class: "field" }, h("label", { for: input.id, text: label }), input,
    help ? h("div", { class: "help", text: help }) : null);
}

function errorBox() {
  return h("div", { class: "form-error", role: "alert", hidden: true });
}

function showError(box, message) {
  box.textContent = message;
  box.hidden = false;
}

export function createDialog() {
  return modal("New task", (close) => {
    const name = h("input", { id: "new-name", name: "name", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,63}",
      maxlength: 64, autocomplete: "off", spellcheck: "false", placeholder: "e.g. sentiment-en" });
    const desc = h("input", { id: "new-desc", name: "description", maxlength: 4096,
      placeholder: "What the task is for" });
    const n = h("input", { id: "new-n", name: "num_virtual_tokens", type: "number", min: 1, max: 512, value: "20" });
    const init = h("select", { id: "new-init", name: "init" },
      h("option", { value: "random", text: "random" }), h("option", { value: "vocab", text: "vocabulary rows" }),
      h("option", { value: "text", text: "from text" }));
    const text = h("textarea", { id: "new-init-text", name: "init_text", rows: 2,
      placeholder: "Classify the sentiment:" });
    const textField = field("Initial text", text, "Its tokens' embeddings start the soft prompt.");
    textField.hidden = true;
    init.addEventListener("change", () => { textField.hidden = init.value !== "text"; });
    const err = errorBox();
    const submit = h("button", { type: "submit", class: "btn btn-primary", id: "create-submit" }, "Create task");
    const form = h("form", { class: "form", novalidate: true },
      field("Name", name, "1–64 of a–z 0–9 . _ -, starting with a letter or digit. Used as the model id."),
      field("Description", desc),
      h("div", { class: "field-row" }, field("Virtual tokens", n), field("Initial prompt", init)),
      textField, err,
      h("div", { class: "form-actions" }, button("Cancel", () => close(null)), submit));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!name.checkValidity()) {
        return showError(err, "Use 1–64 characters of a–z 0–9 . _ -, starting with a letter or digit.");
      }
      const body = { name: name.value, description: desc.value, num_virtual_tokens: Number(n.value), init: init.value };
      if (init.value === "text") body.init_text = text.value;
      submit.disabled = true;
      try {
        const task = await api("/v1/tasks", { method: "POST", json: body });
        close(task);
        toast(`Created ${task.name}: v1 is servable now`);
        location.hash = `#/tasks/${encodeURIComponent(task.name)}`;
      } catch (ex) {
        showError(err, ex.message);
      } finally {
        submit.disabled = false;
      }
    });
    return form;
  });
}

/** Upload `adapter_model.safetensors` (+ optional `adapter_config.json`) as the next version. */
export function uploadDialog(name) {
  return modal(`Upload an adapter to ${name}`, (close) => {
    let files = new Map();
    const input = h("input", { type: "file", id: "adapter-files", multiple: true, accept: ".safetensors,.json",
      class: "file-input" });
    const list = h("ul", { class: "file-list" });
    const err = errorBox();
    const submit = h("button", { type: "submit", class: "btn btn-primary", id: "upload-submit", disabled: true },
      "Upload and activate");
    const drop = h("label", { class: "drop", for: "adapter-files" },
      h("b", { text: "Choose or drop the adapter folder's files" }),
      h("span", { class: "muted small",
        text: `${WEIGHTS} (required) and ${CONFIG}, as saved by PEFT's save_pretrained` }),
      input);
    const pick = (chosen) => {
      files = new Map([...chosen].filter((f) => f.name === WEIGHTS || f.name === CONFIG).map((f) => [f.name, f]));
      const others = [...chosen].filter((f) => !files.has(f.name)).map((f) => f.name);
      list.replaceChildren(...[WEIGHTS, CONFIG].map((fname) => h("li", { class: files.has(fname) ? "ok" : "missing" },
        h("span", { class: "mono", text: fname }),
        h("span", { class: "muted small", text: files.has(fname) ? fmtBytes(files.get(fname).size)
          : fname === WEIGHTS ? "missing" : "optional" }))));
      err.hidden = true;
      if (others.length) showError(err, `Ignored: ${others.join(", ")} (pickled .bin files are refused by the server)`);
      submit.disabled = !files.has(WEIGHTS);
    };
    input.addEventListener("change", () => pick(input.files));
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("drag"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("drag"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("drag");
      pick(e.dataTransfer.files);
    });
    pick([]);
    const form = h("form", { class: "form" }, drop, list, err,
      h("div", { class: "form-actions" }, button("Cancel", () => close(null)), submit));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const data = new FormData();
      for (const [fname, f] of files) data.append(fname, f, fname);
      submit.disabled = true;
      try {
        const v = await api(`/v1/tasks/${encodeURIComponent(name)}/prompt`, { method: "POST", form: data });
        close(v);
        toast(`Uploaded v${v.version} (${v.num_virtual_tokens} × ${v.hidden_size}); active now`);
      } catch (ex) {
        showError(err, ex.message);
        submit.disabled = false;
      }
    });
    return form;
  }, { wide: true });
}

export function deleteDialog(name) {
  return modal(`Delete ${name}?`, (close) => {
    const err = errorBox();
    const yes = h("button", { type: "button", class: "btn btn-danger", id: "confirm-delete" }, `Delete ${name}`);
    yes.addEventListener("click", async () => {
      yes.disabled = true;
      try {
        await api(`/v1/tasks/${encodeURIComponent(name)}`, { method: "DELETE" });
        close(true);
        toast(`Deleted ${name}`);
        location.hash = "#/tasks";
      } catch (ex) {
        showError(err, ex.message);
        yes.disabled = false;
      }
    });
    return h("div", { class: "form" },
      h("p", {}, "The task and all its versions leave the registry. ",
        "Requests already running finish; new ones get 404. ",
        "Its prompt files stay on disk."), err,
      h("div", { class: "form-actions" }, button("Cancel", () => close(null)), yes));
  });
}
