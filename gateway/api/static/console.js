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
const VIEWS = ["search", "message", "person", "holds", "requests", "subprocessors",
  "incidents", "audit"];

function show(view) {
  for (const name of VIEWS) {
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
    save(await call("GET", `/api/v1/messages/${id}/eml`), `${id}.eml`);
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

// ---------------------------------------------------------------- tables
function when(iso) { return iso ? new Date(iso).toLocaleString() : "—"; }

function cell(content) {
  const td = el("td");
  if (content instanceof Node) td.append(content);
  else td.textContent = content === null || content === undefined ? "—" : String(content);
  return td;
}

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const cells of rows) {
    const tr = el("tr");
    for (const content of cells) tr.append(cell(content));
    body.append(tr);
  }
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", empty, { colspan: String($(tableId).tHead.rows[0].cells.length) }));
    body.append(tr);
  }
}

function button(text, onClick, kind) {
  const b = el("button", text, { type: "button" });
  if (kind) b.className = kind;
  b.addEventListener("click", onClick);
  return b;
}

async function openView(view, load) {
  show(view);
  $(`${view === "subprocessors" ? "sp" : view}-title`).focus();
  showError("");
  try { await load(); } catch (error) { showError(error.message); }
}

// ---------------------------------------------------------------- a person's data
let exportId = null;

async function startExport(event) {
  event.preventDefault();
  const subject = $("person").value.trim();
  $("export-download").hidden = true;
  $("erase-box").hidden = true;
  showError("");
  try {
    const started = await call("POST", "/api/v1/exports", subject ? { subject } : {});
    exportId = started.id;
    $("export-status").textContent = `Exporting ${subject || "all of your mail"}…`;
    await followExport(subject);
  } catch (error) {
    $("export-status").textContent = "";
    showError(error.message);
  }
}

async function followExport(subject) {
  for (;;) {
    const state = await call("GET", `/api/v1/exports/${exportId}`);
    const size = state.bytes ? `${Math.ceil(state.bytes / 1024)} KiB` : "";
    if (state.status === "running") {
      const count = state.messages === null ? "" : `${state.messages} messages, `;
      $("export-status").textContent = `Exporting ${subject || "all of your mail"}: ${count}${size || "0 KiB"} so far…`;
      await new Promise((resolve) => setTimeout(resolve, 500));
      continue;
    }
    if (state.status === "done") {
      $("export-status").textContent = `The export of ${subject || "all of your mail"} is ready (${size}).`;
      $("export-download").hidden = false;
    } else {
      $("export-status").textContent = `The export ${state.status}: ${state.error || ""}`;
    }
    return;
  }
}

async function downloadExport() {
  try {
    const blob = await call("GET", `/api/v1/exports/${exportId}/archive`);
    save(blob, `export-${exportId}.tar`);
  } catch (error) {
    showError(error.message);
  }
}

