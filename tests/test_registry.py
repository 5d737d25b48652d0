"""The registry of routing methods, configuration naming, and the routing statistics against a reference."""

import math
import weakref

import pytest
import torch

import bh_experiment as bx
import bh_routing as br
import routing_statistics as rs


def test_design_names_come_from_the_registry():
    assert br.RoutingConfig.of("bh", alpha=0.05, max_k=8, min_k=1, pvalue_method="robust_z").name == "bh_k8_a005"
    assert br.RoutingConfig.of("bh", alpha=0.2, max_k=64).name == "bh_k64_a020"
    assert br.RoutingConfig.of("bh", alpha=0.01, max_k=8, pvalue_method="one_minus_prob").name == "bh1mp_k8_a001"
    assert br.RoutingConfig.of("bh", alpha=0.2, max_k=8, min_k=4).name == "bh_k8_a020_min4"
    assert br.RoutingConfig.of("native", k=8).name == "topk_8_baseline"
    assert br.RoutingConfig.of("topk", k=3).name == "topk_k3"
    assert br.RoutingConfig.of("topp", p=0.5, min_k=1, max_k=8).name == "topp_p050_max8"
    assert (
        br.RoutingConfig.of("bh", alpha=0.05, max_k=8, temperature=2.0, renormalize=True).name == "bh_k8_a005_t2_renorm"
    )
    with pytest.raises(ValueError, match="method must be one of"):
        br.RoutingConfig.of("magic")


def test_names_are_unique_and_bad_parameters_are_named():
    names = {br.RoutingConfig.of("bh", alpha=a, max_k=8).name for a in (0.001, 0.004, 0.01, 0.015, 0.02, 0.2)}
    assert len(names) == 6 and "bh_k8_a0p001" in names and "bh_k8_a020" in names
    with pytest.raises(ValueError, match=r"'bh' takes the parameters \['alpha', .*got unknown \['k'\]"):
        br.RoutingConfig.of("bh", k=8)
    with pytest.raises(ValueError, match="needs \\['k'\\]"):
        br.RoutingConfig.of("topk")


def test_patch_by_name_equals_the_named_methods(tiny_model, input_ids):
    patcher = br.OLMoERouterPatcher(tiny_model)
    for method, params, named in [
        ("bh", {"alpha": 0.1, "max_k": 8}, lambda: patcher.patch_with_bh(alpha=0.1, max_k=8)),
        ("topp", {"p": 0.4, "max_k": 8}, lambda: patcher.patch_with_topp(p=0.4, max_k=8)),
        ("topk", {"k": 3}, lambda: patcher.patch_with_topk(k=3)),
    ]:
        patcher.patch(method, **params)
        with torch.no_grad():
            by_name = tiny_model(input_ids).logits
        named_params = named().params
        with torch.no_grad():
            assert torch.equal(tiny_model(input_ids).logits, by_name)
        assert patcher.params == named_params and patcher.method == method
    patcher.unpatch()
    with pytest.raises(ValueError, match="method must be one of"):
        patcher.patch("magic")
    with pytest.raises(ValueError, match="got unknown \\['p'\\]"):
        patcher.patch("topk", p=0.5)
    assert not patcher.is_patched


class KeepTwo(br.RoutingMethod):
    """A toy method: the two most probable experts, as top-k with k = 2, registered in one place."""

    name = "keep_two"

    def parameters(self, shape, temperature=1.0):
        return {"temperature": temperature, "min_k": 2, "max_k": 2, "renormalize": False}

    def route(self, logits, params, with_stats=False):
        return br.route_topk(logits, 2, params["temperature"], False)

    def config_name(self, temperature=1.0):
        return "keep_two"


