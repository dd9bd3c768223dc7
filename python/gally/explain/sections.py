"""The data of each step of "How LLMs Work" for one prompt, from one recorded forward pass of the
model (Session.forward with hidden_states, attentions and mlp_activations). Each function takes
what the engine recorded and returns a dataclass of NumPy arrays; nothing here draws (page.py
does) or prints (summary.py does).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .. import sampling
from .embeddings import EmbeddingMatrix, nearest_neighbours, pca_2d, unit_rows
from .pieces import Pieces

NEIGHBOURS = 8           # nearest vocabulary entries listed per prompt token
LENS_TOP = 5             # logit lens: candidates kept per layer and position
FFN_TOP = 8              # feed-forward: most active neurons kept per layer and token
PREDICTION_TOP = 20      # prediction: candidates listed
STEP_TOP = 5             # each generated step: candidates listed
TEMPERATURES = (0.5, 1.0, 1.5)
# The filters shown one at a time, at llama.cpp's defaults (sampling.SamplingParams).
FILTERS = sampling.SamplingParams()
POSITION_PAIR = ("The dog bites the man", "The man bites the dog")
REVERSED_TOKENS = 8      # position, when the pair does not split into the same tokens: the prompt's first ones
LOGITS_BLOCK = 1 << 24   # floats of logits per unembed call (64 MiB)


@dataclasses.dataclass
class Recording:
    """The prompt's forward pass, as the engine recorded it."""
    ids: np.ndarray              # int32 [n]
    logits: np.ndarray           # float32 [n, vocab_size]
    hidden_states: np.ndarray    # float32 [layers + 1, n, hidden]: the embeddings, then each layer's output
    attentions: np.ndarray       # float32 [layers, heads, n, n]: each head's softmax, 0 above the diagonal
    mlp_activations: np.ndarray  # float32 [layers, n, intermediate]: silu(gate) ⊙ up


def record(session, ids: np.ndarray) -> Recording:
    """Runs ids through an empty session with every recording on."""
    if session.position != 0:
        raise ValueError("record needs an empty session")
    c = session.model.config
    n, layers = len(ids), c.num_hidden_layers
    hidden = np.zeros((layers + 1, n, c.hidden_size), np.float32)
    attentions = np.zeros((layers, c.num_attention_heads, n, n), np.float32)
    mlp = np.zeros((layers, n, c.intermediate_size), np.float32)
    logits = session.forward(ids, all_logits=True, hidden_states=hidden, attentions=attentions, mlp_activations=mlp)
    return Recording(np.asarray(ids, np.int32), logits, hidden, attentions, mlp)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, float32."""
    x = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    """−Σ p log₂ p along the last axis: 0 for a certain choice, log₂ N for N equal candidates."""
    p = probs.astype(np.float64)
    return -(p * np.log2(np.where(p > 0, p, 1))).sum(axis=-1)


def top(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest along the last axis, largest first."""
    k = min(k, values.shape[-1])
    idx = np.argpartition(-values, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(values, idx, axis=-1), axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=-1)
    return idx, np.take_along_axis(values, idx, axis=-1)


# ---- 1. tokenization ----

@dataclasses.dataclass
class Tokens:
    text: Optional[str]     # the prompt, None when given as token ids
    ids: np.ndarray         # int32 [n]
    pieces: list[str]       # each token's text (pieces.py)
    special: np.ndarray     # bool [n]: special tokens (<|im_start|>, <s>)


def tokenization(pieces: Pieces, text: Optional[str], ids: np.ndarray) -> Tokens:
    return Tokens(text, np.asarray(ids, np.int32), [pieces(i) for i in ids],
                  np.array([pieces.is_special(i) for i in ids], dtype=bool))


# ---- 2. embedding lookup ----

@dataclasses.dataclass
class EmbeddingLookup:
    rows: np.ndarray                # float32 [n, hidden]: each token's row as the forward pass looked it up
    norms: np.ndarray               # float32 [n]
    matrix_shape: tuple[int, int]   # (vocab_size, hidden_size)
    mean_norm: float                # mean row norm over the whole vocabulary


