"""gally.generate: the token loop's stop conditions and streaming on a scripted model (exact, fast),
then sampling, logprobs and KV-cache reuse on random checkpoints against plain session/logits loops."""

from __future__ import annotations

import numpy as np
import pytest

import gally
from gally import generate as gen
from gally.scheduler import eos_ids
from generation_helpers import ScriptedModel, gally_tokenizer, make_text_checkpoint

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
    return gally_tokenizer()


def scripted(tok, text, prompt_len=3, **kw):
    ids = tok.encode(text)
    return ScriptedModel(tok, ids, prompt_len, **kw), ids


def streamed(model, prompt, **kw):
    chunks = list(gen.generate(model, prompt, stream=True, **kw))
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason in ("stop", "length")
    return chunks


# ---- the loop on a scripted model ----

def test_script_runs_until_eos(tok):
    model, ids = scripted(tok, "Hello world, hello there!")
    c = gen.generate(model, [5, 6, 7], max_new_tokens=100, **GREEDY)
    assert c.text == "Hello world, hello there!"
    assert c.token_ids == ids + [0] and c.finish_reason == "stop"  # 0 = <|endoftext|>, config eos
    assert c.usage == dict(prompt_tokens=3, completion_tokens=len(ids) + 1, total_tokens=3 + len(ids) + 1,
                           cached_tokens=0)


def test_end_of_turn_token_from_the_tokenizer_stops(tok):
    im_end = tok.token_to_id("<|im_end|>")
    model = ScriptedModel(tok, tok.encode("Paris.") + [im_end] + tok.encode(" more"), 3)
    c = gen.generate(model, [5, 6, 7], **GREEDY)
    assert (c.text, c.finish_reason, c.token_ids[-1]) == ("Paris.", "stop", im_end)


def test_generation_config_eos_stops(tok):
    ids = tok.encode("Hello world")
    model = ScriptedModel(tok, ids, 3, generation_config={"eos_token_id": [ids[1]]})
    c = gen.generate(model, [5, 6, 7], **GREEDY)
    assert c.token_ids == ids[:2] and c.finish_reason == "stop" and c.text == tok.decode(ids[:1])


def test_max_new_tokens(tok):
    model, ids = scripted(tok, "The quick brown fox jumps over the lazy dog.")
    c = gen.generate(model, [5, 6, 7], max_new_tokens=4, **GREEDY)
    assert c.token_ids == ids[:4] and c.finish_reason == "length" and c.text == tok.decode(ids[:4])
    sessions = len(model.sessions)
    empty = gen.generate(model, [5, 6, 7], max_new_tokens=0)
    assert (empty.text, empty.token_ids, empty.finish_reason) == ("", [], "length")
    assert empty.usage["completion_tokens"] == 0 and len(model.sessions) == sessions  # nothing computed


def test_stop_string_across_tokens(tok):
    model, ids = scripted(tok, "Stop here. HALT now. The end")
    pieces = [tok.decode([i]) for i in ids]
    assert not any("HALT" in p for p in pieces)  # the stop string really spans tokens
    c = gen.generate(model, [5, 6, 7], stop=["HALT"], **GREEDY)
    assert (c.text, c.finish_reason) == ("Stop here. ", "stop")
    # generation ends with the token that completed the stop string
    assert tok.decode(c.token_ids).endswith("HALT") and "HALT" not in tok.decode(c.token_ids[:-1])
    chunks = streamed(model, [5, 6, 7], stop=["HALT"], **GREEDY)
    assert "".join(ch.text for ch in chunks) == c.text
    assert [t for ch in chunks for t in ch.token_ids] == c.token_ids


def test_stream_holds_back_a_possible_stop_prefix(tok):
    model, ids = scripted(tok, "Hello world. STOP now")
    released = ""
    for ch in gen.generate(model, [5, 6, 7], stop="STOP!", stream=True, **GREEDY):
        released += ch.text
        if ch.finish_reason is None:
            # never released: any tail that could still grow into "STOP!"
            assert not any(released.endswith("STOP!"[:k]) for k in range(1, 5))
    assert released == "Hello world. STOP now"  # never completed, so all of it comes out at the end


