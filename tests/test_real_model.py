"""The default model through the default path, against transformers 5.24 (float32) on the same
GGUF: tokenization, argmax and top-40 logits at every position, greedy continuations (f32 and bf16)."""

from __future__ import annotations

import numpy as np
import pytest

from real_model_helpers import CASES, NEAR_TIE, case_ids, reference

BF16_STEPS = 16
BF16_NEAR_TIE = 0.15


def prompt_ids(model, name: str) -> list[int]:
    case = CASES[name]
    if "chat" in case:
        return model.tokenizer.encode(model.tokenizer.apply_chat_template(case["chat"]))
    return model.tokenizer.encode(case["text"])


def prefill_and_greedy(model, ids: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Logits at every prompt position, then `steps` greedy tokens (session.append + argmax)."""
    session = model.session()
    all_logits = session.forward(ids, all_logits=True)
    logits, out = all_logits[-1], []
    for _ in range(steps):
        out.append(int(np.argmax(logits)))
        logits = session.append([out[-1]])
    return all_logits, out


def agreed_prefix(got: list[int], want: list[int], margins: list[float], tie: float) -> int:
    """Steps to compare: up to the first whose reference margin is a near-tie."""
    stop = next((i for i, m in enumerate(margins) if m < tie), len(want))
    assert got[:stop] == want[:stop], f"first difference at step {next(i for i in range(stop) if got[i] != want[i])}"
    return stop


def test_default_model_is_the_alias_converted_once(smollm):
    assert smollm.config.architecture == "LlamaForCausalLM" and smollm.config.num_hidden_layers == 30
    assert smollm.config.tie_word_embeddings and smollm.config.rope_theta == 100000.0
    assert smollm.dtype == "f32" and smollm.copied_bytes == 0  # the cache holds f32: mapped, not copied
    assert smollm.tokenizer.eos_token_ids == [2] and smollm.tokenizer.bos_token_id == 1


@pytest.mark.parametrize("name", case_ids())
def test_f32_matches_transformers(smollm, name):
    ref = reference(name)
    ids = prompt_ids(smollm, name)
    assert ids == ref["input_ids"]
    logits, got = prefill_and_greedy(smollm, ids, len(ref["greedy_ids"]))

    decided = np.array(ref["argmax_margin_per_position"]) >= NEAR_TIE
    argmax = logits.argmax(-1)
    wrong = np.flatnonzero(decided & (argmax != np.array(ref["argmax_per_position"])))
    assert wrong.size == 0, f"argmax differs at positions {wrong[:10].tolist()}"
    np.testing.assert_allclose(logits[-1, ref["last_top40_ids"]], ref["last_top40_logits"], rtol=0, atol=2e-3)
    top = logits.max(-1, keepdims=True)
    logsumexp = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    np.testing.assert_allclose(logsumexp, ref["logsumexp_per_position"], rtol=0, atol=2e-3)
    # mean NLL of each next prompt token, the reference's perplexity in log form
    nll = logsumexp[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]
    assert abs(nll.mean() - ref["mean_nll"]) < 1e-3
    agreed_prefix(got, ref["greedy_ids"], ref["greedy_margins"], NEAR_TIE)


def test_bf16_weights(smollm_bf16):
    assert smollm_bf16.dtype == "bf16" and smollm_bf16.copied_bytes == 0  # cached in bf16: zero-copy
    agree = total = 0
    for name in case_ids():
        ref = reference(name)
        logits, got = prefill_and_greedy(smollm_bf16, ref["input_ids"], BF16_STEPS)
        agree += int((logits.argmax(-1) == np.array(ref["argmax_per_position"])).sum())
        total += len(ref["input_ids"])
        agreed_prefix(got, ref["greedy_ids"][:BF16_STEPS], ref["greedy_margins"][:BF16_STEPS], BF16_NEAR_TIE)
    assert agree / total >= 0.99, f"argmax agrees with the f32 reference at {agree}/{total} positions"


def test_transformers_reads_the_converted_folder(smollm):
    """The cached checkpoint is a plain Hugging Face folder: transformers loads it and reproduces its
    own GGUF-loaded reference, which checks the conversion apart from gally's engine."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm.path, dtype=torch.float32,
                                                              attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm.path)
    for name in ("gally_raw", "chat_system", "unicode"):
        ref = reference(name)
        assert tokenizer.encode(ref["prompt_text"], add_special_tokens=False) == ref["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ref["input_ids"]])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[ref["last_top40_ids"]], ref["last_top40_logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_a_batch_of_the_reference_prompts_gives_each_its_greedy_tokens(smollm, smollm_bf16, dtype):
    """All reference prompts decoded together: each gets, token for token, what it gets alone,
    and in f32 what transformers gives up to its first near-tie."""
    model = smollm if dtype == "f32" else smollm_bf16
    names = case_ids()
    prompts = [prompt_ids(model, name) for name in names]
    together = model.generate(prompts, max_new_tokens=12, temperature=0, stop=None)
    for name, ids, c in zip(names, prompts, together):
        alone = model.generate(ids, max_new_tokens=12, temperature=0)
        assert c.token_ids == alone.token_ids, name
        if dtype == "f32":
            ref = reference(name)
            eos = next((i + 1 for i, t in enumerate(ref["greedy_ids"]) if t in model.tokenizer.eos_token_ids), 12)
            agreed_prefix(c.token_ids, ref["greedy_ids"][:min(12, eos)], ref["greedy_margins"], NEAR_TIE)
