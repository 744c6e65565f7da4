// Teachers: the attached ones (POST /v1/teachers, with their compatibility check) and every teacher runs use, with
// each run's view of it (breaker, live replicas, latency, tokens scored), from the runs' last train records.
import { api } from "./api.js";
import { fmt, h, statusBadge, teacherLabel, when } from "./dom.js";

const REFRESH_MS = 5000;

function usageRow(run) {
  const m = run.latest_metrics || {};
  return h("tr", { "data-run": run.id },
    h("td", {}, h("a", { href: `#/run/${encodeURIComponent(run.id)}`, text: run.name })),
    h("td", {}, statusBadge(run.status)),
    h("td", { text: m.teacher_breaker ?? "—" }),
    h("td", { class: "n", text: fmt(m.teacher_replicas_live) }),
    h("td", { class: "n", text: fmt(m.teacher_latency_p50_s) }),
    h("td", { class: "n", text: fmt(m.teacher_latency_p95_s) }),
    h("td", { class: "n", text: fmt(m.teacher_retries) }),
    h("td", { class: "n", text: fmt(m.teacher_requests) }),
    h("td", { class: "n", text: fmt(m.teacher_tokens_scored) }));
}

export function teachersView(root) {
  const attached = h("div", { id: "attached-teachers" });
  const inUse = h("div", { id: "teachers-in-use" });
  root.replaceChildren(h("section", {},
    h("h2", {}, "Teachers"),
    h("div", { class: "card" }, h("h3", {}, "Attached"), attached),
    h("div", { class: "card" }, h("h3", {}, "Used by runs"),
      h("p", { class: "muted" }, "Each run's teacher client as of its last step: circuit breaker, live replicas, "
        + "latency (seconds, p50/p95), retries, requests and tokens scored so far."), inUse)));

  async function refresh() {
    const [teachers, runs] = await Promise.all([api("/v1/teachers"), api("/v1/runs?limit=200")]);
    attached.replaceChildren(teachers.teachers.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["id", "kind", "url", "check", "key from", "attached"].map((t) => h("th", { text: t })))),
      h("tbody", {}, teachers.teachers.map((t) => h("tr", { "data-teacher": t.id },
        h("td", { text: t.id }), h("td", { text: t.kind }), h("td", { text: t.url }),
        h("td", { title: t.report }, h("span", { class: `status status-${t.ok ? "finished" : "failed"}`,
          text: t.ok ? "pass" : "fail" })),
        h("td", { text: t.api_key_env || "—" }), h("td", { text: when(t.created) })))))
      : h("p", { class: "muted", text: "none attached (POST /v1/teachers)" }));
    const groups = new Map();
    for (const r of runs.runs) {
      const key = teacherLabel(r.teacher);
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(r);
    }
    inUse.replaceChildren(...[...groups].map(([label, rs]) => h("div", { class: "teacher-group" },
      h("h4", { text: label }),
      h("table", {}, h("thead", {}, h("tr", {}, ["run", "status", "breaker", "replicas live", "p50", "p95", "retries",
        "requests", "tokens scored"].map((t) => h("th", { text: t })))),
      h("tbody", {}, rs.map(usageRow))))));
    if (!groups.size) inUse.replaceChildren(h("p", { class: "muted", text: "no runs yet" }));
  }

  let timer = null, stopped = false;
  const loop = async () => {
    try { await refresh(); } catch (err) { window.dispatchEvent(new CustomEvent("api-error", { detail: err })); return; }
    if (!stopped) timer = setTimeout(loop, REFRESH_MS);
  };
  loop();
  return () => { stopped = true; clearTimeout(timer); };
}
