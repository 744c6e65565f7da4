// The REST API with the bearer token the user entered: kept in sessionStorage (this tab only), sent as an
// Authorization header on every call, never a cookie (so no request is authorised by the browser on its own).
const TOKEN_KEY = "onpolicy.token";

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const setToken = (t) => sessionStorage.setItem(TOKEN_KEY, t);
export const clearToken = () => sessionStorage.removeItem(TOKEN_KEY);

function headers(extra = {}) {
  const t = token();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

// FastAPI's `detail` is a string, or a list of {path, msg} for a body that fails validation.
export function detailText(body) {
  const d = body && body.detail;
  if (Array.isArray(d)) return d.map((e) => (e.path ? `${e.path}: ${e.msg}` : e.msg || JSON.stringify(e))).join("; ");
  return typeof d === "string" ? d : JSON.stringify(body);
}

async function failure(r) {
  let body = null;
  try { body = await r.json(); } catch { /* not JSON */ }
  const text = body ? detailText(body) : `${r.status} ${r.statusText}`;
  if (r.status === 401) return new AuthError(`the API refused the token: ${text}`);
  return new ApiError(r.status, `${r.status}: ${text}`);
}

// `json` is sent as the JSON body; returns the parsed answer (null for 204).
export async function api(path, { method = "GET", json, signal } = {}) {
  const init = { method, signal, credentials: "omit", cache: "no-store",
                 headers: headers(json === undefined ? {} : { "Content-Type": "application/json" }) };
  if (json !== undefined) init.body = JSON.stringify(json);
  const r = await fetch(path, init);
  if (!r.ok) throw await failure(r);
  return r.status === 204 ? null : r.json();
}

// Server-sent events over fetch (EventSource cannot send an Authorization header). Calls onEvent(name, data)
// for each event until the server ends the stream (a terminal status) or `signal` aborts it.
export async function streamEvents(path, onEvent, signal) {
  const r = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal, credentials: "omit",
                                cache: "no-store" });
  if (!r.ok) throw await failure(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) {
        let parsed;
        try { parsed = JSON.parse(data.join("\n")); } catch { continue; }
        onEvent(name, parsed);
      }
    }
  }
}
