"""gally explain's data checked against the engine and against NumPy: token ids are the
tokenizer's, hidden states and attention are Session.forward's recording, attention rows sum to 1
and are causal, the last layer's logit lens is the softmax of model.logits, neighbours are those
of a NumPy search of the embedding matrix, the cost's byte counts are the engine's; then every
architecture and dtype, bad input, and the command line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import gally
from conftest import make_checkpoint
from gally import quantize, safetensors_file, sampling
from gally.dtypes import as_float32
from gally.explain import MAX_PROMPT_TOKENS, cost as cost_mod, page, pieces as pieces_mod, sections
from generation_helpers import make_text_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog. Hello world"
GALLY = "Gally is a smart dog"


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rmsnorm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def embedding_matrix(folder) -> np.ndarray:
    t = safetensors_file.open_checkpoint(folder)["model.embed_tokens.weight"]
    return as_float32(t.dtype, t.numpy()).astype(np.float64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Llama checkpoint with a small byte-level BPE tokenizer, and its explanation."""
    folder = make_text_checkpoint(str(tmp_path_factory.mktemp("tiny")))
    model = gally.load(folder, threads=2)
    return model, model.explain(PROMPT, steps=3, compare=())


@pytest.fixture(scope="module")
def smollm_explained(smollm):
    return smollm, smollm.explain(GALLY, steps=4, compare=())


@pytest.fixture(params=["tiny", "smollm"])
def explained(request):
    return request.getfixturevalue("tiny" if request.param == "tiny" else "smollm_explained")


# ---- the data against the engine ----

def test_token_ids_are_the_tokenizers(explained):
    model, e = explained
    text = e.tokens.text
    assert e.tokens.ids.tolist() == model.tokenizer.encode(text)
    assert model.tokenizer.decode(e.tokens.ids) == text
    assert "".join(e.tokens.pieces) == text  # each piece is the text its token stands for
    assert not e.tokens.special.any()


def test_recording_is_the_sessions(explained):
    model, e = explained
    c, n = model.config, len(e.tokens.ids)
    hidden = np.zeros((c.num_hidden_layers + 1, n, c.hidden_size), np.float32)
    att = np.zeros((c.num_hidden_layers, c.num_attention_heads, n, n), np.float32)
    mlp = np.zeros((c.num_hidden_layers, n, c.intermediate_size), np.float32)
    logits = model.session(n).forward(e.tokens.ids, all_logits=True, hidden_states=hidden, attentions=att,
                                      mlp_activations=mlp)
    assert np.array_equal(e.hidden_states, hidden)
    assert np.array_equal(e.attention.weights, att)
    assert np.array_equal(e.feed_forward.activations, mlp)
    assert np.array_equal(e.recording.logits, logits)
    assert np.array_equal(e.embedding.rows, hidden[0])


def test_attention_rows_sum_to_one_and_are_causal(explained):
    _, e = explained
    w = e.attention.weights
    assert np.abs(w.sum(axis=-1) - 1).max() < 1e-5
    n = w.shape[-1]
    assert not w[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]].any()
    assert (w >= 0).all()
    assert np.allclose(e.attention.followed, w[:, :, e.attention.follow].mean(axis=1))


def test_the_last_layer_of_the_logit_lens_is_the_models_prediction(explained):
    model, e = explained
    want = softmax(model.logits(e.tokens.ids))  # [n, vocab]
    lens = e.layers
    got = np.take_along_axis(want, lens.top_ids[-1], axis=1)
    # float rounding apart: a short prompt's lm_head goes row-wise, the lens's blocks of rows through the GEMM
    # (measured: 3e-6 at most)
    assert np.allclose(lens.top_probs[-1], got, rtol=2e-5, atol=1e-6)
    assert np.array_equal(lens.top_ids[-1, :, 0], want.argmax(axis=1))
    entropy = -(want * np.log2(np.where(want > 0, want, 1))).sum(axis=1)
    assert np.allclose(lens.entropy[-1], entropy, atol=1e-4)
    assert np.allclose(lens.final_prob[-1], want.max(axis=1), rtol=2e-5, atol=1e-6)
    # the prediction section's distribution is the last position's
    assert np.allclose(e.prediction.probs, want[-1], atol=1e-6)
    assert (np.diff(lens.top_probs, axis=2) <= 0).all()  # candidates best first


