"""The explanation page in a real browser: headless Chromium (Debian's `chromium`, which .ci/run
installs) driven over the DevTools protocol (browser.py). Every section drew its charts after the
page's scripts ran, the console shows no errors, nothing came from a network, the screenshot is
not blank, the charts hold the explanation's numbers, and the selectors redraw them."""

from __future__ import annotations

import io
import json
import os
import pathlib

import numpy as np
import pytest

import gally
from browser import Browser, find_chromium
from conftest import make_checkpoint
from gally.explain import MAX_PROMPT_TOKENS
from generation_helpers import make_text_checkpoint

SECTIONS = ["tokenization", "embedding", "space", "position", "attention", "feed-forward", "layers", "prediction",
            "cost"]
# Per section: its charts, each with its traces and how many SVG shapes and texts it drew.
SECTION_STATE = """JSON.stringify([...document.querySelectorAll("section[data-section]")].map((s) => ({
  name: s.dataset.section, rendered: s.dataset.rendered, text: s.innerText.length,
  charts: [...s.querySelectorAll("[data-chart]")].map((c) => ({
    name: c.dataset.chart, plotted: c.classList.contains("js-plotly-plot"), traces: (c.data || []).length,
    marks: c.querySelectorAll("svg path, svg rect, svg image, svg text").length })) })))"""
LOCAL = ("file:", "data:", "blob:", "about:")


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        message = "Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with Browser(executable) as b:
        yield b


def open_page(browser, path):
    return browser.open(pathlib.Path(path).as_uri(), until="document.body.dataset.rendered !== 'pending'")


def check_rendered(page, screenshot_path):
    """Every section drew; no console errors; nothing fetched; a screenshot with something on it."""
    assert page.evaluate("document.body.dataset.rendered") == "ok", page.console_errors
    sections = json.loads(page.evaluate(SECTION_STATE))
    assert [s["name"] for s in sections] == SECTIONS
    for s in sections:
        assert s["rendered"] == "ok" and s["text"] > 200, s
        for chart in s["charts"]:
            assert chart["plotted"] and chart["traces"] >= 1 and chart["marks"] >= 5, (s["name"], chart)
    assert sum(len(s["charts"]) for s in sections) >= 15
    assert page.console_errors == []
    assert [u for u in page.requested_urls if not u.startswith(LOCAL)] == []
    png = page.screenshot()
    pathlib.Path(screenshot_path).write_bytes(png)
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.shape[1] == 1280 and image.shape[0] > 4000  # the whole page, nine sections long
    rgb = (image[..., 0].astype(np.uint32) << 16) | (image[..., 1].astype(np.uint32) << 8) | image[..., 2]
    colours, counts = np.unique(rgb, return_counts=True)
    assert len(colours) > 500  # charts, text and tables, not a blank or single-colour page
    assert counts.max() < 0.8 * rgb.size
    return sections


def on_chart(piece: str) -> str:
    """A token's text as the page gives it to Plotly (explain.js: ptext): whitespace marked,
    markup characters escaped."""
    text = piece.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    if text and not text.strip(" "):
        text = "·" * len(text)
    return (text or "∅").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def chart_data(page, name, trace=0, field="z"):
    return page.evaluate(f'document.querySelector(\'[data-chart="{name}"]\').data[{trace}].{field}')


def choose(page, control, value):
    page.evaluate(f"""(() => {{ const s = document.querySelector('[data-control="{control}"]');
        s.value = "{value}"; s.dispatchEvent(new Event("change")); }})()""")


