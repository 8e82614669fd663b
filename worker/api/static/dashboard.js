// The live parts of the sitegen dashboard: the overview refreshes itself, an order's progress streams
// over SSE, the enqueue, cancel, retry, edit and rollback controls call the API, and two versions of a
// site are compared from the diff API. Plain JavaScript, no build step.
"use strict";

const HEADERS = { "Content-Type": "application/json", "X-Sitegen-Dashboard": "1" };
const PHASES_OF = { generation: ["plan", "content", "code", "assemble"], edit: ["edit_plan", "edit_files", "assemble"], rollback: ["publish"] };
const END_KINDS = new Set(["job.rejected", ...["generation", "edit", "rollback"].flatMap((k) => ["succeeded", "failed", "cancelled"].map((e) => `${k}.${e}`))]);

class ApiRefusal extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: HEADERS, body: JSON.stringify(body || {}), credentials: "same-origin" });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiRefusal(response.status, (data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiRefusal(response.status, (data.error && data.error.message) || `HTTP ${response.status}`);
  return data;
}

// What identifies a focused control across a refresh that replaces it: its id, else its data attributes or link.
function focusKey(element) {
  if (element.id) return `#${CSS.escape(element.id)}`;
  for (const name of ["action", "rollback"]) {
    if (element.dataset && element.dataset[name]) return `[data-${name}="${CSS.escape(element.dataset[name])}"]`;
  }
  const href = element.getAttribute && element.getAttribute("href");
  return href ? `a[href="${CSS.escape(href)}"]` : null;
}

// The server renders the fragments (escaping what they show); a control that had the focus keeps it.
async function refresh(element, path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) return;
  const key = element.contains(document.activeElement) ? focusKey(document.activeElement) : null;
  element.innerHTML = await response.text();
  const again = key && element.querySelector(key);
  if (again) again.focus();
}

// An element with its text set as text: whatever it holds (a model's output in a diff) is never parsed as HTML.
function node(tag, text, attributes) {
  const element = document.createElement(tag);
  if (text !== undefined && text !== null) element.textContent = text;
  for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, value);
  return element;
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

// --------------------------------------------------------------------------- diffs of two versions

// A unified diff's hunks: each line with its kind (" ", "-", "+" or "\\") and its numbers in the old and new file.
function hunksOf(diff) {
  const hunks = [];
  let hunk = null;
  let a = 0;
  let b = 0;
  for (const line of diff.split("\n")) {
    const header = /^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@/.exec(line);
    if (header) {
      a = Number(header[1]);
      b = Number(header[2]);
      hunk = { header: line, lines: [] };
      hunks.push(hunk);
    } else if (hunk && line !== "") { // before the first hunk: the --- and +++ lines
      const kind = line[0];
      if (kind === " ") hunk.lines.push({ kind, text: line.slice(1), old: a++, new: b++ });
      else if (kind === "-") hunk.lines.push({ kind, text: line.slice(1), old: a++ });
      else if (kind === "+") hunk.lines.push({ kind, text: line.slice(1), new: b++ });
      else hunk.lines.push({ kind: "\\", text: line });
    }
  }
  return hunks;
}

function unifiedView(file) {
  const pre = node("pre", null, { class: "diff" });
  file.diff.split("\n").forEach((line, index) => {
    if (line === "") return; // what follows the last newline
    let kind = { " ": "ctx", "-": "del", "+": "add", "@": "hunk" }[line[0]] || "note";
    if (index < 2 && /^(---|\+\+\+) /.test(line)) kind = "meta";
    pre.append(node("span", line, { class: `line line-${kind}` }));
  });
  return pre;
}

