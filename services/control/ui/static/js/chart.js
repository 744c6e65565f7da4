// Live line charts on a canvas, with bounded memory: a series keeps at most `cap` points. When full it drops
// every other point and from then on keeps one point in `stride` (doubling each time), so a run of any length
// is drawn whole at a resolution that halves as it grows, and a page open on a run at 5 steps/s for a day
// holds the same few thousand numbers as one open for a minute. The newest point is always drawn.
import { h, fmt } from "./dom.js";

export const SERIES_CAP = 512;
// The same colours as .c0-.c5 in style.css (the legend; inline styles are refused by the page's CSP).
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2"];

export class Series {
  constructor(label, cap = SERIES_CAP) {
    this.label = label;
    this.cap = cap;
    this.xs = [];
    this.ys = [];
    this.stride = 1;
    this.seen = 0;
    this.last = null; // [x, y] of the newest point, kept even when the stride skips it
  }

  push(x, y) {
    if (typeof y !== "number" || !Number.isFinite(y)) return;
    this.last = [x, y];
    if (this.seen++ % this.stride !== 0) return;
    this.xs.push(x);
    this.ys.push(y);
    if (this.xs.length >= this.cap) {
      this.xs = this.xs.filter((_, i) => i % 2 === 0);
      this.ys = this.ys.filter((_, i) => i % 2 === 0);
      this.stride *= 2;
    }
  }

  points() {
    const n = this.xs.length;
    if (this.last && (n === 0 || this.xs[n - 1] !== this.last[0])) {
      return [this.xs.concat(this.last[0]), this.ys.concat(this.last[1])];
    }
    return [this.xs, this.ys];
  }

  clear() {
    this.xs = [];
    this.ys = [];
    this.stride = 1;
    this.seen = 0;
    this.last = null;
  }
}

export class LineChart {
  // keys: [[metric key, label], ...], and any key of a record that `match` matches (up to COLORS.length
  // series); `kinds`: the record kinds it reads. The chart is hidden until a series has a point (`optional`)
  // or shows "no data yet".
  constructor(title, keys, { optional = false, yLabel = "", match = null, kinds = ["train"] } = {}) {
    this.title = title;
    this.optional = optional;
    this.match = match;
    this.kinds = new Set(kinds);
    this.series = new Map(keys.map(([k, label]) => [k, new Series(label)]));
    this.canvas = h("canvas", { width: 460, height: 200 });
    this.legend = h("div", { class: "legend" });
    this.el = h("figure", { class: "chart", "data-chart": title, hidden: optional },
      h("figcaption", {}, title, yLabel ? h("span", { class: "muted", text: ` (${yLabel})` }) : null),
      this.canvas, this.legend);
    this.dirty = true;
  }

  ingest(record) {
    if (!this.kinds.has(record.kind)) return;
    const x = record.step;
    if (this.match) {
      for (const k of Object.keys(record)) {
        if (this.match.test(k) && !this.series.has(k) && this.series.size < COLORS.length) {
          this.series.set(k, new Series(k));
        }
      }
    }
    for (const [k, s] of this.series) {
      if (k in record) {
        s.push(x, record[k]);
        this.dirty = true;
      }
    }
  }

  clear() {
    for (const s of this.series.values()) s.clear();
    this.dirty = true;
  }

  hasData() {
    for (const s of this.series.values()) if (s.last) return true;
    return false;
  }

  draw() {
    if (!this.dirty) return;
    this.dirty = false;
    const has = this.hasData();
    if (this.optional) this.el.hidden = !has;
    const ctx = this.canvas.getContext("2d");
    const W = this.canvas.width, H = this.canvas.height, L = 56, R = 8, T = 8, B = 22;
    ctx.clearRect(0, 0, W, H);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    if (!has) {
      ctx.fillText("no data yet", W / 2 - 30, H / 2);
      this.legend.replaceChildren();
      return;
    }
    const all = [...this.series.values()].filter((s) => s.last).map((s) => [s, ...s.points()]);
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const [, xs, ys] of all) {
      for (let i = 0; i < xs.length; i++) {
        x0 = Math.min(x0, xs[i]); x1 = Math.max(x1, xs[i]);
        y0 = Math.min(y0, ys[i]); y1 = Math.max(y1, ys[i]);
      }
    }
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += Math.abs(y1) * 0.1 || 1; y0 -= Math.abs(y0) * 0.1 || 0; }
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    ctx.strokeStyle = "#d1d5db";
    ctx.beginPath();
    ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B);
    ctx.stroke();
    ctx.fillText(fmt(y1), 2, T + 8);
    ctx.fillText(fmt(y0), 2, H - B);
    ctx.fillText(`step ${x0}`, L, H - 6);
    ctx.fillText(`${x1}`, W - R - 30, H - 6);
    const legend = [];
    all.forEach(([s, xs, ys], i) => {
      const color = COLORS[i % COLORS.length];
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      for (let j = 0; j < xs.length; j++) (j ? ctx.lineTo : ctx.moveTo).call(ctx, px(xs[j]), py(ys[j]));
      if (xs.length === 1) ctx.arc(px(xs[0]), py(ys[0]), 2, 0, 2 * Math.PI);
      ctx.stroke();
      legend.push(h("span", { class: "key" }, h("i", { class: `c${i % COLORS.length}` }),
        `${s.label} `, h("b", { "data-last": s.label, text: fmt(s.last[1]) })));
    });
    this.legend.replaceChildren(...legend);
  }
}