def test_the_default_model_page(browser, smollm, tmp_path):
    e = smollm.explain("Gally is a smart dog", steps=4, compare=())
    page = open_page(browser, e.to_html(tmp_path / "page.html"))
    check_rendered(page, tmp_path / "page.png")
    n, L = len(e.tokens.ids), smollm.config.num_hidden_layers
    # the token chips are the tokens
    assert page.evaluate("[...document.querySelectorAll('.tok .id')].map((x) => Number(x.textContent))") == \
        e.tokens.ids.tolist()
    assert page.evaluate("document.querySelectorAll('.tok .piece')[4].textContent") == "·smart"
    # the attention map holds the recorded weights (16-bit fractions on the page)
    z = np.array(chart_data(page, "attention-map"))
    assert z.shape == (n, n) and np.abs(z - e.attention.mean_over_heads[0]).max() < 1e-4
    choose(page, "attention-layer", L - 1)
    choose(page, "attention-head", 2)
    assert np.abs(np.array(chart_data(page, "attention-map")) - e.attention.weights[L - 1, 2]).max() < 2e-5
    # following "smart" by default; another token redraws the layer-by-layer view
    follow = np.array(chart_data(page, "attention-follow"))
    assert e.attention.follow == 4 and np.abs(follow - e.attention.followed[:, :5]).max() < 1e-4
    choose(page, "follow-token", n - 1)
    assert np.array(chart_data(page, "attention-follow")).shape == (L, n)
    # the logit lens grid names each layer's top candidate
    text = chart_data(page, "lens-grid", field="text")
    assert text[-1] == [on_chart(e.pieces(i)) for i in e.layers.top_ids[-1, :, 0]]
    assert np.abs(np.array(chart_data(page, "lens-grid")) - e.layers.top_probs[:, :, 0]).max() < 1e-4
    # the feed-forward vector of the chosen layer and token
    choose(page, "ffn-layer", 3)
    choose(page, "ffn-token", 1)
    y = np.array(chart_data(page, "ffn-vector", field="y"))
    assert np.allclose(y, e.feed_forward.activations[3, 1], rtol=1e-3, atol=1e-3)  # float16 on the page
    assert page.console_errors == []


def test_special_tokens_and_markup_stay_text(browser, tmp_path):
    """Special tokens, newlines and text that looks like HTML ("<b>", "<s>") are shown as
    themselves, in the tables and in the charts; a dtype compared in the cost section."""
    folder = make_text_checkpoint(str(tmp_path / "m"))
    e = gally.load(folder).explain("<|im_start|>user\nHello <b>world</b> & <s><|im_end|>", steps=2, compare=["bf16"])
    page = open_page(browser, e.to_html(tmp_path / "page.html"))
    check_rendered(page, tmp_path / "page.png")
    chips = page.evaluate("[...document.querySelectorAll('.tok')].map((t) => [t.className, "
                          "t.querySelector('.piece').textContent])")
    assert chips[0] == ["tok special", "<|im_start|>"] and chips[-1][1] == "<|im_end|>"
    assert "↵" in "".join(c[1] for c in chips)
    labels = page.evaluate("[...document.querySelectorAll('[data-chart=\"attention-map\"] .ytick text')]"
                           ".map((t) => t.textContent)")
    assert labels[0] == "<|im_start|>" and any("<" in t and ">" in t for t in labels[1:])
    assert page.evaluate("document.querySelectorAll('b, s').length") == \
        page.evaluate("document.querySelectorAll('section b').length")  # no stray <s> or <b> from the text
    assert chart_data(page, "cost-bytes", field="x") == ["f32", "bf16", "int8", "int4"]
    assert [bool(t) for t in chart_data(page, "cost-bytes", field="text")] == [True, True, False, False]


def test_256_tokens_get_windows(browser, tmp_path):
    """A long prompt (token ids, on a model without tokenizer): the large maps show a window of
    positions that a slider moves."""
    folder, _ = make_checkpoint(tmp_path / "m", max_position_embeddings=512)
    ids = np.random.default_rng(0).integers(0, 97, MAX_PROMPT_TOKENS)
    e = gally.load(folder).explain(ids, steps=2, compare=())
    path = e.to_html(tmp_path / "page.html")
    assert os.path.getsize(path) < 12e6
    page = open_page(browser, path)
    check_rendered(page, tmp_path / "page.png")
    assert page.evaluate("document.querySelectorAll('[data-window] input[type=range]').length") == 3
    y = chart_data(page, "attention-map", field="y")
    assert y[0] == 0 and len(y) == 48
    page.evaluate("""(() => { const r = document.querySelector('[data-window="attention"] input');
        r.value = "200"; r.dispatchEvent(new Event("input")); })()""")
    y = chart_data(page, "attention-map", field="y")
    assert y[0] == 200 and len(chart_data(page, "attention-map", field="x")) == 248
    z = np.array(chart_data(page, "attention-map"))
    mean = e.attention.mean_over_heads[0]
    assert np.abs(z - mean[200:248, :248]).max() < 5e-3  # 8-bit fractions: maps of over 4 M weights
    assert page.console_errors == []
