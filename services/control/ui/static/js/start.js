// Start a run: a YAML config pasted, uploaded or picked from the server's list, sent as POST /v1/runs.
import { api, ApiError, AuthError } from "./api.js";
import { h, yamlLib } from "./dom.js";

export async function parseConfig(text) {
  const jsyaml = await yamlLib();
  let cfg;
  try {
    cfg = jsyaml.load(text);
  } catch (err) {
    throw new Error(`the config is not valid YAML: ${err.message}`);
  }
  if (cfg === undefined || cfg === null) return {}; // empty: the server's defaults
  if (typeof cfg !== "object" || Array.isArray(cfg)) {
    throw new Error("the config must be a YAML mapping (key: value lines, like configs/toy.yaml)");
  }
  return cfg;
}

export function startView(root) {
  const message = h("p", { class: "error", id: "start-error", hidden: true });
  const yaml = h("textarea", { id: "config-yaml", rows: 18, spellcheck: "false",
                               placeholder: "model:\n  student: ...\nteacher:\n  kind: local\n  model: ..." });
  const name = h("input", { id: "run-name", placeholder: "(config.name)" });
  const pick = h("select", { id: "config-pick" }, h("option", { value: "" }, "— a server-side config —"));
  const teacher = h("select", { id: "teacher-pick" }, h("option", { value: "" }, "— as in the config —"));
  const file = h("input", { type: "file", id: "config-file", accept: ".yaml,.yml,.json" });
  const button = h("button", { type: "submit", id: "start-run" }, "Start");
  let configs = [];

  pick.addEventListener("change", () => {
    const c = configs.find((x) => x.name === pick.value);
    if (c) yaml.value = c.yaml;
  });
  file.addEventListener("change", async () => {
    if (file.files.length) yaml.value = await file.files[0].text();
  });

  const form = h("form", { class: "card", id: "start-form" },
    h("h2", {}, "Start a run"),
    h("p", { class: "muted" }, "Paste a run config (YAML, as in configs/), upload one, or pick one the server holds. ",
      "Paths to models and data must lie under the server's --models-root and --data-root."),
    h("div", { class: "row" }, h("label", {}, "From the server ", pick), h("label", {}, "Upload ", file)),
    yaml,
    h("div", { class: "row" }, h("label", {}, "Name ", name), h("label", {}, "Attached teacher ", teacher), button),
    message);

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    message.hidden = true;
    button.disabled = true;
    try {
      const body = { config: await parseConfig(yaml.value) };
      if (name.value.trim()) body.name = name.value.trim();
      if (teacher.value) body.teacher_id = teacher.value;
      const run = await api("/v1/runs", { method: "POST", json: body });
      location.hash = `#/run/${encodeURIComponent(run.id)}`;
    } catch (err) {
      if (err instanceof AuthError) {
        window.dispatchEvent(new CustomEvent("api-error", { detail: err }));
        return;
      }
      message.textContent = err instanceof ApiError ? `The server refused the run: ${err.message}` : err.message;
      message.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  root.replaceChildren(form);

  // The two lists are optional: a failure leaves them empty (the error banner says why).
  api("/v1/ui/configs").then((body) => {
    configs = body.configs;
    pick.append(...configs.map((c) => h("option", { value: c.name }, c.name)));
  }).catch((err) => window.dispatchEvent(new CustomEvent("api-error", { detail: err })));
  api("/v1/teachers").then((body) => {
    teacher.append(...body.teachers.map((t) => h("option", { value: t.id }, `${t.id} ${t.kind} ${t.url}${t.ok ? "" : " (check failed)"}`)));
  }).catch((err) => window.dispatchEvent(new CustomEvent("api-error", { detail: err })));
  return () => {};
}
