// Building the page. Data is only ever written as text (textContent, attribute values), never parsed as HTML:
// a run name or an error from a teacher is any text.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

export function fmt(v, digits = 3) {
  const x = num(v);
  if (x === null) return "—";
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

export const pct = (v) => (num(v) === null ? "—" : `${(100 * v).toFixed(1)}%`);

export function age(seconds) {
  const s = num(seconds);
  if (s === null) return "—";
  if (s < 60) return `${Math.max(0, Math.round(s))}s`;
  if (s < 3600) return `${Math.round(s / 60)}m`;
  if (s < 86400) return `${(s / 3600).toFixed(1)}h`;
  return `${(s / 86400).toFixed(1)}d`;
}

export const when = (t) => (num(t) === null ? "—" : new Date(t * 1000).toLocaleString());

export function statusBadge(status) {
  return h("span", { class: `status status-${status}`, "data-status": status, text: status });
}

// rows: [[label, value], ...] as a two-column table.
export function kvTable(rows, attrs = {}) {
  return h("table", { class: "kv", ...attrs },
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", { text: k }), h("td", {}, v)))));
}

export function teacherLabel(t) {
  if (!t) return "—";
  if (t.teacher_id) return `attached ${t.teacher_id}`;
  return t.url ? `${t.kind} ${t.url}` : t.kind || "—";
}

// js-yaml (vendored), loaded when a page first needs it (start a run, a run's config), not on every page load.
let yamlLoading = null;
export function yamlLib() {
  if (window.jsyaml) return Promise.resolve(window.jsyaml);
  yamlLoading = yamlLoading || new Promise((resolve, reject) => {
    document.head.append(h("script", {
      src: "vendor/js-yaml.min.js",
      onload: () => resolve(window.jsyaml),
      onerror: () => { yamlLoading = null; reject(new Error("cannot load vendor/js-yaml.min.js")); },
    }));
  });
  return yamlLoading;
}