def test_logit_lens_is_the_final_norm_and_lm_head_of_each_layer(tmp_path):
    """Independently of Model.unembed: NumPy's RMSNorm with model.norm and lm_head on every
    recorded layer gives the lens's probabilities."""
    folder, w = make_checkpoint(tmp_path)
    model = gally.load(folder)
    e = model.explain([3, 14, 15, 92, 65, 35, 89, 79], steps=0, compare=())
    h = rmsnorm(e.hidden_states, w["model.norm.weight"], model.config.rms_norm_eps)
    probs = softmax(h @ w["lm_head.weight"].T)  # [layers + 1, n, vocab]
    assert np.allclose(e.layers.top_probs, np.take_along_axis(probs, e.layers.top_ids, axis=2), atol=1e-5)
    assert np.array_equal(e.layers.top_ids[..., 0], probs.argmax(axis=2))
    change = np.linalg.norm(np.diff(e.hidden_states, axis=0), axis=2) / np.linalg.norm(e.hidden_states[:-1], axis=2)
    assert np.allclose(e.layers.change, change, rtol=1e-5)
    final = probs[-1].argmax(axis=1)
    assert np.allclose(e.layers.final_prob, probs[:, np.arange(8), final], atol=1e-5)
    settle = e.layers.settles_at(7)
    assert (e.layers.top_ids[settle:, 7, 0] == final[7]).all()
    assert settle == 0 or e.layers.top_ids[settle - 1, 7, 0] != final[7]


def test_neighbours_are_numpys(explained):
    model, e = explained
    matrix = embedding_matrix(model.path)
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    k = e.space.neighbour_ids.shape[1]
    for i, t in enumerate(e.tokens.ids):
        sims = unit @ unit[t]
        sims[t] = -np.inf
        order = np.argsort(-sims, kind="stable")[:k]
        assert np.allclose(e.space.similarity[i], sims[order], atol=1e-5)
        assert e.space.neighbour_ids[i].tolist() == order.tolist()
    assert e.embedding.matrix_shape == matrix.shape
    assert np.isclose(e.embedding.mean_norm, np.linalg.norm(matrix, axis=1).mean(), rtol=1e-5)
    assert np.allclose(e.embedding.rows, matrix[e.tokens.ids], atol=1e-6)  # the lookup is the matrix's rows


def test_embedding_space_projection_is_a_pca(explained):
    model, e = explained
    s = e.space
    distinct = list(dict.fromkeys(e.tokens.ids.tolist()))
    assert s.point_ids[:len(distinct)].tolist() == distinct and s.in_prompt.sum() == len(distinct)
    assert set(s.point_ids.tolist()) == set(distinct) | set(s.neighbour_ids.ravel().tolist())
    v = embedding_matrix(model.path)[s.point_ids]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v -= v.mean(axis=0)
    u, sv, _ = np.linalg.svd(v, full_matrices=False)
    assert np.allclose(np.abs(s.coords), np.abs(u[:, :2] * sv[:2]), atol=1e-4)  # each axis up to its sign
    assert np.allclose(s.variance_share, sv[:2] ** 2 / (sv ** 2).sum(), atol=1e-5)


def test_position_compares_the_same_tokens_in_two_orders(explained):
    model, e = explained
    p = e.position
    assert p.texts == sections.POSITION_PAIR  # both tokenizers split the pair into the same tokens
    a, b = p.ids
    assert np.array_equal(a[p.matches[:, 0]], b[p.matches[:, 1]])
    assert sorted(p.matches[:, 1].tolist()) == list(range(len(b)))
    assert np.allclose(p.similarity[0], 1, atol=1e-6)  # no position in the embeddings
    first = p.matches[:, 0] == 0
    assert np.allclose(p.similarity[:, first], 1, atol=1e-6)  # "The" starts both: the same context
    assert (p.similarity[-1, ~first] < 0.9999).all()  # every later token has a different past


