"""Every training-free method against a direct reference on random logits, the fitted nulls and their
calibration, the bootstrap intervals of the frontier, and the oracle check."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

import bh_experiment as bx
import bh_routing as br
from moe_families import find_moe_layers

NUM_EXPERTS, NATIVE_K = 64, 8


def random_logits(tokens=400, seed=0, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, NUM_EXPERTS, generator=generator) * scale


def heavy_tailed_logits(tokens, seed):
    """Logits with no token-specific signal: each expert its own offset, Student-t (3) noise, right-skewed."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-1, 1, NUM_EXPERTS)
    chi_square = torch.randn(tokens, NUM_EXPERTS, 3, generator=generator).square().sum(-1)
    student = torch.randn(tokens, NUM_EXPERTS, generator=generator) / (chi_square / 3).sqrt()
    return offsets + student + 0.5 * torch.rand(tokens, NUM_EXPERTS, generator=generator).log().neg()


@pytest.fixture(scope="module")
def embedded_model():
    model, tokenizer = bx.load_model("embedded")[:2]
    return model, tokenizer


@pytest.fixture(scope="module")
def calibration():
    return br.fit_routing_calibration([heavy_tailed_logits(4000, seed) for seed in range(2)], seed=0)


# --- references, one token at a time ---------------------------------------------------------------


def reference_hc_count(p_values, beta, min_k, max_k):
    """HC thresholding written out: sort, evaluate the objective at i = 1..floor(beta m), first argmax."""
    m = len(p_values)
    ordered = sorted(p_values)
    best_i, best = 1, -math.inf
    for i in range(1, max(1, math.floor(beta * m + 1e-9)) + 1):
        p = min(max(ordered[i - 1], np.finfo(np.float32).eps), 1 - np.finfo(np.float32).eps)
        value = math.sqrt(m) * (i / m - p) / math.sqrt(p * (1 - p))
        if value > best:
            best_i, best = i, value
    return min(max(best_i, min_k), max_k)


def reference_skip_count(probabilities, beta, k, min_k):
    top = sorted(probabilities, reverse=True)[:k]
    return max(min_k, sum(1 for w in top if w >= beta * top[0]))


def test_hc_objective_on_hand_computed_values():
    p = torch.tensor([[0.001, 0.01, 0.2, 0.5]])
    expected = [2 * (i / 4 - q) / math.sqrt(q * (1 - q)) for i, q in enumerate([0.001, 0.01, 0.2, 0.5], 1)]
    assert br.higher_criticism(p.double(), 4)[0].tolist() == pytest.approx(expected)
    # 2 (0.25 - 0.001) / sqrt(0.000999) = 15.75...: the first p-value wins; HC keeps 1 expert
    assert expected[0] == pytest.approx(15.7545, rel=1e-4) and max(expected) == expected[0]


@pytest.mark.parametrize("pvalue_method", ["robust_z", "one_minus_prob", "empirical", "pooled"])
@pytest.mark.parametrize("beta,min_k,max_k", [(0.3, 1, 8), (0.1, 2, 4), (0.5, 0, 16)])
def test_hc_counts_match_the_reference(calibration, pvalue_method, beta, min_k, max_k):
    logits = random_logits(seed=3)
    null = calibration.null(pvalue_method, 1) if br.pvalue_method_of(pvalue_method).fitted else None
    routing = br.route_logits(
        "hc", logits, 1, calibration, beta=beta, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method
    )
    p_values = br.compute_p_values(logits, pvalue_method, null=null)
    expected = [reference_hc_count(row.tolist(), beta, min_k, max_k) for row in p_values]
    assert routing.expert_counts.tolist() == expected
    assert len(set(expected)) > 1  # the counts vary: the test can tell methods apart


@pytest.mark.parametrize("beta,k,min_k", [(0.3, 8, 1), (0.05, 4, 1), (0.9, 8, 2), (1.0, 8, 1)])
def test_skip_counts_match_the_reference(beta, k, min_k):
    logits = random_logits(seed=4, scale=1.0)
    routing = br.route_logits("skip", logits, beta=beta, k=k, min_k=min_k)
    probabilities = torch.softmax(logits, -1)
    assert routing.expert_counts.tolist() == [reference_skip_count(p.tolist(), beta, k, min_k) for p in probabilities]
    kept = routing.top_index[routing.top_index < NUM_EXPERTS]
    assert kept.numel() == routing.expert_counts.sum()  # exactly the counted slots are routed