function splitView(file, from, to) {
  const table = node("table", null, { class: "diff-split" });
  table.append(node("caption", `${file.path}: ${from} on the left, ${to} on the right`, { class: "sr-only" }));
  const head = node("tr");
  for (const name of [`${from} line`, from, `${to} line`, to]) head.append(node("th", name, { scope: "col" }));
  table.appendChild(node("thead")).append(head);
  const body = table.appendChild(node("tbody"));
  const side = (line, number, mark) => {
    if (!line) return [node("td", "", { class: "num" }), node("td", "", { class: "code empty" })];
    const code = node("td", null, { class: `code${mark ? ` code-${mark}` : ""}` });
    code.append(mark ? node(mark, line.text) : document.createTextNode(line.text));
    return [node("td", String(number), { class: "num" }), code];
  };
  const whole = (text, kind) => {
    const row = body.appendChild(node("tr", null, { class: `row-${kind}` }));
    row.append(node("td", text, { colspan: "4" }));
  };
  for (const hunk of hunksOf(file.diff)) {
    whole(hunk.header, "hunk");
    const lines = hunk.lines;
    for (let i = 0; i < lines.length;) {
      const line = lines[i];
      if (line.kind === " ") {
        body.appendChild(node("tr")).append(...side(line, line.old), ...side(line, line.new));
        i += 1;
      } else if (line.kind === "\\") {
        whole(line.text, "note");
        i += 1;
      } else {
        // A run of removed lines then added ones: shown side by side, pair by pair.
        const removed = [];
        const added = [];
        while (i < lines.length && lines[i].kind === "-") removed.push(lines[i++]);
        while (i < lines.length && lines[i].kind === "+") added.push(lines[i++]);
        for (let k = 0; k < Math.max(removed.length, added.length); k += 1) {
          const old = removed[k];
          const now = added[k];
          body.appendChild(node("tr")).append(...side(old, old && old.old, "del"), ...side(now, now && now.new, "ins"));
        }
      }
    }
  }
  const scroll = node("div", null, { class: "scroll", tabindex: "0", role: "region", "aria-label": `${file.path}, side by side` });
  scroll.append(table);
  return scroll;
}

function renderDiff(output, data, mode) {
  const from = data.against ? `v${data.against}` : "no site";
  const to = `v${data.version}`;
  const parts = [node("h3", `Changes from ${from} to ${to}`)];
  parts.push(node("p", `Files: ${data.changed.length} changed, ${data.added.length} added, ${data.removed.length} removed, ${data.unchanged} unchanged.`, { class: "muted" }));
  for (const [title, files] of [["Added files", data.added], ["Removed files", data.removed]]) {
    if (!files.length) continue;
    const list = node("ul", null, { class: `files files-${title.split(" ")[0].toLowerCase()}` });
    for (const f of files) {
      const item = list.appendChild(node("li"));
      item.append(node("code", f.path), ` (${f.bytes.toLocaleString()} bytes, ${f.media_type})`);
    }
    parts.push(node("h4", title), list);
  }
  for (const file of data.changed) {
    const block = node("div", null, { class: "diff-file" });
    block.appendChild(node("h4")).append(node("code", file.path));
    if (file.binary || file.diff === null) {
      block.append(node("p", `Not shown line by line (binary, or not UTF-8 text): ${file.from_bytes.toLocaleString()} → ${file.to_bytes.toLocaleString()} bytes.`, { class: "muted" }));
    } else {
      block.append(mode === "split" ? splitView(file, from, to) : unifiedView(file));
    }
    parts.push(block);
  }
  output.replaceChildren(...parts);
}

// --------------------------------------------------------------------------- the order page's versions