def embedding_lookup(rec: Recording, matrix_shape: tuple[int, int], mean_norm: float) -> EmbeddingLookup:
    rows = rec.hidden_states[0]
    return EmbeddingLookup(rows, np.linalg.norm(rows, axis=1).astype(np.float32), matrix_shape, mean_norm)


# ---- 3. embedding space ----

@dataclasses.dataclass
class EmbeddingSpace:
    neighbour_ids: np.ndarray   # int64 [n, k]: per prompt token, the vocabulary rows nearest its own, best first
    similarity: np.ndarray      # float32 [n, k]: their cosine similarities
    point_ids: np.ndarray       # int64 [m]: the prompt's distinct tokens, then their neighbours
    in_prompt: np.ndarray       # bool [m]
    coords: np.ndarray          # float32 [m, 2]: the points' unit vectors on their two principal axes
    variance_share: np.ndarray  # float32 [2]: the share of the points' variance each axis shows


def embedding_space(matrix: EmbeddingMatrix, ids: np.ndarray, k: int = NEIGHBOURS) -> tuple[EmbeddingSpace, float]:
    """The space, and the mean row norm of the vocabulary (found on the same pass over the matrix)."""
    distinct = np.array(list(dict.fromkeys(int(i) for i in ids)), dtype=np.int64)
    nids, sims, mean_norm = nearest_neighbours(matrix, distinct, min(k, matrix.shape[0] - 1))
    where = {int(t): i for i, t in enumerate(distinct)}
    rows = np.array([where[int(i)] for i in ids])
    neighbours = [int(t) for t in nids.ravel() if int(t) not in where]
    points = np.array(list(dict.fromkeys([*distinct.tolist(), *neighbours])), dtype=np.int64)
    coords, share = pca_2d(unit_rows(matrix.take(points)))
    space = EmbeddingSpace(nids[rows], sims[rows], points, np.arange(len(points)) < len(distinct), coords, share)
    return space, mean_norm


# ---- 4. position ----

@dataclasses.dataclass
class Position:
    texts: tuple[str, str]                   # the two orders compared
    ids: tuple[np.ndarray, np.ndarray]       # their token ids (the same tokens, reordered)
    matches: np.ndarray                      # int [m, 2]: a token's position in the first and in the second
    similarity: np.ndarray                   # float32 [layers + 1, m]: cosine of the two vectors after each layer
    distances: np.ndarray                    # int64 [d]
    rope_score: np.ndarray                   # float32 [d]: RoPE's q·k at that distance over q·k at distance 0
    attention_by_distance: np.ndarray        # float32 [n - 1]: mean weight a query gives the key i tokens back
                                             # (the first token left out)


def same_tokens_matched(a: np.ndarray, b: np.ndarray) -> Optional[np.ndarray]:
    """[(i, j)] pairing each position of a with the position of b holding the same token (k-th
    occurrence with k-th occurrence), or None when a and b are not the same tokens reordered."""
    if sorted(a.tolist()) != sorted(b.tolist()):
        return None
    free: dict[int, list[int]] = {}
    for j, t in enumerate(b.tolist()):
        free.setdefault(t, []).append(j)
    return np.array([(i, free[t].pop(0)) for i, t in enumerate(a.tolist())], dtype=np.int64).reshape(-1, 2)


