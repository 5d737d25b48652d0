"""OLMoERouterPatcher on a small randomly initialised OlmoeForCausalLM (64 experts, top-8)."""

import functools

import pytest
import torch

import bh_experiment
import bh_routing
import variable_k_experts
from bh_routing import OLMoERouterPatcher


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_unpatch_restores_bit_identical_logits(tiny_model, input_ids):
    reference = logits_of(tiny_model, input_ids)
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    router_classes = [type(router) for router in patcher.routers]
    for patch in (
        lambda: patcher.patch_with_bh(alpha=0.05, max_k=8),
        lambda: patcher.patch_with_topp(p=0.5),
        lambda: patcher.patch_with_topk(k=2),
    ):
        patch()
        assert not torch.equal(logits_of(tiny_model, input_ids), reference)
        patcher.unpatch()
        assert torch.equal(logits_of(tiny_model, input_ids), reference)
    patcher.unpatch()  # idempotent
    assert torch.equal(logits_of(tiny_model, input_ids), reference)
    assert [type(router) for router in patcher.routers] == router_classes
    assert all(not hasattr(router, "_moe_patch") and not router._forward_hooks for router in patcher.routers)


def test_patching_again_replaces_and_never_stacks(tiny_model, input_ids):
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_topk(k=2)
    expected = logits_of(tiny_model, input_ids)
    patcher.patch_with_bh(alpha=0.2, max_k=4)
    patcher.patch_with_topk(k=2)
    # One level of patch: each router's class is its own class's patched subclass, never a subclass of that.
    assert all(type(router).__bases__ == (type(router).unpatched_class,) for router in patcher.routers)
    assert all(not router._forward_hooks for router in patcher.routers)
    assert torch.equal(logits_of(tiny_model, input_ids), expected)
    assert patcher.get_stats()["num_tokens"] == input_ids.numel()  # stats reset on re-patch


def test_topk8_and_observe_reproduce_native(tiny_model, input_ids):
    reference = logits_of(tiny_model, input_ids)
    with OLMoERouterPatcher(tiny_model, record_token_counts=True) as patcher:
        patcher.patch_with_topk(k=8)
        assert torch.equal(logits_of(tiny_model, input_ids), reference)
        patcher.observe()
        assert torch.equal(logits_of(tiny_model, input_ids), reference)
        stats = patcher.get_stats()
        assert stats["avg_experts"] == 8 and stats["method"] == "native"
    assert not patcher.is_patched


def test_context_manager_and_exception_leave_model_restorable(tiny_model, input_ids):
    reference = logits_of(tiny_model, input_ids)
    with pytest.raises(RuntimeError, match="boom"):
        with OLMoERouterPatcher(tiny_model, record_token_counts=True) as patcher:
            patcher.patch_with_bh(alpha=0.05, max_k=8)
            logits_of(tiny_model, input_ids)
            raise RuntimeError("boom")
    assert torch.equal(logits_of(tiny_model, input_ids), reference)

    class Failing(bh_routing.TopPMethod):  # routes like top-p, then fails inside the forward pass
        name = "failing"

        def layer_route(self, params, context, compiled=False):
            def route(logits, native_weights, native_index):
                raise RuntimeError("boom inside the forward")

            return route

    bh_routing.register_routing_method(Failing())
    try:
        patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True).patch("failing", p=0.5)
        with pytest.raises(RuntimeError, match="boom inside"):
            logits_of(tiny_model, input_ids)
        patcher.unpatch()
    finally:
        del bh_routing.ROUTING_METHODS["failing"]
    assert torch.equal(logits_of(tiny_model, input_ids), reference)