def test_a_registered_method_is_known_everywhere(tiny_model, input_ids):
    br.register_routing_method(KeepTwo())
    try:
        config = br.RoutingConfig.of("keep_two")
        patcher = br.OLMoERouterPatcher(tiny_model)
        with torch.no_grad():
            patcher.patch_with_topk(k=2)
            expected = tiny_model(input_ids).logits
            config.apply(patcher)
            assert torch.equal(tiny_model(input_ids).logits, expected)
        assert patcher.get_stats()["avg_experts"] == 2 and patcher.method == "keep_two"
        _, experts, counts = br.topk_routing(torch.randn(3, 64), k=2)
        quality = {
            "topk_k1": {
                "name": "topk_k1",
                "method": "topk",
                "status": "ok",
                "avg_experts": 1.0,
                "perplexity": 40.0,
                "params": {},
            },
            "topk_k4": {
                "name": "topk_k4",
                "method": "topk",
                "status": "ok",
                "avg_experts": 4.0,
                "perplexity": 20.0,
                "params": {},
            },
            "keep_two": {
                "name": "keep_two",
                "method": "keep_two",
                "status": "ok",
                "avg_experts": 2.0,
                "perplexity": 25.0,
                "params": {},
            },
        }
        row = bx.frontier_table(quality).set_index("config").loc["keep_two"]
        assert row["series"] == "keep_two" and row["topk_perplexity_at_equal_experts"] == pytest.approx(
            40 ** (2 / 3) * 20 ** (1 / 3)
        )
    finally:
        del br.ROUTING_METHODS["keep_two"]


class PlainZ(br.PValueMethod):
    """A toy p-value, added in this one class: each logit standardised by the token's mean and standard deviation
    over all E (no trimming), against the layer's null fitted on calibration logits with the token-specific
    signal removed."""

    name, code, fitted = "plain_z", "pz", True

    def fit(self, logits, generator):
        return br.NullTable.from_sample(self.statistics(None, br.permute_experts(logits, generator)))

    def statistics(self, logits, scaled_logits, top_logits=None):
        mean, std = scaled_logits.mean(-1, keepdim=True), scaled_logits.std(-1, keepdim=True)
        return (scaled_logits - mean) / std


def test_a_registered_pvalue_method_is_known_everywhere(tiny_model, input_ids):
    br.register_pvalue_method(PlainZ())
    try:
        generator = torch.Generator().manual_seed(3)
        calibration_logits = [torch.randn(500, 64, generator=generator) * 2 for _ in range(2)]
        calibration = br.fit_routing_calibration(calibration_logits)
        assert list(calibration.nulls) == ["empirical", "pooled", "plain_z"]  # fitted, in registry order
        null = calibration.null("plain_z", 1)
        logits = torch.randn(40, 64, generator=generator) * 2
        logits[:, :3] += 6  # a few relevant experts
        p_values = br.compute_p_values(logits, "plain_z", null=null)
        counts = br.route_logits("bh", logits, 1, calibration, alpha=0.1, min_k=0, max_k=64, pvalue_method="plain_z")
        assert torch.equal(counts.expert_counts, br.bh_reject(p_values, 0.1).sum(-1))  # the procedure as stated
        assert counts.expert_counts.float().mean() > 1
        assert br.RoutingConfig.of("bh", alpha=0.1, max_k=8, pvalue_method="plain_z").name == "bhpz_k8_a010"
        assert br.RoutingConfig.of("hc", beta=0.3, pvalue_method="plain_z").name == "hcpz_b030"
        patcher = br.MoERouterPatcher(tiny_model, calibration=calibration, record_token_counts=True)
        with pytest.raises(ValueError, match="uses the layer's fitted 'plain_z' null: give a RoutingCalibration"):
            br.MoERouterPatcher(tiny_model).patch("bh", pvalue_method="plain_z")
        for method in ("bh", "hc"):
            patcher.patch(method, pvalue_method="plain_z", max_k=8)
            with torch.no_grad():
                tiny_model(input_ids)
            assert 1 <= patcher.get_stats()["avg_experts"] <= 8
        patcher.unpatch()
    finally:
        del br.PVALUE_METHODS["plain_z"]
    with pytest.raises(ValueError, match="pvalue_method must be one of"):
        br.compute_p_values(logits, "plain_z")


