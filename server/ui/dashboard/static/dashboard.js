// fedcoord dashboard: renders the JSON API into the page. No framework, no build step.
// Every value from a run store is written with textContent, never parsed as HTML.
"use strict";

const FINAL_STATES = ["stopped", "completed", "failed"];
const ACTION_HEADERS = { "X-Fedcoord-Request": "1", "Content-Type": "application/json" };
const ALLOWED = {
  running: ["pause", "stop"],
  paused: ["resume", "stop"],
};

// ------------------------------------------------------------------ helpers
const $ = (id) => document.getElementById(id);

function fmt(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function clock(epochSeconds) {
  if (typeof epochSeconds !== "number") return "–";
  return new Date(epochSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

// Flower node ids are 64-bit numbers: show the ends, keep the whole id as a tooltip.
function nodeCell(nodeId) {
  const text = String(nodeId);
  const td = cell(text.length > 12 ? `${text.slice(0, 5)}…${text.slice(-4)}` : text, "node");
  td.title = text;
  return td;
}

function fillTable(bodyId, rows, makeCells, emptyId) {
  const body = $(bodyId);
  body.replaceChildren(
    ...rows.map((row) => {
      const tr = document.createElement("tr");
      tr.append(...makeCells(row));
      return tr;
    }),
  );
  if (emptyId) {
    $(emptyId).hidden = rows.length > 0;
    body.closest("table").hidden = rows.length === 0;
  }
}

function setLive(state, text) {
  const live = $("live");
  live.dataset.live = state;
  live.textContent = text;
}

function setBadge(element, state) {
  element.dataset.state = state;
  element.textContent = state;
}

function runUrl(name, suffix = "") {
  return `/api/runs/${encodeURIComponent(name)}${suffix}`;
}

// ---------------------------------------------------------------- runs page
async function refreshRuns() {
  try {
    const response = await fetch("/api/runs", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    $("runs-dir").textContent = data.runs_dir;
    keepSelectable(data.runs);
    fillTable("runs-body", data.runs, runCells, "runs-empty");
    setLive("live", "live");
    refreshCompare(data.runs);
  } catch (error) {
    setLive("offline", `offline (${error.message})`);
  }
}

function runCells(run) {
  const pick = pickCell(run);
  const name = document.createElement("td");
  const link = document.createElement("a");
  link.href = `/runs/${encodeURIComponent(run.run_name)}`;
  link.textContent = run.run_name;
  name.append(link);
  // A folder copied or renamed: its run.db records another run name.
  if (run.stored_run_name && run.stored_run_name !== run.run_name) {
    const note = document.createElement("span");
    note.className = "muted";
    note.textContent = ` (holds run '${run.stored_run_name}')`;
    name.append(note);
  }
  const state = document.createElement("td");
  const badge = document.createElement("span");
  badge.className = "badge";
  setBadge(badge, run.state);
  state.append(badge);
  if (run.state === "unreadable") {
    // Its run.db cannot be read: the reason takes the place of the numbers.
    const why = cell(run.message, "reason");
    why.colSpan = 6;
    return [pick, name, state, why];
  }
  const progress = document.createElement("td");
  progress.textContent = run.num_rounds ? `${run.current_round}/${run.num_rounds}` : "–";
  if (run.num_rounds) {
    const bar = document.createElement("span");
    bar.className = "mini-bar";
    const fillSpan = document.createElement("span");
    fillSpan.style.width = `${Math.round(100 * (run.progress || 0))}%`;
    bar.append(fillSpan);
    progress.append(bar);
  }
  return [
    pick,
    name,
    state,
    progress,
    cell(fmt(run.accuracy), "num"),
    cell(fmt(run.best_accuracy), "num"),
    cell(run.nodes, "num"),
    cell(FINAL_STATES.includes(run.state) ? "–" : duration(run.eta_s), "num"),
    cell(duration(run.age_s), "num"),
  ];
}

// ------------------------------------------------------- runs page: compare
// Runs ticked for comparison, kept across the list's refreshes.
const compare = { selected: new Set(), key: "", runs: [] };

function pickCell(run) {
  const td = cell("", "pick");
  const box = document.createElement("input");
  box.type = "checkbox";
  box.value = run.run_name;
  box.checked = compare.selected.has(run.run_name);
  box.disabled = run.state === "unreadable";
  box.setAttribute("aria-label", `compare ${run.run_name}`);
  box.addEventListener("change", () => {
    if (box.checked) compare.selected.add(run.run_name);
    else compare.selected.delete(run.run_name);
    refreshCompare(compare.runs);
  });
  td.append(box);
  return td;
}

// A run that is gone, or cannot be read, leaves the comparison.
function keepSelectable(runs) {
  const readable = new Set(runs.filter((r) => r.state !== "unreadable").map((r) => r.run_name));
  for (const name of [...compare.selected]) if (!readable.has(name)) compare.selected.delete(name);
}

function compareQuery() {
  const params = new URLSearchParams();
  for (const name of compare.selected) params.append("run", name);
  const target = $("compare-target").value.trim();
  if (target) params.set("target", target);
  return params.toString();
}

// Ask again only when the selection, the target or a selected run's progress changed.
async function refreshCompare(runs) {
  compare.runs = runs;
  const names = [...compare.selected];
  $("compare").hidden = names.length === 0;
  $("compare-hint").hidden = names.length !== 1;
  if (names.length < 2) {
    $("compare-result").hidden = true;
    $("compare-error").hidden = true;
    compare.key = "";
    return;
  }
  const query = compareQuery();
  const progress = runs.filter((r) => compare.selected.has(r.run_name)).map((r) => `${r.current_round}${r.state}`);
  const key = `${query}|${progress.join(",")}`;
  if (key === compare.key) return;
  compare.key = key;
  try {
    const response = await fetch(`/api/compare?${query}`, { cache: "no-store" });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    renderComparison(data, query, key);
  } catch (error) {
    compare.key = "";
    $("compare-result").hidden = true;
    $("compare-error").hidden = false;
    $("compare-error").textContent = error.message;
  }
}

function renderComparison(data, query, key) {
  $("compare-error").hidden = true;
  $("compare-result").hidden = false;
  const target = data.target;
  const hasTarget = typeof target === "number";
  const others = data.differing_keys.filter((k) => k !== "strategy");
  const head = ["Run", "State", "Strategy", "Config", "Rounds", "Final", "Best"];
  if (hasTarget) head.push(`Round @${target}`, `Time @${target}`);
  head.push("Rejected", "Epsilon");
  fillHead("compare-head", head);
  fillTable("compare-body", data.runs, (run) => {
    const cells = [
      cell(run.run_name),
      cell(run.state),
      cell(run.strategy),
      cell(others.map((k) => `${k}=${run.differs[k]}`).join(" ") || "–"),
      cell(`${run.rounds}/${run.num_rounds}`, "num"),
      cell(fmt(run.final_accuracy), "num"),
      cell(fmt(run.best_accuracy), "num"),
    ];
    if (hasTarget) cells.push(cell(run.target_round ?? "–", "num"), cell(duration(run.target_time_s), "num"));
    cells.push(cell(run.rejected, "num"), cell(run.epsilon_text === "-" ? "–" : run.epsilon_text, "num"));
    return cells;
  });
  renderSeeds(data.over_seeds, hasTarget ? target : null);
  for (const axis of ["round", "time"]) {
    $(`compare-${axis}`).src = `/api/compare/${axis}.svg?${query}&v=${encodeURIComponent(key)}`;
  }
}

function renderSeeds(summaries, target) {
  $("compare-seeds").hidden = summaries.length === 0;
  const meanStd = (s, show) => (s.mean === null ? "–" : show(s.mean) + (s.std === null ? "" : ` ± ${show(s.std)}`));
  const head = ["Over seeds", "Runs", "Final", "Best"];
  if (target !== null) head.push(`Reached ${target}`, `Time @${target}`);
  head.push("Wall time");
  fillHead("compare-seeds-head", head);
  fillTable("compare-seeds-body", summaries, (s) => {
    const cells = [cell(s.label), cell(s.runs, "num"), cell(meanStd(s.final_accuracy, fmt), "num"), cell(meanStd(s.best_accuracy, fmt), "num")];
    if (target !== null) cells.push(cell(`${s.reached_target}/${s.runs}`, "num"), cell(meanStd(s.target_time_s, duration), "num"));
    cells.push(cell(meanStd(s.wall_time_s, duration), "num"));
    return cells;
  });
}

function fillHead(rowId, labels) {
  $(rowId).replaceChildren(
    ...labels.map((label) => {
      const th = document.createElement("th");
      th.textContent = label;
      return th;
    }),
  );
}

// ----------------------------------------------------------------- run page
const page = { name: "", detail: null, receivedAt: 0, chartKey: "", partitions: "" };

function startRunPage() {
  page.name = decodeURIComponent(window.location.pathname.split("/")[2] || "");
  document.title = `fedcoord · ${page.name}`;
  $("crumb-run").textContent = page.name;
  $("run-title").textContent = page.name;
  for (const button of document.querySelectorAll("button[data-command]")) {
    button.addEventListener("click", () => sendCommand(button.dataset.command));
  }
  $("weight-form").addEventListener("submit", sendWeight);
  connect();
  window.setInterval(tick, 1000);
}

function connect() {
  const source = new EventSource(runUrl(page.name, "/stream"));
  source.addEventListener("run", (event) => {
    setLive("live", "live");
    render(JSON.parse(event.data));
    if (FINAL_STATES.includes(page.detail.status.state)) {
      source.close();
      setLive("finished", "finished · read-only");
    }
  });
  // The run's store cannot be read: the server ends the stream; so does the page.
  source.addEventListener("problem", (event) => {
    source.close();
    const problem = JSON.parse(event.data);
    setLive("offline", "unreadable · reload to retry");
    setBadge($("state-badge"), problem.state || "unreadable");
    $("run-message").hidden = false;
    $("run-message").textContent = problem.error;
    for (const button of document.querySelectorAll("button[data-command], #btn-weight")) {
      button.disabled = true;
    }
  });
  source.onerror = () => {
    if (source.readyState !== EventSource.CLOSED) setLive("offline", "reconnecting…");
  };
}

function render(detail) {
  page.detail = detail;
  page.receivedAt = Date.now() / 1000;
  const status = detail.status;
  renderHeader(detail, status);
  renderKpis(detail, status);
  renderCharts(detail, status);
  renderNodes(detail.nodes);
  fillTable("rejections-body", detail.rejections, rejectionCells, "rejections-empty");
  fillTable("rounds-body", [...detail.rounds].reverse(), roundCells, "rounds-empty");
  fillTable("events-body", [...detail.events].reverse(), eventCells, "events-empty");
  tick();
}

function renderHeader(detail, status) {
  setBadge($("state-badge"), status.state);
  const config = detail.config;
  $("run-config").replaceChildren(
    ...Object.entries(config).map(([key, value]) => {
      const span = document.createElement("span");
      span.textContent = `${key} ${value}`;
      return span;
    }),
  );
  $("round-label").textContent = status.step === "version" ? "Version" : "Round";
  $("round-current").textContent = status.current_round;
  $("round-total").textContent = status.num_rounds;
  const percent = Math.round(100 * status.progress);
  $("progress-fill").style.width = `${percent}%`;
  $("progress-caption").textContent = `${percent}% · ${progressText(status)}`;
  const expected = status.state === "running" ? status.replies_expected || 0 : 0;
  const replies = expected ? Math.min(1, status.replies_received / expected) : 0;
  $("replies-fill").style.width = `${Math.round(100 * replies)}%`;
  $("fact-replies").textContent = expected ? `${status.replies_received}/${expected}` : "–";
  $("fact-phase").textContent = status.state === "running" ? phaseText(status.phase) : "–";
  $("fact-eta").textContent = status.state === "running" ? duration(status.eta_s) : "–";
  $("run-message").hidden = !status.message;
  $("run-message").textContent = status.message || "";
  const pending = detail.pending_commands.map((c) => c.argument ? `${c.command} ${c.argument}` : c.command);
  $("pending").hidden = pending.length === 0;
  $("pending").textContent = pending.length ? `queued: ${pending.join(", ")}` : "";
  const allowed = ALLOWED[status.state] || [];
  for (const button of document.querySelectorAll("button[data-command]")) {
    button.disabled = !allowed.includes(button.dataset.command);
  }
  $("btn-weight").disabled = !["running", "paused"].includes(status.state);
}

const PHASES = { train: "training", evaluate: "evaluating", "waiting-for-nodes": "waiting for nodes" };

function phaseText(phase) {
  return PHASES[phase] || phase || "starting";
}

function progressText(status) {
  if (status.current_round >= status.num_rounds) return "all rounds done";
  if (status.state === "running") return `round ${status.current_round + 1}: ${phaseText(status.phase)}`;
  return `${status.state} after round ${status.current_round}`;
}

function renderKpis(detail, status) {
  const metrics = status.metrics || {};
  $("kpi-accuracy").textContent = fmt(metrics.central_accuracy);
  $("kpi-best").textContent = fmt(status.best_accuracy);
  $("kpi-federated").textContent = fmt(metrics.federated_accuracy);
  $("kpi-loss").textContent = fmt(metrics.central_loss);
  $("kpi-nodes").textContent = status.nodes;
  const rejected = detail.rounds.reduce((sum, r) => sum + (r.rejected || 0), 0);
  const failed = detail.rounds.reduce((sum, r) => sum + (r.failed || 0), 0);
  $("kpi-faults").textContent = `${rejected} / ${failed}`;
  const privacy = status.privacy || {};
  $("kpi-epsilon").textContent = privacy.epsilon_text || "–";
  $("kpi-epsilon").title = privacy.private
    ? `delta ${privacy.delta}, ${privacy.sampling} sampling, noise multiplier ${privacy.noise_multiplier}` +
      (privacy.target_epsilon > 0 ? `, budget ${privacy.target_epsilon}` : "")
    : "no noise: not differentially private";
}

function renderCharts(detail, status) {
  const key = `${detail.rounds.length}-${status.current_round}-${status.num_rounds}`;
  if (key === page.chartKey) return;
  page.chartKey = key;
  for (const img of document.querySelectorAll("img[data-chart]")) {
    img.src = `${runUrl(page.name, `/charts/${img.dataset.chart}.svg`)}?v=${key}`;
  }
}

function renderNodes(nodes) {
  fillTable("nodes-body", nodes, nodeCells, "nodes-empty");
  const partitions = nodes.map((n) => n.partition_id).filter((p) => p !== null);
  const signature = partitions.join(",");
  if (signature === page.partitions) return;
  page.partitions = signature;
  const select = $("weight-partition");
  const chosen = select.value;
  select.replaceChildren(
    ...partitions.map((p) => {
      const option = document.createElement("option");
      option.value = option.textContent = String(p);
      return option;
    }),
  );
  if (partitions.map(String).includes(chosen)) select.value = chosen;
}

function nodeCells(node) {
  const now = page.detail ? page.detail.now : Date.now() / 1000;
  return [
    cell(node.partition_id, "num"),
    nodeCell(node.node_id),
    cell(node.device || "–"),
    cell(node.num_examples, "num"),
    cell(node.rounds_joined, "num"),
    cell(node.failures, node.failures ? "num warn" : "num"),
    cell(node.rejected, node.rejected ? "num warn" : "num"),
    cell(fmt(node.weight, 2), "num"),
    cell(node.last_seen ? `${duration(now - node.last_seen)} ago` : "–", "num"),
  ];
}

function rejectionCells(row) {
  return [
    cell(row.round, "num"),
    nodeCell(row.node_id),
    cell(row.kind),
    cell(row.reason, "reason"),
    cell(clock(row.at), "num time"),
  ];
}

function roundCells(row) {
  const clients = `${row.accepted}/${row.sampled}` + (row.rejected || row.failed ? ` (−${row.rejected + row.failed})` : "");
  return [
    cell(row.round, "num"),
    cell(fmt(row.central_accuracy), "num"),
    cell(fmt(row.federated_accuracy), "num"),
    cell(fmt(row.central_loss), "num"),
    cell(fmt(row.train_loss), "num"),
    cell(row.round === 0 ? "–" : clients, "num"),
    cell(row.round === 0 ? "–" : row.epsilon_text, "num"),
    cell(row.round === 0 ? "–" : `${fmt(row.duration_s, 1)}s`, "num"),
    cell(row.note || ""),
  ];
}

function eventCells(event) {
  return [cell(clock(event.at), "time"), cell(event.kind, "kind"), cell(event.message)];
}

// Relative times move on between snapshots.
function tick() {
  const detail = page.detail;
  if (!detail) return;
  const status = detail.status;
  const elapsed = Date.now() / 1000 - page.receivedAt;
  const final = FINAL_STATES.includes(status.state);
  const age = status.heartbeat_age_s;
  $("fact-heartbeat").textContent = final || age === null ? "–" : `${duration(age + elapsed)} ago`;
  $("fact-age").textContent = `${duration(detail.now + elapsed - status.created_at)} ago`;
}

// ------------------------------------------------------------------ actions
function showNotice(kind, text) {
  const notice = $("notice");
  notice.dataset.kind = kind;
  notice.textContent = text;
  notice.hidden = false;
}

async function post(suffix, body) {
  try {
    const response = await fetch(runUrl(page.name, suffix), {
      method: "POST",
      headers: ACTION_HEADERS,
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    const data = await response.json().catch(() => ({}));
    if (response.ok) showNotice("ok", data.message || "done");
    else showNotice("error", data.error || `HTTP ${response.status}`);
  } catch (error) {
    showNotice("error", `request failed: ${error.message}`);
  }
}

function sendCommand(command) {
  if (command === "stop" && !window.confirm(`Stop run ${page.name}? The round in flight is abandoned.`)) {
    return;
  }
  post(`/${command}`);
}

function sendWeight(event) {
  event.preventDefault();
  const partition = Number.parseInt($("weight-partition").value, 10);
  const weight = Number.parseFloat($("weight-value").value);
  if (!Number.isInteger(partition)) {
    showNotice("error", "no partition to weight yet");
    return;
  }
  post("/weight", { partition, weight });
}

// -------------------------------------------------------------------- start
document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "run") {
    startRunPage();
  } else {
    refreshRuns();
    window.setInterval(refreshRuns, 2000);
    $("compare-target").addEventListener("change", () => refreshCompare(compare.runs));
  }
});