def count_computed_pairs(model):
    """Hooks counting (a) non-sentinel pairs the experts module receives, (b) rows its MLPs compute."""
    received, computed = [0], [0]
    handles = []
    for layer in model.model.layers:
        experts = layer.mlp.experts

        def pre_hook(module, args):
            received[0] += int((args[1] < module.num_experts).sum())

        handles.append(experts.register_forward_pre_hook(pre_hook))

        def act_pre_hook(module, args):  # eager calls act_fn once per expert on its selected rows
            computed[0] += args[0].shape[0]

        handles.append(experts.act_fn.register_forward_pre_hook(act_pre_hook))
    return received, computed, handles


def test_only_selected_pairs_are_computed(tiny_model, input_ids):
    tiny_model.set_experts_implementation("eager")
    received, computed, handles = count_computed_pairs(tiny_model)
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=16)
    logits_of(tiny_model, input_ids)
    selected = int(patcher.get_stats()["token_counts"].sum())
    assert received[0] == selected and computed[0] == selected
    assert selected < 8 * input_ids.numel() * len(patcher.routers)  # fewer than native top-8 would compute
    assert len(patcher.get_stats()["token_counts"].unique()) > 2  # and the counts vary per token
    patcher.unpatch()
    received[0] = computed[0] = 0
    logits_of(tiny_model, input_ids)
    assert computed[0] == 8 * input_ids.numel() * len(patcher.routers)
    for handle in handles:
        handle.remove()


def test_grouped_mm_path_matches_eager(tiny_model, input_ids):
    assert tiny_model.config._experts_implementation == "grouped_mm"  # transformers' default
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=16)
    grouped = logits_of(tiny_model, input_ids)
    assert patcher.get_stats()["experts_implementation"] == "grouped_mm"
    patcher.unpatch()
    assert tiny_model.config._experts_implementation == "grouped_mm"
    assert all(not experts._is_expert_parallel for experts in patcher.experts)
    tiny_model.set_experts_implementation("eager")
    patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=16)
    torch.testing.assert_close(logits_of(tiny_model, input_ids), grouped, atol=1e-5, rtol=1e-5)


def test_unsupported_experts_path_is_switched_to_eager_and_back(tiny_model, input_ids):
    tiny_model.set_experts_implementation("batched_mm")  # indexes out of range with sentinels
    reference = logits_of(tiny_model, input_ids)
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=8)
    logits_of(tiny_model, input_ids)
    assert patcher.get_stats()["experts_implementation"] == "eager"
    patcher.unpatch()
    assert tiny_model.config._experts_implementation == "batched_mm"
    assert torch.equal(logits_of(tiny_model, input_ids), reference)


def test_stats(tiny_model, input_ids):
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.1, min_k=1, max_k=4)
    logits_of(tiny_model, input_ids)
    stats = patcher.get_stats()
    counts = stats["token_counts"]
    assert counts.shape == (input_ids.numel(), 2)
    assert stats["avg_experts"] == pytest.approx(counts.double().mean().item())
    assert stats["ceiling_hit_rate"] == pytest.approx(100 * (counts == 4).double().mean().item())
    assert stats["floor_hit_rate"] == pytest.approx(100 * (counts == 1).double().mean().item())
    assert stats["per_layer_avg_experts"] == pytest.approx(counts.double().mean(0).tolist())
    utilization = torch.tensor(stats["expert_utilization_per_layer"])
    assert utilization.shape == (2, 64)
    torch.testing.assert_close(utilization.sum(-1), counts.double().mean(0), check_dtype=False)
    assert 0 < stats["expert_utilization"] <= 1 and stats["weight_entropy"] >= 0
    assert stats["params"]["max_k"] == 4 and stats["weights_renormalized"] is False
    patcher.reset_stats()
    with pytest.raises(RuntimeError, match="no tokens"):
        patcher.get_stats()