def reference_statistics(records, num_experts):
    """The statistics of a list of (weights [T, K], index [T, K], counts [T] or None) per layer, directly."""
    token_counts, selections, entropy, decisions = [], [], 0.0, 0
    for layer_records in records:
        counts = torch.cat([c if c is not None else torch.full((i.shape[0],), i.shape[1]) for _, i, c in layer_records])
        token_counts.append(counts)
        index = torch.cat([i for _, i, _ in layer_records]).flatten()
        selections.append(torch.bincount(index, minlength=num_experts + 1)[:num_experts].double())
        for weights, _, _ in layer_records:
            for row in weights.double():
                shares = row / row.sum()
                entropy -= sum(float(s * math.log(s)) for s in shares if s > 0)
                decisions += 1
    return torch.stack(token_counts, 1), torch.stack(selections), entropy / decisions


@pytest.mark.parametrize("max_pending", [1, 3, 1000])
def test_routing_statistics_equal_a_direct_computation(max_pending):
    generator = torch.Generator().manual_seed(0)
    records = [[], []]
    for layer in range(2):
        for num_tokens in (5, 1, 1, 7):
            logits = torch.randn(num_tokens, 64, generator=generator) * 3
            if layer == 0:  # BH: counts vary, sentinels in the unused slots
                records[layer].append(br.route_bh_tensors(logits, None, 0.2, 1.0, 0, 6, "robust_z", False))
            else:  # top-k: every slot kept, no counts passed
                routing = br.route_topk(logits, 6, 1.0, False)
                records[layer].append((routing.top_weights, routing.top_index, None))
    statistics = rs.RoutingStatistics(num_layers=2, num_experts=64, record_token_counts=True)
    statistics.max_pending = max_pending  # eager calls folded in batches, or one at a time
    for layer, layer_records in enumerate(records):
        for weights, index, counts in layer_records:
            if weights.shape[0] == 7:  # a call with a batch dimension: [1, T, K], [1, T]
                weights, index, counts = weights[None], index[None], None if counts is None else counts[None]
            statistics.record(layer, weights, index, counts)
    token_counts, selections, entropy = reference_statistics(records, 64)
    summary = statistics.summary(min_k=0, max_k=6, baseline_k=8)
    assert torch.equal(summary["token_counts"], token_counts) and statistics.num_tokens == 14
    assert torch.equal(statistics.selections(), selections)
    assert summary["weight_entropy"] == pytest.approx(entropy)
    assert summary["avg_experts"] == pytest.approx(token_counts.double().mean().item())
    counts = token_counts.double()
    assert summary["std_experts"] == pytest.approx(counts.std(unbiased=False).item())
    assert summary["median_experts"] == counts.quantile(0.5).item()
    assert (summary["min_experts"], summary["max_experts"]) == (counts.min().item(), counts.max().item())
    assert summary["ceiling_hit_rate"] == pytest.approx(100 * (counts == 6).double().mean().item())
    assert summary["floor_hit_rate"] == pytest.approx(100 * (counts == 0).double().mean().item())
    torch.testing.assert_close(
        torch.tensor(summary["expert_utilization_per_layer"], dtype=torch.float64), selections / 14
    )
    without_counts = rs.RoutingStatistics(num_layers=2, num_experts=64, record_token_counts=False)
    for layer, layer_records in enumerate(records):
        for weights, index, counts in layer_records:
            without_counts.record(layer, weights, index, counts)
    assert without_counts.summary(0, 6, 8)["avg_experts"] == pytest.approx(summary["avg_experts"])
    with pytest.raises(RuntimeError, match="record_token_counts"):
        without_counts.token_counts()