// The forms beside the versions table: compare two versions, preview one, send an edit, roll back to one.
// `sent` is called once an edit or rollback is enqueued, so that the page follows its run.
function versionTools(id, sent) {
  const base = `/v1/orders/${encodeURIComponent(id)}`;
  const result = document.getElementById("versions-result");
  const diffForm = document.getElementById("diff-form");
  const diffState = document.getElementById("diff-state");
  const output = document.getElementById("diff-output");
  const previewForm = document.getElementById("preview-form");
  const frame = document.getElementById("preview-frame");
  const previewLink = document.getElementById("preview-link");
  const editForm = document.getElementById("edit-form");
  let versions = [];
  let chosen = false; // the operator picked the version to compare; until then it follows the newest
  let shown = null; // the diff on screen, drawn again when the mode changes

  function say(element, text, error) {
    element.textContent = text;
    element.classList.toggle("alert", Boolean(error));
  }
  function refused(what, error) {
    return `${what} (${error.status ? `HTTP ${error.status}` : "no answer"}): ${error.message}`;
  }
  function fill(select, options, wanted) {
    select.replaceChildren(...options.map(([value, label]) => node("option", label, { value })));
    if (options.some(([value]) => value === wanted)) select.value = wanted;
  }
  function sync() {
    const table = document.getElementById("versions");
    versions = table ? JSON.parse(table.dataset.versions || "[]") : [];
    for (const name of ["compare", "version-preview"]) document.getElementById(name).hidden = versions.length === 0;
    const edit = document.getElementById("edit");
    if (edit) edit.hidden = !(table && table.dataset.editable === "true");
    if (!versions.length) return;
    const options = versions.map((v) => [String(v.number), `v${v.number}${v.live ? " (live)" : ""}`]);
    const live = versions.find((v) => v.live) || versions[0];
    fill(diffForm.elements.version, options, chosen ? diffForm.elements.version.value : options[0][0]);
    fill(diffForm.elements.against, [["", "its parent"], ...options], diffForm.elements.against.value);
    fill(previewForm.elements.version, options, previewForm.elements.version.value || String(live.number));
  }

  diffForm.addEventListener("change", (event) => {
    if (event.target.name === "version") chosen = true;
    if (event.target.name === "mode" && shown) renderDiff(output, shown, diffForm.elements.mode.value);
  });
  diffForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const against = diffForm.elements.against.value;
    const query = against ? `?against=${encodeURIComponent(against)}` : "";
    say(diffState, "Loading the changes…");
    try {
      shown = await getJson(`${base}/versions/${encodeURIComponent(diffForm.elements.version.value)}/diff${query}`);
      renderDiff(output, shown, diffForm.elements.mode.value);
      const count = shown.changed.length + shown.added.length + shown.removed.length;
      say(diffState, `${count} file${count === 1 ? "" : "s"} differ between ${shown.against ? `v${shown.against}` : "no site"} and v${shown.version}.`);
    } catch (error) {
      shown = null;
      output.replaceChildren();
      say(diffState, refused("No diff", error), true);
    }
  });
  previewForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const n = previewForm.elements.version.value;
    const src = `${base}/versions/${encodeURIComponent(n)}/site/index.html`;
    frame.title = `Preview of version ${n} of order ${id}`;
    frame.src = src;
    frame.hidden = false;
    const link = previewLink.querySelector("a");
    link.href = src;
    link.textContent = `Open version ${n}`;
    previewLink.hidden = false;
  });
  if (editForm) {
    editForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = editForm.querySelector("button[type=submit]");
      const body = { instruction: editForm.elements.instruction.value };
      const pages = editForm.elements.pages.value.split(/[\s,]+/).filter(Boolean);
      if (pages.length) body.pages = pages;
      button.disabled = true;
      try {
        await post(`${base}/edits`, body);
        say(result, "Edit sent: its progress shows below, and its version joins the list once it succeeds.");
        editForm.reset();
        sent();
      } catch (error) {
        say(result, refused("Edit not sent", error), true);
      } finally {
        button.disabled = false;
      }
    });
  }
  document.getElementById("summary").addEventListener("click", async (event) => {
    const button = event.target.closest && event.target.closest("[data-rollback]");
    if (!button) return;
    const version = Number(button.dataset.rollback);
    try {
      await post(`${base}/rollback`, { version });
      say(result, `Rollback to v${version} sent: its progress shows below.`);
      sent();
    } catch (error) {
      say(result, refused(`Rollback to v${version} not sent`, error), true);
    }
  });
  sync();
  return { sync };
}

