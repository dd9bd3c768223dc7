"""The explanation as one HTML page that works offline: the text and tables written here from a
Jinja template (assets/page.html), the charts drawn in the browser by assets/explain.js with
Plotly, whose JavaScript (from the `plotly` package: pip install 'gally[explain]') is inlined
like everything else. Nothing is fetched from a network.

The arrays the charts need travel in one JSON object. Large ones are packed: float16 for vectors,
probabilities and attention weights as 16-bit (8-bit for maps of over 4 M values) fractions of 1,
zlib-compressed and base64-encoded; the page inflates them with the browser's DecompressionStream.
A 16-token prompt on SmolLM2 makes a page of about 5 MB, 4.8 MB of it Plotly.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from typing import Optional

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
UNIT8_ABOVE = 1 << 22          # maps of more values than this travel as 8-bit fractions
FULL_ACTIVATIONS_MAX = 1 << 22  # feed-forward vectors of every token when [layers, n, intermediate] fits


def plotly_js() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ImportError("the explanation page draws its charts with Plotly's JavaScript: "
                          "pip install 'gally[explain]' (or pip install plotly)") from None
    return get_plotlyjs()


def pack(array: np.ndarray, kind: str) -> dict:
    """An array for the page: kind "f32", "f16", "i32", or "unit16"/"unit8" for values in [0, 1]
    stored as round(x · 65535) or round(x · 255)."""
    a = np.asarray(array)
    if kind == "f32":
        data = a.astype("<f4")
    elif kind == "f16":
        data = a.astype("<f2")
    elif kind == "i32":
        data = a.astype("<i4")
    elif kind in ("unit16", "unit8"):
        top = 65535 if kind == "unit16" else 255
        data = np.rint(np.clip(a, 0, 1) * top).astype("<u2" if kind == "unit16" else "u1")
    else:
        raise ValueError(f"kind must be f32, f16, i32, unit16 or unit8, got {kind!r}")
    blob = zlib.compress(np.ascontiguousarray(data).tobytes(), 6)
    return {"kind": kind, "shape": list(a.shape), "data": base64.b64encode(blob).decode("ascii")}


def unit_kind(array: np.ndarray) -> str:
    return "unit8" if array.size > UNIT8_ABOVE else "unit16"


def payload(e) -> dict:
    """What explain.js draws: model facts, token texts and the sections' arrays."""
    c = e.config
    L = c.num_hidden_layers
    lens, ffn, pos, pred = e.layers, e.feed_forward, e.position, e.prediction
    ids_seen = {int(i) for i in e.tokens.ids}
    ids_seen |= {int(i) for i in e.space.point_ids} | {int(i) for i in lens.top_ids.ravel()}
    ids_seen |= {int(i) for i in pred.top_ids} | {int(i) for s in pred.steps for i in s.top_ids}
    ids_seen |= {int(i) for p in pos.ids for i in p}
    full_ffn = ffn.activations.size <= FULL_ACTIVATIONS_MAX
    nearest_prompt = _nearest_prompt_token(e)
    return {
        "model": {"name": e.model_name, "layers": L, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                  "hidden": c.hidden_size, "intermediate": c.intermediate_size, "vocab": c.vocab_size},
        "tokens": {"ids": [int(i) for i in e.tokens.ids], "pieces": e.tokens.pieces,
                   "special": [bool(s) for s in e.tokens.special]},
        "vocab": {str(i): e.pieces(i) for i in sorted(ids_seen)},
        "follow": e.attention.follow,
        "embedding": {"rows": pack(e.embedding.rows, "f16"), "norms": e.embedding.norms.tolist(),
                      "mean_norm": e.embedding.mean_norm},
        "space": {"ids": e.space.point_ids.tolist(), "in_prompt": e.space.in_prompt.tolist(),
                  "coords": pack(e.space.coords, "f32"), "share": e.space.variance_share.tolist(),
                  "nearest_prompt": nearest_prompt},
        "position": {"texts": list(pos.texts), "ids": [p.tolist() for p in pos.ids], "matches": pos.matches.tolist(),
                     "similarity": pack(pos.similarity, "f32"), "distances": pos.distances.tolist(),
                     "rope": pack(pos.rope_score, "f32"), "by_distance": pack(pos.attention_by_distance, "f32")},
        "attention": {"weights": pack(e.attention.weights, unit_kind(e.attention.weights))},
        "ffn": {"rms": pack(ffn.rms, "f32"), "top_ids": pack(ffn.top_neurons, "i32"),
                "top_values": pack(ffn.top_values, "f32"),
                "activations": pack(ffn.activations if full_ffn else ffn.activations[:, e.attention.follow], "f16"),
                "all_tokens": full_ffn},
        "lens": {"top_ids": pack(lens.top_ids, "i32"), "top_probs": pack(lens.top_probs, "unit16"),
                 "entropy": pack(lens.entropy, "f32"), "final_prob": pack(lens.final_prob, "unit16"),
                 "change": pack(lens.change, "f32"), "final_ids": [int(i) for i in lens.top_ids[-1, :, 0]]},
        "prediction": {"top_ids": pred.top_ids.tolist(), "top_probs": pred.top_probs.tolist(),
                       "temperatures": pred.temperatures.tolist(), "temperature_probs": pred.temperature_probs.tolist(),
                       "kept": {s.name: [int(i) for i in s.kept[:len(pred.top_ids)]] for s in pred.strategies}},
        "cost": {"rows": [{"dtype": r.dtype, "bytes": r.bytes_per_token,
                           "ms": None if r.timing is None else 1000 * r.timing.median} for r in e.cost.dtypes],
                 "dtype": e.cost.dtype},
    }


