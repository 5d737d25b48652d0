"""Allocations of experts to layers (greedy, dynamic programming, Alloc-L, LExI), the methods that read them, the
per-token rules fitted to a schedule's layer budgets, and Alloc-T's redistribution: each against a direct
reference."""

import itertools
import json
import math
import re

import pytest
import torch

import bh_allocation as ba
import bh_experiment as bx
import bh_routing as br


def test_the_greedy_step_gives_the_expert_to_the_layer_whose_loss_drops_most():
    # Two layers, up to 3 experts each, a loss by hand: each step's choice below is read off the table.
    losses = {(1, 1): 10.0, (2, 1): 8.0, (1, 2): 7.0, (2, 2): 5.0, (1, 3): 6.5, (3, 2): 4.8, (2, 3): 4.0, (3, 3): 3.9}
    asked = []

    def loss(experts):
        asked.append(experts)
        return losses[experts]

    rows = ba.greedy_allocation(loss, num_layers=2, native_k=3)
    # (1, 1): layer 1 drops to 7 (layer 0 only to 8); (1, 2): layer 0 to 5 (layer 1 to 6.5); (2, 2): layer 1 to 4.0.
    assert rows.tolist() == [[1, 1], [1, 2], [2, 2], [2, 3], [3, 3]]
    assert asked == [(2, 1), (1, 2), (2, 2), (1, 3), (3, 2), (2, 3), (3, 3)]  # only the candidates of each step
    tied = ba.greedy_allocation(lambda experts: 1.0, num_layers=2, native_k=2)
    assert tied.tolist() == [[1, 1], [2, 1], [2, 2]]  # a tie goes to the lowest layer


def test_dynamic_programming_finds_the_least_summed_cost_at_every_total():
    generator = torch.Generator().manual_seed(0)
    costs = torch.rand(3, 5, generator=generator)
    costs[:, 0] = math.inf  # no layer may keep 0 experts
    rows = ba.dp_allocation(costs)
    assert [int(row.sum()) for row in rows] == list(range(3, 13))  # one row per total, 1..4 experts per layer
    for row in rows:
        totals = [c for c in itertools.product(range(1, 5), repeat=3) if sum(c) == int(row.sum())]
        best = min(sum(costs[layer, k] for layer, k in enumerate(c)) for c in totals)
        assert sum(costs[layer, int(k)] for layer, k in enumerate(row)) == pytest.approx(float(best))


def test_alloc_l_sensitivities_lower_one_layer_at_a_time():
    seen = []

    def loss(experts):
        seen.append(experts)
        return sum((4 - k) * (layer + 1) for layer, k in enumerate(experts))  # layer 1 twice as sensitive

    costs = ba.layer_sensitivities(loss, num_layers=2, native_k=4)
    assert costs[0].tolist() == [math.inf, 3, 2, 1, 0] and costs[1].tolist() == [math.inf, 6, 4, 2, 0]
    assert all(sum(k != 4 for k in experts) <= 1 for experts in seen)
    assert ba.dp_allocation(costs)[2].tolist() == [1.0, 3.0]  # at 4 experts in all, the cheaper layer gives


def calibration_with(allocation: torch.Tensor) -> br.RoutingCalibration:
    generator = torch.Generator().manual_seed(0)
    calibration = br.fit_routing_calibration([torch.randn(64, 64, generator=generator) for _ in range(2)])
    calibration.allocations = {"schedule": allocation, "allocl": allocation, "lexi": allocation}
    return calibration


def test_a_calibrations_allocation_is_its_row_or_the_mix_of_two_rows():
    calibration = calibration_with(torch.tensor([[1.0, 1.0], [1.0, 2.0], [3.0, 2.0], [8.0, 8.0]]))
    assert calibration.allocation("schedule", 1.5) == [1.0, 2.0]
    assert calibration.allocation("schedule", 2.0) == pytest.approx([2.0, 2.0])  # halfway from (1, 2) to (3, 2)
    with pytest.raises(ValueError, match=r"budget must be a number in \[1, 8\] for the 'schedule' allocation, got 9"):
        calibration.allocation("schedule", 9)
    with pytest.raises(ValueError, match="allocation must be one of"):
        calibration.allocation("greedy", 2.0)
    calibration.allocations = {}
    none_fitted = r"none fitted: bh_allocation.fit_allocations adds them\) for this calibration, got 'schedule'"
    with pytest.raises(ValueError, match=none_fitted):
        calibration.allocation("schedule", 2.0)


def test_an_allocation_routes_each_layer_with_its_budget_and_saves_with_the_calibration(
    tiny_model, input_ids, tmp_path
):
    calibration = calibration_with(ba.greedy_allocation(lambda e: -e[0] - 2 * e[1], 2, 8))
    loaded = br.RoutingCalibration.load(calibration.save(tmp_path / "calibration.pt"))
    assert torch.equal(loaded.allocations["schedule"], calibration.allocations["schedule"])
    patcher = br.MoERouterPatcher(tiny_model, calibration=loaded)
    for budget in (1.5, 2.0, 4.5):
        patcher.patch("schedule", budget=budget)
        with torch.no_grad():
            tiny_model(input_ids)
        stats = patcher.get_stats()
        assert stats["per_layer_avg_experts"] == pytest.approx(loaded.allocation("schedule", budget), abs=0.2)
        assert stats["avg_experts"] == pytest.approx(budget, abs=0.1)
    patcher.unpatch()
    with pytest.raises(ValueError, match="uses the static schedule"):
        br.MoERouterPatcher(tiny_model).patch("schedule", budget=2.0)


