"""The Benjamini-Hochberg step-up procedure against the textbook rule, scipy, and a published example."""

import numpy as np
import pytest
import torch
from scipy.stats import false_discovery_control

from bh_routing import bh_num_rejections, bh_reject, fast_bh_count


def textbook_bh(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini & Hochberg (1995), one family at a time, written as a loop for clarity."""
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    k = 0
    for j in range(1, m + 1):
        if p_values[order[j - 1]] <= alpha * j / m:
            k = j
    reject = np.zeros(m, dtype=bool)
    reject[order[:k]] = True
    return reject


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
def test_matches_textbook_on_random_batches(alpha):
    generator = np.random.default_rng(0)
    # Mix of nulls (uniform) and signals (tiny p-values) so that every count of rejections occurs.
    uniform = generator.uniform(size=(400, 64))
    signal = generator.uniform(size=(400, 64)) ** 8
    mixing = generator.uniform(size=(400, 64)) < generator.uniform(size=(400, 1))
    p_values = np.where(mixing, signal, uniform)
    mask = bh_reject(torch.from_numpy(p_values), alpha).numpy()
    expected = np.stack([textbook_bh(row, alpha) for row in p_values])
    np.testing.assert_array_equal(mask, expected)
    if alpha < 1.0:  # at alpha = 1 every hypothesis is rejected
        assert len(set(expected.sum(axis=1))) > 5  # the test covers many different counts


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_matches_scipy_adjusted_p_values(alpha):
    generator = np.random.default_rng(1)
    p_values = generator.uniform(size=(300, 64)) ** generator.uniform(1, 6, size=(300, 1))
    mask = bh_reject(torch.from_numpy(p_values), alpha).numpy()
    expected = false_discovery_control(p_values, axis=-1, method="bh") <= alpha
    np.testing.assert_array_equal(mask, expected)


def test_ties_are_rejected_together():
    # Values on a coarse grid give many ties; 1/97 steps keep them off the alpha*j/m boundaries.
    generator = np.random.default_rng(2)
    p_values = generator.integers(0, 8, size=(500, 16)) / 97.0
    for alpha in (0.05, 0.1, 0.3, 1.0):
        mask = bh_reject(torch.from_numpy(p_values), alpha).numpy()
        expected = np.stack([textbook_bh(row, alpha) for row in p_values])
        np.testing.assert_array_equal(mask, expected)
        # Tied p-values share one fate.
        for row, row_mask in zip(p_values, mask, strict=True):
            for value in np.unique(row):
                assert len(set(row_mask[row == value])) == 1


def test_published_example():
    # Benjamini & Hochberg (1995), section 4: 15 p-values, q = 0.05 -> the 4 smallest are rejected.
    p_values = torch.tensor(
        [
            0.0001,
            0.0004,
            0.0019,
            0.0095,
            0.0201,
            0.0278,
            0.0298,
            0.0344,
            0.0459,
            0.3240,
            0.4262,
            0.5719,
            0.6528,
            0.7590,
            1.0000,
        ],
        dtype=torch.float64,
    )
    mask = bh_reject(p_values, 0.05)
    assert mask.tolist() == [True] * 4 + [False] * 11


def test_step_up_rejects_past_a_failing_rank():
    # p_(1) fails alpha*1/m but p_(2) passes alpha*2/m: step-up rejects both.
    p_values = torch.tensor([0.03, 0.04, 0.9, 0.95], dtype=torch.float64)
    assert bh_reject(p_values, 0.1).tolist() == [True, True, False, False]


def test_alpha_one_rejects_everything_and_none_when_all_large():
    p_values = torch.rand(10, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert bh_reject(p_values, 1.0).all()
    assert not bh_reject(torch.full((4, 64), 0.99), 0.05).any()


def test_exact_boundary_is_rejected():
    # alpha * j / m exactly representable: p_(2) == 2 * 0.5 / 4 is rejected (<=, not <).
    p_values = torch.tensor([0.2, 0.25, 0.8, 0.9])
    assert bh_reject(p_values, 0.5).tolist() == [True, True, False, False]


def test_leading_dimensions_are_independent_families():
    p_values = torch.rand(2, 3, 5, 64, generator=torch.Generator().manual_seed(4)) ** 4
    mask = bh_reject(p_values, 0.1)
    flat = bh_reject(p_values.reshape(-1, 64), 0.1).reshape(mask.shape)
    assert torch.equal(mask, flat)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), True])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        bh_reject(torch.rand(3, 8), alpha)


def test_bad_p_values():
    with pytest.raises(ValueError, match="p_values"):
        bh_reject(torch.zeros(3, 8, dtype=torch.int64), 0.05)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2, 1.0])
def test_fast_count_equals_the_procedure(alpha):
    # The hot path's sort-free count, fed each hypothesis's first passing rank (smallest j with
    # p <= alpha*j/m), gives BH's number of rejections as bh_reject states it, ties included.
    generator = np.random.default_rng(3)
    p_values = np.where(
        generator.uniform(size=(2000, 64)) < 0.3,
        generator.uniform(size=(2000, 64)) ** 6,
        generator.uniform(size=(2000, 64)),
    )
    p_values[:100] = np.round(p_values[:100], 2)  # ties
    p = torch.from_numpy(p_values)
    first_passing_rank = torch.ceil(64 * p / alpha).long().clamp(1, 65)
    first_passing_rank = torch.where(
        p <= alpha * (first_passing_rank - 1) / 64, first_passing_rank - 1, first_passing_rank
    )
    counts = bh_reject(p, alpha).sum(-1)
    assert torch.equal(fast_bh_count(first_passing_rank.clamp_min(1)), counts)
    assert torch.equal(bh_num_rejections(p, alpha), counts)
