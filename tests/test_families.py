"""One patcher for the transformers MoE families that share OLMoE's router/experts contract: tiny random
instances of each family (`bh_experiment.TINY_MOE_CONFIGS`), built offline on the CPU."""

import functools

import pytest
import torch

import bh_experiment as bx
import bh_routing as br
import variable_k_experts as vk

FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v2_greedy", "deepseek_v3",
            "granitemoe", "gpt_oss", "jamba", "glm4_moe", "dots1")  # fmt: skip
VARIANTS = {"deepseek_v2_greedy": ("deepseek_v2", {"topk_method": "greedy"})}  # (model_type, config overrides)
# How each family routes (the acceptance list's semantics), and the shared experts it always computes.
EXPECTED = {
    "olmoe": ("softmax", False, 1.0, None, 0),
    "mixtral": ("softmax", True, 1.0, None, 0),
    "qwen2_moe": ("softmax", False, 1.0, None, 1),
    "qwen3_moe": ("softmax", True, 1.0, None, 0),
    "deepseek_v2": ("softmax", False, 1.5, (4, 2, "max"), 2),
    "deepseek_v2_greedy": ("softmax", False, 1.5, None, 2),
    "deepseek_v3": ("sigmoid", True, 2.5, (4, 2, "top2sum"), 1),
    "granitemoe": ("softmax_kept", True, 1.0, None, 0),
    "gpt_oss": ("softmax_kept", True, 1.0, None, 0),
    "jamba": ("softmax", False, 1.0, None, 0),
    "glm4_moe": ("sigmoid", True, 1.0, (4, 2, "top2sum"), 1),
    "dots1": ("sigmoid", False, 1.0, (4, 2, "top2sum"), 1),
}


@functools.cache
def _model(family: str, implementation: str = "eager"):
    """The family's tiny instance with sharpened routers (a random router is nearly uniform, so every
    method would keep a fixed count) and, for the sigmoid families, a non-zero score-correction bias. Sigmoid
    scores saturate, so their routers are sharpened less."""
    model_type, overrides = VARIANTS.get(family, (family, {}))
    model = bx.build_random_moe(model_type, seed=0, **overrides)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in br.find_moe_layers(model):
            sharpness = 4 if layer.spec.score == "sigmoid" else 40
            layer.router.weight.mul_(torch.rand(layer.router.weight.shape[0], 1, generator=generator) * sharpness)
            if hasattr(layer.router, "e_score_correction_bias"):
                layer.router.e_score_correction_bias.copy_(
                    0.1 * torch.randn(layer.spec.num_experts, generator=generator)
                )
    model.set_experts_implementation(implementation)
    return model


