"""gally.sampling against hand-computed logits, exact sort-based oracles, and chi-square tests of
the sampled frequencies (fixed seeds, so each test is deterministic)."""

from collections import Counter

import numpy as np
import pytest

from gally import sampling
from gally.sampling import Sampler, SamplingParams

# chi-square critical values at significance 0.001, by degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
            9: 27.877, 10: 29.588, 11: 31.264}

LOGITS8 = np.array([2.0, 1.5, 1.2, 0.4, 0.0, -0.3, -1.0, -2.5], dtype=np.float32)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def oracle_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """transformers' warpers written the plain way: full sorts, float64."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    keep = np.ones(len(x), bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1.0:
        p = softmax(np.where(keep, x, -np.inf))
        order = np.argsort(-p, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        nucleus = np.zeros(len(x), bool)
        nucleus[order[before < top_p]] = True
        keep &= nucleus
    if min_p > 0:
        p = softmax(np.where(keep, x, -np.inf))
        keep &= p >= min_p * p.max()
    return softmax(np.where(keep, x, -np.inf))


def draw_many(logits, params, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.bincount([sampling.sample(logits, params, rng) for _ in range(n)], minlength=len(logits))


def assert_matches(counts, expected):
    """Chi-square goodness of fit over the tokens with non-zero expected probability; the others
    must never be drawn."""
    n = counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {np.flatnonzero(counts * ~support)}"
    e = expected[support] * n
    stat = float((((counts[support] - e) ** 2) / e).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return
    assert stat < CHI2_999[df], f"chi2 {stat:.1f} >= {CHI2_999[df]} (df {df}): counts {counts}, expected {e.round(1)}"


# ---- argument checks ----

@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(min_p=-0.01), "min_p"),
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(frequency_penalty=None), "frequency_penalty"),
])
def test_invalid_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [-1, 1.5, "7"])
def test_invalid_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        sampling.make_rng(seed)


# ---- penalties ----

def test_repetition_penalty_hand_computed():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = sampling.apply_repetition_penalty(logits, np.array([0, 1, 1]), 2.0)
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])  # pure: the input is untouched


def test_presence_frequency_penalty_hand_computed():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = sampling.apply_presence_frequency_penalty(logits, np.array([3, 0]), np.array([2, 1]), 0.5, 0.25)
    np.testing.assert_allclose(out, [2.0 - 0.25 - 0.5, -1.0, 0.5, 3.0 - 2 * 0.25 - 0.5])


def test_sampler_history_matches_naive_recomputation():
    """The incremental history in Sampler against recomputing every penalty from the full token list."""
    vocab, prompt = 50, [3, 7, 7, 11]
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.0, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.3)
    logit_rng = np.random.default_rng(5)
    steps = [logit_rng.standard_normal(vocab).astype(np.float32) * 2 for _ in range(40)]
    sampler = Sampler(params, vocab, seed=123, prompt_ids=prompt)
    got = [sampler(x) for x in steps]

    rng, generated, want = np.random.default_rng(123), [], []
    for x in steps:
        x = x.astype(np.float64)
        for t in set(prompt + generated):
            x[t] = x[t] / 1.3 if x[t] > 0 else x[t] * 1.3
        for t, c in Counter(generated).items():
            x[t] -= c * 0.3 + 0.4
        unpenalised = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.0)
        token = sampling.sample(x.astype(np.float32), unpenalised, rng)
        generated.append(token)
        want.append(token)
    assert got == want
    assert len(set(got)) > 5  # the penalties pushed it around the vocabulary


def test_greedy_repetition_penalty_moves_to_next_best():
    logits = np.array([5.0, 4.9, 1.0, -3.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5), 4)
    assert [sampler(logits) for _ in range(3)] == [0, 1, 0]  # 5/1.5 = 3.33 > 4.9/1.5 = 3.27


# ---- greedy ----

def test_greedy_is_argmax_and_equals_top_k_1():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.standard_normal(1000).astype(np.float32)
        want = int(np.argmax(x))
        assert sampling.sample(x, SamplingParams(temperature=0.0), rng) == want
        assert sampling.sample(x, SamplingParams(temperature=3.0, top_k=1, top_p=0.5), rng) == want
        # and the filter path, not only the shortcut, keeps only the argmax
        ids, _ = sampling.top_k_filter((None, x), 1)
        assert ids.tolist() == [want]


# ---- filters against sort-based oracles ----

def kept(cands, vocab):
    ids, logits = cands
    return set(np.flatnonzero(logits > sampling.MASKED / 2).tolist()) if ids is None else set(ids.tolist())


@pytest.mark.parametrize("vocab", [8, 1000, 49152, 151936])
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 12.0])
def test_filters_keep_exactly_the_oracle_sets(vocab, scale):
    rng = np.random.default_rng(vocab + int(scale * 10))
    x = (rng.standard_normal(vocab) * scale).astype(np.float32)
    order = np.argsort(-x.astype(np.float64), kind="stable")
    for k in (1, 5, 40, 50):
        if k < vocab:
            assert kept(sampling.top_k_filter((None, x), k), vocab) == set(order[:k].tolist())
    p = softmax(x)[order]
    for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
        before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
        want = set(order[before < top_p].tolist())
        got = kept(sampling.top_p_filter((None, x), top_p), vocab)
        # float32 vs float64 masses may move a token sitting exactly on the cut
        assert len(got ^ want) <= 1, (top_p, len(got), len(want))
        assert got >= set(order[:max(1, len(want) - 1)].tolist())
    for min_p in (0.01, 0.1, 0.5, 1.0):
        want = set(np.flatnonzero(softmax(x) >= min_p * softmax(x).max()).tolist())
        assert kept(sampling.min_p_filter((None, x), min_p), vocab) == want


def test_top_p_with_a_dominant_token_keeps_it_alone():
    x = np.zeros(60000, dtype=np.float32)
    x[31337] = 30.0
    ids, _ = sampling.top_p_filter((None, x), 0.9)
    assert ids.tolist() == [31337]


def test_top_k_keeps_ties_with_the_kth():
    x = np.array([3.0, 1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    ids, _ = sampling.top_k_filter((None, x), 2)
    assert sorted(ids.tolist()) == [0, 2, 3]


# ---- sampled frequencies ----

@pytest.mark.parametrize("kw", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0), dict(temperature=1.0, top_k=3),
    dict(temperature=0.8, top_p=0.7), dict(temperature=1.0, min_p=0.2),
    dict(temperature=1.3, top_k=6, top_p=0.9, min_p=0.05),
])
def test_frequencies_match_the_distribution(kw):
    full = dict(top_k=0, top_p=1.0, min_p=0.0)
    full.update(kw)
    counts = draw_many(LOGITS8, SamplingParams(**full), 20000, seed=11)
    assert_matches(counts, oracle_probs(LOGITS8, **full))


def test_frequencies_on_a_large_vocabulary():
    """Exercises the block-wise inverse CDF and the sampled thresholds: a 60k vocabulary where a few
    scattered tokens hold most of the mass, the rest binned together."""
    vocab = 60000
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(vocab) * 0.5 - 2.0).astype(np.float32)
    special = np.array([5, 1030, 1031, 30000, 59999])
    x[special] = [7.0, 6.5, 6.0, 5.0, 4.0]
    for params in (SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
                   SamplingParams(temperature=1.0, top_k=0, top_p=0.95, min_p=0.0)):
        expected = oracle_probs(x, top_p=params.top_p)
        sampler_rng = np.random.default_rng(17)
        draws = np.array([sampling.sample(x, params, sampler_rng) for _ in range(4000)])
        assert expected[draws].min() > 0, "drew a token outside the nucleus"
        bins = np.full(vocab, len(special))
        bins[special] = np.arange(len(special))
        counts = np.bincount(bins[draws], minlength=len(special) + 1)
        assert_matches(counts, np.bincount(bins, weights=expected, minlength=len(special) + 1))


def test_inverse_cdf_skips_zero_weights_at_block_edges():
    w = np.zeros(5000, dtype=np.float32)
    w[[1023, 1024, 4999]] = [1.0, 2.0, 1.0]
    got = Counter(sampling._inverse_cdf(w, u) for u in np.linspace(0, 1, 2001, endpoint=False))
    assert set(got) == {1023, 1024, 4999}
    assert abs(got[1024] / 2000 - 0.5) < 0.01


# ---- seeds ----

def test_seed_reproduces_and_different_seeds_differ():
    x = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed):
        s = Sampler(params, 1000, seed=seed)
        return [s(x) for _ in range(30)]

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(None) != run(None)  # fresh entropy


# ---- logprobs ----

def test_logprobs_against_float64_log_softmax():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal(49152) * 3).astype(np.float32)
    ref = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64) - x.max()).sum()) - x.max()
    chosen, top = sampling.logprobs(x, 123, 5)
    assert chosen == pytest.approx(ref[123], abs=1e-5)
    order = np.argsort(-ref)[:5]
    assert [t for t, _ in top] == order.tolist()
    np.testing.assert_allclose([lp for _, lp in top], ref[order], atol=1e-5)
    assert sampling.logprobs(x, 7, 0)[1] == []