def test_earliest_of_several_stop_strings_wins(tok):
    model, _ = scripted(tok, "The quick brown fox jumps over the lazy dog.")
    c = gen.generate(model, [5, 6, 7], stop=["lazy", "fox", "quick brown fox jumps"], **GREEDY)
    assert c.text == "The quick brown "


def test_a_pending_stop_prefix_is_released_at_max_new_tokens(tok):
    model, ids = scripted(tok, "Hello world. HALT now")
    n = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("HA"))
    c = gen.generate(model, [5, 6, 7], stop="HALT", max_new_tokens=n, **GREEDY)
    assert (c.text, c.finish_reason) == (tok.decode(ids[:n]), "length")


EMOJI_CJK = "Hi 😀 你好 🎉👍🏽 漢字 ok"


def test_stream_never_splits_emoji_or_cjk(tok):
    model, ids = scripted(tok, EMOJI_CJK)
    assert len(ids) > len(EMOJI_CJK)  # multi-byte characters take several tokens
    chunks = streamed(model, [5, 6, 7], **GREEDY)
    so_far, n = "", 0
    for ch in chunks:
        assert "\ufffd" not in ch.text
        so_far += ch.text
        n += len(ch.token_ids)
        # released as soon as complete: everything decodable from the tokens so far
        assert so_far == tok.decode(ids[:n]).rstrip("\ufffd") or n > len(ids)
    assert so_far == EMOJI_CJK


def test_ids_past_the_tokenizer_vocabulary_have_no_text(tok):
    """Models pad their embedding beyond the tokenizer (Qwen2: 151936 rows, 151665 tokens)."""
    ids = tok.encode("Hello world")
    model = ScriptedModel(tok, ids[:1] + [tok.vocab_size + 3] + ids[1:], 3, padded_vocab=8)
    c = gen.generate(model, [5, 6, 7], **GREEDY)
    assert c.text == "Hello world" and c.token_ids[1] == tok.vocab_size + 3


def test_context_end_stops_with_length(tok):
    model, ids = scripted(tok, "The quick brown fox jumps over the lazy dog.", max_context=10, prompt_len=8)
    c = gen.generate(model, list(range(3, 11)), max_new_tokens=50, **GREEDY)
    assert c.token_ids == ids[:3] and c.finish_reason == "length"
    with pytest.raises(ValueError, match="longer than the context"):
        gen.generate(model, list(range(3, 14)))


def test_defaults_come_from_generation_config(tok):
    model, ids = scripted(tok, "The quick brown fox jumps over the lazy dog.",
                          generation_config={"do_sample": False, "max_new_tokens": 5, "top_k": 7,
                                             "repetition_penalty": 1.1})
    opts = gen.resolve_options(model)
    assert opts.max_new_tokens == 5 and opts.sampling.greedy and opts.sampling.top_k == 7
    assert opts.sampling.repetition_penalty == 1.1 and opts.sampling.top_p == gen.DEFAULTS["top_p"]
    assert gen.generate(model, [5, 6, 7]).token_ids == ids[:5]
    assert gen.resolve_options(model, max_new_tokens=9, temperature=0.5).sampling.temperature == 0.5
    plain = ScriptedModel(tok, ids, 3)
    assert gen.resolve_options(plain).sampling == gen.SamplingParams(**{k: v for k, v in gen.DEFAULTS.items()
                                                                       if k in gally.options.SAMPLING})


def test_a_bad_generation_config_names_the_file(tok):
    model = ScriptedModel(tok, [5], 3, generation_config={"top_p": 1.5})
    with pytest.raises(ValueError, match="generation_config.json: top_p"):
        gen.generate(model, [5, 6, 7])
    assert gen.generate(model, [5, 6, 7], top_p=0.5, max_new_tokens=1).token_ids == [5]  # the argument wins


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_new_tokens=-2), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(seed=-1), "seed"), (dict(stop=""), "stop"), (dict(stop=["a", 3]), "stop"), (dict(logprobs=-1), "logprobs"),
])
def test_bad_arguments_name_themselves(tok, kwargs, name):
    model, _ = scripted(tok, "Hello")
    with pytest.raises(ValueError, match=name):
        gen.generate(model, [5, 6, 7], **kwargs)
    with pytest.raises(ValueError, match=name):
        gen.generate(model, [5, 6, 7], stream=True, **kwargs)  # raised at the call, not at the first chunk


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"), ([], "empty"), ([5, 9999], "outside the vocabulary"), ([[1, [2]]], "prompt 0: .*flat sequence"),
    ([1.5], "flat sequence"), (None, "flat sequence"),
])
def test_bad_prompts(tok, prompt, message):
    model, _ = scripted(tok, "Hello")
    with pytest.raises(ValueError, match=message):
        gen.generate(model, prompt)


