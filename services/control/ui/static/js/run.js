// A run's page: live curves over the run's event stream, its status and fault history, the before/after table,
// the teacher's health, its config, and stop / pause / resume / delete.
import { api, AuthError, streamEvents } from "./api.js";
import { LineChart } from "./chart.js";
import { fmt, h, kvTable, num, pct, statusBadge, teacherLabel, when, yamlLib } from "./dom.js";

const TERMINAL = new Set(["finished", "failed", "stopped", "paused"]);
const HISTORY_ROWS = 200; // the newest status changes and faults shown
const POLL_MS = 3000; // the run's record, while no stream is open (a terminal run that may be resumed)
const EVAL_KEYS = [["heldout_reverse_kl", "held-out reverse KL"], ["heldout_accuracy", "held-out exact match"],
                   ["ood_reverse_kl", "longer-problems reverse KL"], ["ood_accuracy", "longer-problems exact match"]];

function makeCharts() {
  return [
    new LineChart("Held-out reverse KL", [["heldout_reverse_kl", "held-out"], ["ood_reverse_kl", "longer problems"]],
      { kinds: ["eval"] }),
    new LineChart("Exact match", [["heldout_accuracy", "held-out"], ["ood_accuracy", "longer problems"]],
      { kinds: ["eval"] }),
    new LineChart("Teacher KL", [["teacher_kl", "teacher KL (train batch)"]]),
    new LineChart("Stage time", [["rollout_seconds", "rollout"], ["score_seconds", "teacher"],
      ["learn_seconds", "learn"], ["push_seconds", "push"]], { yLabel: "seconds per step" }),
    new LineChart("Policy lag", [["policy_lag_mean", "mean"], ["policy_lag_max", "max"]], { yLabel: "versions" }),
    new LineChart("Retention", [], { optional: true, match: /retention/, kinds: ["eval", "train"] }),
  ];
}