def test_renormalize_follows_the_model(tiny_model, input_ids):
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    assert patcher.patch_with_bh().params["renormalize"] is False  # OLMoE: norm_topk_prob=false
    assert patcher.patch_with_bh(renormalize=True).params["renormalize"] is True
    patcher.unpatch()
    tiny_model.config.norm_topk_prob = True
    for router in tiny_model.model.layers:
        router.mlp.gate.norm_topk_prob = True
    assert OLMoERouterPatcher(tiny_model, record_token_counts=True).patch_with_topk(4).params["renormalize"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models_and_generation(tiny_model, input_ids, dtype):
    model = tiny_model.to(dtype)
    with OLMoERouterPatcher(model, record_token_counts=True) as patcher:
        patcher.patch_with_bh(alpha=0.05, max_k=8)
        output = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=1)
        assert output.shape == (1, input_ids.shape[1] + 4)
        stats = patcher.get_stats()
        assert stats["num_tokens"] == input_ids.shape[1] + 3  # prompt, then one token per new step
        assert torch.isfinite(torch.tensor(stats["avg_experts"]))


def test_rejects_non_moe_models_and_bad_arguments(tiny_model):
    with pytest.raises(TypeError, match="no mixture-of-experts layer"):
        OLMoERouterPatcher(torch.nn.Linear(4, 4))
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    for call, argument in [
        (lambda: patcher.patch_with_bh(alpha=2.0), "alpha"),
        (lambda: patcher.patch_with_bh(max_k=65), "max_k"),
        (lambda: patcher.patch_with_bh(pvalue_method="x"), "pvalue_method"),
        (lambda: patcher.patch_with_topk(k=0), "k must"),
        (lambda: patcher.patch_with_topp(p=0.0), "p must"),
    ]:
        with pytest.raises(ValueError, match=argument):
            call()
    assert not patcher.is_patched


def test_load_model_from_a_local_directory_and_offline_hub(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = bh_experiment.build_random_olmoe(seed=3)
    vocabulary = {f"w{i}": i for i in range(512)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w1").save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = bh_experiment.load_model(tmp_path, device="cpu")
    ids = tokenizer("w5 w9 w300", return_tensors="pt").input_ids
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids))
    with pytest.raises(RuntimeError, match="embedded"):
        bh_experiment.load_model("allenai/OLMoE-1B-7B-0924", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        bh_experiment.load_model(tmp_path, dtype="float8")


def test_statistics_without_token_counts_give_the_same_summary(tiny_model, input_ids):
    """The count histograms alone give every summary statistic the per-token counts give."""

    def stats_with(record_token_counts):
        with OLMoERouterPatcher(tiny_model, record_token_counts=record_token_counts) as patcher:
            patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=16)
            tiny_model.generate(input_ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=1)
            return patcher.get_stats()

    with_counts, without = stats_with(True), stats_with(False)
    assert "token_counts" not in without and with_counts["token_counts"].shape[0] == with_counts["num_tokens"]
    summary = bh_routing.summarize_expert_counts(with_counts["token_counts"], 0, 16)
    for key, value in summary.items():
        assert without[key] == pytest.approx(value) and with_counts[key] == pytest.approx(value), key
    per_layer = with_counts["token_counts"].double().mean(dim=0).tolist()
    assert without["per_layer_avg_experts"] == pytest.approx(per_layer)
    assert without["expert_utilization_per_layer"] == with_counts["expert_utilization_per_layer"]


def test_old_transformers_is_refused(tiny_model, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(RuntimeError, match="transformers >= 5.24"):
        OLMoERouterPatcher(tiny_model, record_token_counts=True)


def test_sentinel_handling_only_when_counts_can_fall_short(tiny_model, input_ids):
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.05, min_k=8, max_k=8)  # always 8: no sentinel index
    assert not any(e._is_expert_parallel for e in patcher.experts)
    with torch.no_grad():
        tiny_model(input_ids)
    assert patcher.get_stats()["avg_experts"] == 8
    patcher.patch_with_bh(alpha=0.05, min_k=1, max_k=8)
    assert all(e._is_expert_parallel for e in patcher.experts)
    patcher.unpatch()
    assert not any(e._is_expert_parallel for e in patcher.experts)