# ---- random checkpoints on the real engine ----

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_text_checkpoint(tmp_path_factory.mktemp("text_model"), num_hidden_layers=2, hidden_size=64,
                                  max_position_embeddings=512)
    return gally.load(folder, threads=2)


def manual_greedy(model, ids, n):
    s = model.session()
    logits, out = s.append(ids), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = s.append(out[-1])
    return out


def test_greedy_matches_a_plain_session_loop_and_top_k_1(model):
    prompt = model.tokenizer.encode("The capital of France is")
    c = model.generate(prompt, max_new_tokens=24, **GREEDY)
    eos = set(eos_ids(model))
    want = manual_greedy(model, prompt, 24)
    want = want[:next((i + 1 for i, t in enumerate(want) if t in eos), len(want))]
    assert c.token_ids == want
    assert model.generate(prompt, max_new_tokens=24, temperature=1.7, top_k=1, seed=3).token_ids == want
    assert model.generate("The capital of France is", max_new_tokens=24, **GREEDY).token_ids == want  # text prompt


def test_seeds_reproduce_and_differ(model):
    kw = dict(max_new_tokens=32, temperature=1.2, top_k=0, top_p=1.0, min_p=0.0)
    a = model.generate("Hello world", seed=7, **kw)
    assert model.generate("Hello world", seed=7, **kw).token_ids == a.token_ids
    assert model.generate("Hello world", seed=8, **kw).token_ids != a.token_ids
    assert model.generate("Hello world", **kw).token_ids != model.generate("Hello world", **kw).token_ids


@pytest.mark.parametrize("kw", [
    dict(), dict(stop=[" the", "e"], top_k=20),
    dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
    dict(logprobs=2, min_p=0.1),
])
def test_streamed_equals_non_streamed(model, kw):
    args = dict(max_new_tokens=40, temperature=1.0, seed=11, **kw)
    whole = model.generate("The quick brown fox", **args)
    chunks = list(model.generate("The quick brown fox", stream=True, **args))
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert (chunks[-1].finish_reason, chunks[-1].usage) == (whole.finish_reason, whole.usage)
    if "logprobs" in kw:
        assert [lp for c in chunks for lp in (c.logprobs or [])] == whole.logprobs
    if "stop" not in kw and whole.token_ids[-1] not in eos_ids(model):
        assert whole.text == model.tokenizer.decode(whole.token_ids, skip_special_tokens=True)


def test_logprobs_are_the_models_log_softmax(model):
    prompt = model.tokenizer.encode("Hello there")
    c = model.generate(prompt, max_new_tokens=6, temperature=0.9, seed=2, logprobs=3)
    assert len(c.logprobs) == len(c.token_ids)
    logits = model.logits(prompt + c.token_ids[:-1])[len(prompt) - 1:].astype(np.float64)
    for step, lp in zip(logits, c.logprobs):
        ref = step - step.max() - np.log(np.exp(step - step.max()).sum())
        assert lp.logprob == pytest.approx(ref[lp.token_id], abs=1e-4)
        assert [t for t, _ in lp.top_logprobs] == np.argsort(-ref)[:3].tolist()
        np.testing.assert_allclose([v for _, v in lp.top_logprobs], np.sort(ref)[::-1][:3], atol=1e-4)
    assert model.generate(prompt, max_new_tokens=2).logprobs is None


def test_chat_renders_the_template(model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = model.tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                 "<|im_start|>assistant\n")
    c = model.chat(messages, max_new_tokens=8, **GREEDY)
    assert c.usage["prompt_tokens"] == len(ids)
    assert c.token_ids == model.generate(ids, max_new_tokens=8, **GREEDY).token_ids
    with pytest.raises(ValueError, match="messages"):
        model.chat("Hi")


