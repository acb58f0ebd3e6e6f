// /plots: draws the report's figures as SVG from /api/plots (ui.report panels): no image rendering on the
// server, so the page is as fast as its SQL. Each panel: labelled axes, one series per dataset/run with a
// legend; a curve with a single point says "one iteration so far" with its value instead of a dot.
"use strict";
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fde", "#e8710a", "#2a9d5c", "#c2185b", "#a04bd6", "#0b8a8f", "#6d4c41", "#7a8396"];
const W = 380, H = 250, M = {l: 58, r: 10, t: 24, b: 42};

function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(v) { return Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.01) ? v.toPrecision(3) : +v.toFixed(3) + ""; }
function ticks(lo, hi, n) {
  if (hi === lo) { hi = lo + 1; }
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const s = [1, 2, 5, 10].map((m) => m * step).find((m) => (hi - lo) / m <= n);
  const out = [];
  for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-9 * s; v += s) out.push(+v.toPrecision(12));
  return out;
}

function panel(p) {
  const box = document.createElement("div");
  box.className = "chart";
  const svg = el("svg", {width: W, height: H, role: "img", "aria-label": p.title});
  box.appendChild(svg);
  svg.appendChild(el("text", {x: W / 2, y: 15, "text-anchor": "middle", "font-weight": 600, "font-size": 13}, p.title));
  svg.appendChild(el("text", {x: (M.l + W - M.r) / 2, y: H - 6, "text-anchor": "middle", "font-size": 11, class: "xlabel"}, p.xlabel));
  svg.appendChild(el("text", {x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle", "font-size": 11, class: "ylabel",
                              transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})`}, p.ylabel));
  const series = p.series.filter((s) => s.y.some((v) => v !== null));
  const single = p.kind === "line" && series.every((s) => s.x.length <= 1);
  if (!series.length || single) {
    const lines = single && series.length ? ["one iteration so far", ...series.map((s) => `${s.name}: ${fmt(s.y[0])}`)] : ["no data yet"];
    lines.forEach((t, i) => svg.appendChild(el("text", {x: W / 2, y: H / 2 - 8 + 16 * i, "text-anchor": "middle", class: "note"}, t)));
    box.dataset.single = single ? "1" : "";
    return box;
  }
  const categorical = p.kind === "bar";
  const xs = categorical ? series[0].x : series.flatMap((s) => s.x);
  const ys = series.flatMap((s) => s.y.filter((v) => v !== null));
  let [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1); }
  const [x0, x1] = categorical ? [0, xs.length] : [Math.min(...xs), Math.max(...xs)];
  const sx = (x) => M.l + (W - M.l - M.r) * (categorical ? x / (x1 - x0) : (x - x0) / ((x1 - x0) || 1));
  const sy = (y) => H - M.b - (H - M.t - M.b) * (y - y0) / (y1 - y0);
  svg.appendChild(el("line", {x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b, stroke: "#555"}));
  svg.appendChild(el("line", {x1: M.l, y1: M.t, x2: M.l, y2: H - M.b, stroke: "#555"}));
  for (const v of ticks(y0, y1, 5)) {
    svg.appendChild(el("text", {x: M.l - 4, y: sy(v) + 4, "text-anchor": "end", "font-size": 10}, fmt(v)));
    svg.appendChild(el("line", {x1: M.l, y1: sy(v), x2: W - M.r, y2: sy(v), stroke: "#eee"}));
  }
  if (categorical) {
    const bw = (W - M.l - M.r) / xs.length / series.length;
    xs.forEach((label, i) => svg.appendChild(el("text", {x: sx(i + 0.5), y: H - M.b + 13, "text-anchor": "middle", "font-size": 10}, label)));
    series.forEach((s, j) => s.y.forEach((v, i) => {
      if (v === null) return;
      svg.appendChild(el("rect", {x: sx(i) + j * bw + 2, y: sy(Math.max(v, 0)), width: Math.max(bw - 4, 1),
                                  height: Math.abs(sy(v) - sy(0)), fill: COLORS[j % COLORS.length], class: "bar"}));
    }));
  } else {
    for (const v of ticks(x0, x1, 6)) svg.appendChild(el("text", {x: sx(v), y: H - M.b + 13, "text-anchor": "middle", "font-size": 10}, fmt(v)));
    series.forEach((s, j) => {
      const c = COLORS[j % COLORS.length];
      let d = "";
      if (p.kind === "hist") {  // x: bin edges, y: counts per bin
        s.y.forEach((v, i) => { d += `${i ? "L" : "M"}${sx(s.x[i])},${sy(v)}L${sx(s.x[i + 1])},${sy(v)}`; });
      } else {
        s.x.forEach((x, i) => { if (s.y[i] !== null) d += `${d ? "L" : "M"}${sx(x)},${sy(s.y[i])}`; });
      }
      svg.appendChild(el("path", {d, fill: "none", stroke: c, "stroke-width": 2, class: "series", "data-name": s.name}));
    });
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, j) => {
    const item = document.createElement("span");
    item.style.color = COLORS[j % COLORS.length];
    item.textContent = `■ ${s.name}  `;
    legend.appendChild(item);
  });
  box.appendChild(legend);
  return box;
}

(async () => {
  const root = document.getElementById("figures");
  const res = await fetch(root.dataset.src);
  const data = await res.json();
  root.textContent = "";
  if (!res.ok) { root.textContent = data.error; return; }
  for (const f of data.figures) {
    const fig = document.createElement("figure");
    fig.id = `fig-${f.name}`;
    fig.appendChild(Object.assign(document.createElement("figcaption"), {textContent: f.title}));
    if (!f.panels.length) fig.appendChild(Object.assign(document.createElement("p"), {className: "muted", textContent: "no data for this figure yet"}));
    f.panels.forEach((p) => fig.appendChild(panel(p)));
    root.appendChild(fig);
  }
  root.dataset.drawn = "1";
})();