def _nearest_prompt_token(e) -> list[list]:
    """For each point of the embedding-space plot that is a neighbour: [prompt position, cosine]
    of the prompt token it is nearest to; [position, 1] for the prompt's own tokens."""
    out = []
    first_pos = {int(t): i for i, t in reversed(list(enumerate(e.tokens.ids)))}
    for t in e.space.point_ids.tolist():
        if t in first_pos:
            out.append([first_pos[t], 1.0])
            continue
        rows, cols = np.nonzero(e.space.neighbour_ids == t)
        best = int(np.argmax(e.space.similarity[rows, cols]))
        out.append([int(rows[best]), float(e.space.similarity[rows[best], cols[best]])])
    return out


# ---- text helpers for the template ----

def number(x) -> str:
    return f"{int(x):,}"


def megabytes(x) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def millions(x) -> str:
    return f"{x / 1e6:,.1f} M" if x < 1e9 else f"{x / 1e9:,.2f} B"


def percent(x, digits: int = 1) -> str:
    return f"{100 * float(x):.{digits}f}%"


def spread(timing) -> str:
    """The fastest and slowest of a timing's steps, in ms: how much one step varied."""
    return f"{1000 * timing.seconds.min():,.1f}–{1000 * timing.seconds.max():,.1f}"


def milliseconds(seconds: Optional[float]) -> str:
    return "—" if seconds is None or math.isnan(seconds) else f"{1000 * seconds:,.1f} ms"


def visible(piece: str):
    """A token's text as HTML, whitespace made visible: a space as a faint dot, a newline as ↵."""
    from markupsafe import Markup, escape

    marks = {" ": ("space", "·"), "\n": ("newline", "↵"), "\t": ("tab", "⇥"), "\r": ("carriage return", "␍")}
    out = []
    for ch in piece:
        if ch in marks:
            title, glyph = marks[ch]
            out.append(Markup('<span class="ws" title="{}">{}</span>').format(title, glyph))
        else:
            out.append(escape(ch))
    return Markup("").join(out) if piece else Markup('<span class="ws" title="empty">∅</span>')


def render(e) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ASSETS), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(number=number, megabytes=megabytes, millions=millions, percent=percent,
                       milliseconds=milliseconds, visible=visible, spread=spread)
    with open(os.path.join(ASSETS, "explain.css"), encoding="utf-8") as f:
        css = f.read()
    with open(os.path.join(ASSETS, "explain.js"), encoding="utf-8") as f:
        script = f.read()
    data = json.dumps(payload(e), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return env.get_template("page.html").render(e=e, c=e.config, css=css, script=script, plotly=plotly_js(),
                                                data=data)


def write_page(e, path: str) -> str:
    text = render(e)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise OSError(err.errno, f"{path}: cannot write the page ({err.strerror})") from None
    return path