def test_conversation_reuses_the_cache_and_matches_a_fresh_chat(model):
    conv = model.start_chat(system="You are terse.")
    first = conv.send("Hello", max_new_tokens=10, **GREEDY)
    assert first.usage["cached_tokens"] == 0
    second = conv.send("And then?", max_new_tokens=10, **GREEDY)
    assert second.usage["cached_tokens"] >= first.usage["prompt_tokens"]
    assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"] + first.usage["completion_tokens"] - 2
    fresh = model.chat(conv.messages[:-1], max_new_tokens=10, **GREEDY)
    assert second.token_ids == fresh.token_ids and second.text == conv.messages[-1]["content"]
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    # a history that diverges from the cache falls back to the common prefix (the system prompt)
    conv.reset()
    third = conv.send("Something else", max_new_tokens=10, **GREEDY)
    system_len = len(model.tokenizer.encode("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"))
    assert system_len <= third.usage["cached_tokens"] < first.usage["prompt_tokens"]
    assert third.token_ids == model.chat(conv.messages[:-1], max_new_tokens=10, **GREEDY).token_ids


def test_conversation_stream_closed_early_keeps_what_it_gave(model):
    conv = model.start_chat()
    stream = conv.send("Tell me a story", max_new_tokens=30, stream=True, temperature=0.0)
    given = ""
    for i, chunk in enumerate(stream):
        given += chunk.text
        if i == 5:
            break
    stream.close()
    assert conv.messages[-1] == {"role": "assistant", "content": given}
    after = conv.send("Go on", max_new_tokens=6, **GREEDY)
    assert after.token_ids == model.chat(conv.messages[:-1], max_new_tokens=6, **GREEDY).token_ids
    assert after.usage["cached_tokens"] > 0


def test_conversation_bad_input_loses_nothing(model):
    conv = model.start_chat(system="S")
    conv.send("Hello", max_new_tokens=3, **GREEDY)
    before = list(conv.messages)
    with pytest.raises(ValueError, match="temperature"):
        conv.send("Next", temperature=-1)
    with pytest.raises(ValueError, match="longer than the context"):
        conv.send("word " * 600)
    with pytest.raises(ValueError, match="text"):
        conv.send(None)
    assert conv.messages == before
    assert conv.send("Next", max_new_tokens=3, **GREEDY).usage["cached_tokens"] > 0


def test_no_tokenizer_needs_token_ids(tmp_path):
    from conftest import make_checkpoint

    m = gally.load(make_checkpoint(tmp_path)[0])
    assert len(m.generate([1, 2, 3], max_new_tokens=4, **GREEDY).token_ids) == 4
    with pytest.raises(ValueError, match="tokenizer"):
        m.generate("text")
    with pytest.raises(ValueError, match="tokenizer"):
        m.start_chat()


def test_signatures_follow_the_options_table():
    """Model.generate and Model.chat take exactly the options of gally/options.py (and their aliases)
    as keyword arguments, each documented."""
    import inspect

    from gally.options import ALIASES, OPTIONS

    names = {o.name for o in OPTIONS} | set(ALIASES)
    for f in (gally.Model.generate, gally.Model.chat):
        params = inspect.signature(f).parameters
        assert set(params) - {"self", "prompt", "messages", "stream", "batch_size", "progress"} == names, f.__name__
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names)
    assert all(f"{o.name}" in gally.Model.generate.__doc__ or o.name in ("max_new_tokens",) for o in OPTIONS)


def test_ignore_eos_generates_past_the_end(tok):
    model, ids = scripted(tok, "Hello world")
    c = gen.generate(model, [5, 6, 7], max_new_tokens=len(ids) + 3, ignore_eos=True, **GREEDY)
    assert len(c.token_ids) == len(ids) + 3 and c.finish_reason == "length" and c.text.startswith("Hello world")
    assert gen.generate(model, [5, 6, 7], max_tokens=2, **GREEDY).token_ids == ids[:2]  # the OpenAI alias
    with pytest.raises(ValueError, match="either max_new_tokens or its alias max_tokens"):
        gen.generate(model, [5, 6, 7], max_tokens=2, max_new_tokens=3)
