// The live parts of the sitegen dashboard: the overview refreshes itself, an order's progress streams
// over SSE, and the enqueue, cancel and retry buttons call the API. Plain JavaScript, no build step.
"use strict";

const HEADERS = { "Content-Type": "application/json", "X-Sitegen-Dashboard": "1" };
const PHASES = ["plan", "content", "code", "assemble"];

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: HEADERS, body: JSON.stringify(body || {}), credentials: "same-origin" });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

async function refresh(element, path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (response.ok) element.innerHTML = await response.text();
}

function overview() {
  const main = document.getElementById("main");
  const form = () => document.getElementById("enqueue");
  // The form survives the refreshes: only the sections around it are replaced while it is not in use.
  setInterval(() => {
    const f = form();
    if (f && f.contains(document.activeElement)) return;
    const saved = f && { id: f.order_id.value, brief: f.brief.value, regenerate: f.regenerate.checked };
    refresh(main, "/dashboard/overview").then(() => {
      const g = form();
      if (g && saved) { g.order_id.value = saved.id; g.brief.value = saved.brief; g.regenerate.checked = saved.regenerate; }
    }).catch(() => {});
  }, 3000);
  main.addEventListener("submit", async (event) => {
    if (event.target.id !== "enqueue") return;
    event.preventDefault();
    const f = event.target;
    const result = document.getElementById("enqueue-result");
    const body = { regenerate: f.regenerate.checked };
    try {
      if (f.brief.value.trim()) body.brief = JSON.parse(f.brief.value);
      await post(`/v1/orders/${encodeURIComponent(f.order_id.value)}/generate`, body);
      window.location.assign(`/orders/${encodeURIComponent(f.order_id.value)}`);
    } catch (error) {
      result.textContent = `Not enqueued: ${error.message}`;
    }
  });
}

function order() {
  const id = document.body.dataset.order;
  const timeline = document.getElementById("timeline");
  const state = document.getElementById("stream-state");
  const summary = document.getElementById("summary");
  let source = null;
  let done = 0;

  function setStatus(status) {
    const badge = document.getElementById("live-status");
    if (badge) { badge.textContent = status; badge.className = `status status-${status}`; }
  }
  function setProgress(phase, count) {
    const live = document.getElementById("live-phase");
    if (live) live.textContent = phase || "—";
    const bar = document.querySelector("#live-progress progress");
    if (bar) { bar.value = count; bar.textContent = `${count} of 4`; }
    const text = document.querySelector("#live-progress .muted");
    if (text) text.textContent = `${count}/4`;
  }
  function show(row) {
    const item = document.createElement("li");
    const time = document.createElement("span");
    time.className = "t";
    time.textContent = new Date(row.created_at).toLocaleTimeString();
    const phase = document.createElement("span");
    phase.className = "p";
    phase.textContent = row.phase || "";
    const message = document.createElement("span");
    message.className = `level-${row.level}`;
    message.textContent = row.message;
    item.append(time, phase, message);
    timeline.append(item);
    timeline.scrollTop = timeline.scrollHeight;
    const kind = row.details && row.details.event;
    if (kind === "generation.started" || kind === "generation.resumed") { setStatus("running"); }
    if (kind === "phase.started") { setStatus("running"); setProgress(row.phase, PHASES.indexOf(row.phase)); }
    if (kind === "phase.done") { done = PHASES.indexOf(row.phase) + 1; setProgress(row.phase, done); }
    if (kind === "generation.started" || kind === "generation.resumed" || kind === "phase.done") {
      // The phases, tokens and cost as committed: the summary comes again from the server.
      refresh(summary, `/dashboard/orders/${encodeURIComponent(id)}`).catch(() => {});
    }
  }
  function connect() {
    if (source) source.close();
    source = new EventSource(`/v1/orders/${encodeURIComponent(id)}/events`);
    source.addEventListener("open", () => { state.textContent = "Live"; });
    source.addEventListener("progress", (event) => show(JSON.parse(event.data)));
    source.addEventListener("end", (event) => {
      const end = JSON.parse(event.data);
      source.close();
      setStatus(end.status);
      state.textContent = `Generation ${end.generation_id} ended: ${end.status}`;
      refresh(summary, `/dashboard/orders/${encodeURIComponent(id)}`).catch(() => {});
    });
    source.addEventListener("error", () => { state.textContent = "Reconnecting…"; });
  }
  summary.addEventListener("click", async (event) => {
    const action = event.target.dataset && event.target.dataset.action;
    if (!action) return;
    const result = document.getElementById("action-result");
    try {
      const data = await post(`/v1/orders/${encodeURIComponent(id)}/${action}`);
      result.textContent = action === "cancel" ? `Cancel: ${data.status}` : "Retry enqueued";
      if (action === "retry") { timeline.replaceChildren(); connect(); }
    } catch (error) {
      result.textContent = error.message;
    }
  });
  connect();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "overview") overview();
  if (page === "order") order();
});
