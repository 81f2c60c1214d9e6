// The server's HTTP API as the console uses it: the stored key as a Bearer token, errors in the
// server's OpenAI shape turned into ApiError, and completions streamed as server-sent events.

const KEY = "polyprompt.console.key";
export const root = document.documentElement.dataset.root || "";
export const userKeyRequired = document.documentElement.dataset.userKey === "required";
export const adminKeyRequired = document.documentElement.dataset.adminKey === "required";

export const getKey = () => sessionStorage.getItem(KEY) || "";
export function setKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(key, extra = {}) {
  const k = key ?? getKey();
  return k ? { ...extra, Authorization: `Bearer ${k}` } : extra;
}

async function failure(r, announce = true) {
  let message = `${r.status} ${r.statusText}`;
  let code = null;
  try {
    const body = await r.json();
    if (body && body.error) ({ message, code } = body.error);
  } catch { /* not JSON: keep the status line */ }
  if (r.status === 401 && announce) window.dispatchEvent(new CustomEvent("pp-auth-lost", { detail: message }));
  return new ApiError(r.status, message, code);
}

/** JSON in, JSON out; `form` sends multipart; `key` overrides the stored key; a 401 announces that
 * the key is no longer accepted (`pp-auth-lost`) unless `probe` (checking a key the user typed). */
export async function api(path, { method = "GET", json, form, signal, key, probe = false } = {}) {
  const init = { method, signal, headers: headers(key) };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form) {
    init.body = form;
  }
  let r;
  try {
    r = await fetch(root + path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "the server cannot be reached");
  }
  if (!r.ok) throw await failure(r, !probe);
  if (r.status === 204) return null;
  return r.json();
}

export const metricsText = async (signal) => {
  const r = await fetch(`${root}/metrics`, { signal, cache: "no-store" });
  if (!r.ok) throw await failure(r);
  return r.text();
};

/** Parse a `text/event-stream` body into the `data` of each event, as it arrives. */
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

/**
 * POST /v1/completions with `stream: true`; calls `onDelta(text, tokenIds, finishReason)` per chunk and
 * returns `{usage}` at the end. An error sent in-band after the 200 is thrown as an ApiError.
 */
export async function streamCompletion(body, { signal, onDelta }) {
  let r;
  try {
    r = await fetch(`${root}/v1/completions`, {
      method: "POST", signal, headers: headers(null, { "Content-Type": "application/json" }),
      body: JSON.stringify({ ...body, stream: true, return_token_ids: true, stream_options: { include_usage: true } }),
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "the server cannot be reached");
  }
  if (!r.ok) throw await failure(r);
  let usage = null;
  for await (const data of sseData(r.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code);
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices || []) onDelta(c.text || "", c.token_ids || [], c.finish_reason);
  }
  return { usage };
}