@pytest.mark.parametrize("max_pending", [1, 3, 1000])
def test_masked_records_equal_the_statistics_of_the_kept_rows(max_pending):
    generator = torch.Generator().manual_seed(1)
    kept_records = [[], []]
    statistics = rs.RoutingStatistics(num_layers=2, num_experts=64, record_token_counts=True)
    statistics.max_pending = max_pending
    for num_tokens, masked in ((5, True), (1, False), (4, True), (7, False)):
        keep = torch.rand(num_tokens, generator=generator) < 0.6 if masked else None
        for layer in range(2):
            logits = torch.randn(num_tokens, 64, generator=generator) * 3
            weights, index, counts = br.route_bh_tensors(logits, None, 0.2, 1.0, 0, 6, "robust_z", False)
            statistics.record(layer, weights, index, counts, keep=keep)
            rows = slice(None) if keep is None else keep
            kept_records[layer].append((weights[rows], index[rows], counts[rows]))
    token_counts, selections, entropy = reference_statistics(kept_records, 64)
    summary = statistics.summary(min_k=0, max_k=6, baseline_k=8)
    assert statistics.num_tokens == token_counts.shape[0] < 17
    assert torch.equal(summary["token_counts"], token_counts) and torch.equal(statistics.selections(), selections)
    assert summary["weight_entropy"] == pytest.approx(entropy)


def test_eager_calls_are_folded_once_they_hold_max_pending_rows():
    """Pending calls are kept until max_pending calls or max_pending_rows rows: an eager evaluation's long
    windows are not all held until the next read."""
    statistics = rs.RoutingStatistics(num_layers=1, num_experts=8)
    statistics.max_pending_rows = 10
    index, alive = torch.zeros(4, 2, dtype=torch.long), []
    for call in range(3):  # 4 rows a call: 8 rows after two calls, 12 after the third
        weights = torch.ones(4, 2)
        alive.append(weakref.ref(weights))
        statistics.record(0, weights, index)
        del weights
        assert [ref() is not None for ref in alive] == [call < 2] * (call + 1)
    assert statistics.num_tokens == 12 and statistics.selections()[0, 0] == 24


@pytest.mark.parametrize("max_pending", [1, 3, 1000])
def test_non_finite_rows_read_from_the_logits_at_the_fold_equal_those_given(max_pending):
    """An observed router's calls give their logits, whose non-finite rows the fold reads: the same counts as
    calls that give the rows, alone or mixed with them."""
    generator = torch.Generator().manual_seed(2)
    logits = [torch.randn(rows, 8, generator=generator) for rows in (3, 1, 5, 2)]
    logits[0][1, 2], logits[2][4, 0], logits[3][0, 5] = math.nan, math.inf, -math.inf
    by_rows, by_logits, mixed = (rs.RoutingStatistics(1, 8) for _ in range(3))
    for statistics in (by_rows, by_logits, mixed):
        statistics.max_pending = max_pending
    for call, call_logits in enumerate(logits):
        weights, index = call_logits.softmax(-1).topk(2)
        by_rows.record(0, weights, index, nonfinite=rs.nonfinite_rows(call_logits))
        by_logits.record(0, weights, index, router_logits=call_logits)
        given = {"router_logits": call_logits} if call % 2 else {"nonfinite": rs.nonfinite_rows(call_logits)}
        mixed.record(0, weights, index, **given)
    assert [s.num_tokens for s in (by_rows, by_logits, mixed)] == [11, 11, 11]  # every call folded
    assert [int(s.layers[0].nonfinite) for s in (by_rows, by_logits, mixed)] == [3, 3, 3]


def test_token_counts_ring_keeps_the_last_rows_in_order():
    statistics = rs.RoutingStatistics(num_layers=1, num_experts=8, record_token_counts=True, token_capacity=5)
    all_counts = []
    for step in range(4):  # 3 rows per call: 12 rows through a ring of 5
        counts = torch.tensor([step, (step + 1) % 4, 2])
        index = torch.where(torch.arange(4)[None] < counts[:, None], torch.arange(4)[None], 8)
        statistics.record(0, torch.ones(3, 4), index, counts)
        all_counts.append(counts)
    with pytest.warns(UserWarning, match="keep the last 5"):
        kept = statistics.token_counts()
    assert torch.equal(kept[:, 0], torch.cat(all_counts)[-5:])
    assert statistics.num_tokens == 12 and statistics.histograms()[0, :5].tolist() == [2, 2, 6, 2, 0]
    statistics.reset()
    with pytest.raises(RuntimeError, match="no tokens were routed"):
        statistics.token_counts()
    with pytest.raises(ValueError, match="token_capacity"):
        rs.RoutingStatistics(1, 8, token_capacity=0)