def reference_alloct(probabilities, budget, min_k, max_k):
    """Alloc-T directly: every token's top min_k, then the highest of all tokens' remaining top-max_k slots."""
    ranked = probabilities.sort(-1, descending=True).values[:, :max_k]
    counts = [min_k] * len(ranked)
    pool = sorted(((float(ranked[t, j]), t) for t in range(len(ranked)) for j in range(min_k, max_k)), reverse=True)
    for _, token in pool[: round(budget * len(ranked)) - min_k * len(ranked)]:
        counts[token] += 1
    return counts


def test_alloc_t_shares_a_layers_budget_between_the_tokens_of_a_call():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(40, 64, generator=generator) * torch.linspace(0.5, 4, 40)[:, None]
    for budget, min_k, max_k in ((2.0, 1, 8), (3.3, 1, 6), (1.0, 1, 8), (5.0, 2, 8)):
        routing = br.route_alloct(logits, budget, 1.0, min_k, max_k, False)
        expected = reference_alloct(torch.softmax(logits, -1), budget, min_k, max_k)
        assert routing.expert_counts.tolist() == expected
        assert int(routing.expert_counts.sum()) == round(budget * 40)
        kept = (routing.top_index < 64).sum(-1)
        assert torch.equal(kept, routing.expert_counts)  # the first count slots, the most probable experts


@pytest.fixture(scope="module")
def embedded_logits():
    """The embedded model's router logits on two disjoint slices of held-out text, per layer."""
    model, tokenizer = bx.load_model("embedded")
    ids = tokenizer(bx.load_heldout_text("embedded"), return_tensors="pt").input_ids[0]
    return bx.collect_router_logits(model, ids[:4096]), bx.collect_router_logits(model, ids[8192:12288])


@pytest.mark.parametrize("rule", sorted(ba.MATCHED_RULES))
def test_a_rule_fitted_per_layer_keeps_each_layers_budget_on_fresh_tokens(embedded_logits, rule):
    fitting, fresh = embedded_logits
    calibration = br.fit_routing_calibration(fitting)
    budgets = [1.5, 2.5, 3.0, 2.0][: len(fitting)]
    calibration.allocations = {"schedule": torch.tensor([[1.0] * len(budgets), budgets, [8.0] * len(budgets)])}
    average = sum(budgets) / len(budgets)  # the schedule's second row: these budgets
    config = ba.budget_matched_configs(calibration, fitting, average, 8, rules=(rule,))[0]
    assert config.name == f"{rule}_schedule_b{average:.2f}"
    for layer, (logits, budget) in enumerate(zip(fresh, budgets, strict=True)):
        routing = br.route_logits(config.method, logits, layer, calibration, **config.kwargs)
        assert float(routing.expert_counts.double().mean()) == pytest.approx(budget, rel=0.12), (rule, layer)


@torch.no_grad()
def test_lexi_profile_is_the_blocks_own_perturbation_on_gaussian_inputs(tiny_model):
    patcher = br.MoERouterPatcher(tiny_model, record_statistics=False)
    costs = ba.lexi_perturbations(tiny_model, patcher, tokens=64, iterations=2)
    assert costs.shape == (2, 9) and torch.isinf(costs[:, 0]).all()
    assert costs[:, 8].max() < 1e-3 * costs[:, 1].min()  # the native top-8 perturbs nothing
    assert (costs[:, 1] > costs[:, 4]).all() and (costs[:, 4] > costs[:, 7]).all()
    generator = torch.Generator().manual_seed(0)  # as the profile draws its first input
    x = torch.randn(1, 64, tiny_model.config.hidden_size, generator=generator)
    block = br.find_moe_layers(tiny_model)[0].block
    native = block(x)
    patcher.patch("layerk", budgets=(1.0, 8.0))
    one = block(x)
    patcher.unpatch()
    direct = (one - native).double().norm()
    assert costs[0, 1] == pytest.approx(float(direct), rel=0.5)  # one of the two draws it averages


@pytest.mark.parametrize("rule", sorted(ba.MATCHED_RULES))
def test_a_rule_with_one_value_per_layer_stays_one_when_read_back_from_json(rule):
    """Saved results come back with lists for tuples: the rule keeps its name and series, and top-p with one p
    per layer stays a point to compare, never a point of the top-p curve."""
    (method_name, fixed), name, _, _ = ba.MATCHED_RULES[rule]
    method = br.routing_method(method_name)
    values = (0.1, 0.2, 0.3, 0.4) if rule != "entropy" else (1.0, 2.0, 0.5, 1.5)
    params = method.parameters(br.RouterShape(64), **fixed, **{name: values})
    read_back = json.loads(json.dumps(params))
    assert isinstance(read_back[name], list) and method.series(read_back) == method.series(params)
    assert "per layer" in method.series(read_back) and method.baseline(read_back) is None
    assert method.config_name(**fixed, **{name: list(values)}) == method.config_name(**fixed, **{name: values})


