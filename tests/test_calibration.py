"""int4's calibration: the activation statistics the engine records (Session.forward's
input_squares) against the NumPy reference, the importance-weighted int4 fit, calibrate(), and
the ways to int4 that use them (gally quantize, gally convert, gally.load(dtype="int4"))."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gally
import reference_numpy as ref
from conftest import make_checkpoint, word_tokenizer_json
from gally import cli, quantize as qz

MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, weights = make_checkpoint(tmp_path_factory.mktemp("calibration"))
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(word_tokenizer_json())
    return folder, weights


def _reference_squares(folder, weights, windows) -> dict:
    """{weight name: mean x² per input column} from the NumPy forward pass of each window."""
    sums, count = {}, 0
    for ids in windows:
        def seen(name, x):
            sums[name + ".weight"] = sums.get(name + ".weight", 0) + (x * x).sum(axis=0)
        ref.forward(folder, ids, weights, inputs=seen)
        count += len(ids)
    return {name: s / count for name, s in sums.items() if name.startswith("model.layers.")}


@pytest.mark.parametrize("shape", [{}, {"head_dim": 32},
                                   {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}],
                         ids=["llama", "head_dim-32", "qwen2"])
def test_input_squares_match_the_reference(tmp_path, shape, isa):
    """Prompt chunks through the GEMM, a single token row-wise (each of 3 threads normalising it
    into its own buffer): every column of the four matmul inputs of each layer, summed over all
    of them. head_dim 32: the attention's output (heads · head_dim = 128) is wider than hidden."""
    folder, weights = make_checkpoint(tmp_path / "m", **shape)
    model = gally.load(folder, threads=3)
    c = model.config
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 97, 40)]
    columns, width = qz.input_columns(c)
    assert width == 2 * 64 + c.num_attention_heads * c.head_dim + 96
    squares = np.zeros((c.num_hidden_layers, width))
    session = model.session(64)
    for part in (ids[:30], ids[30:31], ids[31:]):
        session.forward(part, input_squares=squares)
    want = _reference_squares(folder, weights, [ids])
    assert len(want) == 7 * c.num_hidden_layers
    for layer in range(c.num_hidden_layers):
        for name, (a, b) in columns.items():
            key = f"model.layers.{layer}.{name}.weight"
            np.testing.assert_allclose(squares[layer, a:b] / len(ids), want[key], rtol=2e-5, err_msg=key)


def test_input_squares_bad_buffers(tiny):
    model = gally.load(tiny[0])
    session = model.session(16)
    good = (model.config.num_hidden_layers, qz.input_columns(model.config)[1])
    with pytest.raises(ValueError, match="input_squares must be a writable C-contiguous float64"):
        session.forward([1, 2], input_squares=np.zeros(good, np.float32))
    with pytest.raises(ValueError, match="input_squares buffer must have shape"):
        session.forward([1, 2], input_squares=np.zeros((good[0], good[1] - 1)))
    assert session.position == 0  # refused before running


