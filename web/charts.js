// Charts on uPlot (web/vendor/uplot, MIT; served from here, so the dashboard works offline):
// drag to zoom into a range of x, the mouse wheel zooms around the cursor and Shift+wheel pans,
// a double click shows everything again; the legend reads out every series under the cursor.
// While zoomed in, new points do not move the view.
"use strict";

const COLORS = ["#5aa9ff", "#f5b83d", "#5fd38d", "#ff6b6b", "#c792ea", "#4dd0e1", "#ffab91", "#aed581"];

function formatNumber(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100) return v.toFixed(0);
  if (a >= 1) return Number.isInteger(v) ? String(v) : v.toFixed(a >= 10 ? 1 : 3);
  if (a === 0) return "0";
  return v.toExponential(2);
}

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not
// pulled towards zero. weight 0 is the raw series; 0.99 is very smooth.
function smooth(values, weight) {
  let last = 0, n = 0;
  return values.map(v => {
    if (v === null || !Number.isFinite(v)) return v;
    last = last * weight + (1 - weight) * v;
    n += 1;
    return weight ? last / (1 - Math.pow(weight, n)) : v;
  });
}

// Several [xs, ys] series on one x axis (uPlot wants one), with nulls where a series has no point.
function align(series) {
  const xs = [...new Set(series.flatMap(s => s.xs))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  return [xs, ...series.map(s => {
    const ys = new Array(xs.length).fill(null);
    s.xs.forEach((x, i) => { ys[at.get(x)] = s.ys[i]; });
    return ys;
  })];
}

function wheelZoom(chart) {
  return {hooks: {ready: u => {
    u.over.addEventListener("wheel", e => {
      e.preventDefault();
      const {min, max} = u.scales.x;
      if (!(max > min)) return;
      const range = max - min;
      if (e.shiftKey || Math.abs(e.deltaX) > Math.abs(e.deltaY)) {  // pan
        const shift = range * 0.1 * Math.sign(e.deltaX || e.deltaY);
        chart.zoomTo(min + shift, max + shift);
      } else {
        const at = u.posToVal(e.offsetX, "x"), f = e.deltaY < 0 ? 0.8 : 1.25;
        chart.zoomTo(at - (at - min) * f, at + (max - at) * f);
      }
    }, {passive: false});
    u.over.addEventListener("dblclick", () => { chart.zoomed = false; });
  }}};
}

class Chart {
  constructor(box, {logY = false} = {}) {
    this.box = box;
    this.logY = logY;
    this.plot = null;
    this.signature = "";
    this.zoomed = false;
  }

  // series: [{label, color, xs, ys, width, alpha, dash, points}]
  set(series, xLabel) {
    const shown = series.filter(s => s.xs.length);
    this.box.dataset.points = String(shown.reduce((n, s) => n + (s.counted === false ? 0 : s.xs.length), 0));
    const data = align(shown);
    const signature = JSON.stringify([xLabel, this.logY, shown.map(s => [s.label, s.color, s.alpha, s.dash])]);
    if (signature !== this.signature || !this.plot) {
      this.signature = signature;
      this.build(shown, xLabel, data);
      return;
    }
    const view = this.zoomed ? {min: this.plot.scales.x.min, max: this.plot.scales.x.max} : null;
    this.plot.setData(data, !view);
    if (view) this.plot.setScale("x", view);
  }

  build(series, xLabel, data) {
    const view = this.zoomed && this.plot ? {min: this.plot.scales.x.min, max: this.plot.scales.x.max} : null;
    if (this.plot) this.plot.destroy();
    const width = Math.max(200, this.box.clientWidth || 400);
    const self = this;
    this.plot = new uPlot({
      width, height: 230,
      scales: {x: {time: false}, y: this.logY ? {distr: 3} : {}},
      axes: [{stroke: "#8b93a3", grid: {stroke: "#2a2f3a"}, values: (u, ticks) => ticks.map(formatNumber)},
             {stroke: "#8b93a3", grid: {stroke: "#2a2f3a"}, size: 64, values: (u, ticks) => ticks.map(formatNumber)}],
      series: [{label: xLabel, value: (u, v) => formatNumber(v)}, ...series.map(s => ({
        label: s.label, stroke: s.alpha ? s.color + s.alpha : s.color, width: s.width || 1.5, dash: s.dash,
        spanGaps: true, points: {show: !!s.points, size: 5, fill: s.color},
        value: (u, v) => formatNumber(v),
      }))],
      cursor: {drag: {x: true, y: false}},
      legend: {live: true},
      hooks: {setSelect: [u => { if (u.select.width > 0) self.zoomed = true; }]},
      plugins: [wheelZoom(this)],
    }, data, this.box);
    if (view) this.plot.setScale("x", view);
  }

  zoomTo(min, max) {
    this.zoomed = true;
    this.plot.setScale("x", {min, max});
  }

  resize() {
    if (this.plot) this.plot.setSize({width: Math.max(200, this.box.clientWidth), height: 230});
  }
}