@pytest.mark.parametrize(("family", "overrides"), [("olmoe", {"num_hidden_layers": 4}), ("deepseek_v3", {}),
                                                   ("jamba", {}), ("gpt_oss", {})])  # fmt: skip
def test_an_allocation_evaluated_from_its_first_differing_layer_has_its_whole_forwards_loss(family, overrides):
    model = bx.build_random_moe(family, seed=0, **overrides)
    patcher = br.MoERouterPatcher(model, record_statistics=False)
    native_k, num_layers = patcher.native_top_k, patcher.num_layers
    tokens = torch.randint(2, 500, (80,), generator=torch.Generator().manual_seed(4))  # 5 windows: batches 2, 2, 1
    whole = ba.budget_nll(model, patcher, tokens, window=16, batch_size=2)
    reuse = ba.PrefixReuse(model, patcher, tokens, window=16, batch_size=2)
    layers, holders = ba.decoder_layers(model, [layer.block for layer in br.find_moe_layers(model)])
    base = tuple(1 + layer % native_k for layer in range(num_layers))
    assert reuse.rebase(base) == whole(base)
    for layer in range(num_layers):  # one layer raised, as the greedy schedule's candidates are
        raised = tuple(k + (i == layer) for i, k in enumerate(base))
        before = reuse.computed
        assert reuse.first_computed(raised) == holders[layer] and holders[layer] > 0 or layer == 0
        assert reuse(raised) == whole(raised), (family, raised)  # bit for bit on a CPU
        assert reuse.computed - before == len(layers) - holders[layer]
    lowered = tuple(max(1, k - 1) for k in base)
    assert reuse.rebase(lowered) == whole(lowered) and reuse(base) == whole(base)
    assert all("forward" not in layer.__dict__ for layer in layers)  # every layer's own forward again
    assert reuse(base) != reuse(tuple(native_k for _ in base))  # the allocation is routed, not replayed


def test_the_fit_with_reused_prefixes_is_the_fit_of_whole_forwards_within_its_counted_cost(tiny_model):
    tokens = torch.randint(2, 500, (96,), generator=torch.Generator().manual_seed(5))
    logged = []
    fitted = ba.fit_allocations(tiny_model, tokens, window=32, batch_size=2, log=logged.append)
    patcher = br.MoERouterPatcher(tiny_model, record_statistics=False)
    loss = ba.budget_nll(tiny_model, patcher, tokens, window=32, batch_size=2)
    assert torch.equal(fitted["schedule"], ba.greedy_allocation(loss, 2, 8))
    assert torch.equal(fitted["allocl"], ba.dp_allocation(ba.layer_sensitivities(loss, 2, 8)))
    worth = float(re.search(r"(\d+) evaluations' worth", logged[-1]).group(1))
    assert 0.5 * ba.fit_cost(2, 8) <= worth <= ba.fit_cost(2, 8) + 0.5


def test_an_interrupted_fit_resumes_from_the_losses_it_had_saved(tiny_model, tmp_path, monkeypatch):
    tokens = torch.randint(2, 500, (64,), generator=torch.Generator().manual_seed(6))
    store = bx.ResultStore(tmp_path / "allocations", settings={"tokens": 64})
    whole = ba.fit_allocations(tiny_model, tokens, window=32, batch_size=2, log=lambda line: None)
    computed, own_call = [], ba.PrefixReuse.__call__

    def interrupted_after_20(self, experts):
        if len(computed) == 20:
            raise KeyboardInterrupt  # a lost runtime: nothing of the fit itself is saved
        computed.append(experts)
        return own_call(self, experts)

    monkeypatch.setattr(ba.PrefixReuse, "__call__", interrupted_after_20)
    with pytest.raises(KeyboardInterrupt):
        ba.resumed_allocations(store, tiny_model, tokens, window=32, batch_size=2)
    saved = json.loads(store.path(ba.FIT_PROGRESS).read_text())["evaluations"]
    assert len(saved) == 21 and not store.path("allocations").exists()  # 20 candidates and the first base
    computed.clear()
    monkeypatch.setattr(
        ba.PrefixReuse, "__call__", lambda self, experts: computed.append(experts) or own_call(self, experts)
    )
    resumed = ba.resumed_allocations(store, tiny_model, tokens, window=32, batch_size=2)
    assert all(torch.equal(resumed[name], whole[name]) for name in ba.ALLOCATIONS)  # bit for bit on a CPU
    assert not {tuple(experts) for experts, _ in saved} & set(computed)  # nothing saved was computed again
    assert len(json.loads(store.path(ba.FIT_PROGRESS).read_text())["evaluations"]) == len(saved) + len(computed)