def test_rope_decay_is_the_rotated_dot_product():
    """mean_i cos(Δ θ_i) is q·k after rotating q at position p and k at position p + Δ by RoPE,
    for q = k with equal energy in every pair, over q·k: checked with the rotations written out."""
    inv_freq = gally.config.Config.from_dict({**make_config(), "rope_theta": 500.0}).inv_freq()
    q = np.ones(2 * len(inv_freq))

    def rotate(v, pos):
        out = v.copy()
        half = len(v) // 2  # HF's rotate_half pairing: (i, i + d/2)
        c, s = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
        out[:half], out[half:] = v[:half] * c - v[half:] * s, v[half:] * c + v[:half] * s
        return out

    distances, score = sections.rope_decay(inv_freq, 300)
    assert distances[0] == 0 and distances[-1] == 300 and score[0] == 1
    for d, want in zip(distances, score):
        assert np.isclose(rotate(q, 7) @ rotate(q, 7 + d) / (q @ q), want, atol=1e-5)


def make_config():
    from conftest import DEFAULT_CONFIG
    return dict(DEFAULT_CONFIG)


def test_attention_by_distance_leaves_out_the_first_token():
    rng = np.random.default_rng(0)
    w = np.tril(rng.random((2, 3, 6, 6))).astype(np.float32)
    got = sections.attention_by_distance(w)
    mean = w.mean(axis=(0, 1))
    want = [np.mean([mean[q, q - d] for q in range(6) if q - d >= 1]) for d in range(5)]
    assert np.allclose(got, want, atol=1e-6)


def test_feed_forward(explained):
    model, e = explained
    c, f = model.config, e.feed_forward
    act = e.feed_forward.activations
    assert np.allclose(f.rms, np.sqrt((act.astype(np.float64) ** 2).mean(axis=2)), rtol=1e-5)
    order = np.argsort(-np.abs(act), axis=2, kind="stable")[..., :f.top_neurons.shape[2]]
    assert np.allclose(np.abs(f.top_values), np.take_along_axis(np.abs(act), order, axis=2))
    assert np.array_equal(f.top_values, np.take_along_axis(act, f.top_neurons, axis=2))
    tensors = safetensors_file.open_checkpoint(model.path)
    mlp = sum(int(np.prod(t.shape)) for name, t in tensors.items() if name.startswith("model.layers.0.mlp."))
    assert f.parameters_per_layer == mlp == 3 * c.hidden_size * c.intermediate_size
    assert np.isclose(f.share_of_parameters, mlp * c.num_hidden_layers / e.cost.parameters["total"])


def test_prediction_strategies_and_steps(explained):
    model, e = explained
    pred = e.prediction
    probs = pred.probs.astype(np.float64)
    by_name = {s.name: s for s in pred.strategies}
    assert by_name["greedy"].kept.tolist() == [int(np.argmax(probs))]
    assert len(by_name["temperature"].kept) == len(probs) and np.isclose(by_name["temperature"].mass, 1)
    f = sections.FILTERS
    assert len(by_name["top-k"].kept) == f.top_k
    top_p = by_name["top-p"]
    assert top_p.mass >= f.top_p - 1e-6 and probs[top_p.kept[:-1]].sum() < f.top_p
    assert (probs[by_name["min-p"].kept] >= f.min_p * probs.max() * (1 - 1e-6)).all()
    assert ((probs >= f.min_p * probs.max() * (1 + 1e-6)).sum()) <= len(by_name["min-p"].kept)
    for s in pred.strategies:
        assert np.isclose(s.mass, probs[s.kept].sum(), atol=1e-6)
        assert (np.diff(probs[s.kept]) <= 1e-9).all()  # most likely first
    assert np.allclose(pred.temperature_probs[list(pred.temperatures).index(1.0)], pred.top_probs, atol=1e-6)
    sharp = pred.temperature_probs[list(pred.temperatures).index(0.5)]
    assert sharp[0] >= pred.top_probs[0]
    # the steps are greedy generation's tokens
    want = model.generate(e.tokens.ids.tolist(), max_new_tokens=len(pred.steps), temperature=0).token_ids
    assert pred.generated_ids == want
    assert pred.steps[0].top_ids[0] == pred.top_ids[0] and np.isclose(pred.steps[0].entropy, pred.entropy)


