"""P-values: the calibrated default is uniform under its null; the design's formula selects min_k."""

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from bh_routing import benjamini_hochberg_routing, compute_p_values


def gaussian_logits(num_tokens, num_experts=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Each token gets its own location and scale: the null is Gaussian with unknown (mu, sigma).
    location = 3.0 * torch.randn(num_tokens, 1, generator=generator)
    scale = torch.exp(torch.randn(num_tokens, 1, generator=generator))
    return location + scale * torch.randn(num_tokens, num_experts, generator=generator)


def test_robust_z_is_uniform_under_the_null():
    # Seed 11 differs from the table's simulation seed: this is fresh data.
    p_values = compute_p_values(gaussian_logits(40_000, seed=11)).flatten().numpy()
    assert kstest(p_values, "uniform").statistic < 0.005
    for level in (1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5):
        observed = (p_values <= level).mean()
        # Binomial standard error at 2.56M p-values, times 5 (pooled p-values within a token are dependent).
        tolerance = 5 * np.sqrt(level * (1 - level) / 40_000)
        assert abs(observed - level) < tolerance, (level, observed)


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.2])
def test_bh_on_robust_z_controls_false_selections_under_the_global_null(alpha):
    # No expert is relevant: the probability of selecting any beyond min_k is the FDR, which BH keeps <= alpha.
    _, _, counts, stats = benjamini_hochberg_routing(
        gaussian_logits(20_000, seed=12), alpha=alpha, min_k=0, max_k=64, return_stats=True
    )
    any_selected = (stats["num_significant"] > 0).double().mean().item()
    assert any_selected <= alpha + 3 * np.sqrt(alpha / 20_000)
    assert any_selected >= 0.5 * alpha  # calibrated, not merely conservative


def test_robust_z_is_pivotal_and_ignores_temperature():
    logits = gaussian_logits(50, seed=13)
    reference = compute_p_values(logits)
    assert torch.equal(compute_p_values(logits, temperature=0.5), compute_p_values(logits * 2.0))
    torch.testing.assert_close(compute_p_values(3.0 * logits - 7.0), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(compute_p_values(logits, temperature=4.0), reference, atol=1e-5, rtol=0)


def test_robust_z_finds_planted_experts():
    generator = torch.Generator().manual_seed(14)
    logits = torch.randn(300, 64, generator=generator)
    planted = torch.randint(0, 9, (300,), generator=generator)  # 0..8 relevant experts per token
    slots = torch.arange(64) < planted.unsqueeze(-1)
    logits = torch.where(slots, logits + 10.0, logits)
    _, _, counts = benjamini_hochberg_routing(logits, alpha=0.05, min_k=0, max_k=64)
    # BH finds every strongly planted expert and rarely adds one.
    assert (counts >= planted).all()
    assert (counts - planted).float().mean() < 0.2
    assert len(counts.unique()) >= 9


def test_p_values_are_float32_for_low_precision_logits():
    logits = gaussian_logits(64, seed=15)
    for dtype in (torch.bfloat16, torch.float16):
        p_values = compute_p_values(logits.to(dtype))
        assert p_values.dtype == torch.float32
        # bf16 p-values could not go below 2^-7; float32 ones resolve the BH thresholds alpha*j/64.
        assert ((p_values > 0) & (p_values <= 1)).all()
    strong = torch.randn(64, 64, generator=torch.Generator().manual_seed(15))
    strong[:, 0] += 20
    assert compute_p_values(strong.to(torch.bfloat16))[:, 0].max() < 0.05 / 64
    assert compute_p_values(logits.double()).dtype == torch.float64


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 0.98])
def test_one_minus_prob_selects_min_k_for_every_alpha_below_63_64(alpha):
    # Rejecting k experts needs alpha >= m*(k-1)/k^2, smallest at k = m: (m-1)/m = 0.984 for m = 64.
    generator = torch.Generator().manual_seed(16)
    logits = torch.cat(
        [
            5.0 * torch.randn(500, 64, generator=generator),
            torch.zeros(10, 64),
            torch.tensor([[30.0] + [0.0] * 63, [30.0, 30.0] + [0.0] * 62]),  # one and two dominant experts
        ]
    )
    for temperature in (0.1, 1.0, 10.0):
        _, _, counts, stats = benjamini_hochberg_routing(
            logits,
            alpha=alpha,
            temperature=temperature,
            min_k=1,
            max_k=16,
            pvalue_method="one_minus_prob",
            return_stats=True,
        )
        assert (stats["num_significant"] <= 1).all()
        assert (counts == 1).all()
        _, _, counts_floor0 = benjamini_hochberg_routing(
            logits, alpha=alpha, temperature=temperature, min_k=0, max_k=16, pvalue_method="one_minus_prob"
        )
        assert (counts_floor0 <= 1).all()


def test_one_minus_prob_rejects_everything_at_alpha_one():
    # At alpha >= (m-1)/m the bound no longer binds; at alpha = 1, p_(m) <= 1 always, so BH rejects all 64.
    logits = 5.0 * torch.randn(20, 64, generator=torch.Generator().manual_seed(17))
    _, _, counts, stats = benjamini_hochberg_routing(
        logits, alpha=1.0, max_k=64, pvalue_method="one_minus_prob", return_stats=True
    )
    assert (stats["num_significant"] == 64).all() and (counts == 64).all()
