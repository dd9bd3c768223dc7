// gally explain: draws the page's charts from the JSON in #explain-data (page.py's payload) with
// Plotly. Each section is drawn on its own; one that fails is marked and reported, the rest still
// draw. <body data-rendered> ends as "ok" when every section drew, else "error".
"use strict";

const CONFIG = { displayModeBar: false, responsive: true };
const FONT = { family: "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif", size: 12, color: "#1d2330" };
const ACCENT = "#c2410c", BLUE = "#2563eb", GREY = "#9aa3b5";
const DIVERGING = [[0, "#1d4ed8"], [0.5, "#ffffff"], [1, "#dc2626"]];
// Attention and probabilities: most weights are small, so the low end of the scale gets more colours.
const WEIGHTS = [[0, "#ffffff"], [0.05, "#dbeafe"], [0.2, "#93c5fd"], [0.5, "#3b82f6"], [1, "#1e3a8a"]];
const PROBS = [[0, "#fffaf5"], [0.2, "#fed7aa"], [0.5, "#fb923c"], [1, "#9a3412"]];
const WINDOW = 48;        // positions shown at once in a map; a slider moves the window
const LENS_WINDOW = 16;   // positions of the logit-lens grid, whose cells hold text

// ---- data ----

async function inflate(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

const HALF = (() => {  // every float16 bit pattern → its value
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 31, frac = h & 1023;
    table[h] = exp === 0 ? sign * frac * 2 ** -24
      : exp === 31 ? (frac ? NaN : sign * Infinity) : sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  return table;
})();

// An n-dimensional array from page.py's pack(): typed values, a scale, row-major strides.
class Tensor {
  constructor(shape, values, scale) {
    this.shape = shape;
    this.values = values;
    this.scale = scale;
    this.strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1));
  }
  offset(index) { return index.reduce((sum, i, d) => sum + i * this.strides[d], 0); }
  get(...index) { return this.values[this.offset(index)] * this.scale; }
  // The last axis at `index` (one index fewer than the rank), columns [from, to).
  row(index, from = 0, to = this.shape[this.shape.length - 1]) {
    const base = this.offset(index), out = new Array(to - from);
    for (let j = from; j < to; j++) out[j - from] = this.values[base + j] * this.scale;
    return out;
  }
  // Rows [r0, r1) of the matrix at `index` (two fewer than the rank), columns [c0, c1).
  matrix(index, r0, r1, c0, c1) {
    const out = [];
    for (let r = r0; r < r1; r++) out.push(this.row([...index, r], c0, c1));
    return out;
  }
}

async function unpack(packed) {
  const raw = await inflate(packed.data), buffer = raw.buffer;
  switch (packed.kind) {
    case "f32": return new Tensor(packed.shape, new Float32Array(buffer), 1);
    case "i32": return new Tensor(packed.shape, new Int32Array(buffer), 1);
    case "f16": return new Tensor(packed.shape, Float32Array.from(new Uint16Array(buffer), (h) => HALF[h]), 1);
    case "unit16": return new Tensor(packed.shape, new Uint16Array(buffer), 1 / 65535);
    case "unit8": return new Tensor(packed.shape, raw, 1 / 255);
  }
  throw new Error(`unknown array kind ${packed.kind}`);
}

// Replaces every packed array (an object with kind, shape and data) by its Tensor.
async function unpackAll(node) {
  if (node && typeof node === "object" && !Array.isArray(node)) {
    if ("kind" in node && "shape" in node && "data" in node) return unpack(node);
    for (const key of Object.keys(node)) node[key] = await unpackAll(node[key]);
  }
  return node;
}

// ---- text ----

// A token's text for the page: newlines and tabs as visible marks, never empty.
function shown(piece) {
  let text = piece.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
  if (/^ +$/.test(text)) text = "·".repeat(text.length);  // a token of spaces alone would be invisible
  return text.length ? text : "∅";
}
// The same for Plotly, which reads <b>, <br>, <s> ... in text as markup: "<s>" must stay text.
function ptext(piece) {
  return shown(piece).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}