def test_one_patcher_per_model_and_unpatch_in_any_order(tiny_model, input_ids):
    reference = logits_of(tiny_model, input_ids)
    first, second = OLMoERouterPatcher(tiny_model), OLMoERouterPatcher(tiny_model)
    first.patch_with_bh(alpha=0.1, min_k=1, max_k=8)  # grouped_mm flagged to skip sentinels
    with pytest.raises(RuntimeError, match="already patched by another MoERouterPatcher.*unpatch"):
        second.patch_with_topk(2)
    assert not second.is_patched and first.is_patched
    logits_of(tiny_model, input_ids)
    assert first.get_stats()["method"] == "bh" and first.get_stats()["max_experts"] > 1  # BH ran, not top-2
    for order in ([second, first], [first, second]):
        for patcher in order:
            patcher.unpatch()
        assert torch.equal(logits_of(tiny_model, input_ids), reference)  # no NaN, bit for bit
        assert not any(getattr(e, "_is_expert_parallel", False) for e in first.experts)
        assert tiny_model.config._experts_implementation == "grouped_mm"
        first.patch_with_bh(alpha=0.1, min_k=1, max_k=8)
    first.unpatch()
    second.patch_with_topk(2)  # free once the first let go
    logits_of(tiny_model, input_ids)
    assert second.get_stats()["avg_experts"] == 2
    second.unpatch()


def test_a_patched_model_refuses_another_thread(tiny_model, input_ids):
    import threading

    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.1, max_k=8)
    errors = []

    def other_thread():
        try:
            logits_of(tiny_model, input_ids)
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "patched (method 'bh') in another thread" in errors[0]
    with pytest.raises(RuntimeError, match="no tokens were routed"):
        patcher.get_stats()  # the refused forward recorded nothing
    patcher.unpatch()
    thread = threading.Thread(target=other_thread)  # unpatched, the model is free again
    thread.start()
    thread.join()
    assert len(errors) == 1


def test_too_few_experts_for_robust_z_are_refused_clearly(input_ids):
    model = bh_experiment.build_random_olmoe(num_experts=3, num_experts_per_tok=2)
    patcher = OLMoERouterPatcher(model, record_token_counts=True)
    with pytest.raises(ValueError, match="needs at least 4 experts.*num_experts=3.*one_minus_prob"):
        patcher.patch_with_bh(alpha=0.1, max_k=2)
    with pytest.raises(ValueError, match="needs at least 4 experts"):
        bh_routing.benjamini_hochberg_routing(torch.randn(5, 3), alpha=0.1, max_k=2)
    patcher.patch_with_bh(alpha=0.1, max_k=2, pvalue_method="one_minus_prob")  # the other p-value works
    logits_of(model, input_ids[:, :4] % 3 + 2)
    assert patcher.get_stats()["avg_experts"] == 1
    patcher.unpatch()


def test_load_model_places_weights_on_the_gpu_while_reading_them(monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **{**kwargs, "device_map": None})  # this machine has no GPU

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: pytest.fail("a host copy was moved"))
    bh_experiment.load_model("embedded", device="cuda:0", dtype="bfloat16")
    assert seen["device_map"] == "cuda:0" and seen["dtype"] == torch.bfloat16


