// The runs table: every run with its status, step, held-out reverse KL and exact match, sequences/s, teacher and
// age; sortable by any column, refreshed every few seconds.
import { api } from "./api.js";
import { age, fmt, h, num, pct, statusBadge, teacherLabel } from "./dom.js";

const REFRESH_MS = 2000;
const PAGE = 200;
const TERMINAL = new Set(["finished", "failed", "stopped", "paused"]);
const EVAL_FETCHES = 4; // held-out figures fetched at once, after the table is drawn

// The held-out figures of each run (the run list carries only the last train record): id -> {step, kl, em, done}.
// Kept across visits of the page; a run deleted elsewhere drops out at the next refresh.
const heldout = new Map();

const COLUMNS = [
  ["name", "Name", (r) => r.name],
  ["status", "Status", (r) => r.status],
  ["step", "Step", (r) => r.step],
  ["kl", "Held-out reverse KL", (r) => heldoutOf(r).kl],
  ["em", "Exact match", (r) => heldoutOf(r).em],
  ["sps", "Sequences/s", (r) => seqPerSecond(r)],
  ["teacher", "Teacher", (r) => teacherLabel(r.teacher)],
  ["age", "Age", (r) => -r.created],
];

function heldoutOf(r) {
  const m = r.latest_metrics || {};
  const cached = heldout.get(r.id) || {};
  return { kl: num(m.heldout_reverse_kl) ?? cached.kl ?? null, em: num(m.heldout_accuracy) ?? cached.em ?? null };
}

function seqPerSecond(r) {
  const m = r.latest_metrics || {};
  return num(m.sequences) !== null && num(m.step_seconds) ? m.sequences / m.step_seconds : null;
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1; // blanks last
  if (b === null || b === undefined) return -1;
  return typeof a === "string" ? a.localeCompare(b) : a - b;
}

export function runsView(root) {
  let runs = [];
  let sort = { key: "age", dir: 1 };
  let timer = null;
  let painted = false;
  let fetching = false;
  const tbody = h("tbody");
  const head = h("tr");
  const count = h("span", { class: "muted" });
  const table = h("table", { class: "runs", id: "runs-table" }, h("thead", {}, head), tbody);
  root.replaceChildren(h("section", {}, h("h2", {}, "Runs ", count),
    h("p", {}, h("a", { href: "#/start", class: "button" }, "Start a run")), table));

  function drawHead() {
    head.replaceChildren(...COLUMNS.map(([key, label]) => h("th", {
      "data-sort": key, class: sort.key === key ? (sort.dir > 0 ? "sorted asc" : "sorted desc") : "",
      onclick: () => { sort = { key, dir: sort.key === key ? -sort.dir : 1 }; draw(); },
    }, label)));
  }

  function draw() {
    drawHead();
    const get = COLUMNS.find(([k]) => k === sort.key)[2];
    const rows = [...runs].sort((a, b) => sort.dir * compare(get(a), get(b)));
    const now = Date.now() / 1000;
    tbody.replaceChildren(...rows.map((r) => {
      const hv = heldoutOf(r);
      return h("tr", { "data-run": r.id },
        h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.id)}`, text: r.name })),
        h("td", {}, statusBadge(r.status)),
        h("td", { class: "n", "data-col": "step", text: `${r.step} / ${r.steps}` }),
        h("td", { class: "n", "data-col": "kl", text: fmt(hv.kl) }),
        h("td", { class: "n", "data-col": "em", text: pct(hv.em) }),
        h("td", { class: "n", text: fmt(seqPerSecond(r), 1) }),
        h("td", { text: teacherLabel(r.teacher) }),
        h("td", { class: "n", text: age(now - r.created) }));
    }));
    count.textContent = `(${runs.length})`;
    if (!painted) {
      painted = true;
      // First paint of the table: the browser test logs this mark's time.
      requestAnimationFrame(() => { performance.mark("runs-painted"); document.body.dataset.runsPainted = "1"; });
    }
  }

  // The held-out figures of runs whose last evaluation may have changed: active runs, and runs not yet looked at.
  async function fillHeldout() {
    if (fetching) return;
    fetching = true;
    try {
      const todo = runs.filter((r) => !(heldout.get(r.id) || {}).done);
      const worker = async () => {
        for (let r; (r = todo.shift());) {
          const known = heldout.get(r.id) || { step: -1, kl: null, em: null };
          try {
            const body = await api(`/v1/runs/${encodeURIComponent(r.id)}/metrics?kind=eval&since_step=${known.step}`);
            const last = body.records.filter((e) => num(e.heldout_reverse_kl) !== null).pop();
            heldout.set(r.id, { ...(last ? { step: last.step, kl: last.heldout_reverse_kl, em: last.heldout_accuracy }
              : known), done: TERMINAL.has(r.status) });
          } catch { /* the run went away; the next refresh drops it */ }
        }
      };
      await Promise.all(Array.from({ length: EVAL_FETCHES }, worker));
      draw();
    } finally {
      fetching = false;
    }
  }

  async function refresh() {
    const body = await api(`/v1/runs?limit=${PAGE}`);
    runs = body.runs;
    draw();
    fillHeldout();
  }

  let stopped = false;
  const loop = async () => {
    try { await refresh(); } catch (err) { window.dispatchEvent(new CustomEvent("api-error", { detail: err })); return; }
    if (!stopped) timer = setTimeout(loop, REFRESH_MS);
  };
  loop();
  return () => { stopped = true; clearTimeout(timer); };
}
