"""`gally explain`: the pictures of "How LLMs Work" for one prompt on the loaded model, with the
numbers of its own forward pass.

    e = gally.load().explain("Gally is a smart dog", steps=4)
    print(e.summary())                       # the terminal summary
    e.to_html("gally-explain.html")          # one self-contained page, a section per step
    e.attention.weights                      # float32 [layers, heads, n, n], and so on per section

One recorded forward pass (Session.forward with hidden states, attention weights and the
feed-forward activations) feeds every section:

    tokenization     Tokens             the text's tokens and ids
    embedding        EmbeddingLookup    each token's row of the embedding matrix
    embedding space  EmbeddingSpace     nearest vocabulary entries by cosine, a 2-D projection
    position         Position           "dog bites man" against "man bites dog"; RoPE and distance
    attention        Attention          every layer's and head's weights
    feed-forward     FeedForward        the expanded vectors, their most active neurons
    layers           LogitLens          each layer's output read as a prediction
    prediction       Prediction         the distribution, what each strategy keeps, the next steps
    cost             Cost               parameters, bytes per token per dtype, measured time

sections.py computes them, cost.py the last, page.py draws the page and summary.py the text.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Sequence, Union

import numpy as np

from .cost import Cost, cost_of, dtypes_to_compare
from .embeddings import EmbeddingMatrix
from .pieces import Pieces
from .sections import (
    Attention,
    EmbeddingLookup,
    EmbeddingSpace,
    FeedForward,
    LogitLens,
    Position,
    Prediction,
    Recording,
    Tokens,
    default_follow,
    embedding_lookup,
    embedding_space,
    feed_forward,
    logit_lens,
    position,
    prediction,
    record,
    tokenization,
)

MAX_PROMPT_TOKENS = 256  # attention maps grow as n²: 256 tokens of SmolLM2 record 17.7 M weights
MAX_STEPS = 64


@dataclasses.dataclass
class Explanation:
    """Everything the page shows, as NumPy arrays per section (see the module doc)."""
    model_name: str
    model_path: str
    config: object            # gally.config.Config
    dtype: str
    threads: int
    tokens: Tokens
    embedding: EmbeddingLookup
    space: EmbeddingSpace
    position: Position
    attention: Attention
    feed_forward: FeedForward
    layers: LogitLens
    prediction: Prediction
    cost: Cost
    recording: Recording      # the forward pass itself
    pieces: Pieces            # token id → text, for any id

    @property
    def hidden_states(self) -> np.ndarray:
        """float32 [layers + 1, n, hidden]: the embeddings, then each layer's output."""
        return self.recording.hidden_states

    def summary(self) -> str:
        """A few lines per section, for the terminal."""
        from .summary import summary
        return summary(self)

    def to_html(self, path: Union[str, os.PathLike]) -> str:
        """Writes the page to path; returns the path. Needs plotly (pip install 'gally[explain]')."""
        from .page import write_page
        return write_page(self, os.fspath(path))

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        c = self.config
        return (f"Explanation({self.model_name!r}, {len(self.tokens.ids)} tokens, {c.num_hidden_layers} layers, "
                f"{self.dtype}, {len(self.prediction.steps)} steps)")


def prompt_ids(model, prompt) -> tuple[np.ndarray, Optional[str]]:
    """(int32 ids, the text or None): text is encoded as `gally run --raw` does (no special tokens
    added); token ids are checked against the vocabulary."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: the model has no tokenizer.json; give the prompt as token ids")
        ids, text = model.tokenizer.encode(prompt), prompt
    else:
        try:
            array = np.asarray(prompt)
        except Exception:
            array = None
        if array is None or array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError("prompt must be a string or a flat sequence of integer token ids")
        ids, text = array.astype(np.int64).tolist(), None
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})")
    if not ids:
        raise ValueError("prompt is empty")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise ValueError(f"prompt has {len(ids)} tokens; gally explain shows at most {MAX_PROMPT_TOKENS}")
    return np.array(ids, dtype=np.int32), text


# A GGUF converted into GALLY_HOME lives in "<file stem>-<16 hex digits of its sha256>-<dtype>"
# (sources.py); the page names it by the stem.
CACHED_GGUF = re.compile(r"(.+)-[0-9a-f]{16}-(f32|bf16|f16)")


def model_name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    m = CACHED_GGUF.fullmatch(name)
    return m.group(1) if m else name


def _check_int(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def explain(model, prompt: Union[str, Sequence[int]], *, steps: int = 4, follow: Optional[int] = None,
            compare: Optional[Sequence[str]] = None) -> Explanation:
    """Runs the prompt through the model once with every recording on and computes each section.

    steps: tokens to generate (greedy) after the prompt, each shown with its candidates.
    follow: the position whose attention and feed-forward activity are followed (default: the
    article's "smart" when the prompt has it, else the last token).
    compare: dtypes to load the model again at and time for the cost section (default: bf16,
    int8 and int4 besides the loaded one, for models of at most 1B parameters; () for none).
    """
    from ..generate import resolve_options

    steps = _check_int(steps, "steps", 0, MAX_STEPS)
    ids, text = prompt_ids(model, prompt)
    n = len(ids)
    if n + steps > model.max_context:
        raise ValueError(f"prompt ({n} tokens) + steps ({steps}) exceeds the model's max_context {model.max_context}")
    pieces = Pieces(model.tokenizer)
    tokens = tokenization(pieces, text, ids)
    follow = default_follow(tokens) if follow is None else _check_int(follow, "follow", 0, n - 1)
    compare = dtypes_to_compare(model, compare)
    c = model.config
    session = model.session(n + steps)
    rec = record(session, ids)
    matrix = EmbeddingMatrix(model.path)
    space, mean_norm = embedding_space(matrix, ids)
    costs = cost_of(model, ids, compare)
    return Explanation(
        model_name=model_name(model.path), model_path=model.path, config=c,
        dtype=model.dtype, threads=model.threads, tokens=tokens,
        embedding=embedding_lookup(rec, matrix.shape, mean_norm), space=space,
        position=position(model, pieces, rec),
        attention=Attention(rec.attentions, c.num_key_value_heads, follow),
        feed_forward=feed_forward(c, rec, costs.parameters["total"]), layers=logit_lens(model, rec),
        prediction=prediction(session, rec, resolve_options(model).sampling, steps), cost=costs,
        recording=rec, pieces=pieces)