def test_skip_with_the_calibrated_beta_uses_each_layers_median(calibration):
    logits = random_logits(seed=5, scale=1.0)
    for layer in range(calibration.num_layers):
        routed = br.route_logits("skip", logits, layer, calibration, beta="median")
        direct = br.route_logits("skip", logits, beta=calibration.skip_beta[layer])
        assert torch.equal(routed.expert_counts, direct.expert_counts)
    top = torch.topk(torch.softmax(heavy_tailed_logits(4000, 0), -1), 2).values
    assert calibration.skip_beta[0] == pytest.approx((top[:, 1] / top[:, 0]).median().item(), rel=1e-6)
    assert 0 < min(calibration.skip_beta) < max(calibration.skip_beta) < 1


def test_entropy_counts_match_the_reference_and_split_calibration_tokens_evenly(calibration):
    logits = heavy_tailed_logits(4000, 0)  # the first layer's calibration logits
    routing = br.route_logits("entropy", logits, 0, calibration, min_k=1, max_k=4)
    knots = calibration.entropy_knots[0].double()
    entropy = br.router_entropy(torch.softmax(logits.double(), -1))
    for value, count in zip(entropy[:200].tolist(), routing.expert_counts[:200].tolist(), strict=True):
        quantile = max(0, int((knots <= value).sum()) - 1) / (len(knots) - 1)
        assert count == min(4, 1 + math.floor(quantile * 4))
    shares = torch.bincount(routing.expert_counts, minlength=5)[1:].double() / len(logits)
    assert shares.tolist() == pytest.approx([0.25] * 4, abs=0.01)


@pytest.mark.parametrize("pvalue_method", ["empirical", "pooled"])
def test_bh_with_a_fitted_null_counts_what_bh_on_its_p_values_rejects(calibration, pvalue_method):
    logits = random_logits(seed=6)
    null = calibration.null(pvalue_method, 0)
    p_values = br.compute_p_values(logits, pvalue_method, null=null)
    for alpha in (0.05, 0.2):
        expected = br.bh_num_rejections(p_values, alpha).clamp(1, 16)
        routing = br.route_logits("bh", logits, 0, calibration, alpha=alpha, max_k=16, pvalue_method=pvalue_method)
        agree = (routing.expert_counts == expected).double().mean()
        assert agree >= 0.995  # the hot path inverts the interpolated table: ties at a critical value may differ


def test_the_empirical_null_gives_uniform_p_values_on_fresh_logits_of_the_calibration_distribution(calibration):
    fresh = heavy_tailed_logits(20000, 7)  # no token-specific signal, like the permuted calibration logits
    p_values = br.compute_p_values(fresh, "empirical", null=calibration.null("empirical", 0))
    expert = torch.randint(0, NUM_EXPERTS, (len(fresh),), generator=torch.Generator().manual_seed(8))
    one_per_token = p_values[torch.arange(len(fresh)), expert]
    assert kstest(one_per_token.numpy(), "uniform").pvalue > 0.01
    gaussian = br.compute_p_values(fresh, "robust_z")[torch.arange(len(fresh)), 0]
    assert kstest(gaussian.numpy(), "uniform").pvalue < 1e-6  # the Gaussian null does not hold here


def test_methods_that_read_tables_say_what_they_need():
    logits = random_logits()
    for method, params in [("bh", {"pvalue_method": "empirical"}), ("skip", {"beta": "median"}), ("entropy", {})]:
        with pytest.raises(ValueError, match="RoutingCalibration"):
            br.route_logits(method, logits, **params)
    with pytest.raises(ValueError, match="beta must be a number in \\(0, 1\\] or 'median'"):
        br.route_logits("skip", logits, beta="mean")
    with pytest.raises(ValueError, match="temperature must be 1.0 with tables fitted at temperature 1"):
        br.route_logits("entropy", logits, temperature=2.0)
    with pytest.raises(ValueError, match="pvalue_method must be one of"):
        br.route_logits("hc", logits, pvalue_method="gaussian")


