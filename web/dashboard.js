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

const charts = {loss: new Chart($("chart-loss")), lr: new Chart($("chart-lr")), grad: new Chart($("chart-grad")),
                rate: new Chart($("chart-rate"))};
const compared = new Map();  // run name → its history, for the runs ticked in the list

function series(label, color, points, y, extra = {}) {
  return {label, color, xs: points.map(xOf), ys: points.map(y), ...extra};
}

function render() {
  const weight = Number($("smooth").value);
  const hive = run.step.length === 0 && run.round.length > 0;
  const trainPoints = hive ? run.round : run.step;
  const trainY = p => hive ? p.train_loss : p.loss;
  const xLabel = $("xaxis").selectedOptions[0].textContent;
  const raw = series("train", COLORS[0], trainPoints, trainY, {alpha: "55", width: 1});
  const loss = [raw, {...raw, label: "train (smoothed)", alpha: undefined, width: 2, ys: smooth(raw.ys, weight),
                      counted: false},
                series("validation", COLORS[1], run.eval, p => p.val_loss, {width: 2, points: true})];
  let i = 2;
  for (const [name, h] of compared) {  // other runs, each in a colour of its own
    const color = COLORS[i++ % COLORS.length];
    const theirs = series(`${name} train (smoothed)`, color, h.step, p => p.loss, {counted: false});
    loss.push({...theirs, ys: smooth(theirs.ys, weight)},
              series(`${name} validation`, color, h.eval, p => p.val_loss, {dash: [6, 4], points: true, counted: false}));
  }
  charts.loss.set(loss, xLabel);
  charts.lr.set([series("learning rate", COLORS[2], run.step, p => p.lr)], xLabel);
  charts.grad.set([series("gradient norm", COLORS[3], run.step, p => p.grad_norm)], xLabel);
  const later = run.round.slice(1);  // a hive's rate: tokens between two rounds over the time between them
  const rateRaw = hive
    ? {label: "tokens/s", color: COLORS[4], xs: later.map(xOf),
       ys: later.map((p, k) => (p.tokens - run.round[k].tokens) / (p.time - run.round[k].time))}
    : series("tokens/s", COLORS[4], run.step, p => p.tokens_per_sec);
  charts.rate.set([{...rateRaw, alpha: "55", width: 1},
                   {...rateRaw, label: "tokens/s (smoothed)", ys: smooth(rateRaw.ys, weight), width: 2, counted: false}],
                  xLabel);
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

// Other runs (`hived serve --runs DIR`): tick one to overlay its curves and see its configuration.
async function listRuns() {
  let runs;
  try {
    runs = await (await fetch("/api/runs")).json();
  } catch (e) { return; }
  if (!runs.length) return;
  $("runs").hidden = false;
  const rows = $("run-list");
  rows.replaceChildren();
  for (const r of runs) {
    const tr = document.createElement("tr");
    const tick = document.createElement("input");
    tick.type = "checkbox";
    tick.dataset.run = r.name;
    tick.addEventListener("change", () => toggleRun(r.name, tick.checked));
    const first = document.createElement("td");
    first.appendChild(tick);
    tr.appendChild(first);
    for (const v of [r.name, r.step ?? "–", r.best_val === null ? "–" : r.best_val.toFixed(4), formatNumber(r.params)]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    rows.appendChild(tr);
  }
}

async function toggleRun(name, on) {
  if (on) {
    const history = await (await fetch(`/api/runs/${encodeURIComponent(name)}`)).json();
    compared.set(name, history);
  } else {
    compared.delete(name);
  }
  renderConfigs();
  render();
}

function flatten(prefix, value, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(prefix ? `${prefix}.${k}` : k, v, out);
  } else {
    out[prefix] = Array.isArray(value) ? value.join(", ") : String(value);
  }
  return out;
}

function renderConfigs() {
  const table = $("run-configs");
  table.replaceChildren();
  $("run-configs-box").hidden = compared.size === 0;
  if (!compared.size) return;
  const names = [...compared.keys()];
  const flat = names.map(n => flatten("", {train: compared.get(n).config, model: compared.get(n).model}, {}));
  const keys = [...new Set(flat.flatMap(Object.keys))].sort();
  const head = document.createElement("tr");
  for (const v of ["", ...names]) {
    const th = document.createElement("th");
    th.textContent = v;
    head.appendChild(th);
  }
  table.appendChild(head);
  for (const key of keys) {
    const values = flat.map(f => f[key] ?? "–");
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    const differs = new Set(values).size > 1;
    for (const v of [key, ...values]) {
      const td = document.createElement("td");
      td.textContent = v;
      if (differs && v !== key) td.className = "differs";
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
}

$("xaxis").addEventListener("change", render);
$("smooth").addEventListener("input", () => { $("smooth-value").textContent = Number($("smooth").value).toFixed(2); render(); });
$("logy").addEventListener("change", () => { charts.loss.logY = $("logy").checked; render(); });
window.addEventListener("resize", () => Object.values(charts).forEach(c => c.resize()));
window.hivedCharts = charts;  // for the browser tests: zoom, scales and legends
start().then(listRuns);