const quoted = (piece) => `“${ptext(piece)}”`;
const pct = (p, digits = 1) => `${(100 * p).toFixed(digits)}%`;

// ---- drawing helpers ----

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function chartDiv(section, name) {
  const div = section.querySelector(`[data-chart="${name}"]`);
  if (!div) throw new Error(`no chart ${name}`);
  return div;
}

function plot(section, name, traces, layout) {
  const base = {
    font: FONT, margin: { l: 70, r: 20, t: 10, b: 45 }, paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)", hoverlabel: { font: { family: FONT.family } },
  };
  const merged = { ...base, ...layout };
  for (const axis of ["xaxis", "yaxis", "xaxis2"]) merged[axis] = { zeroline: false, ...(merged[axis] || {}) };
  return Plotly.react(chartDiv(section, name), traces, merged, CONFIG);
}

function fillSelect(section, name, options, selected, onChange) {
  const select = section.querySelector(`[data-control="${name}"]`);
  select.replaceChildren(...options.map(([value, text]) => el("option", { value: String(value) }, [text])));
  select.value = String(selected);
  select.addEventListener("change", () => onChange(Number(select.value)));
  return select;
}

// A slider over positions when there are more than `size`; calls draw(start) now and on change.
function positionWindow(section, name, n, size, draw) {
  const box = section.querySelector(`[data-window="${name}"]`);
  if (n <= size) { box.hidden = true; return draw(0); }
  const input = el("input", { type: "range", min: "0", max: String(n - size), step: "1", value: "0" });
  const text = el("span");
  const update = () => {
    const start = Number(input.value);
    text.textContent = ` positions ${start}–${start + size - 1} of ${n}`;
    return draw(start);
  };
  input.addEventListener("input", update);
  box.replaceChildren(el("label", {}, ["window ", input]), text);
  return update();
}

// Axis ticks naming prompt positions [from, to) by their tokens, when they fit.
function tokenAxis(pieces, from, to, extra = {}) {
  const count = to - from;
  if (count > WINDOW) return { title: { text: "position" }, ...extra };
  const values = [...Array(count).keys()].map((i) => from + i);
  return { tickmode: "array", tickvals: values, ticktext: values.map((i) => ptext(pieces[i])), ...extra };
}

function layerLabel(l) { return l === 0 ? "embedding" : `layer ${l}`; }

// A vertical axis of layers, first at the top, every one labelled while they fit.
function layerAxis(count) {
  return { title: { text: "layer" }, autorange: "reversed", dtick: count <= 40 ? 1 : 5 };
}
// Pixels for a map of `rows` rows: 18 a row while that fits in max, never under 120 for the plot.
function mapHeight(rows, max = 560) { return Math.max(120, Math.min(18, Math.max(8, max / rows)) * rows); }
// Ticks along 0 … layers: every layer while there are few.
function layerTicks(layers) { return Math.max(1, Math.ceil(layers / 16)); }

// A heatmap of positive values on a log colour scale, so that a few huge values (the first
// token's, often) do not flatten the rest; hover shows the values themselves.
function logHeatmap(values, x, y, text) {
  const flat = values.flat().filter((v) => v > 0);
  const floor = flat.length ? Math.min(...flat) : 1;
  const z = values.map((row) => row.map((v) => Math.log10(Math.max(v, floor))));
  const lo = Math.floor(Math.min(...z.flat())), hi = Math.ceil(Math.max(...z.flat()));
  const ticks = [...Array(hi - lo + 1).keys()].map((i) => lo + i);
  return { type: "heatmap", z, x, y, text, customdata: values, colorscale: "Viridis",
    hovertemplate: "%{text}: %{customdata:.4g}<extra></extra>",
    colorbar: { thickness: 10, tickvals: ticks, ticktext: ticks.map((t) => String(10 ** t >= 1 ? 10 ** t : (10 ** t).toPrecision(1))) } };
}

