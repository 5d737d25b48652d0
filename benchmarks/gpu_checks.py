"""GPU correctness checks for the patcher (run on a CUDA machine; prints one line per check).

1. The sentinel-padded BH routing (min_k = 0: some tokens keep no expert) through this repository's
   variable-k path (the patcher's default on CUDA) and through transformers' grouped_mm path (flagged
   expert-parallel by the patcher) gives the same logits as through the eager path, prefill and decode,
   in bf16.
2. Restoring: after unpatch the model's logits are bit-identical to before patching.
3. CUDA-graph routing (the patcher's default on CUDA) and torch.compile give the same counts as plain.
4. The methods that read per-layer tables (BH and HC with fitted nulls, dynamic skipping with the median
   beta, entropy k, top-k at a per-layer budget), patched with CUDA graphs and compilation, keep in every
   layer the counts that `route_logits` gives for that layer's logits, and decode like the plain patcher.
5. The decode form of the variable-k path (`variable_k_experts_decode`, at most DECODE_PAIRS pairs) and the
   grouped form, on OLMoE-1B-7B's expert shape in bf16, against a float64 computation of the same inputs.
6. Every MoE family of `bh_experiment.TINY_MOE_CONFIGS` in bf16 on CUDA, with the patcher's defaults there
   (CUDA-graph and compiled routing): native top-k bit-identical, BH's counts equal to `route_logits` on the
   selection logits each layer saw, the variable-k path against the family's own experts path, and the
   model restored bit for bit.
"""

import copy
import sys
from pathlib import Path

import torch
from common import relative_error, strengthen_experts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bh_experiment  # noqa: E402
import bh_routing  # noqa: E402 - importable only once the repository root is on sys.path
import variable_k_experts  # noqa: E402
from bh_routing import OLMoERouterPatcher  # noqa: E402

IMPLEMENTATIONS = ("variable_k", "grouped_mm", "eager")


def patch_bh(patcher: OLMoERouterPatcher) -> None:
    """The routing every check uses: BH that may keep no expert (min_k = 0), so sentinels occur."""
    patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=16)


def patcher_on(model, implementation: str) -> OLMoERouterPatcher:
    """A patcher whose experts run `implementation`: "variable_k" (this repository's path) or a transformers one."""
    if implementation == "variable_k":
        return OLMoERouterPatcher(model, experts_path="variable_k", record_token_counts=True)
    model.set_experts_implementation(implementation)
    return OLMoERouterPatcher(model, experts_path="model", record_token_counts=True)


def patched_logits(model, input_ids, implementation: str, patch) -> tuple[OLMoERouterPatcher, torch.Tensor]:
    """Patch the model (left patched) with `patch` on `implementation` and return its prefill logits."""
    patcher = patcher_on(model, implementation)
    patch(patcher)
    with torch.no_grad():
        logits = model(input_ids).logits.float()
    return patcher, logits


def patched_runs(model, input_ids) -> dict:
    """Per experts implementation: patched prefill logits, greedy generation and routing statistics."""
    results = {}
    for implementation in IMPLEMENTATIONS:
        patcher, logits = patched_logits(model, input_ids, implementation, patch_bh)
        generated = model.generate(input_ids[:2], max_new_tokens=8, do_sample=False, pad_token_id=1)
        stats = patcher.get_stats()
        results[implementation] = (logits, generated, stats)
        patcher.unpatch()
        print(
            f"{implementation}: experts path used {stats['experts_implementation']}, avg experts "
            f"{stats['avg_experts']:.3f}, distinct counts {stats['token_counts'].unique().tolist()}"
        )
    return results


def check_against_float32(model, input_ids) -> None:
    """bf16 paths round differently, which moves some BH decisions near their threshold; a float32 copy of
    the model (eager experts) is the reference each bf16 path is measured against."""
    reference_model = copy.deepcopy(model).float()
    reference_model.set_experts_implementation("eager")
    reference_patcher = OLMoERouterPatcher(reference_model, experts_path="model", record_token_counts=True)
    for name, patch in (("BH", patch_bh), ("top-4", lambda p: p.patch_with_topk(k=4))):
        patch(reference_patcher)
        with torch.no_grad():
            fp32 = reference_model(input_ids).logits.float()
        errors = []
        for implementation in IMPLEMENTATIONS:
            patcher, logits = patched_logits(model, input_ids, implementation, patch)
            patcher.unpatch()
            errors.append(f"{implementation} {relative_error(logits, fp32):.2e}")
        reference_patcher.unpatch()
        print(f"{name}: bf16 logits against the float32 model, relative error: {', '.join(errors)}")