def test_a_calibration_saves_loads_and_must_match_the_model(calibration, tmp_path, tiny_model):
    loaded = br.RoutingCalibration.load(calibration.save(tmp_path / "calibration.pt"))
    assert loaded.skip_beta == calibration.skip_beta and loaded.info == calibration.info
    assert torch.equal(loaded.entropy_knots, calibration.entropy_knots)
    assert list(loaded.nulls) == list(calibration.nulls) == ["empirical", "pooled"]
    for mine, theirs in zip(*(sum(c.nulls.values(), []) for c in (loaded, calibration)), strict=True):
        assert (mine.first, mine.step) == (theirs.first, theirs.step)
        assert torch.equal(mine.log_survival, theirs.log_survival)
    three_layers = br.fit_routing_calibration([heavy_tailed_logits(100, seed) for seed in range(3)])
    with pytest.raises(ValueError, match=r"\(fitted in this process\) has 3 layers, this model 2 MoE layers"):
        br.OLMoERouterPatcher(tiny_model, calibration=three_layers)


def test_every_method_runs_through_the_patcher_with_each_layers_own_tables(tiny_model):
    token_ids = torch.randint(0, tiny_model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    logits = bx.collect_router_logits(tiny_model, token_ids[:400], window=100)
    assert len(logits) == tiny_model.config.num_hidden_layers and logits[0].shape == (400, NUM_EXPERTS)
    calibration = br.fit_routing_calibration(logits)
    assert calibration.skip_beta[0] != calibration.skip_beta[1]  # the layers' tables differ
    patcher = br.OLMoERouterPatcher(tiny_model, calibration=calibration, record_token_counts=True)
    specs = ["hc:beta=0.3,pvalue_method=empirical", "hc:beta=0.2", "skip:beta=median", "entropy:max_k=4",
             "bh:pvalue_method=pooled", "bh:pvalue_method=empirical,alpha=0.2"]  # fmt: skip
    configs = [br.RoutingConfig.parse(spec) for spec in specs] + [br.RoutingConfig.of("layerk", budgets=(1.5, 3.25))]
    for config in configs:
        spec = config.name
        config.apply(patcher)
        kept = bx.collect_router_logits(tiny_model, token_ids[400:], window=200)  # the logits each layer routed
        counts = patcher.get_stats()["token_counts"]  # [200, L]
        patcher.unpatch()
        assert counts.double().std() > 0, spec  # variable counts
        for layer, layer_logits in enumerate(kept):
            expected = br.route_logits(config.method, layer_logits, layer, calibration, **config.kwargs)
            assert torch.equal(counts[:, layer], expected.expert_counts), (spec, layer)


# --- calibration on the embedded model -------------------------------------------------------------


def test_the_empirical_null_keeps_the_rejection_rate_at_alpha_on_the_embedded_models_permuted_null(embedded_model):
    model, tokenizer = embedded_model
    ids = tokenizer(bx.load_heldout_text("embedded"), return_tensors="pt").input_ids[0]
    calibration = br.fit_routing_calibration(bx.collect_router_logits(model, ids[16384 : 16384 + 8192]))
    evaluation = bx.collect_router_logits(model, ids[:16384])  # disjoint from the calibration slice
    rates = bx.null_rejection_rates(evaluation, (0.05, 0.2), ("empirical", "robust_z"), calibration)
    fitted = rates[rates["pvalue_method"] == "empirical"]
    # at most alpha within simulation error (4 binomial standard errors), in every layer and at both alphas
    assert (fitted["rejection_rate"] <= fitted["alpha"] + 4 * fitted["standard_error"]).all()
    gaussian = rates[rates["pvalue_method"] == "robust_z"]
    assert (gaussian["rejection_rate"] > gaussian["alpha"] + 4 * gaussian["standard_error"]).any()


# --- bootstrap intervals and the best method per budget ----------------------------------------------


def synthetic_quality(true_log_ratio, seed, windows=40):
    """top-k at 1, 2, 3 experts and a method at exactly 2 experts whose per-window mean NLL exceeds top-k 2's
    by true_log_ratio plus noise: its perplexity is exp(true_log_ratio) times top-k's in expectation."""
    rng = np.random.default_rng(seed)
    tokens = np.full(windows, 100.0)
    base = rng.normal(3.0, 0.3, windows)

    def entry(name, method, experts, window_nll, params):
        nll = window_nll * tokens
        return {"name": name, "method": method, "status": "ok", "params": params, "avg_experts": experts,
                "perplexity": float(np.exp(nll.sum() / tokens.sum())), "window_nll": nll.tolist(),
                "window_tokens": tokens.tolist(), "window_experts": (experts * tokens).tolist()}  # fmt: skip

    quality = {f"topk_k{k}": entry(f"topk_k{k}", "topk", k, base + 0.2 * (2 - k), {"k": k}) for k in (1, 2, 3)}
    noisy = base + true_log_ratio + rng.normal(0, 0.05, windows)
    quality["bh"] = entry("bh", "bh", 2.0, noisy, {"alpha": 0.05, "pvalue_method": "robust_z"})
    return quality


def test_bootstrap_intervals_cover_a_known_difference():
    true_delta = 100 * math.expm1(0.02)
    covered = []
    for seed in range(60):
        row = bx.frontier_table(synthetic_quality(0.02, seed), resamples=300, seed=seed).iloc[0]
        assert row["delta_vs_topk_low"] <= row["delta_vs_topk_percent"] <= row["delta_vs_topk_high"]
        covered.append(row["delta_vs_topk_low"] <= true_delta <= row["delta_vs_topk_high"])
    assert 0.85 <= np.mean(covered) <= 1.0  # nominal 95%; 60 data sets
    # width: about 2 x 1.96 standard errors of the mean over 40 windows of noise 0.05 (in log perplexity)
    assert 100 * (row["delta_vs_topk_high"] - row["delta_vs_topk_low"]) / 100 == pytest.approx(
        2 * 1.96 * 0.05 / math.sqrt(40) * 100 * math.exp(0.02), rel=0.35
    )
    assert math.isnan(row["delta_vs_topp_low"])  # no top-p points: no comparison


def test_best_at_budget_ranks_within_each_budget_with_paired_intervals():
    quality = synthetic_quality(-0.05, 0)
    table = bx.best_at_budget(quality, budgets=(2, 3), resamples=200)
    at_two = table[table["budget"] == 2]
    assert list(at_two["series"]) == ["BH (robust_z)", "top-k"] and list(at_two["rank"]) == [1, 2]
    best = at_two.iloc[0]
    assert best["delta_vs_topk_high"] < 0 and best["delta_vs_topk_percent"] == pytest.approx(
        100 * math.expm1(math.log(quality["bh"]["perplexity"] / quality["topk_k2"]["perplexity"]))
    )
    assert table[table["budget"] == 3].iloc[0]["config"] == "topk_k3"  # more experts win at budget 3


def test_window_sums_fold_positions_per_window():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    counts = torch.tensor([[1, 3], [2, 2], [4, 4], [1, 1], [2, 4]])
    sums = bx.window_sums(nll, torch.tensor([0, 0, 7, 7, 7]), counts)
    assert sums == {"window_nll": [3.0, 12.0], "window_tokens": [2.0, 3.0], "window_experts": [4.0, 8.0]}


# --- the oracle check ------------------------------------------------------------------------------


def drop_one_loss(model, layer, inputs, target, slot):
    """The surprisal of `target` after `inputs` ([1, T]) with `slot` of `layer`'s router dropped at the last
    position alone (None: nothing dropped), by a plain hook on one sequence."""
    router = model.model.layers[layer].mlp.gate

    def hook(module, args, output):
        weights = output[1].clone()
        if slot is not None:
            weights[-1, slot] = 0
        return output[0], weights, output[2]

    handle = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(inputs).logits[0, -1].float()
    finally:
        handle.remove()
    return (torch.logsumexp(logits, -1) - logits[target]).item()


def test_oracle_effects_are_those_of_dropping_one_expert_at_one_position(tiny_model):
    token_ids = torch.randint(0, tiny_model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(1))
    effects = bx.oracle_drop_effects(tiny_model, token_ids, layer=1, positions=[40, 150], context=32)
    top_k = tiny_model.config.num_experts_per_tok
    for row, position in enumerate((40, 150)):
        inputs, target = token_ids[position - 31 : position + 1].unsqueeze(0), token_ids[position + 1]
        reference = drop_one_loss(tiny_model, 1, inputs, target, None)
        for slot in range(top_k):
            expected = drop_one_loss(tiny_model, 1, inputs, target, slot) - reference
            assert effects["loss_increase"][row, slot].item() == pytest.approx(expected, abs=1e-5)
    assert effects["loss_increase"].abs().max() > 1e-4  # the drops change the loss: the check can fail
    table = bx.oracle_table([effects], [br.RoutingConfig.of("topk", k=2)], num_experts_per_tok=top_k)
    assert table.set_index("config").loc["topk_k2", "kept_share"] == pytest.approx(2 / top_k)
    assert table.iloc[0]["config"] == "router order"


def test_layer_budget_keeps_each_layers_average_whatever_the_token():
    logits = random_logits(tokens=1000, seed=9)
    budgets = (1.25, 3.5, 2.0)
    for layer, budget in enumerate(budgets):
        routing = br.route_logits("layerk", logits, layer, budgets=budgets)
        assert routing.expert_counts.double().mean().item() == pytest.approx(budget, abs=0.01)
        assert set(routing.expert_counts.tolist()) <= {math.floor(budget), math.ceil(budget)}
        shuffled = br.route_logits("layerk", logits[torch.randperm(1000)], layer, budgets=budgets)
        assert torch.equal(shuffled.expert_counts, routing.expert_counts)  # by position, not by content
    assert br.RoutingConfig.of("layerk", budgets=budgets).name == "layerk_1.25_3.50_2.00"
    with pytest.raises(ValueError, match="budgets must be a non-empty tuple of numbers in \\[0, 64\\]"):
        br.route_logits("layerk", logits, budgets=(1.0, 65.0))
    with pytest.raises(ValueError, match="layer 3 has no budget"):
        br.route_logits("layerk", logits, 3, budgets=budgets)


def test_paired_perplexity_difference_of_two_results_on_the_same_windows():
    quality = synthetic_quality(0.03, 1)
    paired = bx.paired_perplexity_difference(quality["bh"], quality["topk_k2"], resamples=300)
    expected = 100 * (quality["bh"]["perplexity"] / quality["topk_k2"]["perplexity"] - 1)
    assert paired["percent"] == pytest.approx(expected) and paired["low"] < paired["percent"] < paired["high"]
    assert paired["low"] > 0  # the 3% difference with small noise is resolved
    with pytest.raises(ValueError, match="per-window sums over the same windows"):
        bx.paired_perplexity_difference(quality["bh"], {**quality["topk_k2"], "window_tokens": [1.0]})


def test_every_gpu_batch_halves_on_out_of_memory_the_oracle_included(tiny_model, monkeypatch):
    def small_only(batch):
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(batch)

    with pytest.warns(UserWarning, match="out of memory: testing with batches of 2"):
        done, size = bx.halving_batches(list(range(7)), 8, small_only, "testing")
    assert sum(done, []) == list(range(7)) and size == 2
    with pytest.raises(torch.OutOfMemoryError):
        bx.halving_batches([1], 1, lambda batch: small_only(batch * 3), "testing")
    token_ids = torch.randint(2, 500, (300,), generator=torch.Generator().manual_seed(0))
    expected = bx.oracle_drop_effects(tiny_model, token_ids, layer=1, positions=[40, 90, 150, 200], context=32)
    forward = tiny_model.forward

    def limited(input_ids, **kwargs):  # a forward of more than two positions' copies runs out of memory
        if input_ids.shape[0] > 2 * (tiny_model.config.num_experts_per_tok + 1):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(input_ids, **kwargs)

    monkeypatch.setattr(tiny_model, "forward", limited)
    with pytest.warns(UserWarning, match="the oracle check with batches of 2"):
        backed_off = bx.oracle_drop_effects(tiny_model, token_ids, layer=1, positions=[40, 90, 150, 200], context=32)
    assert torch.allclose(backed_off["loss_increase"], expected["loss_increase"], atol=1e-5)
    assert torch.equal(backed_off["router_logits"], expected["router_logits"])


def test_collecting_router_logits_halves_on_out_of_memory_and_drops_the_failed_batchs_part(tiny_model):
    token_ids = torch.randint(2, 500, (450,), generator=torch.Generator().manual_seed(1))  # 4 windows and a tail
    expected = bx.collect_router_logits(tiny_model, token_ids, window=100, batch_size=4)
    last_router = find_moe_layers(tiny_model)[-1].router

    def limited(module, args):  # the last layer runs out of memory after the others' logits were kept
        if args[0].reshape(-1, args[0].shape[-1]).shape[0] > 2 * 100:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = last_router.register_forward_pre_hook(limited)
    try:
        with pytest.warns(UserWarning, match="collecting router logits with batches of 2"):
            backed_off = bx.collect_router_logits(tiny_model, token_ids, window=100, batch_size=4)
    finally:
        handle.remove()
    assert [layer.shape for layer in backed_off] == [layer.shape for layer in expected] == [(450, 64)] * len(expected)
    for got, want in zip(backed_off, expected, strict=True):
        torch.testing.assert_close(got, want)