def test_default_chain_is_samplings():
    """The "this model's default" row keeps what sampling.sample's filters keep at that setting."""
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal(500)).astype(np.float32)
    chain = sampling.SamplingParams(temperature=0.7, top_k=30, top_p=0.8, min_p=0.02)
    row = sections.strategies(logits, sections.softmax(logits), chain)[-1]
    draws = {sampling.sample(logits, chain, np.random.default_rng(s)) for s in range(3000)}
    assert draws <= set(row.kept.tolist())
    assert len(draws) >= len(row.kept) // 2
    greedy = sections.strategies(logits, sections.softmax(logits), sampling.SamplingParams(temperature=0))[-1]
    assert greedy.kept.tolist() == [int(np.argmax(logits))]


# ---- cost ----

COST_CASES = {
    "llama": {},
    "tied": dict(tie_word_embeddings=True),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "uneven": dict(hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=4),
}


@pytest.mark.parametrize("case", list(COST_CASES))
@pytest.mark.parametrize("stored", ["F32", "BF16"])
def test_bytes_per_token_are_the_engines(tmp_path, case, stored):
    """bytes_per_token at every dtype equals Model.weight_bytes once loaded so (a matrix whose
    columns do not fill groups of 32 stays in the stored dtype), and parameters counts every
    tensor of the checkpoint."""
    folder, w = make_checkpoint(tmp_path, dtype=stored, **COST_CASES[case])
    c = gally.config.read(folder)
    for dtype in gally.model.DTYPES:
        want = gally.load(folder, dtype=dtype).weight_bytes
        assert cost_mod.bytes_per_token(c, dtype, 4 if stored == "F32" else 2) == want, dtype
    assert cost_mod.parameters(c)["total"] == sum(v.size for v in w.values())
    with pytest.raises(ValueError, match="dtype"):
        cost_mod.bytes_per_token(c, "int3")


def test_cost_compares_dtypes(tmp_path):
    folder = make_text_checkpoint(str(tmp_path / "m"))
    model = gally.load(folder, threads=1)
    e = model.explain("Hello world", steps=1, compare=["bf16", "int4"])
    rows = {r.dtype: r for r in e.cost.dtypes}
    assert list(rows) == ["f32", "bf16", "int8", "int4"] and e.cost.dtype == "f32"
    for dtype in ("f32", "bf16", "int4"):
        assert rows[dtype].timing is not None and len(rows[dtype].timing.seconds) == cost_mod.DECODE_STEPS
        assert (rows[dtype].timing.seconds > 0).all()
        assert rows[dtype].bytes_per_token == gally.load(folder, dtype=dtype).weight_bytes
    assert rows["int8"].timing is None and "not loaded" in rows["int8"].note
    assert rows["f32"].bandwidth == rows["f32"].bytes_per_token / rows["f32"].timing.median
    assert e.cost.timing.prompt_tokens == len(e.tokens.ids) and e.cost.timing.prefill_seconds > 0
    # a checkpoint stored quantized loads at its own dtype only
    quantize.quantize_folder(folder, str(tmp_path / "q"), "int8")
    q = gally.load(str(tmp_path / "q"))
    eq = q.explain("Hello world", steps=1)
    rows = {r.dtype: r for r in eq.cost.dtypes}
    assert eq.cost.dtype == "int8" and rows["int8"].timing is not None
    assert rows["bf16"].timing is None and "stored as int8" in rows["bf16"].note
    with pytest.raises(ValueError, match="compare.*int8"):
        q.explain("Hello world", compare=["bf16"])


# ---- every architecture and dtype ----

ARCHITECTURES = {
    "llama": {},
    "llama-tied": dict(tie_word_embeddings=True),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "biases": dict(attention_bias=True, mlp_bias=True),
}


def check_explanation(model, e, n):
    c = model.config
    assert e.hidden_states.shape == (c.num_hidden_layers + 1, n, c.hidden_size)
    assert e.attention.weights.shape == (c.num_hidden_layers, c.num_attention_heads, n, n)
    assert np.abs(e.attention.weights.sum(-1) - 1).max() < 1e-5
    want = softmax(model.logits(e.tokens.ids)[-1])
    assert np.allclose(e.layers.top_probs[-1, -1], want[e.layers.top_ids[-1, -1]], atol=1e-6)
    html = page.render(e)
    assert html.count('data-section="') == 9 and len(html) < 10e6
    assert e.summary().count("\n") >= 9


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture(tmp_path, arch):
    folder = make_text_checkpoint(str(tmp_path), **ARCHITECTURES[arch])
    model = gally.load(folder, threads=2)
    e = model.explain(PROMPT, steps=2, compare=())
    check_explanation(model, e, len(model.tokenizer.encode(PROMPT)))
    assert e.config.architecture == model.config.architecture


