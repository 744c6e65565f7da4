// The dashboard's shell: sign-in, the error banner and the hash routes (#/runs, #/run/<id>, #/start, #/teachers).
import { api, AuthError, clearToken, setToken, token } from "./api.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";
import { startView } from "./start.js";
import { teachersView } from "./teachers.js";

const view = document.getElementById("view");
const banner = document.getElementById("error");
const logout = document.getElementById("logout");
let cleanup = () => {};

function showError(text) {
  banner.textContent = text;
  banner.hidden = !text;
}

function showLogin(message = "") {
  cleanup();
  cleanup = () => {};
  logout.hidden = true;
  view.replaceChildren(document.getElementById("login-template").content.cloneNode(true)); // no data stays shown
  showError(message);
  const form = document.getElementById("login");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    setToken(document.getElementById("token").value.trim());
    try {
      await api("/v1/runs?limit=1"); // the token is checked before anything is shown
    } catch (err) {
      clearToken();
      showLogin(err instanceof AuthError ? "Sign-in failed: the API refused this token." : `Sign-in failed: ${err.message}`);
      return;
    }
    showError("");
    route();
  });
  document.getElementById("token").focus();
}

function route() {
  if (!token()) { showLogin(); return; }
  cleanup();
  logout.hidden = false;
  showError("");
  const [, page, arg] = (location.hash || "#/runs").match(/^#\/([a-z]+)\/?(.*)$/) || [null, "runs", ""];
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === page);
  if (page === "run" && arg) cleanup = runView(view, decodeURIComponent(arg));
  else if (page === "start") cleanup = startView(view);
  else if (page === "teachers") cleanup = teachersView(view);
  else cleanup = runsView(view);
}

window.addEventListener("api-error", (ev) => {
  const err = ev.detail;
  if (err instanceof AuthError) {
    clearToken();
    showLogin("The API refused the token (it may have been rotated); sign in again.");
  } else {
    showError(err && err.message ? err.message : String(err));
  }
});
window.addEventListener("hashchange", route);
logout.addEventListener("click", () => { clearToken(); showLogin(); });
route();
