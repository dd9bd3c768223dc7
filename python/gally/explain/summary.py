"""The explanation in a few lines per section, for the terminal."""

from __future__ import annotations

import numpy as np

from .page import megabytes, millions


def _q(piece: str) -> str:
    """A token's text in quotes, with newlines and tabs escaped so that it stays on one line."""
    return '"' + piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


def _listed(items: list[str], limit: int) -> str:
    return " ".join(items[:limit]) + (f" … ({len(items)} in all)" if len(items) > limit else "")


def summary(e) -> str:
    c = e.config
    pieces, ids, n, last = e.tokens.pieces, e.tokens.ids, len(e.tokens.ids), len(e.tokens.ids) - 1
    lines = [f"gally explain · {e.model_name} ({c.architecture}, {e.dtype}, {e.threads} thread"
             f"{'s' if e.threads != 1 else ''})"]

    def add(label: str, *texts: str) -> None:
        lines.append(f"{label:<13} {texts[0]}")
        lines.extend(f"{'':<13} {t}" for t in texts[1:])

    id_list = ", ".join(str(int(i)) for i in ids[:16]) + (", …" if n > 16 else "")
    add("tokens", f"{n}: {_listed([_q(p) for p in pieces], 16)}", f"ids [{id_list}]")
    emb = e.embedding
    add("embedding", f"each a row of the {emb.matrix_shape[0]:,} × {emb.matrix_shape[1]:,} matrix; norms "
        f"{emb.norms.min():.2f} … {emb.norms.max():.2f} (vocabulary mean {emb.mean_norm:.2f})")
    f = e.attention.follow
    near = ", ".join(f"{_q(e.pieces(t))} {s:.2f}"
                     for t, s in zip(e.space.neighbour_ids[f][:3], e.space.similarity[f][:3]))
    add("space", f"{_q(pieces[f])} is nearest to {near}")
    pos = e.position
    m = int(np.argmin(pos.similarity[-1]))
    moved = pos.ids[0][pos.matches[m, 0]]
    add("position", f"{_q(pos.texts[0])} against {_q(pos.texts[1])}: {_q(e.pieces(moved))} has cosine similarity "
        f"{pos.similarity[0, m]:.2f} as an embedding, {pos.similarity[-1, m]:.2f} after layer {c.num_hidden_layers}")
    most = ", ".join(f"{_q(pieces[p])} {100 * w:.0f}%" for p, w in e.attention.most_attended(3))
    add("attention", f"{c.num_hidden_layers} layers × {c.num_attention_heads} heads "
        f"({c.num_key_value_heads} key/value); {_q(pieces[f])} attends most to {most}")
    ffn = e.feed_forward
    add("feed-forward", f"{ffn.hidden_size:,} → {ffn.intermediate_size:,} → {ffn.hidden_size:,}: "
        f"{ffn.parameters_per_layer:,} parameters per layer, {100 * ffn.share_of_parameters:.0f}% of the model")
    lens = e.layers
    final = e.pieces(lens.top_ids[-1, last, 0])
    settle = lens.settles_at(last)
    add("layers", f"after {_q(pieces[last])} the final answer {_q(final)} leads from "
        f"{'the embeddings' if settle == 0 else f'layer {settle}'} on (p {lens.top_probs[settle, last, 0]:.2f} there, "
        f"{lens.top_probs[-1, last, 0]:.2f} at the end)")
    pred = e.prediction
    top = ", ".join(f"{_q(e.pieces(t))} {100 * p:.1f}%" for t, p in zip(pred.top_ids[:4], pred.top_probs[:4]))
    kept = "; ".join(f"{s.name} keeps {len(s.kept):,}" for s in pred.strategies
                     if s.name in ("top-k", "top-p", "min-p"))
    texts = [f"{top}; entropy {pred.entropy:.2f} bits", kept]
    if pred.steps:
        prompt = e.tokens.text if e.tokens.text is not None else "".join(pieces)
        grown = "".join(e.pieces(t) for t in pred.generated_ids)
        texts.append(f"greedy, {len(pred.steps)} steps: {_q(prompt)} + {_q(grown)}")
    add("prediction", *texts)
    cost = e.cost
    others = " · ".join(
        f"{r.dtype} {megabytes(r.bytes_per_token)}" + (f" {1000 * r.timing.median:.1f} ms" if r.timing else "")
        for r in cost.dtypes if r.dtype != cost.dtype)
    add("cost", f"{millions(cost.parameters['total'])} parameters; {megabytes(cost.bytes_per_token)} read per token "
        f"({cost.dtype}): {1000 * cost.timing.median:.1f} ms per token, "
        f"{cost.bytes_per_token / cost.timing.median / 1e9:.1f} GB/s", others)
    return "\n".join(lines)