def _ids(batch=2, length=9, seed=1):
    return torch.randint(2, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_recognised_with_its_own_semantics(family):
    layers = br.find_moe_layers(_model(family))
    score, renormalize, scale, groups, shared = EXPECTED[family]
    assert len(layers) == 2
    for layer in layers:
        spec = layer.spec
        assert (spec.score, spec.renormalize, spec.scale, spec.groups) == (score, renormalize, scale, groups)
        assert layer.shared_experts == shared


@pytest.mark.parametrize("family", FAMILIES)
def test_the_spec_reproduces_the_router_on_fresh_inputs(family):
    """RouterSpec.native, from the router's logits alone, gives the router's experts and weights."""
    for layer in br.find_moe_layers(_model(family)):
        hidden = torch.randn(64, layer.router.weight.shape[1], generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            logits, weights, index = layer.router(hidden)[:3]
        ours_weights, ours_index = layer.spec.native(logits)
        order, ours_order = index.argsort(-1), ours_index.argsort(-1)
        assert torch.equal(index.gather(-1, order), ours_index.gather(-1, ours_order))
        torch.testing.assert_close(
            ours_weights.to(weights.dtype).gather(-1, ours_order), weights.gather(-1, order), rtol=1e-6, atol=1e-7
        )
        # What a compiled forward's statistics read instead of the router's weights: the same shares.
        relative = layer.spec.relative_weights(logits, index)
        shares = weights.float() / weights.float().sum(-1, keepdim=True)
        torch.testing.assert_close(relative / relative.sum(-1, keepdim=True), shares, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_native_topk_is_bit_identical_and_unpatch_restores(family, implementation):
    model, ids = _model(family, implementation), _ids()
    expected = _logits(model, ids)
    with br.MoERouterPatcher(model, record_token_counts=True) as patcher:
        patcher.patch("topk")
        assert torch.equal(_logits(model, ids), expected)
        patcher.patch("bh", alpha=0.2, max_k=patcher.native_top_k)
        assert not torch.equal(_logits(model, ids), expected)
    assert torch.equal(_logits(model, ids), expected)
    assert model.config._experts_implementation == implementation


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_below_the_native_k_is_the_family_router_at_that_k(family):
    """An independent reference: the family's own router with its top_k lowered. Top-k at k < native k
    through the patcher (the spec's selection, groups and weighting) must give the same model output."""
    model, ids = _model(family), _ids()
    layers = br.find_moe_layers(model)
    k = layers[0].spec.top_k - 1
    for layer in layers:
        layer.router.top_k = k
    try:
        expected = _logits(model, ids)
    finally:
        for layer in layers:
            layer.router.top_k = k + 1
    with br.MoERouterPatcher(model, record_token_counts=True) as patcher:
        patcher.patch("topk", k=k)
        torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def _kept_pairs_recorder(monkeypatch):
    """Record how many rows (kept (token, expert) pairs) each grouped GEMM of the variable-k path computes."""
    computed = []
    real = vk.grouped_matmul

    def recording(rows, weights, offsets, grouped=None):
        computed.append(int(offsets[-1]))
        return real(rows, weights, offsets, grouped)

    monkeypatch.setattr(vk, "grouped_matmul", recording)
    return computed


@pytest.mark.parametrize("method, params", [("bh", {"alpha": 0.2}), ("topp", {"p": 0.45})])
@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_methods_keep_variable_counts_and_compute_exactly_the_kept_pairs(family, method, params, monkeypatch):
    model, ids = _model(family), _ids(batch=3, length=11)
    # the family's own experts path (eager skipping sentinels)
    with br.MoERouterPatcher(model, record_token_counts=True) as patcher:
        patcher.patch(method, max_k=patcher.native_top_k, **params)
        expected = _logits(model, ids)
        counts = patcher.get_stats()["token_counts"]
    assert counts.min() < counts.max()  # variable per token
    computed = _kept_pairs_recorder(monkeypatch)
    with br.MoERouterPatcher(model, experts_path=vk.VARIABLE_K_EXPERTS, record_token_counts=True) as patcher:
        patcher.patch(method, max_k=patcher.native_top_k, **params)
        actual = _logits(model, ids)
        assert torch.equal(patcher.get_stats()["token_counts"], counts)
    # Two grouped GEMMs per layer (up, down), each over exactly the kept pairs of that layer.
    assert computed == [int(c) for c in counts.sum(0) for _ in range(2)]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)  # the variable-k path serves the layout


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2", "deepseek_v3", "mixtral"])
def test_shared_experts_are_counted_apart_from_routed_ones(family):
    model = _model(family)
    shared = EXPECTED[family][4]
    with br.MoERouterPatcher(model, record_token_counts=True) as patcher:
        patcher.patch("bh", alpha=0.2, max_k=patcher.native_top_k)
        _logits(model, _ids())
        stats = patcher.get_stats()
    assert stats["shared_experts_per_layer"] == [shared, shared]
    assert stats["avg_active_experts"] == pytest.approx(stats["avg_experts"] + shared)
    # reduction against the native top-k counts routed experts only
    assert stats["reduction_vs_baseline"] == pytest.approx(100 * (1 - stats["avg_experts"] / patcher.native_top_k))


def test_gpt_oss_eager_experts_cannot_skip_the_sentinel_so_grouped_mm_runs_while_patched():
    model = _model("gpt_oss", "eager")
    assert not vk.eager_skips_sentinels(br.find_moe_layers(model)[0].experts)
    assert vk.eager_skips_sentinels(br.find_moe_layers(_model("mixtral"))[0].experts)
    with br.MoERouterPatcher(model, record_token_counts=True) as patcher:
        patcher.patch("bh", alpha=0.2, max_k=2)
        _logits(model, _ids())
        assert patcher.get_stats()["experts_implementation"] == "grouped_mm"
        assert all(layer.experts._is_expert_parallel for layer in patcher.layers)
    assert model.config._experts_implementation == "eager"
    assert not any(layer.experts._is_expert_parallel for layer in br.find_moe_layers(model))


@pytest.mark.parametrize("family", ["deepseek_v3", "granitemoe"])
def test_fitted_methods_route_the_selection_logits_the_calibration_saw(family):
    """collect_router_logits gives the logits the methods route (a group-limited family's selectable
    experts), so a calibration fitted on them drives the patcher exactly as route_logits."""
    model, ids = _model(family), _ids(batch=1, length=96, seed=4)
    collected = bx.collect_router_logits(model, ids[0], window=32, batch_size=3)
    patcher = br.MoERouterPatcher(model, record_token_counts=True)
    assert collected[0].shape == (96, patcher.shape.num_experts)
    patcher.calibration = br.fit_routing_calibration(collected)
    params = dict(alpha=0.2, max_k=patcher.native_top_k, pvalue_method="empirical")
    with patcher:
        patcher.patch("bh", **params)
        seen = bx.collect_router_logits(model, ids[0], window=32, batch_size=3)  # under the patch's routing
        counts = patcher.get_stats()["token_counts"]
    for layer, logits in enumerate(seen):
        expected = br.route_logits("bh", logits, layer, patcher.calibration, num_experts_per_tok=patcher.native_top_k,
                                   **params).expert_counts  # fmt: skip
        assert torch.equal(counts[:, layer], expected)


def test_models_outside_the_contract_get_a_clear_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **bx.TINY_MOE_BASE))
    with pytest.raises(TypeError, match="LlamaForCausalLM cannot be patched: it has no mixture-of-experts layer"):
        br.MoERouterPatcher(llama)
    phimoe = AutoConfig.for_model("phimoe", **bx.TINY_MOE_BASE, num_local_experts=8, num_experts_per_tok=2)
    with pytest.raises(TypeError, match="PhimoeTopKRouter's routing is none of the supported families"):
        br.MoERouterPatcher(AutoModelForCausalLM.from_config(phimoe))
    assert br.OLMoERouterPatcher is br.MoERouterPatcher


