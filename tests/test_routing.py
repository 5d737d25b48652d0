"""The routing functions' shared contract, the baselines, the summaries and every bad input."""

import math

import pandas as pd
import pytest
import torch

from bh_routing import (
    benjamini_hochberg_routing,
    compare_multi_k_statistics,
    run_bh_multi_k,
    summarize_expert_counts,
    topk_routing,
    topp_routing,
)


def mixed_logits(shape=(4, 25, 64), seed=0):
    """Gaussian bulk plus 0-12 planted strong experts per token, so BH counts vary."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator)
    planted = torch.randint(0, 13, shape[:-1], generator=generator).unsqueeze(-1)
    boost = 2.0 + 6.0 * torch.rand(*shape, generator=generator)
    return torch.where(torch.arange(shape[-1]) < planted, logits + boost, logits)


ROUTERS = {
    "bh": lambda logits, **kw: benjamini_hochberg_routing(logits, alpha=0.1, min_k=1, max_k=16, **kw),
    "topk": lambda logits, **kw: topk_routing(logits, k=6, **kw),
    "topp": lambda logits, **kw: topp_routing(logits, p=0.7, max_k=16, **kw),
}
WIDTH = {"bh": 16, "topk": 6, "topp": 16}


@pytest.mark.parametrize("method", list(ROUTERS))
@pytest.mark.parametrize("shape", [(4, 25, 64), (100, 64)])
def test_contract(method, shape):
    logits = mixed_logits(shape)
    weights, experts, counts = ROUTERS[method](logits)
    assert weights.shape == shape and weights.dtype == torch.float32
    assert experts.shape == (*shape[:-1], WIDTH[method]) and experts.dtype == torch.int64
    assert counts.shape == shape[:-1] and counts.dtype == torch.int64
    probabilities = torch.softmax(logits, dim=-1)
    slot = torch.arange(WIDTH[method])
    kept = slot < counts.unsqueeze(-1)
    # Unused slots hold the sentinel E = 64.
    assert (experts[~kept] == 64).all() and (experts[kept] < 64).all()
    # Kept experts are the most probable ones, most probable first, weighted by their probability.
    top_index = probabilities.topk(WIDTH[method], dim=-1).indices
    assert torch.equal(experts[kept], top_index[kept])
    kept_probs = probabilities.gather(-1, experts.clamp(max=63))
    torch.testing.assert_close(weights.gather(-1, experts.clamp(max=63))[kept], kept_probs[kept])
    assert torch.equal((weights > 0).sum(-1), counts)


@pytest.mark.parametrize("method", list(ROUTERS))
def test_renormalize(method):
    weights, _, counts = ROUTERS[method](mixed_logits(), renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(counts.shape))


def test_bh_counts_within_bounds_and_monotone_in_alpha():
    logits = mixed_logits((8, 50, 64), seed=1)
    for min_k, max_k in [(0, 64), (1, 8), (2, 4), (3, 3), (1, 16)]:
        previous = None
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0):
            _, _, counts = benjamini_hochberg_routing(logits, alpha=alpha, min_k=min_k, max_k=max_k)
            assert counts.min() >= min_k and counts.max() <= max_k
            if previous is not None:
                assert (counts >= previous).all(), (min_k, max_k, alpha)
            previous = counts
    _, _, counts = benjamini_hochberg_routing(logits, alpha=0.05, min_k=0, max_k=64)
    assert len(counts.unique()) > 5  # the counts really adapt per token


def test_bh_stats():
    logits = mixed_logits(seed=2)
    _, _, counts, stats = benjamini_hochberg_routing(logits, alpha=0.05, max_k=8, return_stats=True)
    assert set(stats) >= {"p_values", "bh_threshold", "significant_mask", "num_significant", "probabilities"}
    assert stats["p_values"].shape == logits.shape and stats["bh_threshold"].shape == logits.shape[:-1]
    assert torch.equal(stats["significant_mask"].sum(-1), stats["num_significant"])
    assert torch.equal(counts, stats["num_significant"].clamp(1, 8))
    torch.testing.assert_close(stats["bh_threshold"], 0.05 * stats["num_significant"].float() / 64)


def test_topk_matches_olmoe_router():
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    config = OlmoeConfig(hidden_size=32, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False)
    router = OlmoeTopKRouter(config)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    router_logits, native_weights, native_index = router(hidden)
    weights, experts, counts = topk_routing(router_logits, k=8)
    assert torch.equal(experts, native_index) and (counts == 8).all()
    assert torch.equal(weights.gather(-1, experts), native_weights)


def test_topp_counts_are_the_fewest_reaching_p():
    logits = mixed_logits((200, 64), seed=4)
    for p in (0.3, 0.5, 0.9, 1.0):
        _, _, counts = topp_routing(logits, p=p, min_k=0)
        sorted_probs = torch.softmax(logits, -1).sort(-1, descending=True).values
        cumulative = sorted_probs.cumsum(-1)
        for row in range(200):
            needed = counts[row].item()
            assert cumulative[row, needed - 1] >= p - 1e-6
            if needed > 1:
                assert cumulative[row, needed - 2] < p


def test_temperature_changes_weights():
    logits = mixed_logits(seed=5)
    weights_t1, experts, _ = topk_routing(logits, k=4)
    weights_t2, experts_t2, _ = topk_routing(logits, k=4, temperature=2.0)
    assert torch.equal(experts, experts_t2) and not torch.allclose(weights_t1, weights_t2)


def test_summaries_and_multi_k():
    logits = mixed_logits((2, 60, 64), seed=6)
    results = run_bh_multi_k(logits, max_k_values=[2, 4, 8, 16], alpha=0.1)
    rows = compare_multi_k_statistics(results)
    table = pd.DataFrame.from_dict(rows, orient="index")  # as the docstring says pandas reads it
    assert isinstance(rows, dict) and list(table.index) == [2, 4, 8, 16]
    for column in (
        "avg_experts",
        "std_experts",
        "min_experts",
        "max_experts",
        "median_experts",
        "ceiling_hit_rate",
        "floor_hit_rate",
        "reduction_vs_baseline",
    ):
        assert column in table.columns
    assert table["avg_experts"].is_monotonic_increasing
    counts = results[4]["expert_counts"]
    assert table.loc[4, "ceiling_hit_rate"] == pytest.approx(100 * (counts == 4).float().mean().item())
    summary = summarize_expert_counts(torch.tensor([1, 2, 2, 8]), min_k=1, max_k=8)
    assert summary["avg_experts"] == 3.25 and summary["median_experts"] == 2.0
    assert summary["floor_hit_rate"] == 25.0 and summary["ceiling_hit_rate"] == 25.0
    assert summary["reduction_vs_baseline"] == pytest.approx(100 * (1 - 3.25 / 8))
    assert summary["std_experts"] == pytest.approx(math.sqrt(((torch.tensor([1, 2, 2, 8.0]) - 3.25) ** 2).mean()))


GOOD = torch.randn(3, 64)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: benjamini_hochberg_routing(GOOD, alpha=0.0), "alpha"),
        (lambda: benjamini_hochberg_routing(GOOD, alpha=1.01), "alpha"),
        (lambda: benjamini_hochberg_routing(GOOD, temperature=0.0), "temperature"),
        (lambda: benjamini_hochberg_routing(GOOD, temperature=-1.0), "temperature"),
        (lambda: benjamini_hochberg_routing(GOOD, min_k=-1), "min_k"),
        (lambda: benjamini_hochberg_routing(GOOD, min_k=9, max_k=8), "min_k"),
        (lambda: benjamini_hochberg_routing(GOOD, max_k=65), "max_k"),
        (lambda: benjamini_hochberg_routing(GOOD, max_k=0, min_k=0), "max_k"),
        (lambda: benjamini_hochberg_routing(GOOD, max_k=4.5), "max_k"),
        (lambda: benjamini_hochberg_routing(GOOD, pvalue_method="bonferroni"), "pvalue_method"),
        (lambda: benjamini_hochberg_routing(torch.tensor([[0.0, float("nan")]]), max_k=1), "finite"),
        (lambda: benjamini_hochberg_routing(torch.tensor([[0.0, float("inf")]]), max_k=1), "finite"),
        (lambda: benjamini_hochberg_routing(torch.randn(64)), "router_logits"),
        (lambda: benjamini_hochberg_routing(torch.randn(1, 2, 3, 64)), "router_logits"),
        (lambda: benjamini_hochberg_routing(torch.ones(2, 64, dtype=torch.int64)), "router_logits"),
        (lambda: topk_routing(GOOD, k=0), "k must"),
        (lambda: topk_routing(GOOD, k=65), "k must"),
        (lambda: topp_routing(GOOD, p=0.0), "p must"),
        (lambda: topp_routing(GOOD, p=1.5), "p must"),
        (lambda: topp_routing(GOOD, p=0.5, max_k=100), "max_k"),
        (lambda: run_bh_multi_k(GOOD, max_k_values=[]), "max_k_values"),
        (lambda: summarize_expert_counts(torch.tensor([]), 1, 8), "empty"),
    ],
)
def test_bad_input_names_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


@pytest.mark.parametrize("pvalue_method", ["robust_z", "one_minus_prob"])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0])
def test_routing_counts_are_bh_on_the_stated_p_values(pvalue_method, alpha):
    # The hot path compares sorted logits with per-rank critical values; it must agree with the
    # procedure stated once: bh_reject on compute_p_values.
    from bh_routing import bh_reject, compute_p_values

    logits = torch.cat([mixed_logits((20, 50, 64), seed=7).reshape(-1, 64), 4 * torch.randn(500, 64)])
    _, _, counts, stats = benjamini_hochberg_routing(
        logits, alpha=alpha, min_k=0, max_k=64, pvalue_method=pvalue_method, return_stats=True
    )
    reference = bh_reject(compute_p_values(logits, pvalue_method), alpha)
    assert torch.equal(counts, reference.sum(-1))
    assert torch.equal(stats["significant_mask"], reference)
    torch.testing.assert_close(stats["p_values"], compute_p_values(logits, pvalue_method))


def test_cpu_shortcut_and_full_histogram_agree_including_many_strong_experts():
    # The CPU path reads BH's count off the top-16 statistics unless more than 16 experts clear the
    # loosest critical value; tokens with up to 40 strong experts exercise both branches.
    from bh_routing import (
        fast_bh_count,
        fast_bh_count_robust_z_cpu,
        first_passing_rank,
        robust_z_critical_statistics,
        robust_z_statistic,
    )

    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(3000, 64, generator=generator)
    planted = torch.randint(0, 41, (3000, 1), generator=generator)
    logits = torch.where(
        torch.arange(64) < planted, logits + 1.0 + 5.0 * torch.rand(3000, 64, generator=generator), logits
    )
    top_logits = torch.topk(logits, 16, dim=-1).values
    for alpha in (0.01, 0.05, 0.2, 0.9, 1.0):
        critical = robust_z_critical_statistics(alpha, 64, "cpu")
        shortcut = fast_bh_count_robust_z_cpu(logits, top_logits, critical)
        full = fast_bh_count(first_passing_rank(robust_z_statistic(logits, top_logits), critical))
        assert torch.equal(shortcut, full), alpha
        if alpha == 0.2:
            assert (full > 16).any() and (full <= 16).any()