export function runView(root, runId) {
  const path = `/v1/runs/${encodeURIComponent(runId)}`;
  const charts = makeCharts();
  let view = null, firstEval = null, lastEval = null, lastTrain = null;
  let abort = null, stopped = false, pollTimer = null, frame = null, streaming = false;

  const title = h("h2", { id: "run-name" });
  const status = h("span", { id: "run-status" });
  const step = h("span", { id: "run-step", class: "n" });
  const teacherKl = h("b", { id: "run-teacher-kl", text: "—" });
  const heldoutKl = h("b", { id: "run-heldout-kl", text: "—" });
  const reason = h("p", { id: "run-reason", class: "muted" });
  const actionError = h("p", { class: "error", id: "run-action-error", hidden: true });
  const beforeAfter = h("div", { id: "run-before-after" });
  const teacher = h("div", { id: "run-teacher" });
  const history = h("div", { id: "run-history" });
  const config = h("pre", { id: "run-config", class: "config", text: "loading…" });
  const buttons = Object.fromEntries(["stop", "pause", "resume", "delete"].map((a) => [a,
    h("button", { type: "button", id: `run-${a}`, class: a === "delete" ? "danger" : "", onclick: () => act(a) }, a)]));

  root.replaceChildren(h("section", {},
    h("p", {}, h("a", { href: "#/runs" }, "← runs")),
    title,
    h("div", { class: "row" }, status, h("span", {}, "step ", step), h("span", {}, "teacher KL ", teacherKl),
      h("span", {}, "held-out reverse KL ", heldoutKl), h("span", { class: "spacer" }), ...Object.values(buttons)),
    reason, actionError,
    h("div", { class: "charts" }, charts.map((c) => c.el)),
    h("div", { class: "grid2" },
      h("div", { class: "card" }, h("h3", {}, "Before / after"), beforeAfter),
      h("div", { class: "card" }, h("h3", {}, "Teacher"), teacher)),
    h("div", { class: "card" }, h("h3", {}, "Status and faults"), history),
    h("details", { class: "card" }, h("summary", {}, "Config"), config)));

  function schedule() {
    if (frame === null) frame = requestAnimationFrame(() => { frame = null; charts.forEach((c) => c.draw()); });
  }

  function showView() {
    title.textContent = view.name;
    status.replaceChildren(statusBadge(view.status));
    step.textContent = `${view.step} / ${view.steps}`;
    reason.textContent = view.reason || "";
    const terminal = TERMINAL.has(view.status);
    buttons.stop.disabled = buttons.pause.disabled = terminal;
    buttons.resume.disabled = !(view.status === "stopped" || view.status === "paused" || view.status === "failed");
    buttons.delete.disabled = !terminal && view.status !== "queued";
    const rows = (view.history || []).slice(-HISTORY_ROWS).reverse();
    history.replaceChildren(rows.length ? h("table", { class: "history" },
      h("thead", {}, h("tr", {}, ["time", "kind", "status", "step", "reason"].map((t) => h("th", { text: t })))),
      h("tbody", {}, rows.map((e) => h("tr", { class: e.kind === "fault" ? "fault" : "" },
        h("td", { text: when(e.time) }), h("td", { text: e.kind }), h("td", {}, statusBadge(e.status)),
        h("td", { class: "n", text: e.step }), h("td", { text: e.reason || "" })))))
      : h("p", { class: "muted", text: "no status changes yet" }));
    showTeacher();
  }

  function showBeforeAfter() {
    if (!firstEval) { beforeAfter.replaceChildren(h("p", { class: "muted", text: "no evaluation yet" })); return; }
    const keys = [...EVAL_KEYS, ...Object.keys(lastEval).filter((k) => /retention/.test(k)).map((k) => [k, k])];
    beforeAfter.replaceChildren(h("table", { class: "before-after" },
      h("thead", {}, h("tr", {}, h("th"), h("th", { text: `before (step ${firstEval.step})` }),
        h("th", { text: `now (step ${lastEval.step})` }))),
      h("tbody", {}, keys.filter(([k]) => k in lastEval || k in firstEval).map(([k, label]) => {
        const show = /accuracy/.test(k) ? pct : fmt;
        return h("tr", {}, h("th", { text: label }), h("td", { class: "n", text: show(firstEval[k]) }),
          h("td", { class: "n", text: show(lastEval[k]) }));
      }))));
  }

  // The teacher as the run sees it: its address, and the client's counters from the last train record
  // (breaker state, live replicas, latency, retries, tokens scored); a degraded run says why in `reason`.
  function showTeacher() {
    const rows = [["teacher", teacherLabel(view && view.teacher)]];
    if (view && view.status === "degraded") rows.push(["health", "degraded: " + (view.reason || "")]);
    const m = lastTrain || (view && view.latest_metrics) || {};
    for (const [k, v] of Object.entries(m)) {
      if (k.startsWith("teacher_") && k !== "teacher_kl") rows.push([k.slice(8).replaceAll("_", " "), typeof v === "number" ? fmt(v) : String(v)]);
    }
    teacher.replaceChildren(kvTable(rows, { id: "teacher-health" }));
  }

  function ingest(rec) {
    if (rec.kind === "train") {
      lastTrain = rec;
      teacherKl.textContent = fmt(rec.teacher_kl);
      if (num(rec.step) !== null) step.textContent = `${Math.max(rec.step, view ? view.step : 0)} / ${view ? view.steps : "?"}`;
    } else if (rec.kind === "eval") {
      if (!firstEval) firstEval = rec;
      lastEval = rec;
      heldoutKl.textContent = fmt(rec.heldout_reverse_kl);
      showBeforeAfter();
    }
    charts.forEach((c) => c.ingest(rec));
    schedule();
  }

  async function refreshView() {
    view = await api(path);
    showView();
  }

  function reset() {
    charts.forEach((c) => c.clear());
    firstEval = lastEval = lastTrain = null;
  }

  // One stream per life of the run; when it ends (a terminal status) the record is polled, and a resume opens
  // a new stream, which replays metrics.jsonl from its start (so the curves start over).
  async function follow() {
    if (stopped || streaming) return;
    streaming = true;
    abort = new AbortController();
    reset();
    try {
      await streamEvents(`${path}/events`, (name, data) => {
        if (name === "metrics") ingest(data);
        else if (name === "fault" || name === "status") refreshView().catch(fail);
      }, abort.signal);
    } catch (err) {
      if (err.name !== "AbortError") fail(err);
    } finally {
      streaming = false;
    }
    if (!stopped) pollTimer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    clearTimeout(pollTimer);
    if (stopped) return;
    try {
      await refreshView();
      if (!TERMINAL.has(view.status)) { follow(); return; }
    } catch (err) {
      fail(err);
      if (err instanceof AuthError || err.status === 404) return;
    }
    pollTimer = setTimeout(poll, POLL_MS);
  }

  async function act(action) {
    actionError.hidden = true;
    try {
      if (action === "delete") {
        if (!confirm(`Delete run ${view.name} (${runId}) and its files?`)) return;
        await api(path, { method: "DELETE" });
        location.hash = "#/runs";
        return;
      }
      view = await api(`${path}/${action}`, { method: "POST" });
      showView();
      if (action === "resume") follow();
    } catch (err) {
      if (err instanceof AuthError) { fail(err); return; }
      actionError.textContent = `${action}: ${err.message}`;
      actionError.hidden = false;
    }
  }

  function fail(err) {
    window.dispatchEvent(new CustomEvent("api-error", { detail: err }));
  }

  // For the browser test and for a look from the console: feed records, read the series' sizes.
  window.onpolicyRunPage = { ingest, sizes: () => charts.map((c) => [...c.series.values()].map((s) => s.xs.length)) };

  showBeforeAfter();
  refreshView().then(() => follow()).catch(fail);
  Promise.all([api(`/v1/ui/runs/${encodeURIComponent(runId)}/config`), yamlLib()])
    .then(([body, jsyaml]) => { config.textContent = jsyaml.dump(body.config); })
    .catch((err) => { config.textContent = `cannot load the config: ${err.message}`; });

  return () => {
    stopped = true;
    clearTimeout(pollTimer);
    if (abort) abort.abort();
    delete window.onpolicyRunPage;
  };
}