@pytest.mark.parametrize(
    "model_type, fields",
    [
        ("dbrx", dict(d_model=64, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=128,
                      attn_config=dict(kv_n_heads=4, rope_theta=10000),
                      ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=32))),
        ("llama4_text", dict(bx.TINY_MOE_BASE, intermediate_size_mlp=64, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=1, interleave_moe_layer_step=1)),
    ],
)  # fmt: skip
def test_experts_outside_the_experts_interface_are_refused_naming_them(model_type, fields):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    with pytest.raises(TypeError, match=r"Experts\)'.* not dispatched by transformers' experts interface"):
        br.MoERouterPatcher(model, record_token_counts=True)


def test_configurations_scale_with_the_family_shape():
    assert br.moe_shape(_model("mixtral").config) == (8, 2, 8)
    assert br.moe_shape(_model("deepseek_v3").config) == (16, 4, 8)  # 2 of 4 groups selectable
    assert br.moe_shape(_model("olmoe").config) == (64, 8, 64)
    patcher = br.MoERouterPatcher(_model("deepseek_v3"), record_token_counts=True)
    assert patcher.shape.num_experts == 8
    with pytest.raises(ValueError, match=r"max_k must be in \[1, num_experts=8\]"):
        patcher.patch("bh", max_k=16)
    with pytest.raises(TypeError, match="no mixture-of-experts model"):
        br.moe_shape(bx.load_config("embedded").__class__.__base__())
    with pytest.raises(ValueError, match="model_type must be one of"):
        bx.build_random_moe("llama")