// ---- the sections ----

const SECTIONS = {
  tokenization(section, d) {
    const chips = section.querySelectorAll(".tok");
    if (chips.length !== d.tokens.ids.length) throw new Error("token chips missing");
  },

  embedding(section, d) {
    const rows = d.embedding.rows, n = rows.shape[0], width = rows.shape[1], pieces = d.tokens.pieces;
    const magnitudes = Array.from(rows.values, Math.abs).sort((a, b) => a - b);
    const range = magnitudes[Math.floor(0.99 * (magnitudes.length - 1))] || 1;
    const size = 32;
    return positionWindow(section, "embedding", n, size, (start) => {
      const stop = Math.min(n, start + size), positions = [...Array(stop - start).keys()].map((i) => start + i);
      const z = rows.matrix([], start, stop, 0, width);
      const text = positions.map((p) => z[0].map((_, j) => `${quoted(pieces[p])} (position ${p}), dimension ${j}`));
      return plot(section, "embedding-rows", [
        { type: "heatmap", z, y: positions, text, colorscale: DIVERGING, zmid: 0, zmin: -range, zmax: range,
          hovertemplate: "%{text}: %{z:.4f}<extra></extra>", colorbar: { thickness: 10, len: 0.9, x: 0.79 } },
        { type: "bar", orientation: "h", y: positions, x: positions.map((p) => d.embedding.norms[p]), xaxis: "x2",
          marker: { color: ACCENT }, hovertemplate: "norm %{x:.3f}<extra></extra>" },
      ], {
        height: 60 + 22 * positions.length, showlegend: false,
        xaxis: { domain: [0, 0.78], title: { text: `dimension (of ${width})` } },
        xaxis2: { domain: [0.86, 1], title: { text: "norm" } },
        yaxis: tokenAxis(pieces, start, stop, { autorange: "reversed" }),
      });
    });
  },

  space(section, d) {
    const s = d.space, pieces = d.tokens.pieces, coords = s.coords;
    const points = s.ids.map((id, i) => ({ id, i, prompt: s.in_prompt[i], x: coords.get(i, 0), y: coords.get(i, 1) }));
    const hover = (p) => {
      const [pos, cos] = s.nearest_prompt[p.i];
      return p.prompt ? `${quoted(d.vocab[p.id])} (in the prompt, id ${p.id})`
        : `${quoted(d.vocab[p.id])} (id ${p.id}): nearest to ${quoted(pieces[pos])}, cosine ${cos.toFixed(3)}`;
    };
    const trace = (group, style) => ({
      type: "scatter", mode: group.length <= 60 ? "markers+text" : "markers", x: group.map((p) => p.x),
      y: group.map((p) => p.y), text: group.map((p) => ptext(d.vocab[p.id])), hovertext: group.map(hover),
      hovertemplate: "%{hovertext}<extra></extra>", textposition: "top center", ...style,
    });
    const axis = (k) => ({ title: { text: `component ${k + 1} (${pct(s.share[k], 0)} of the spread)` },
      zeroline: false, gridcolor: "#eef1f6" });
    return plot(section, "space", [
      trace(points.filter((p) => !p.prompt), { name: "neighbours", marker: { color: GREY, size: 7 },
        textfont: { color: "#7b8497", size: 11 } }),
      trace(points.filter((p) => p.prompt), { name: "prompt tokens", marker: { color: ACCENT, size: 11 },
        textfont: { color: ACCENT, size: 13 } }),
    ], { height: 520, xaxis: axis(0), yaxis: { ...axis(1), scaleanchor: "x" }, legend: { orientation: "h", y: 1.06 } });
  },

  position(section, d) {
    const p = d.position, sim = p.similarity, layers = sim.shape[0], pieces = p.ids[0].map((id) => d.vocab[id]);
    const x = [...Array(layers).keys()];
    const lines = p.matches.map(([a, b], m) => ({
      type: "scatter", mode: "lines+markers", x, y: x.map((l) => sim.get(l, m)), marker: { size: 4 },
      name: `${quoted(pieces[a])} (${a} / ${b})`,
      hovertemplate: `${quoted(pieces[a])} at positions ${a} and ${b}, %{x}: cosine %{y:.4f}<extra></extra>`,
    }));
    const distances = p.distances, rope = p.rope.values;
    const far = distances.map((dist, i) => [dist, rope[i]]).filter(([dist]) => dist >= 1);
    const byDistance = Array.from(p.by_distance.values).slice(0, p.by_distance.shape[0]);
    return Promise.all([
      plot(section, "position-similarity", lines, {
        height: 340, xaxis: { title: { text: "after layer (0: the embeddings)" }, dtick: layerTicks(layers - 1) },
        yaxis: { title: { text: "cosine similarity" } }, legend: { title: { text: "token (positions)" } },
      }),
      plot(section, "rope", [{ type: "scatter", mode: "lines", x: far.map((f) => f[0]), y: far.map((f) => f[1]),
        line: { color: BLUE }, hovertemplate: "distance %{x}: %{y:.3f}<extra></extra>" }], {
        height: 300, xaxis: { type: "log", title: { text: "distance between query and key (tokens)" } },
        yaxis: { title: { text: "score / score at distance 0" } },
      }),
      plot(section, "attention-distance", [{ type: "bar", x: byDistance.map((_, i) => i), y: byDistance,
        marker: { color: BLUE }, hovertemplate: "%{x} tokens back: %{y:.3f}<extra></extra>" }], {
        height: 300, xaxis: { title: { text: "tokens back" }, rangemode: "tozero" },
        yaxis: { title: { text: "mean attention weight" } },
      }),
    ]);
  },

  attention(section, d) {
    const w = d.attention.weights, [L, H, n] = w.shape, pieces = d.tokens.pieces;
    const state = { layer: 0, head: -1, start: 0, follow: d.follow };
    // the query rows [r0, r1) over key columns [0, r1) of one head, or the mean of all heads
    const map = (r0, r1) => {
      if (state.head >= 0) return w.matrix([state.layer, state.head], r0, r1, 0, r1);
      const sum = w.matrix([state.layer, 0], r0, r1, 0, r1);
      for (let h = 1; h < H; h++) {
        const m = w.matrix([state.layer, h], r0, r1, 0, r1);
        for (let r = 0; r < sum.length; r++) for (let c = 0; c < r1; c++) sum[r][c] += m[r][c];
      }
      return sum.map((row) => row.map((v) => v / H));
    };
    const drawMap = () => {
      const r0 = state.start, r1 = Math.min(n, r0 + WINDOW), z = map(r0, r1);
      const rows = [...Array(r1 - r0).keys()].map((i) => r0 + i), cols = [...Array(r1).keys()];
      const text = rows.map((q) => cols.map((k) => `${quoted(pieces[q])} (${q}) → ${quoted(pieces[k])} (${k})`));
      const cell = Math.max(8, Math.min(34, 620 / Math.max(rows.length, 1)));
      return plot(section, "attention-map", [{ type: "heatmap", z, x: cols, y: rows, text, colorscale: WEIGHTS,
        zmin: 0, zmax: 1, hovertemplate: "%{text}: %{z:.3f}<extra></extra>", colorbar: { thickness: 10 } }], {
        height: 110 + cell * rows.length, margin: { l: 90, r: 20, t: 10, b: 90 },
        xaxis: tokenAxis(pieces, 0, r1, { title: { text: "key: the token attended to" }, tickangle: -45 }),
        yaxis: tokenAxis(pieces, r0, r1, { autorange: "reversed", title: { text: "query" } }),
      });
    };
    const drawFollow = () => {
      const q = state.follow, z = [], keys = [...Array(q + 1).keys()];
      for (let l = 0; l < L; l++) {
        const row = new Array(q + 1).fill(0);
        for (let h = 0; h < H; h++) for (let k = 0; k <= q; k++) row[k] += w.get(l, h, q, k) / H;
        z.push(row);
      }
      const layers = [...Array(L).keys()].map((l) => l + 1);
      return plot(section, "attention-follow", [{ type: "heatmap", z, x: keys, y: layers, colorscale: WEIGHTS,
        zmin: 0, zmax: 1, text: layers.map((l) => keys.map((k) => `layer ${l}: ${quoted(pieces[q])} → ${quoted(pieces[k])} (${k})`)),
        hovertemplate: "%{text}: %{z:.3f}<extra></extra>", colorbar: { thickness: 10 } }], {
        height: 90 + mapHeight(L), margin: { l: 70, r: 20, t: 10, b: 80 },
        xaxis: tokenAxis(pieces, 0, q + 1, { title: { text: "token attended to" }, tickangle: -45 }),
        yaxis: layerAxis(L),
      });
    };
    fillSelect(section, "attention-layer", [...Array(L).keys()].map((l) => [l, `${l + 1} of ${L}`]), 0,
      (v) => { state.layer = v; drawMap(); });
    fillSelect(section, "attention-head", [[-1, "mean of all heads"], ...[...Array(H).keys()].map((h) => [h, `${h + 1}`])],
      -1, (v) => { state.head = v; drawMap(); });
    fillSelect(section, "follow-token", pieces.map((p, i) => [i, `${i}: ${shown(p)}`]), state.follow,
      (v) => { state.follow = v; drawFollow(); });
    return Promise.all([positionWindow(section, "attention", n, WINDOW, (s) => { state.start = s; return drawMap(); }),
      drawFollow()]);
  },

  "feed-forward"(section, d) {
    const f = d.ffn, [L, n] = f.rms.shape, pieces = d.tokens.pieces, k = f.top_ids.shape[2];
    const state = { layer: L - 1, token: d.follow };
    const layers = [...Array(L).keys()].map((l) => l + 1), positions = [...Array(n).keys()];
    const rms = f.rms.matrix([], 0, L, 0, n);
    const drawVector = () => {
      const { layer, token } = state;
      const values = f.all_tokens ? f.activations.row([layer, token]) : f.activations.row([layer]);
      const top = [...Array(k).keys()].map((j) => [f.top_ids.get(layer, token, j), f.top_values.get(layer, token, j)]);
      const table = section.querySelector('[data-table="ffn-top"]');
      table.replaceChildren(el("table", { class: "ffn-top" }, [
        el("thead", {}, [el("tr", {}, [el("th", {}, ["neuron"]), ...top.map(([id]) => el("th", {}, [`#${id}`]))])]),
        el("tbody", {}, [el("tr", {}, [el("td", {}, ["activation"]),
          ...top.map(([, v]) => el("td", { class: "n" }, [v.toFixed(3)]))])]),
      ]));
      return plot(section, "ffn-vector", [
        { type: "scatter", mode: "lines", x: values.map((_, i) => i), y: values, line: { color: BLUE, width: 1 },
          name: "activation", hovertemplate: "neuron %{x}: %{y:.4f}<extra></extra>" },
        { type: "scatter", mode: "markers+text", x: top.map((t) => t[0]), y: top.map((t) => t[1]),
          text: top.map((t) => `#${t[0]}`), textposition: "top center", marker: { color: ACCENT, size: 8 },
          name: "most active", hovertemplate: "neuron %{x}: %{y:.4f}<extra></extra>" },
      ], { height: 300, showlegend: false,
        xaxis: { title: { text: `neuron (of ${values.length}) in layer ${layer + 1}, token ${quoted(pieces[token])}` } },
        yaxis: { title: { text: "silu(gate) × up" } } });
    };
    fillSelect(section, "ffn-layer", layers.map((l) => [l - 1, `${l} of ${L}`]), state.layer,
      (v) => { state.layer = v; drawVector(); });
    const tokenOptions = f.all_tokens ? positions : [d.follow];
    fillSelect(section, "ffn-token", tokenOptions.map((i) => [i, `${i}: ${shown(pieces[i])}`]), state.token,
      (v) => { state.token = v; drawVector(); });
    return Promise.all([
      plot(section, "ffn-rms", [logHeatmap(rms, positions, layers,
        layers.map((l) => positions.map((p) => `layer ${l}, ${quoted(pieces[p])} (${p})`)))], {
        height: 90 + mapHeight(L), margin: { l: 70, r: 20, t: 10, b: 80 },
        xaxis: tokenAxis(pieces, 0, n, { tickangle: -45 }), yaxis: layerAxis(L),
      }),
      drawVector(),
    ]);
  },

  layers(section, d) {
    const lens = d.lens, [rows, n, k] = lens.top_ids.shape, pieces = d.tokens.pieces, last = n - 1;
    const layerNames = [...Array(rows).keys()].map(layerLabel);
    const grid = positionWindow(section, "lens", n, LENS_WINDOW, (start) => {
      const stop = Math.min(n, start + LENS_WINDOW), cols = [...Array(stop - start).keys()].map((i) => start + i);
      const z = [], text = [], hover = [];
      for (let l = 0; l < rows; l++) {
        z.push(cols.map((p) => lens.top_probs.get(l, p, 0)));
        text.push(cols.map((p) => ptext(d.vocab[lens.top_ids.get(l, p, 0)])));
        hover.push(cols.map((p) => `${layerLabel(l)}, after ${quoted(pieces[p])} (${p}):<br>` +
          [...Array(k).keys()].map((j) => `${quoted(d.vocab[lens.top_ids.get(l, p, j)])} ${pct(lens.top_probs.get(l, p, j))}`)
            .join("<br>")));
      }
      const rowHeight = Math.max(13, Math.min(22, 900 / rows));
      return plot(section, "lens-grid", [{ type: "heatmap", z, x: cols, y: [...Array(rows).keys()], text,
        customdata: hover, texttemplate: "%{text}", textfont: { size: rowHeight > 16 ? 11 : 9 }, colorscale: PROBS,
        zmin: 0, zmax: 1, hovertemplate: "%{customdata}<extra></extra>", xgap: 1, ygap: 1,
        colorbar: { thickness: 10, title: { text: "p" } } }], {
        height: 110 + rowHeight * rows, margin: { l: 80, r: 20, t: 10, b: 90 },
        xaxis: tokenAxis(pieces, start, stop, { title: { text: "the prompt so far ends with" }, tickangle: -45, side: "bottom" }),
        yaxis: { tickmode: "array", tickvals: [...Array(rows).keys()], ticktext: layerNames, autorange: "reversed",
          dtick: 1, tickfont: { size: rows > 40 ? 8 : 11 } },
      });
    });
    const x = [...Array(rows).keys()];
    const finalPiece = d.vocab[d.lens.final_ids[last]];
    const change = lens.change, layers = [...Array(rows - 1).keys()].map((l) => l + 1), positions = [...Array(n).keys()];
    return Promise.all([grid,
      plot(section, "lens-final", [
        { type: "scatter", mode: "lines+markers", x, y: x.map((l) => lens.final_prob.get(l, last)),
          name: `p(${quoted(finalPiece)})`, line: { color: ACCENT }, hovertemplate: "%{y:.3f}<extra></extra>" },
        { type: "scatter", mode: "lines", x, y: x.map((l) => lens.entropy.get(l, last)), yaxis: "y2",
          name: "entropy (bits)", line: { color: BLUE, dash: "dot" }, hovertemplate: "%{y:.2f} bits<extra></extra>" },
      ], { height: 320, hovermode: "x unified", legend: { orientation: "h", y: 1.12 },
        xaxis: { title: { text: "after layer (0: the embeddings)" }, dtick: layerTicks(rows - 1) },
        yaxis: { title: { text: "probability" }, range: [0, 1] },
        yaxis2: { title: { text: "entropy (bits)" }, overlaying: "y", side: "right", rangemode: "tozero" },
        margin: { l: 70, r: 70, t: 10, b: 45 } }),
      plot(section, "layer-change", [logHeatmap(change.matrix([], 0, rows - 1, 0, n), positions, layers,
        layers.map((l) => positions.map((p) => `layer ${l}, ${quoted(pieces[p])} (${p})`)))], {
        height: 90 + mapHeight(rows - 1), margin: { l: 70, r: 20, t: 10, b: 80 },
        xaxis: tokenAxis(pieces, 0, n, { tickangle: -45 }), yaxis: layerAxis(rows - 1),
      }),
    ]);
  },

  prediction(section, d) {
    const p = d.prediction, ids = p.top_ids, labels = ids.map((id) => quoted(d.vocab[id]));
    const chain = new Set(p.kept["this model's default"] || []);
    const colours = ids.map((id, i) => (i === 0 ? ACCENT : chain.has(id) ? BLUE : GREY));
    const note = ids.map((id, i) => (i === 0 ? "greedy's choice" : chain.has(id) ? "kept by this model's default sampling"
      : "dropped by this model's default sampling"));
    const top10 = Math.min(10, ids.length);
    return Promise.all([
      plot(section, "prediction-top", [{ type: "bar", orientation: "h", x: p.top_probs, y: labels.map((_, i) => i),
        marker: { color: colours }, text: p.top_probs.map((v) => pct(v)), textposition: "outside", customdata: note,
        hovertext: labels, hovertemplate: "%{hovertext}: %{x:.4f}, %{customdata}<extra></extra>" }], {
        height: 60 + 24 * ids.length, margin: { l: 110, r: 40, t: 10, b: 40 },
        xaxis: { title: { text: "probability" }, range: [0, Math.min(1, Math.max(...p.top_probs) * 1.2 + 0.02)] },
        yaxis: { tickmode: "array", tickvals: labels.map((_, i) => i), ticktext: labels, autorange: "reversed" },
      }),
      plot(section, "temperature", p.temperatures.map((t, j) => ({
        type: "bar", name: `temperature ${t}`, x: labels.slice(0, top10), y: p.temperature_probs[j].slice(0, top10),
        hovertemplate: `T = ${t}, %{x}: %{y:.4f}<extra></extra>`,
      })), { height: 320, barmode: "group", yaxis: { title: { text: "probability" } }, legend: { orientation: "h", y: 1.12 } }),
    ]);
  },

  cost(section, d) {
    const rows = d.cost.rows;
    return plot(section, "cost-bytes", [{ type: "bar", x: rows.map((r) => r.dtype), y: rows.map((r) => r.bytes / 1e6),
      marker: { color: rows.map((r) => (r.dtype === d.cost.dtype ? ACCENT : BLUE)) },
      text: rows.map((r) => (r.ms === null ? "" : `${r.ms.toFixed(1)} ms`)), textposition: "outside",
      hovertemplate: "%{x}: %{y:.1f} MB per token<extra></extra>" }], {
      height: 300, yaxis: { title: { text: "MB of weights read per token" } }, xaxis: { title: { text: "weights" } },
    });
  },
};

async function main() {
  const data = await unpackAll(JSON.parse(document.getElementById("explain-data").textContent));
  let failed = 0;
  for (const section of document.querySelectorAll("section[data-section]")) {
    const name = section.dataset.section;
    try {
      await SECTIONS[name](section, data);
      section.dataset.rendered = "ok";
    } catch (err) {
      failed += 1;
      section.dataset.rendered = "error";
      section.append(el("pre", { class: "errors" }, [`this section could not be drawn: ${err}`]));
      console.error(`gally explain: section ${name}:`, err);
    }
  }
  if (document.body.dataset.rendered !== "error") document.body.dataset.rendered = failed ? "error" : "ok";
}

main().catch((err) => {
  document.body.dataset.rendered = "error";
  console.error("gally explain:", err);
});