@pytest.mark.parametrize("stored,dtype", [("F32", "bf16"), ("BF16", None), ("F16", None), ("F16", "f32"),
                                          ("F32", "int8"), ("BF16", "int4"), ("F32", "stored int4")])
def test_every_dtype(tmp_path, stored, dtype):
    folder = make_text_checkpoint(str(tmp_path / "m"), dtype=stored)
    if dtype == "stored int4":
        quantize.quantize_folder(folder, str(tmp_path / "q"), "int4")
        folder, dtype = str(tmp_path / "q"), None
    model = gally.load(folder, dtype=dtype, threads=2)
    e = model.explain(PROMPT, steps=2, compare=())
    check_explanation(model, e, len(model.tokenizer.encode(PROMPT)))
    assert e.dtype == model.dtype and e.cost.bytes_per_token == model.weight_bytes
    # the lookup rows are the model's own, rounded or quantized at load: close to the stored ones
    matrix = quantize.dequantize_checkpoint(folder)["model.embed_tokens.weight"] if quantize.read_checkpoint(folder) \
        else embedding_matrix(folder)
    assert np.allclose(e.embedding.rows, matrix[e.tokens.ids], atol=0.02 * np.abs(matrix).max())


def test_a_model_without_tokenizer_takes_ids(tmp_path):
    folder, _ = make_checkpoint(tmp_path)
    model = gally.load(folder)
    ids = [5, 17, 3, 88, 42, 0, 96]
    e = model.explain(ids, steps=2, compare=())
    check_explanation(model, e, len(ids))
    assert e.tokens.pieces == [f"⟨{i}⟩" for i in ids] and e.tokens.text is None
    # no tokenizer to split "dog bites man": the prompt against its own tokens reversed
    assert e.position.ids[1].tolist() == ids[::-1]
    with pytest.raises(ValueError, match="tokenizer"):
        model.explain("text")


def test_256_tokens(tmp_path):
    folder, _ = make_checkpoint(tmp_path, max_position_embeddings=512)
    model = gally.load(folder, threads=2)
    ids = np.random.default_rng(0).integers(0, 97, MAX_PROMPT_TOKENS)
    e = model.explain(ids, steps=1, compare=())
    check_explanation(model, e, MAX_PROMPT_TOKENS)
    assert e.position.ids[1].tolist() == ids[:sections.REVERSED_TOKENS][::-1].tolist()


# ---- token texts ----

def test_pieces_undo_the_vocabularies_spelling(tmp_path):
    assert pieces_mod.byte_level_alphabet()["Ġ"] == 32 and pieces_mod.byte_level_alphabet()["Ċ"] == 10
    assert len(set(pieces_mod.byte_level_alphabet().values())) == 256
    assert pieces_mod.token_bytes("Ġdog", True) == b" dog"
    assert pieces_mod.token_bytes("ĠðŁ", True) == b" \xf0\x9f"  # half an emoji: shown as its bytes
    assert pieces_mod.token_bytes("▁dog", False) == b" dog" and pieces_mod.token_bytes("<0x0A>", False) == b"\n"
    folder = make_text_checkpoint(str(tmp_path))
    model = gally.load(folder)
    text = "<|im_start|>user\nHello 🐕 world<|im_end|>"
    e = model.explain(text, steps=0, compare=())
    assert e.tokens.pieces[0] == "<|im_start|>" and e.tokens.special[0] and e.tokens.special[-1]
    assert "\n" in "".join(e.tokens.pieces) and not e.tokens.special[1:-1].any()
    joined = "".join(e.tokens.pieces)
    assert "🐕" in joined or "\\x" in joined  # whole character, or its bytes when split over tokens
    assert e.pieces(10**6) == f"⟨{10**6}⟩"


# ---- bad input ----