function save(blob, name) {
  const link = el("a", null, { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function previewErasure() {
  const subject = $("person").value.trim();
  $("erase-status").textContent = "";
  showError("");
  if (!subject || !$("person").checkValidity()) {
    showError("Give the e-mail address of the person whose mail is to be erased.");
    $("person").focus();
    return;
  }
  try {
    const plan = await call("POST", "/api/v1/erasures", { subject, dry_run: true });
    const held = Object.entries(plan.held || {});
    let text = `${plan.messages} message${plan.messages === 1 ? "" : "s"} with ${subject} would be erased, ` +
      `and ${plan.exports.length} export${plan.exports.length === 1 ? "" : "s"} of your mail removed. ` +
      "This cannot be undone.";
    if (held.length) {
      text = `${plan.messages} messages with ${subject}, but legal holds cover some: ` +
        held.map(([name, count]) => `${name} (${count})`).join(", ") +
        ". Nothing can be erased while they are in force.";
    }
    $("erase-plan").textContent = text;
    $("erase-confirm").textContent = `Erase ${plan.messages} message${plan.messages === 1 ? "" : "s"}`;
    $("erase-confirm").hidden = held.length > 0 || plan.messages === 0;
    $("erase-confirm").dataset.subject = subject;
    $("erase-box").hidden = false;
    $("erase-cancel").focus();
  } catch (error) {
    showError(error.message);
  }
}

async function erase() {
  const subject = $("erase-confirm").dataset.subject;
  $("erase-box").hidden = true;
  try {
    const done = await call("POST", "/api/v1/erasures", { subject });
    $("erase-status").textContent = `Erased: ${done.messages} message${done.messages === 1 ? "" : "s"} with ${subject}.`;
  } catch (error) {
    showError(error.message);
  }
}

// ---------------------------------------------------------------- records
async function holds() {
  const doc = await call("GET", "/api/v1/holds");
  fill("holds-table", doc.holds.map((h) => [h.name, h.reason,
    h.address || (h.tag ? `tag ${h.tag}` : "all your mail"), h.until || "until released",
    h.placed_by === "tenant" ? "you" : "the gateway's operator",
    h.id === null ? "" : button(`Release ${h.name}`, () => release(h))]),
  "No legal hold is in force.");
}

async function placeHold(event) {
  event.preventDefault();
  const body = {};
  for (const [name, value] of new FormData(event.target).entries()) {
    if (value) body[name] = value;
  }
  try {
    await call("POST", "/api/v1/holds", body);
    event.target.reset();
    await holds();
    $("holds-status").textContent = `The hold ${body.name} is in force.`;
  } catch (error) {
    showError(error.message);
  }
}

async function release(hold) {
  if (!window.confirm(`Release the hold ${hold.name}? Retention applies again to what it kept.`)) return;
  try {
    await call("DELETE", `/api/v1/holds/${hold.id}`);
    await holds();
    $("holds-status").textContent = `The hold ${hold.name} is released.`;
  } catch (error) {
    showError(error.message);
  }
}

async function requests() {
  const doc = await call("GET", "/api/v1/requests");
  const now = Date.now();
  fill("requests-table", doc.requests.map((r) => {
    const due = el("span", when(r.due_at));
    if (r.status === "open" && new Date(r.due_at).getTime() < now) {
      due.className = "overdue";
      due.textContent += " (overdue)";
    }
    return [r.kind, r.subject, when(r.received_at), due, r.status, r.fulfilled_by];
  }), "No request has reached us.");
}

async function incidents() {
  const doc = await call("GET", "/api/v1/incidents");
  fill("incidents-table", doc.incidents.map((i) => [when(i.discovered_at), i.description,
    when(i.deadline), i.notice.delivered_at ? `delivered ${when(i.notice.delivered_at)}` :
      i.notice.state, i.status]), "No incident concerns your data.");
}

let auditBefore = null;

async function audit(older) {
  const path = older && auditBefore ? `/api/v1/audit?limit=50&before=${auditBefore}` :
    "/api/v1/audit?limit=50";
  const doc = await call("GET", path);
  const events = doc.events.slice().reverse();
  const rows = events.map((e) => [when(e.at), e.actor, e.action,
    e.detail ? JSON.stringify(e.detail) : ""]);
  if (older) {
    const body = $("audit-table").tBodies[0];
    for (const cells of rows) {
      const tr = el("tr");
      for (const content of cells) tr.append(cell(content));
      body.append(tr);
    }
  } else {
    fill("audit-table", rows, "No event yet.");
  }
  auditBefore = doc.older;
  $("audit-older").hidden = doc.older === null;
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
  $("person-form").addEventListener("submit", startExport);
  $("export-download").addEventListener("click", downloadExport);
  $("erase-preview").addEventListener("click", previewErasure);
  $("erase-confirm").addEventListener("click", erase);
  $("erase-cancel").addEventListener("click", () => {
    $("erase-box").hidden = true;
    $("erase-status").textContent = "Nothing was erased.";
  });
  $("hold-form").addEventListener("submit", placeHold);
  $("audit-older").addEventListener("click", () => audit(true).catch((e) => showError(e.message)));
  const loaders = {
    person: async () => { $("person").focus(); },
    holds, requests, incidents, audit: () => audit(false), subprocessors: null,
  };
  for (const navButton of document.querySelectorAll("nav button")) {
    navButton.addEventListener("click", () => {
      const view = navButton.dataset.view;
      if (view === "subprocessors") subprocessors();
      else if (view === "search") { show("search"); $("q").focus(); }
      else openView(view, loaders[view]);
    });
  }
  try {
    loggedIn(await call("GET", "/console/session"));
  } catch (error) {
    loggedOut("");
  }
});