@pytest.mark.parametrize(("capability", "dtype"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_auto_dtype_follows_what_the_gpu_computes_natively(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert bh_experiment.native_dtype("cuda") == dtype  # T4 (sm75): float16; A100/H100 (sm80+): bfloat16
    assert bh_experiment.native_dtype("cpu") == torch.float32


def test_a_missing_local_model_directory_is_named(tmp_path):
    for missing in (str(tmp_path / "nope"), "./models/nope", "../nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="not an existing local directory"):
            bh_experiment.load_model(missing, device="cpu")
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        bh_experiment.load_config("./models/nope")
    config = bh_experiment.load_config("embedded")  # the geometry without the weights
    assert (config.num_experts, config.num_experts_per_tok) == (64, 8)
    with pytest.raises(RuntimeError, match="embedded"):
        bh_experiment.load_config(bh_experiment.HUB_MODEL_ID)  # offline: the same message as load_model's
    assert bh_experiment.model_source("allenai/OLMoE-1B-7B-0924") == "hub"
    assert bh_experiment.model_source(bh_experiment.EMBEDDED_MODEL_DIR) == "local"
    assert bh_experiment.model_source("embedded") == "embedded"


def test_statistics_leave_padding_positions_out(tiny_model):
    generator = torch.Generator().manual_seed(5)
    long, short = torch.randint(2, 512, (11,), generator=generator), torch.randint(2, 512, (6,), generator=generator)
    padded = torch.stack([long, torch.cat([short, torch.full((5,), 1)])])  # right-padded with the pad id
    mask = torch.stack([torch.ones(11, dtype=torch.long), torch.cat([torch.ones(6), torch.zeros(5)]).long()])
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.2, min_k=0, max_k=16)

    def stats_of(*calls):
        patcher.reset_stats()
        with torch.no_grad():
            for ids, kwargs in calls:
                tiny_model(ids, **kwargs)
        return patcher.get_stats()

    alone = stats_of((long[None], {}), (short[None], {}))  # no padding at all
    masked = stats_of((padded, {"attention_mask": mask}))
    unmasked = stats_of((padded, {}))
    assert masked["num_tokens"] == alone["num_tokens"] == 17 and unmasked["num_tokens"] == 22
    assert torch.equal(masked["token_counts"], alone["token_counts"])  # the real tokens, in order
    assert masked["avg_experts"] == alone["avg_experts"] != unmasked["avg_experts"]
    assert masked["expert_utilization_per_layer"] == alone["expert_utilization_per_layer"]
    patcher.set_attention_mask(mask)  # for a caller whose forward passes no mask (lm-eval's right padding)
    assert torch.equal(stats_of((padded, {}))["token_counts"], alone["token_counts"])
    patcher.set_attention_mask(None)
    assert stats_of((padded, {}))["num_tokens"] == 22
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, length\]"):
        patcher.set_attention_mask(mask[0])
    patcher.unpatch()


def test_generation_with_a_padded_batch_counts_real_tokens_only(tiny_model):
    prompts = torch.tensor([[1, 1, 7, 8, 9], [3, 4, 5, 6, 7]])  # the first left-padded, as generate wants
    mask = (prompts != 1).long()
    patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.observe()
    tiny_model.generate(prompts, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=1)
    stats = patcher.get_stats()
    assert stats["num_tokens"] == 3 + 5 + 2 * 2  # real prompt tokens, then one token per row and new step
    patcher.unpatch()


@pytest.mark.parametrize(
    "method, params",
    [
        ("bh", {"alpha": 0.2, "min_k": 0, "max_k": 16}),
        ("topk", {"k": 4, "temperature": 2.0}),  # every token keeps K: no counts among its outputs
        ("topk", {"k": 4}),  # in expert space, yet computed from the logits alone: graphed, given no natives
    ],
)
def test_cuda_graphed_routes_give_the_plain_routes_outputs_and_statistics(tiny_model, method, params):
    # On the CPU CudaGraphed calls its function directly: this checks what the patcher passes to the graph
    # and how it records what comes out (a GPU replays the same function: benchmarks/gpu_checks.py).
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 512, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    results = []
    for cuda_graphs in (False, True):
        patcher = OLMoERouterPatcher(tiny_model, record_token_counts=True, cuda_graphs=cuda_graphs)
        patcher.patch(method, **params)
        patches = [getattr(router, bh_routing.PATCH_ATTRIBUTE) for router in patcher.routers]
        assert not any(patch.reads_native for patch in patches)  # a graph copies the logits alone
        routes = [patch.eager_route for patch in patches]
        assert all(isinstance(route, variable_k_experts.CudaGraphed) == cuda_graphs for route in routes)
        with torch.no_grad():
            logits = tiny_model(ids, attention_mask=mask).logits
        results.append((logits, patcher.get_stats()))
        patcher.unpatch()
    (plain_logits, plain), (graphed_logits, stats) = results
    assert torch.equal(plain_logits, graphed_logits)
    assert torch.equal(plain["token_counts"], stats["token_counts"]) and stats["num_tokens"] == 15
    for name in ("avg_experts", "weight_entropy", "expert_utilization_per_layer"):
        assert stats[name] == plain[name]


def _router_first_two(logits, native_weights, native_index):
    return native_weights[..., :2], native_index[..., :2], None


class SlicesTwo(bh_routing.RoutingMethod):
    """The router's first two slots, sliced from its output: a method in expert space that reads it."""

    name = "slices_two"

    def parameters(self, shape):
        return {"temperature": 1.0, "min_k": 2, "max_k": 2, "renormalize": False}

    def route(self, logits, params, with_stats=False):
        return bh_routing.route_topk(logits, 2, 1.0, False)

    def in_expert_space(self, params, shape):
        return True

    def layer_route(self, params, context, compiled=False):
        return functools.partial(_router_first_two)

    def config_name(self):
        return "slices_two"


def test_a_route_that_slices_the_routers_output_is_given_it_and_not_graphed(tiny_model, input_ids):
    bh_routing.register_routing_method(SlicesTwo())
    try:
        patcher = OLMoERouterPatcher(tiny_model, cuda_graphs=True)
        with torch.no_grad():
            patcher.patch_with_topk(k=2)
            expected = tiny_model(input_ids).logits
            patcher.patch("slices_two")
            patches = [getattr(router, bh_routing.PATCH_ATTRIBUTE) for router in patcher.routers]
            assert all(patch.reads_native for patch in patches)
            assert not any(isinstance(patch.eager_route, variable_k_experts.CudaGraphed) for patch in patches)
            assert torch.equal(tiny_model(input_ids).logits, expected)  # the router's slots, as top-2 computes them
        patcher.unpatch()
    finally:
        del bh_routing.ROUTING_METHODS["slices_two"]


def test_unpatch_drops_the_routes_cuda_graphs_at_once(tiny_model):
    # A patch can outlive its unpatch in a reference cycle until the garbage collector runs; its graphs must
    # not, or a sweep's earlier configurations hold GPU memory (run 56 ran out of it under a 15 GiB cap).
    patcher = OLMoERouterPatcher(tiny_model, cuda_graphs=True).patch("bh", alpha=0.1)
    routes = [getattr(router, bh_routing.PATCH_ATTRIBUTE).eager_route for router in patcher.routers]
    for route in routes:
        route.graphs[("a captured shape",)] = ("graph", [], ())  # what a capture on a GPU leaves
    patcher.patch("bh", alpha=0.2)  # a new patch unpatches the old one first
    assert all(route.graphs == {} for route in routes)
    fresh = [getattr(router, bh_routing.PATCH_ATTRIBUTE).eager_route for router in patcher.routers]
    for route in fresh:
        route.graphs[("a captured shape",)] = ("graph", [], ())
    patcher.unpatch()
    assert all(route.graphs == {} for route in fresh)


def test_a_graphed_shape_is_captured_at_its_third_call_so_a_prefill_seen_once_is_not():
    graphed = variable_k_experts.CudaGraphed(lambda logits: (logits,))
    assert [graphed.captures("a decode shape") for _ in range(3)] == [False, False, True]  # then replayed
    assert [graphed.captures("a prompt's shape") for _ in range(2)] == [False, False]
    graphed.release()  # a new patch counts afresh
    assert [graphed.captures("a prompt's shape") for _ in range(3)] == [False, False, True]
