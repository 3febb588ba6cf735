// A small SVG line chart: hand-written because four charts of a few thousand points each need
// nothing more, and a page with no build step and no network should not fetch a library.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

function formatNumber(v) {
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return v.toFixed(2);
  if (a === 0) return "0";
  return v.toExponential(1);
}

// series: [{name, color, points: [[x, y], ...], width, dots}]
function drawChart(svg, series, xLabel) {
  const W = svg.clientWidth || 500, H = svg.clientHeight || 230, L = 48, R = 10, T = 8, B = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const all = series.flatMap(s => s.points).filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  svg.dataset.points = String(series.reduce((n, s) => n + s.points.length, 0));
  if (!all.length) {
    el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, svg).textContent = "waiting for data";
    return;
  }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 1; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    el("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}, svg);
    el("text", {x: L - 4, y: sy(t) + 3, "text-anchor": "end"}, svg).textContent = formatNumber(t);
  }
  for (const t of niceTicks(x0, x1, 5)) {
    el("text", {x: sx(t), y: H - B + 14, "text-anchor": "middle"}, svg).textContent = formatNumber(t);
  }
  el("text", {x: W - R, y: H - 2, "text-anchor": "end"}, svg).textContent = xLabel;
  for (const s of series) {
    const pts = s.points.filter(p => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (!pts.length) continue;
    const d = pts.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    el("path", {d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.5, opacity: s.opacity || 1}, svg);
    if (s.dots) for (const p of pts) el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color}, svg);
  }
}
