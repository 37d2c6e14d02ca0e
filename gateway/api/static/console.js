// The console: every action is a call of the admin API (/api/v1/...), made with the
// session's cookie and its CSRF secret, which lives in this page's memory only.
// Nothing a message holds is ever parsed as HTML: text goes in with textContent.
"use strict";

const state = { csrf: null, query: "", page: 1, scopes: [] };
const $ = (id) => document.getElementById(id);

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function showError(text) { $("error").textContent = text || ""; }

async function call(method, path, body) {
  const headers = { "X-CSRF-Token": state.csrf || "" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && !path.startsWith("/console/")) {
    loggedOut("Your session has ended: log in again.");
    throw new Error("logged out");
  }
  const type = response.headers.get("Content-Type") || "";
  const doc = type.startsWith("application/json") ? await response.json() : await response.blob();
  if (!response.ok) {
    const message = doc && doc.error ? doc.error : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return doc;
}

// ---------------------------------------------------------------- session
function loggedIn(who) {
  state.csrf = who.csrf;
  state.scopes = who.scopes;
  $("who").textContent = `${who.tenant} · ${who.actor}`;
  for (const id of ["who", "logout", "app"]) $(id).hidden = false;
  $("login").hidden = true;
  showError("");
  show("search");
  $("q").focus();
}

function loggedOut(message) {
  state.csrf = null;
  for (const id of ["who", "logout", "app"]) $(id).hidden = true;
  $("login").hidden = false;
  showError(message || "");
  $("login-name").focus();
}

async function login(body) {
  try {
    loggedIn(await call("POST", "/console/login", body));
  } catch (error) {
    showError(`Not logged in: ${error.message}`);
  }
}

// ---------------------------------------------------------------- views
function show(view) {
  for (const name of ["search", "message", "subprocessors"]) {
    $(`${name}-view`).hidden = name !== view;
  }
  for (const button of document.querySelectorAll("nav button")) {
    const current = button.dataset.view === view ||
      (view === "message" && button.dataset.view === "search");
    if (current) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
}

// ---------------------------------------------------------------- search
async function search(page) {
  const status = $("search-status");
  status.textContent = "Searching…";
  showError("");
  if (page === 1) $("results").replaceChildren();
  try {
    const q = encodeURIComponent(state.query);
    const doc = await call("GET", `/api/v1/search?q=${q}&page=${page}`);
    state.page = page;
    for (const found of doc.results) $("results").append(result(found));
    const count = $("results").children.length;
    status.textContent = count ? `${count} message${count === 1 ? "" : "s"} shown` :
      "No message matches.";
    $("more").hidden = doc.next === null;
  } catch (error) {
    status.textContent = "";
    showError(error.message);
  }
}

function result(found) {
  const item = el("li");
  const open = el("button", found.subject || "(no subject)", { type: "button" });
  open.addEventListener("click", () => openMessage(found.id));
  item.append(open);
  const when = found.received_at ? new Date(found.received_at).toLocaleString() : "";
  item.append(el("div", `${found.from || found.sender || ""} · ${when}`, { class: "from" }));
  const snippet = el("p", null, { class: "snippet" });
  for (const piece of found.snippet || []) {
    snippet.append(piece.match ? el("mark", piece.text) : document.createTextNode(piece.text));
  }
  item.append(snippet);
  return item;
}

// ---------------------------------------------------------------- one message
async function openMessage(id) {
  showError("");
  try {
    const [message, text] = await Promise.all([
      call("GET", `/api/v1/messages/${id}`), call("GET", `/api/v1/messages/${id}/text`)]);
    $("m-subject").textContent = message.subject || "(no subject)";
    const meta = $("m-meta");
    meta.replaceChildren();
    const rows = [["From", message.from], ["To", message.to], ["Cc", message.cc],
      ["Date", message.date], ["Received", new Date(message.received_at).toLocaleString()],
      ["Envelope sender", message.sender], ["Tags", (message.tags || []).join(", ")],
      ["Retention", retention(message.retention)],
      ["Id", message.id]];
    for (const [name, value] of rows) {
      if (!value) continue;
      meta.append(el("dt", name), el("dd", value));
    }
    $("m-text").textContent = text.text;
    $("m-text-note").textContent = text.source === "html" ?
      "Shown as text: the message is HTML, without its markup, scripts and images." :
      text.source === "none" ? "The message has no text part." : "";
    $("m-eml").dataset.id = message.id;
    show("message");
    $("m-subject").focus();
  } catch (error) {
    showError(error.message);
  }
}

function retention(standing) {
  if (!standing) return "";
  const until = standing.expires_at ? `, until ${new Date(standing.expires_at).toLocaleDateString()}` : "";
  const held = (standing.held_by || []).length ? `; held by ${standing.held_by.join(", ")}` : "";
  return `${standing.rule}${until}${held}`;
}

async function downloadEml() {
  const id = $("m-eml").dataset.id;
  try {
    const blob = await call("GET", `/api/v1/messages/${id}/eml`);
    const link = el("a", null, { href: URL.createObjectURL(blob), download: `${id}.eml` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    showError(error.message);
  }
}

// ---------------------------------------------------------------- sub-processors
async function subprocessors() {
  show("subprocessors");
  $("sp-title").focus();
  const body = $("sp-table").tBodies[0];
  body.replaceChildren();
  try {
    const [registry, notices] = await Promise.all([
      call("GET", "/api/v1/subprocessors"), call("GET", "/api/v1/subprocessors/notices")]);
    const windows = {};
    for (const n of notices.notices) {
      if (n.objection_window_ends) windows[n.subprocessor] = n.objection_window_ends;
    }
    for (const sp of registry.subprocessors) {
      const row = el("tr");
      const window = windows[sp.name] ? new Date(windows[sp.name]).toLocaleString() : "—";
      row.append(el("td", sp.name), el("td", sp.purpose), el("td", sp.country),
        el("td", sp.usable ? "yes" : `no: ${sp.why_not}`), el("td", window));
      const action = el("td");
      if (sp.usable || windows[sp.name]) {
        const button = el("button", `Object to ${sp.name}`, { type: "button" });
        button.addEventListener("click", () => object(sp.name));
        action.append(button);
      }
      row.append(action);
      body.append(row);
    }
    $("sp-status").textContent = registry.policy ? "" : "No sub-processor policy is in force.";
  } catch (error) {
    showError(error.message);
  }
}

async function object(name) {
  if (!window.confirm(`Object to ${name}? It will not handle your mail from now on.`)) return;
  try {
    await call("POST", `/api/v1/subprocessors/${encodeURIComponent(name)}/objections`,
      { note: "objected in the console" });
    await subprocessors();
    $("sp-status").textContent = `Your objection to ${name} is recorded.`;
  } catch (error) {
    showError(error.message);
  }
}

// ---------------------------------------------------------------- wiring
function formBody(form) {
  return Object.fromEntries(new FormData(form).entries());
}

document.addEventListener("DOMContentLoaded", async () => {
  $("password-form").addEventListener("submit", (event) => {
    event.preventDefault();
    login(formBody(event.target));
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    login(formBody(event.target));
  });
  $("logout").addEventListener("click", async () => {
    try { await call("POST", "/console/logout"); } catch (error) { /* over already */ }
    loggedOut("You are logged out.");
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.query = $("q").value;
    search(1);
  });
  $("more").addEventListener("click", () => search(state.page + 1));
  $("back").addEventListener("click", () => { show("search"); $("q").focus(); });
  $("m-eml").addEventListener("click", downloadEml);
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => {
      if (button.dataset.view === "subprocessors") subprocessors();
      else { show("search"); $("q").focus(); }
    });
  }
  try {
    loggedIn(await call("GET", "/console/session"));
  } catch (error) {
    loggedOut("");
  }
});
