// A small line-chart drawer on <canvas> for the console (no library): time on x, one line
// per series, a y axis from 0 to a rounded maximum, a legend built as text.
"use strict";
const PALETTE = ["#2f6fde", "#1f8a4c", "#c0392b", "#b35c00", "#7b4fc9", "#138496", "#d63384", "#5c6b00",
                 "#6b7385", "#e0a800"];

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function formatNumber(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 1 ? 3 : 1);
}

// drawChart(canvas, legendElement, times [epoch s], series {name: [value|null]}, unit)
function drawChart(canvas, legend, times, series, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const left = 48, right = 8, top = 8, bottom = 22;
  const names = Object.keys(series);
  let max = 0;
  for (const n of names) for (const v of series[n]) if (v != null && v > max) max = v;
  max = niceMax(max);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7385";
  ctx.strokeStyle = "#e6e9f0";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {  // grid and y labels
    const y = top + (h - top - bottom) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(formatNumber(max * i / 4), left - 6, y);
  }
  const n = times.length;
  const x = (i) => left + (w - left - right) * (n <= 1 ? 1 : i / (n - 1));
  const y = (v) => top + (h - top - bottom) * (1 - v / max);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  if (n > 1) {  // x labels: how long ago
    for (const frac of [0, 0.25, 0.5, 0.75, 1]) {
      const i = Math.round(frac * (n - 1));
      const ago = times[n - 1] - times[i];
      const label = ago === 0 ? "now" : ago >= 60 ? `-${Math.round(ago / 60)} min` : `-${ago} s`;
      ctx.fillText(label, x(i), h - bottom + 6);
    }
  }
  legend.replaceChildren();
  names.forEach((name, k) => {
    const color = PALETTE[k % PALETTE.length];
    ctx.strokeStyle = color; ctx.lineWidth = 1.6; ctx.beginPath();
    let pen = false;
    series[name].forEach((v, i) => {
      if (v == null) { pen = false; return; }
      if (pen) ctx.lineTo(x(i), y(v)); else { ctx.moveTo(x(i), y(v)); pen = true; }
    });
    ctx.stroke();
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = color;
    const values = series[name].filter((v) => v != null);
    const last = values.length ? values[values.length - 1] : null;
    item.append(swatch, `${name}${last == null ? "" : " " + formatNumber(last) + (unit ? " " + unit : "")}`);
    legend.append(item);
  });
  if (!names.length) {
    ctx.fillStyle = "#6b7385"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText("no data yet", (left + w) / 2, h / 2);
  }
}

window.drawChart = drawChart;