def compare_with_eager(results: dict) -> None:
    eager = results["eager"]
    for implementation in ("variable_k", "grouped_mm"):
        other = results[implementation]
        relative = relative_error(other[0], eager[0])
        print(
            f"{implementation} vs eager patched prefill logits: relative error {relative:.2e}; "
            f"generated tokens identical: {torch.equal(other[1], eager[1])}; "
            f"counts identical: {torch.equal(other[2]['token_counts'], eager[2]['token_counts'])}"
        )


def check_graphs_and_compile(model, input_ids) -> None:
    """CUDA-graph and compiled routing against plain: prefill counts (the same prompt until its graph replays),
    and decode generations (one token per step replays the same graph)."""
    model.set_experts_implementation("grouped_mm")
    plain = OLMoERouterPatcher(model, cuda_graphs=False, record_token_counts=True)
    graphed = OLMoERouterPatcher(model, record_token_counts=True)  # default: CUDA graphs
    compiled = OLMoERouterPatcher(model, compile_routing=True, record_token_counts=True)
    counts = []
    for candidate in (plain, graphed, compiled):
        patch_bh(candidate)
        with torch.no_grad():
            for _ in range(variable_k_experts.CAPTURE_AT_CALL + 1):  # captured at the last but one, then replayed
                model(input_ids)
        counts.append(candidate.get_stats()["token_counts"])
        candidate.unpatch()
    print(
        f"CUDA-graph routing gives the same counts as plain: {torch.equal(counts[0], counts[1])}; "
        f"compiled + CUDA graph: {torch.equal(counts[0], counts[2])}"
    )
    generations = []
    for candidate in (plain, graphed):
        patch_bh(candidate)
        generations.append(model.generate(input_ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=1))
        candidate.unpatch()
    print(f"CUDA-graph decode generations identical to plain: {torch.equal(generations[0], generations[1])}")


FITTED = ["bh:pvalue_method=empirical,alpha=0.1", "bh:pvalue_method=pooled,alpha=0.1", "hc:beta=0.3",
          "hc:beta=0.3,pvalue_method=empirical", "skip:beta=median", "entropy:max_k=8"]  # fmt: skip


def layer_counts_agree(model, patcher, config, input_ids) -> float:
    """Share of (token, layer) counts of the patched forward equal to `route_logits` on that layer's logits."""
    config.apply(patcher)
    kept = bh_experiment.collect_router_logits(model, input_ids.flatten(), input_ids.shape[1], input_ids.shape[0])
    counts = patcher.get_stats()["token_counts"]  # [T, L] on the CPU
    patcher.unpatch()
    route = [bh_routing.route_logits(config.method, kept[layer].cuda(), layer, patcher.calibration, **config.kwargs)
             for layer in range(len(kept))]  # fmt: skip
    expected = torch.stack([r.expert_counts.cpu() for r in route], dim=1)
    return (counts == expected).double().mean().item()