@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=""), "empty"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, 400]), "outside the vocabulary"),
    (dict(prompt=[[1, 2]]), "flat sequence"),
    (dict(prompt=[1.5]), "flat sequence"),
    (dict(prompt=[1] * (MAX_PROMPT_TOKENS + 1)), f"at most {MAX_PROMPT_TOKENS}"),
    (dict(steps=-1), "steps"),
    (dict(steps=True), "steps"),
    (dict(steps=65), "steps"),
    (dict(follow=99), "follow"),
    (dict(compare=["int3"]), "compare"),
    (dict(compare="bf16"), "compare"),
    (dict(steps=64, prompt=[1] * 200), "max_context"),
])
def test_bad_input(tmp_path, kwargs, message):
    folder = make_text_checkpoint(str(tmp_path), max_position_embeddings=256)
    model = gally.load(folder)
    kwargs = {"prompt": "Hello", **kwargs}
    with pytest.raises(ValueError, match=message):
        model.explain(kwargs.pop("prompt"), **kwargs)


def test_page_needs_plotly(monkeypatch, tiny):
    import builtins

    real_import = builtins.__import__

    def no_plotly(name, *args, **kwargs):
        if name.startswith("plotly"):
            raise ImportError("No module named 'plotly'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_plotly)
    with pytest.raises(ImportError, match=r"gally\[explain\]"):
        tiny[1].to_html(os.devnull)


# ---- the page, without a browser ----

def test_page_is_self_contained_and_small(smollm_explained, tmp_path):
    _, e = smollm_explained
    path = e.to_html(tmp_path / "page.html")
    size = os.path.getsize(path)
    with open(path, encoding="utf-8") as f:
        html = f.read()
    assert size < 10e6  # a 16-token prompt stays under 10 MB; this one has 6
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert html.count('data-section="') == 9
    start = html.index('<script id="explain-data" type="application/json">') + len(
        '<script id="explain-data" type="application/json">')
    data = json.loads(html[start:html.index("</script>", start)])
    assert data["tokens"]["ids"] == e.tokens.ids.tolist()
    with pytest.raises(OSError, match="cannot write"):
        e.to_html(tmp_path / "missing" / "page.html")


def test_sixteen_tokens_on_smollm_stay_under_10_mb(smollm):
    ids = smollm.tokenizer.encode("Gally is a smart dog. She lives in a small house near the river")
    assert len(ids) == 16
    e = smollm.explain(ids, steps=4, compare=())
    assert len(page.render(e).encode()) < 10e6


def test_pack_round_trips():
    import base64
    import zlib

    x = np.random.default_rng(0).random((3, 5)).astype(np.float32)
    for kind, dtype, scale in (("f32", "<f4", 1), ("f16", "<f2", 1), ("unit16", "<u2", 65535), ("unit8", "u1", 255)):
        p = page.pack(x, kind)
        back = np.frombuffer(zlib.decompress(base64.b64decode(p["data"])), dtype).reshape(p["shape"]) / scale
        assert np.allclose(back, x, atol=1 / scale if scale > 1 else 1e-3)
    with pytest.raises(ValueError, match="kind"):
        page.pack(x, "f8")


# ---- command line ----

def test_cli(tmp_path, capsys, monkeypatch):
    from gally import cli

    folder = make_text_checkpoint(str(tmp_path / "m"))
    out = tmp_path / "page.html"
    assert cli.main(["explain", PROMPT, "-m", folder, "-o", str(out), "--steps", "2", "--compare", "none"]) == 0
    text = capsys.readouterr().out
    assert f"page: {out}" in text and "tokens" in text and "cost" in text and out.stat().st_size > 1e6
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello world"))
    assert cli.main(["explain", "-", "-m", folder, "--steps", "0", "--compare", "bf16", "--follow", "0"]) == 0
    assert (tmp_path / "gally-explain.html").exists()
    assert "bf16" in capsys.readouterr().out
    assert cli.main(["explain", PROMPT, "-m", folder, "--compare", "int3"]) == 1
    assert "compare" in capsys.readouterr().err
    assert cli.main(["explain", PROMPT, "-m", folder, "--steps", "-2"]) == 1
    assert "steps" in capsys.readouterr().err

    def missing():
        raise ImportError("pip install 'gally[explain]'")

    monkeypatch.setattr(page, "plotly_js", missing)
    assert cli.main(["explain", PROMPT, "-m", folder]) == 1
    assert "gally[explain]" in capsys.readouterr().err