// Which run a progress row is of, and its kind as a generation's: "edit.phase.done" is ["edit", "phase.done"].
function lifecycle(kind) {
  const prefixed = /^(edit|rollback)\.(.+)$/.exec(kind || "");
  if (prefixed) return [prefixed[1], prefixed[2].startsWith("phase.") ? prefixed[2] : `generation.${prefixed[2]}`];
  return [/^(generation|phase)\./.test(kind || "") ? "generation" : null, kind];
}

function order() {
  const id = document.body.dataset.order;
  const timeline = document.getElementById("timeline");
  const state = document.getElementById("stream-state");
  const summary = document.getElementById("summary");
  const fragment = `/dashboard/orders/${encodeURIComponent(id)}`;
  const facts = summary.querySelector(".facts");
  let run = (facts && facts.dataset.run) || "generation";
  let source = null;
  let again = null;
  let lastId = 0; // the last progress row received
  let current = Number(document.body.dataset.generation) || 0; // the order's latest run, as far as seen
  // The run that was the latest when an edit or rollback was sent: until that one has started, the stream's
  // `end` is this run's, and the page asks again (with a growing pause) instead of stopping.
  let awaiting = null;
  let pause = 1000;
  const tools = versionTools(id, () => { awaiting = current; pause = 1000; timeline.replaceChildren(); connect(lastId); });

  function update() { refresh(summary, fragment).then(tools.sync).catch(() => {}); }
  function setStatus(status) {
    const badge = document.getElementById("live-status");
    if (badge) { badge.textContent = status; badge.className = `status status-${status}`; }
  }
  function setProgress(phase, count, total) {
    const live = document.getElementById("live-phase");
    if (live) live.textContent = phase || "—";
    const bar = document.querySelector("#live-progress progress");
    if (bar) { bar.max = total; bar.value = count; bar.textContent = `${count} of ${total}`; }
    const text = document.querySelector("#live-progress .muted");
    if (text) text.textContent = `${count}/${total}`;
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
    const event = row.details && row.details.event;
    const [of, kind] = lifecycle(event);
    if (of) run = of;
    const phases = PHASES_OF[run];
    if (row.generation_id) current = Math.max(current, row.generation_id);
    if (awaiting !== null && END_KINDS.has(event) && row.generation_id !== awaiting) awaiting = null;
    if (kind === "generation.started" || kind === "generation.resumed") { setStatus("running"); }
    if (kind === "phase.started") { setStatus("running"); setProgress(row.phase, phases.indexOf(row.phase), phases.length); }
    if (kind === "phase.done") { setProgress(row.phase, phases.indexOf(row.phase) + 1, phases.length); }
    if (kind === "generation.started" || kind === "generation.resumed" || kind === "phase.done") {
      // The phases, tokens, cost and versions as committed: the summary comes again from the server.
      update();
    }
  }
  function connect(after) {
    clearTimeout(again);
    if (source) source.close();
    source = new EventSource(`/v1/orders/${encodeURIComponent(id)}/events${after ? `?after=${after}` : ""}`);
    source.addEventListener("open", () => { state.textContent = awaiting === null ? "Live" : "Live: waiting for a replica to start it…"; });
    source.addEventListener("progress", (event) => {
      lastId = Math.max(lastId, Number(event.lastEventId) || 0);
      show(JSON.parse(event.data));
    });
    source.addEventListener("end", (event) => {
      const end = JSON.parse(event.data);
      source.close();
      if (awaiting !== null && end.generation_id === awaiting) {
        state.textContent = "Waiting for a replica to start it…";
        again = setTimeout(() => connect(lastId), pause);
        pause = Math.min(pause * 2, 8000);
        return;
      }
      awaiting = null;
      current = Math.max(current, end.generation_id);
      setStatus(end.status);
      state.textContent = `${run.charAt(0).toUpperCase()}${run.slice(1)} ${end.generation_id} ended: ${end.status}`;
      update();
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