def test_calibrate_matches_the_reference_and_repeats(tiny):
    folder, weights = tiny
    model = gally.load(folder)
    text = " ".join(f"w{i % 90 + 3}" for i in range(70))
    cal = qz.calibrate(model, text, length=32)
    assert cal.source == "text, 70 tokens in windows of 32"
    ids = model.tokenizer.encode(text)
    assert len(ids) == 70
    want = _reference_squares(folder, weights, [[1] + ids[0:31], [1] + ids[31:62], [1] + ids[62:]])  # BOS first
    assert sorted(cal.squares) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2) for m in MATRICES)
    for name, squares in cal.squares.items():
        np.testing.assert_allclose(squares, want[name], rtol=2e-5, err_msg=name)
        np.testing.assert_array_equal(cal.importance(name), np.sqrt(squares))
    # self-sampled: every sequence its own seed, the same ones again on a second call
    a, b = qz.calibrate(model, samples=3, length=20), qz.calibrate(model, samples=3, length=20)
    assert a.source == "self-sampled, 3 x 20 tokens, seed 0"
    for name in a.squares:
        np.testing.assert_array_equal(a.squares[name], b.squares[name])
    samples = qz._self_samples(model, 3, 20, 0)
    assert [len(s) for s in samples] == [20] * 3 and all(s[0] == 1 for s in samples)  # config's BOS first
    assert len({tuple(s) for s in samples}) == 3
    other = qz.calibrate(model, samples=3, length=20, seed=5).squares
    assert any(not np.array_equal(other[n], a.squares[n]) for n in a.squares)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text=""), "holds no tokens"),
    (dict(samples=0), "samples must be a positive integer"),
    (dict(length=True), "length must be a positive integer"),
])
def test_calibrate_bad_input(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        qz.calibrate(gally.load(tiny[0]), **kwargs)


def test_calibration_text_needs_a_tokenizer(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "m")
    with pytest.raises(ValueError, match="no tokenizer.json to read a calibration text with"):
        qz.calibrate(gally.load(folder), "w1 w2")


def test_importance_weighted_fit():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    plain = qz.dequantize_int4(*qz.quantize_int4(w))
    # all columns alike: the unweighted fit exactly; all zero: no information, the same
    for same in (np.full(256, 3.0), np.zeros(256)):
        np.testing.assert_array_equal(qz.dequantize_int4(*qz.quantize_int4(w, importance=same)), plain)
    # columns of very different importance: the weighted error falls well below the plain fit's
    importance = np.exp(2 * rng.standard_normal(256))
    weighted = qz.dequantize_int4(*qz.quantize_int4(w, importance=importance))

    def cost(deq):
        return float((importance * (deq - w) ** 2).sum())

    assert cost(weighted) < 0.8 * cost(plain)
    assert np.mean((weighted - w) ** 2) > np.mean((plain - w) ** 2)  # paid for on the columns that matter less


@pytest.mark.parametrize("importance, message", [
    (np.ones(255), r"importance must have shape \[256\]"),
    (np.r_[np.ones(255), -1.0], "importance must be finite and non-negative"),
    (np.r_[np.ones(255), np.nan], "importance must be finite and non-negative"),
])
def test_importance_bad_input(importance, message):
    with pytest.raises(ValueError, match="tensor 'x': " + message):
        qz.quantize_int4(np.ones((4, 256), np.float32), "x", importance=importance)


def _arrays(folder):
    return qz.load_arrays(folder)[1]


def test_every_way_to_int4_is_calibrated_alike(tiny, tmp_path):
    """gally quantize (default: self-sampled on the int8 model), its parts by hand, and
    gally.load(dtype="int4") of the float folder write the same int4."""
    folder, weights = tiny
    out = str(tmp_path / "q")
    layout = qz.quantize_folder(folder, out, "int4")
    assert layout.metadata[qz.METADATA_CALIBRATION] == "self-sampled, 4 x 256 tokens, seed 0"
    by_hand, _ = qz.quantize_tensors({n: ("F32", w.astype(np.float32)) for n, w in weights.items()}, "int4",
                                     calibration=qz.calibrate(qz.calibration_model(folder)))
    stored = _arrays(out)
    assert stored.keys() == by_hand.keys()
    for name, (_, a) in by_hand.items():
        assert stored[name].tobytes() == np.ascontiguousarray(a).tobytes(), name
    ids = np.arange(3, 40)
    np.testing.assert_array_equal(gally.load(folder, dtype="int4").logits(ids), gally.load(out).logits(ids))
    plain = str(tmp_path / "plain")
    assert qz.quantize_folder(folder, plain, "int4", calibration=None).metadata[qz.METADATA_CALIBRATION] == "none"
    unweighted = _arrays(plain)
    up = "model.layers.0.mlp.up_proj.qweight"
    assert not np.array_equal(stored[up], unweighted[up])  # the calibration changed the fit
    v = "model.layers.0.self_attn.v_proj.qweight"
    np.testing.assert_array_equal(stored[v], unweighted[v])  # int8: no fit to weigh


def test_cli_calibration_options(tiny, tmp_path, capsys):
    folder, _ = tiny
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"w{i % 90 + 3}" for i in range(50)))
    out = tmp_path / "text"
    assert cli.main(["quantize", folder, str(out), "--to", "int4", "--calibration-text", str(text)]) == 0
    metadata = qz.read_checkpoint(str(out)).metadata
    assert metadata[qz.METADATA_CALIBRATION] == "text, 50 tokens in windows of 256"
    assert cli.main(["quantize", folder, str(tmp_path / "none"), "--to", "int4", "--no-calibration"]) == 0
    assert qz.read_checkpoint(str(tmp_path / "none")).metadata[qz.METADATA_CALIBRATION] == "none"
    capsys.readouterr()
    # bad input: a clear error, and no folder left behind
    assert cli.main(["quantize", folder, str(tmp_path / "a"), "--to", "int8", "--calibration-text", str(text)]) == 1
    assert "--calibration-text applies to --to int4 only, not int8" in capsys.readouterr().err
    missing = str(tmp_path / "missing.txt")
    assert cli.main(["quantize", folder, str(tmp_path / "b"), "--to", "int4", "--calibration-text", missing]) == 1
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["quantize", folder, str(tmp_path / "c"), "--to", "int4", "--calibration-text", str(empty)]) == 1
    assert "the calibration text holds no tokens" in capsys.readouterr().err
    assert not any(os.path.exists(tmp_path / n) for n in "abc")
    # an output folder in the way is refused before the calibration runs (its message, not load's)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert cli.main(["quantize", folder, str(taken), "--to", "int4", "--calibration-text", str(text)]) == 1
    assert "already exists; choose a new output folder" in capsys.readouterr().err
    assert os.listdir(taken) == ["x"]
    already = str(tmp_path / "text")  # quantized above
    assert cli.main(["quantize", already, str(tmp_path / "e"), "--to", "int4", "--calibration-text", str(text)]) == 1
    assert "already quantized; quantize from an f32, bf16 or f16 checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one or the other
        cli.main(["quantize", folder, str(tmp_path / "d"), "--to", "int4", "--no-calibration",
                  "--calibration-text", str(text)])
