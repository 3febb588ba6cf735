// The dashboard: loads the run's whole history, then follows it live over Server-Sent Events.
// Every string from the run, a peer or a user goes into the page as text (textContent), never
// as HTML.
"use strict";

const run = {step: [], eval: [], round: [], samples: [], status: null, t0: null};
const $ = id => document.getElementById(id);

function clock(s) {
  if (!Number.isFinite(s) || s < 0) return "–";
  s = Math.round(s);
  return `${Math.floor(s / 3600)}:${String(Math.floor(s / 60) % 60).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
}

function xOf(p) {
  const axis = $("xaxis").value;
  if (axis === "tokens") return p.tokens;
  if (axis === "time") return p.elapsed ?? (p.time - run.t0);
  return p.kind === "round" ? p.round : p.step;
}

function smooth(points, alpha = 0.05) {
  let m = null;
  return points.map(([x, y]) => [x, (m = m === null ? y : m + alpha * (y - m))]);
}

function render() {
  const hive = run.step.length === 0 && run.round.length > 0;
  const train = hive ? run.round.map(p => [xOf(p), p.train_loss]) : run.step.map(p => [xOf(p), p.loss]);
  const val = run.eval.map(p => [xOf(p), p.val_loss]);  // a hive's are evaluated off the rounds' path, some skipped
  const xLabel = $("xaxis").selectedOptions[0].textContent;
  drawChart($("chart-loss"), [
    {name: "train", color: "#5aa9ff", opacity: 0.35, points: train, width: 1},
    {name: "smoothed", color: "#5aa9ff", points: smooth(train), width: 2},
    {name: "validation", color: "#f5b83d", points: val, width: 2, dots: true},
  ], xLabel);
  drawChart($("chart-lr"), [{color: "#5fd38d", points: run.step.map(p => [xOf(p), p.lr])}], xLabel);
  drawChart($("chart-grad"), [{color: "#ff6b6b", points: run.step.map(p => [xOf(p), p.grad_norm])}], xLabel);
  const rate = hive ? run.round.map((p, i) => [xOf(p), i ? (p.tokens - run.round[i - 1].tokens) / (p.time - run.round[i - 1].time) : NaN])
                    : run.step.map(p => [xOf(p), p.tokens_per_sec]);
  drawChart($("chart-rate"), [{color: "#c792ea", points: rate}], xLabel);
  renderHeader();
}

function renderHeader() {
  const s = run.status;
  if (!s) return;
  const info = s.info || {};
  $("role").textContent = s.role;
  $("state").textContent = s.state;
  const lastStep = run.step[run.step.length - 1], lastEval = run.eval[run.eval.length - 1];
  const lastRound = run.round[run.round.length - 1];
  const elapsed = (s.now ?? Date.now() / 1000) - s.started;
  $("elapsed").textContent = clock(elapsed);
  if (s.role === "coordinator") {
    $("progress-label").textContent = "round";
    $("progress").textContent = `${s.round}${s.hive && s.hive.rounds ? " / " + s.hive.rounds : ""}`;
    $("tokens").textContent = formatNumber(s.tokens || 0);
    const recent = run.round.slice(-5);
    const r = recent.length > 1 ? (recent.at(-1).tokens - recent[0].tokens) / (recent.at(-1).time - recent[0].time) : NaN;
    $("rate").textContent = Number.isFinite(r) ? formatNumber(r) : "–";
    $("eta").textContent = "–";
    const lastVal = run.eval[run.eval.length - 1];
    $("losses").textContent = lastRound ? `${lastRound.train_loss.toFixed(3)} / ${lastVal ? lastVal.val_loss.toFixed(3) : "–"}` : "–";
  } else {
    // A served checkpoint is at its own step, whatever the run went on to (its curves go on).
    const step = s.role === "model" || !lastStep ? (info.step || 0) : lastStep.step, total = info.steps;
    $("progress").textContent = total ? `${step} / ${total}` : String(step);
    $("tokens").textContent = formatNumber(lastStep ? lastStep.tokens : 0);
    const recent = run.step.slice(-20);
    const rate = recent.length ? recent.reduce((a, p) => a + p.tokens_per_sec, 0) / recent.length : NaN;
    $("rate").textContent = Number.isFinite(rate) ? formatNumber(rate) : "–";
    // The pace since this daemon started, evaluations and samples included: an ETA from the last
    // few steps swings each time an evaluation lands among them.
    const mine = run.step.filter(p => p.time >= s.started);
    const pace = mine.length > 1 ? (mine.at(-1).time - mine[0].time) / (mine.at(-1).step - mine[0].step) : 0;
    $("eta").textContent = s.state === "training" && pace > 0 ? clock((total - step) * pace) : "–";
    $("losses").textContent = `${lastStep ? lastStep.loss.toFixed(3) : "–"} / ${lastEval ? lastEval.val_loss.toFixed(3) : "–"}`;
  }
  $("config").textContent = JSON.stringify({preset: info.preset, params: info.params, model: info.model,
                                            train: info.config, hive: info.hive}, null, 2);
  if (s.role === "coordinator") renderHive(s);
  if (s.cluster) renderCluster(s.cluster);
}

function renderCluster(c) {
  $("cluster").hidden = false;
  const restarts = c.restarts ? `, ${c.restarts} restart${c.restarts > 1 ? "s" : ""} from a checkpoint` : "";
  $("cluster-note").textContent = `(${c.workers.length} of ${[...new Set(c.requested)].join("-")}${restarts}; Ray at ${c.address})`;
  const rows = $("workers");
  rows.replaceChildren();
  for (const w of c.workers) cells(rows, [w.rank, w.node, w.pid, w.weights ? w.weights.slice(0, 16) : "–"]);
}

function cells(row, values) {
  const tr = document.createElement("tr");
  for (const v of values) {
    const td = document.createElement("td");
    td.textContent = v;  // peer names and devices are untrusted: text only
    tr.appendChild(td);
  }
  row.appendChild(tr);
}

function renderHive(s) {
  $("hive").hidden = false;
  const peers = $("peers");
  peers.replaceChildren();
  for (const p of s.peers || []) {
    cells(peers, [p.name, p.device, p.state, p.rounds, formatNumber(p.tokens), formatNumber(p.tokens_per_sec),
                  `${p.last_seen}s ago`]);
  }
  if (!(s.peers || []).length) cells(peers, ["no peers connected", "", "", "", "", "", ""]);
  const rounds = $("rounds");
  rounds.replaceChildren();
  const vals = new Map(run.eval.map(p => [p.step, p.val_loss]));  // a hive's evaluations are labelled by round
  for (const r of run.round.slice(-15).reverse()) {
    cells(rounds, [r.round, r.peers, r.accepted, r.clipped, r.rejected, r.late ?? 0, formatNumber(r.bytes_in),
                   formatNumber(r.bytes_out), r.seconds, vals.has(r.round) ? vals.get(r.round).toFixed(4) : "–"]);
  }
}

function renderSamples() {
  const box = $("samples");
  box.replaceChildren();
  if (!run.samples.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "no samples yet";
    box.appendChild(p);
  }
  for (const s of run.samples) {
    const div = document.createElement("div");
    div.className = "sample";
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `step ${s.step}`;
    const pre = document.createElement("pre");
    pre.textContent = (s.prompt || "") + s.text;
    div.append(meta, pre);
    box.appendChild(div);
  }
}

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  setTimeout(() => { pending = false; render(); }, 250);
}

function add(record) {
  const list = run[record.kind];
  if (record.kind === "sample") {
    if (run.samples.length && run.samples[0].step >= record.step && run.samples[0].time >= record.time) return;
    run.samples.unshift(record);
    run.samples.length = Math.min(run.samples.length, 50);
    renderSamples();
  } else if (list) {
    const key = record.kind === "round" ? "round" : "step";
    if (list.length && list.at(-1)[key] >= record[key]) return;  // already in the history
    list.push(record);
    if (run.t0 === null) run.t0 = record.time;
    schedule();
  } else if (record.kind === "restart") {  // the workers went back to a checkpoint: later steps are redone
    for (const kind of ["step", "eval"]) run[kind] = run[kind].filter(p => p.step <= record.step);
    refreshStatus();
    schedule();
  } else if (run.status && ["start", "done", "stopped", "state"].includes(record.kind)) {
    if (record.kind === "start") Object.assign(run.status.info, record);
    run.status.state = record.state || (record.kind === "start" ? "training" : record.kind);
    renderHeader();
  }
}

async function refreshStatus() {
  try {
    run.status = await (await fetch("/api/status")).json();
    renderHeader();
  } catch (e) { /* the daemon may be restarting; the next poll retries */ }
}

async function start() {
  const early = [];
  const source = new EventSource("/api/events");
  source.onmessage = e => early.push(JSON.parse(e.data));  // until the history is in
  const [history] = await Promise.all([fetch("/api/history").then(r => r.json()), refreshStatus()]);
  for (const kind of ["step", "eval", "round"]) run[kind] = history[kind];
  run.samples = history.samples;
  run.t0 = [...run.step, ...run.eval, ...run.round].reduce((m, p) => Math.min(m, p.time), Infinity);
  if (!Number.isFinite(run.t0)) run.t0 = null;
  const queued = early.splice(0);
  for (const record of queued) add(record);
  source.onmessage = e => add(JSON.parse(e.data));
  renderSamples();
  render();
  setInterval(refreshStatus, 2000);
}

$("xaxis").addEventListener("change", render);
window.addEventListener("resize", schedule);
start();