def rope_decay(inv_freq: np.ndarray, max_distance: int, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """RoPE turns each pair (q_2i, q_2i+1) of a query by position · θ_i and the key's likewise, so
    their dot product depends on the distance Δ alone: for a query equal to its key, with the same
    energy in every pair, q·k(Δ) / q·k(0) = mean_i cos(Δ θ_i). Distances from 0 to max_distance,
    spaced evenly on a log scale."""
    d = np.unique(np.concatenate([[0], np.round(np.geomspace(1, max(max_distance, 1), points))])).astype(np.int64)
    score = np.cos(np.outer(d.astype(np.float64), inv_freq.astype(np.float64))).mean(axis=1)
    return d, score.astype(np.float32)


def attention_by_distance(attentions: np.ndarray) -> np.ndarray:
    """float32 [n - 1]: the mean over layers, heads and queries of the weight a query gives the
    key Δ tokens before it (Δ = 0: itself), for the keys after the first token. The first token
    is left out: many models park attention there whatever the distance (an "attention sink")."""
    n = attentions.shape[-1]
    mean = attentions.mean(axis=(0, 1), dtype=np.float64)  # [n, n]
    return np.array([np.diagonal(mean, -d)[1:].mean() for d in range(n - 1)], dtype=np.float32)


def position(model, pieces: Pieces, rec: Recording) -> Position:
    """The article's "dog bites man" against "man bites dog", run through the model: the same
    tokens after the embedding (similarity 1), different vectors once attention has mixed in what
    came before. When the model's tokenizer splits the two differently (or it has none), the
    prompt's first tokens against the same tokens reversed."""
    texts, pair = POSITION_PAIR, None
    if pieces.tokenizer is not None:
        pair = [np.array(pieces.tokenizer.encode(t), dtype=np.int32) for t in texts]
    matches = same_tokens_matched(*pair) if pair else None
    if matches is None:
        first = rec.ids[:REVERSED_TOKENS]
        pair = [first, first[::-1].copy()]
        texts = tuple("".join(pieces(i) for i in ids) for ids in pair)
        matches = same_tokens_matched(*pair)
    hidden = []
    for ids in pair:
        h = np.zeros((model.config.num_hidden_layers + 1, len(ids), model.config.hidden_size), np.float32)
        model.session(len(ids)).forward(ids, hidden_states=h)
        hidden.append(h)
    a = unit_rows(hidden[0][:, matches[:, 0]].reshape(-1, model.config.hidden_size))
    b = unit_rows(hidden[1][:, matches[:, 1]].reshape(-1, model.config.hidden_size))
    similarity = (a * b).sum(axis=1).reshape(-1, len(matches)).astype(np.float32)
    distances, score = rope_decay(model.config.inv_freq(), model.max_context)
    return Position(tuple(texts), (pair[0], pair[1]), matches, similarity, distances, score,
                    attention_by_distance(rec.attentions))


# ---- 5. attention ----

@dataclasses.dataclass
class Attention:
    weights: np.ndarray     # float32 [layers, heads, n, n]: query (row) × key (column), rows sum to 1
    kv_heads: int           # heads share key/value heads in groups of heads / kv_heads (GQA)
    follow: int             # the position whose attention is followed layer by layer

    @property
    def mean_over_heads(self) -> np.ndarray:
        """float32 [layers, n, n]"""
        return self.weights.mean(axis=1)

    @property
    def followed(self) -> np.ndarray:
        """float32 [layers, n]: how much the followed token attends to each token, per layer (mean over heads)."""
        return self.weights[:, :, self.follow, :].mean(axis=1)

    def most_attended(self, k: int = 3) -> list[tuple[int, float]]:
        """(position, weight) of the k tokens the followed one attends to most, averaged over
        layers and heads, most first."""
        mean = self.followed.mean(axis=0)
        idx, values = top(mean[: self.follow + 1], k)
        return [(int(i), float(v)) for i, v in zip(idx, values)]


def default_follow(tokens: Tokens) -> int:
    """The token the article follows, "smart", when the prompt has it; else the last."""
    for i, p in enumerate(tokens.pieces):
        if p.strip().lower() == "smart":
            return i
    return len(tokens.pieces) - 1


# ---- 6. feed-forward ----

@dataclasses.dataclass
class FeedForward:
    hidden_size: int
    intermediate_size: int
    parameters_per_layer: int   # gate, up and down (and their biases)
    share_of_parameters: float  # of the whole model, all layers together
    activations: np.ndarray     # float32 [layers, n, intermediate]: silu(gate) ⊙ up, the expanded vector
    rms: np.ndarray             # float32 [layers, n]: root mean square of each expanded vector
    top_neurons: np.ndarray     # int64 [layers, n, k]: the neurons of largest |activation|
    top_values: np.ndarray      # float32 [layers, n, k]: their activations (signed)


def feed_forward(c, rec: Recording, total_parameters: int, k: int = FFN_TOP) -> FeedForward:
    D, F = c.hidden_size, c.intermediate_size
    per_layer = 3 * D * F + ((2 * F + D) if c.mlp_bias else 0)
    act = rec.mlp_activations
    idx, _ = top(np.abs(act), k)
    return FeedForward(D, F, per_layer, per_layer * c.num_hidden_layers / total_parameters, act,
                       np.sqrt((act.astype(np.float64) ** 2).mean(axis=2)).astype(np.float32), idx,
                       np.take_along_axis(act, idx, axis=2))


# ---- 7. layers: the logit lens ----

@dataclasses.dataclass
class LogitLens:
    top_ids: np.ndarray       # int64 [layers + 1, n, k]: most likely next tokens read off each layer's output
    top_probs: np.ndarray     # float32 [layers + 1, n, k]
    entropy: np.ndarray       # float32 [layers + 1, n]: bits
    final_prob: np.ndarray    # float32 [layers + 1, n]: probability of the last layer's first choice
    change: np.ndarray        # float32 [layers, n]: |h_l+1 − h_l| / |h_l|, how much each layer moved each vector
    hidden_norm: np.ndarray   # float32 [layers + 1, n]

    def settles_at(self, position: int) -> int:
        """The first layer (0: the embeddings) from which the top candidate at position stays the
        last layer's."""
        same = self.top_ids[:, position, 0] == self.top_ids[-1, position, 0]
        changed = np.flatnonzero(~same)
        return int(changed[-1]) + 1 if len(changed) else 0


def lens_block(logits: np.ndarray, final_ids: np.ndarray, k: int):
    """For rows of logits [r, vocab] (overwritten): the top k ids and probabilities, the entropy
    in bits and the probability of final_ids [r], from one exp pass. With z = logits − max and
    S = Σ e^z: p = e^z / S, and the entropy −Σ p ln p = ln S − Σ e^z·z / S (nats)."""
    rows = np.arange(len(logits))
    z = np.subtract(logits, logits.max(axis=1, keepdims=True), out=logits)
    e = np.exp(z)
    total = e.sum(axis=1, dtype=np.float64)
    entropy = (np.log(total) - np.einsum("ij,ij->i", e, z, dtype=np.float64) / total) / np.log(2)
    final_prob = e[rows, final_ids] / total
    del e
    ids = np.zeros((len(z), k), np.int64)
    z_top = np.zeros((len(z), k), np.float64)
    for j in range(k):  # k argmax passes cost a fifth of one argpartition over a 50k vocabulary
        ids[:, j] = z.argmax(axis=1)
        z_top[:, j] = z[rows, ids[:, j]]
        z[rows, ids[:, j]] = -np.inf
    return ids, np.exp(z_top) / total[:, None], entropy, final_prob


def logit_lens(model, rec: Recording, k: int = LENS_TOP) -> LogitLens:
    """Every recorded residual-stream vector through the final norm and lm_head (Model.unembed),
    as if the model stopped after that layer. The last layer's is the model's prediction."""
    H = rec.hidden_states
    rows = H.reshape(-1, H.shape[2])
    final_of_row = np.tile(np.argmax(rec.logits, axis=1), H.shape[0])
    block = max(1, LOGITS_BLOCK // model.config.vocab_size)
    ids = np.zeros((len(rows), k), np.int64)
    probs = np.zeros((len(rows), k), np.float32)
    entropy = np.zeros(len(rows), np.float32)
    final_prob = np.zeros(len(rows), np.float32)
    for a in range(0, len(rows), block):
        b = min(a + block, len(rows))
        ids[a:b], probs[a:b], entropy[a:b], final_prob[a:b] = lens_block(model.unembed(rows[a:b]), final_of_row[a:b], k)
    shape = H.shape[:2]
    norms = np.linalg.norm(H, axis=2)
    change = np.linalg.norm(np.diff(H, axis=0), axis=2) / np.where(norms[:-1] > 0, norms[:-1], 1)
    return LogitLens(ids.reshape(*shape, k), probs.reshape(*shape, k), entropy.reshape(shape),
                     final_prob.reshape(shape), change.astype(np.float32), norms.astype(np.float32))


# ---- 8. prediction ----

@dataclasses.dataclass
class Strategy:
    name: str               # "greedy", "top-k", ...
    setting: str            # "k = 40"
    kept: np.ndarray        # int64: the token ids it may choose, most likely first
    mass: float             # their probability under the model


@dataclasses.dataclass
class Step:
    token_id: int           # the token chosen (greedy)
    top_ids: np.ndarray     # int64 [k]: the candidates, most likely first
    top_probs: np.ndarray   # float32 [k]
    entropy: float          # bits


@dataclasses.dataclass
class Prediction:
    probs: np.ndarray               # float32 [vocab_size]: the last token's next-token distribution
    top_ids: np.ndarray             # int64 [k]
    top_probs: np.ndarray           # float32 [k]
    entropy: float                  # bits
    strategies: list[Strategy]
    temperatures: np.ndarray        # float32 [t]
    temperature_probs: np.ndarray   # float32 [t, k]: the top tokens' probabilities at each temperature
    steps: list[Step]               # step i: the distribution the i-th generated token was chosen from

    @property
    def generated_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]


def kept_ids(cands: sampling.Candidates, logits: np.ndarray) -> np.ndarray:
    """The ids a filter chain left, most likely first (a filter may mask instead of dropping)."""
    ids, values = cands
    if ids is None:
        ids = np.flatnonzero(values > sampling.MASKED / 2)
    ids = np.asarray(ids, np.int64)
    return ids[np.argsort(-logits[ids], kind="stable")]


def strategies(logits: np.ndarray, probs: np.ndarray, chain: sampling.SamplingParams) -> list[Strategy]:
    """What each decoding strategy would let the next token be: greedy, temperature (which drops
    nothing), each filter alone at llama.cpp's defaults, and the model's own default chain
    (sampling.sample's order)."""
    f = FILTERS
    whole: sampling.Candidates = (None, logits)
    out = [("greedy", "temperature 0", np.array([int(np.argmax(logits))])),
           ("temperature", "T > 0 alone: every token, reweighted", np.argsort(-logits, kind="stable")),
           ("top-k", f"k = {f.top_k}", kept_ids(sampling.top_k_filter(whole, f.top_k), logits)),
           ("top-p", f"p = {f.top_p:g}", kept_ids(sampling.top_p_filter(whole, f.top_p), logits)),
           ("min-p", f"min_p = {f.min_p:g}", kept_ids(sampling.min_p_filter(whole, f.min_p), logits))]
    if chain.greedy:
        out.append(("this model's default", "greedy", out[0][2]))
    else:
        scaled = sampling.apply_temperature(logits, chain.temperature)
        cands = sampling.min_p_filter(sampling.top_p_filter(sampling.top_k_filter((None, scaled), chain.top_k),
                                                            chain.top_p), chain.min_p)
        setting = (f"temperature {chain.temperature:g}, top-k {chain.top_k}, top-p {chain.top_p:g}, "
                   f"min-p {chain.min_p:g}")
        out.append(("this model's default", setting, kept_ids(cands, logits)))
    return [Strategy(name, setting, kept, float(probs[kept].sum(dtype=np.float64))) for name, setting, kept in out]


def prediction(session, rec: Recording, chain: sampling.SamplingParams, steps: int) -> Prediction:
    """The last token's distribution and the strategies, then `steps` greedy steps in the
    session that ran the prompt: choose, append, predict again."""
    logits = rec.logits[-1]
    probs = softmax(logits)
    top_ids, top_probs = top(probs, PREDICTION_TOP)
    temps = np.array(TEMPERATURES, np.float32)
    temp_probs = np.stack([softmax(logits / t)[top_ids] for t in temps])
    kept = strategies(logits, probs, chain)
    grown = []
    for _ in range(steps):
        p = softmax(logits)
        ids, values = top(p, STEP_TOP)
        grown.append(Step(int(ids[0]), ids, values, float(entropy_bits(p))))
        logits = session.append([int(ids[0])])
    return Prediction(probs, top_ids, top_probs, float(entropy_bits(probs)), kept, temps, temp_probs, grown)