def check_fitted_methods(model, input_ids) -> None:
    """Check 4, on a calibration fitted to other random tokens of the same model."""
    other = torch.randint(2, 512, (4096,), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    calibration = bh_routing.fit_routing_calibration(bh_experiment.collect_router_logits(model, other, 256))
    # CUDA graphs and compiled routing on
    graphed = OLMoERouterPatcher(model, calibration=calibration, record_token_counts=True)
    configs = [bh_routing.RoutingConfig.parse(spec) for spec in FITTED]
    configs.append(bh_routing.RoutingConfig.of("layerk", budgets=(1.5, 2.25, 3.0, 4.75)))
    for config in configs:
        share = layer_counts_agree(model, graphed, config, input_ids)
        print(f"{config.name}: per-layer counts equal to route_logits for {100 * share:.3f}% of decisions")
    options = {"cuda_graphs": False, "compile_routing": False, "record_token_counts": True}
    plain = OLMoERouterPatcher(model, calibration=calibration, **options)
    generations = []
    for candidate in (plain, graphed):
        configs[0].apply(candidate)
        generations.append(model.generate(input_ids[:1], max_new_tokens=12, do_sample=False, pad_token_id=1))
        candidate.unpatch()
    print(f"{configs[0].name}: graphed decode identical to plain: {torch.equal(generations[0], generations[1])}")


def sharpened_family(family: str):
    """A tiny random instance of `family` in bf16 on CUDA with routers sharpened, so that BH's counts vary."""
    model = bh_experiment.build_random_moe(family, seed=0, device="cuda", dtype=torch.bfloat16)
    generator = torch.Generator("cuda").manual_seed(3)
    with torch.no_grad():
        for layer in bh_routing.find_moe_layers(model):
            sharpness = 4 if layer.spec.score == "sigmoid" else 40
            rows = torch.rand(layer.router.weight.shape[0], 1, device="cuda", generator=generator) * sharpness
            layer.router.weight.mul_(rows.to(layer.router.weight.dtype))
    return model


def check_family(family: str, input_ids) -> None:
    """Check 5 for one family (one printed line)."""
    model = sharpened_family(family)
    with torch.no_grad():
        reference = model(input_ids).logits
    patcher = OLMoERouterPatcher(model, record_token_counts=True)  # the defaults on CUDA
    patcher.patch("topk")
    with torch.no_grad():
        native_identical = torch.equal(model(input_ids).logits, reference)
    config = bh_routing.RoutingConfig.of("bh", alpha=0.2, max_k=patcher.native_top_k)
    share = layer_counts_agree(model, patcher, config, input_ids)
    logits = {}
    for path in ("variable_k", "model"):
        with OLMoERouterPatcher(model, experts_path=path, record_token_counts=True) as other:
            config.apply(other)
            with torch.no_grad():
                logits[path] = model(input_ids).logits.float()
    with torch.no_grad():
        restored = torch.equal(model(input_ids).logits, reference)
    paths = relative_error(logits["variable_k"], logits["model"])
    print(
        f"{family} ({patcher.spec.describe()}): native top-k identical {native_identical}, BH counts equal to "
        f"route_logits {100 * share:.3f}%, variable_k vs model path {paths:.4f}, restored {restored}"
    )


def check_decode_kernels() -> None:
    """Both forms of the fused variable-k path on the OLMoE-1B-7B expert shape (64 experts, H 2048, I 1024),
    bf16, for decode-sized inputs with sentinel slots, against float64 (relative error of the [T, H] output)."""
    generator = torch.Generator("cuda").manual_seed(0)
    gate_up = (torch.randn(64, 2048, 2048, device="cuda", generator=generator) / 45).bfloat16()
    down = (torch.randn(64, 2048, 1024, device="cuda", generator=generator) / 32).bfloat16()
    for num_tokens, slots in ((1, 8), (2, 8), (6, 2), (3, 1)):
        logits = torch.randn(num_tokens, 64, device="cuda", generator=generator)
        weights, index = torch.softmax(logits, -1).topk(slots)
        index[0, slots // 2 :] = 64  # sentinel slots
        hidden = torch.randn(num_tokens, 2048, device="cuda", generator=generator).bfloat16()
        expected = torch.zeros(num_tokens, 2048, device="cuda", dtype=torch.float64)
        for token, slot in (index < 64).nonzero().tolist():
            expert = int(index[token, slot])
            gate, up = (gate_up[expert].double() @ hidden[token].double()).chunk(2)
            activated = torch.nn.functional.silu(gate) * up
            expected[token] += weights[token, slot].double() * (down[expert].double() @ activated)
        forms = {"decode": variable_k_experts.variable_k_experts_decode(hidden, index, weights, gate_up, down)}
        saved, variable_k_experts.DECODE_PAIRS = (
            variable_k_experts.DECODE_PAIRS,
            0,
        )  # the grouped form, below its threshold
        forms["grouped"] = variable_k_experts.variable_k_experts_triton(hidden, index, weights, gate_up, down)
        variable_k_experts.DECODE_PAIRS = saved
        errors = ", ".join(f"{name} {relative_error(out.double(), expected):.2e}" for name, out in forms.items())
        print(f"variable-k decode/grouped forms, {num_tokens} tokens x {slots} slots, against float64: {errors}")


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    model = bh_experiment.build_random_olmoe(
        None, seed=0, device="cuda", dtype=torch.bfloat16, num_hidden_layers=4, hidden_size=256, intermediate_size=128
    )
    strengthen_experts(model)
    input_ids = torch.randint(2, 512, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids).logits
    print(f"patcher default experts path on CUDA bf16: {OLMoERouterPatcher(model).experts_path}")
    results = patched_runs(model, input_ids)
    check_against_float32(model, input_ids)
    compare_with_eager(results)
    check_graphs_and_compile(model, input_ids)
    check_fitted_methods(model, input_ids)
    with torch.no_grad():
        restored = model(input_ids).logits
    print(f"unpatched logits bit-identical to before patching: {torch.equal(restored, reference)}")
    check_decode_kernels()
    for family in bh_experiment.TINY_MOE_CONFIGS:
        check_family(family, input_ids)


if __name__ == "__main__":
    main()
