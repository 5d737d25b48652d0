"""The fused BH routing kernel (fused_bh_route.py) against the torch route it replaces on CUDA
(`bh_routing.route_bh_tensors`): counts equal, weights equal to float32 rounding, the same experts kept, on
random and adversarial logits (ties, a constant row, a huge spread, many relevant experts), under Triton's CPU
interpreter; and the kernel compiled for a T4 (sm75) and an H100 (sm90) without a card."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

INTERPRETER_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import bh_routing as br
from fused_bh_route import fused_bh_route


def adversarial(num_experts, generator):
    rows = [torch.zeros(num_experts), torch.full((num_experts,), 3.25)]  # constant rows: no spread to measure
    tied = torch.randn(num_experts, generator=generator)
    tied[: num_experts // 2] = tied[0]  # half the experts tied, the largest among them or not
    rows += [tied, torch.where(torch.arange(num_experts) % 3 == 0, 5.0, -1.0)]
    planted = torch.randn(num_experts, generator=generator)
    planted[: num_experts // 2] += 30.0  # more relevant experts than the statistic trims
    rows += [planted, torch.randn(num_experts, generator=generator) * 1e12]  # a spread beyond 2**32
    rows += [torch.randn(num_experts, generator=generator) * 1e-6 + 7.0]  # bulk at the rounding of its mean
    floored = torch.full((num_experts,), 7.0)  # a bulk with no spread: the floor alone scales the statistic
    floored[: num_experts // 4] += torch.linspace(0.002, 0.04, num_experts // 4)
    rows += [floored]
    return torch.stack(rows)


def check(logits, alpha, temperature, min_k, max_k, renormalize):
    num_experts = logits.shape[-1]
    critical = br.robust_z_critical_statistics(alpha, num_experts, "cpu")
    expected = br.route_bh_tensors(logits, critical, alpha, temperature, min_k, max_k, "robust_z", renormalize)
    weights, index, counts, nonfinite = fused_bh_route(logits, critical, temperature, min_k, max_k, renormalize,
                                                       br.robust_z_trimmed(num_experts), max_k)
    case = (tuple(logits.shape), logits.dtype, alpha, temperature, min_k, max_k, renormalize)
    assert not nonfinite.any(), case
    assert torch.equal(counts, expected[2]), (case, counts, expected[2])
    assert torch.allclose(weights, expected[0], rtol=1e-5, atol=1e-7), case
    assert torch.equal(index == num_experts, expected[1] == num_experts), case  # the same empty slots
    probabilities = torch.softmax(logits.float() / temperature, -1)
    kept = index < num_experts  # the kept experts' own probabilities (renormalised): no other expert's
    chosen = probabilities.gather(-1, index.clamp_max(num_experts - 1)).where(kept, 0.0)
    if renormalize:
        chosen = chosen / chosen.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    assert torch.allclose(chosen, weights, rtol=1e-5, atol=1e-7), case
    distinct = torch.sort(probabilities, -1, descending=True).values
    untied = (distinct[:, :-1] > distinct[:, 1:])[:, :max_k].all(-1)  # rows whose kept order has no tie
    assert torch.equal(index[untied], expected[1][untied]), case
    return int(counts.sum())


generator = torch.Generator().manual_seed(0)
total = 0
for num_experts, num_tokens in ((64, 37), (8, 5), (60, 9), (128, 6)):
    logits = torch.randn(num_tokens, num_experts, generator=generator) * 2
    logits = torch.cat([logits, adversarial(num_experts, generator)])
    for alpha, temperature, min_k, max_k, renormalize in ((0.05, 1.0, 1, 8, False), (0.2, 0.7, 2, 4, True),
                                                          (0.5, 1.0, 1, num_experts, False), (0.01, 1.3, 3, 3, True)):
        max_k = min(max_k, num_experts)
        min_k = min(min_k, max_k)
        total += check(logits, alpha, temperature, min_k, max_k, renormalize)
        total += check(logits.bfloat16(), alpha, temperature, min_k, max_k, renormalize)
method, shape = br.routing_method("bh"), br.RouterShape(64, 8)
logits = torch.randn(11, 64, generator=generator)
for pvalue_method, fused in (("robust_z", True), ("empirical", True), ("pooled", False), ("one_minus_prob", False)):
    calibration = br.fit_routing_calibration([torch.randn(2048, 64, generator=generator)])
    params = method.parameters(shape, alpha=0.1, max_k=8, pvalue_method=pvalue_method)
    context = br.LayerContext(0, shape, torch.device("cpu"), calibration, 1, fused=True)
    route = method.layer_route(params, context)
    assert (route.func.__name__ == "_fused_bh_layer_route") == fused, pvalue_method  # a method with the kernel
    plain = method.layer_route(params, br.LayerContext(0, shape, torch.device("cpu"), calibration, 1))
    routed, expected = route(logits, None, None), plain(logits, None, None)
    assert torch.equal(routed[2], expected[2]) and torch.allclose(routed[0], expected[0], atol=1e-7), pvalue_method
wide = br.RouterShape(256, 8)  # DeepSeek-V3's 256 experts: beyond the kernel's registers, torch's route
params = method.parameters(wide, alpha=0.1, max_k=8)
route = method.layer_route(params, br.LayerContext(0, wide, torch.device("cpu"), None, 1, fused=True))
assert route.func.__name__ == "_bh_layer_route"
empty = fused_bh_route(torch.zeros(0, 64), br.robust_z_critical_statistics(0.05, 64, "cpu"), 1.0, 1, 8, False, 16, 8)
assert [tuple(t.shape) for t in empty] == [(0, 8), (0, 8), (0,), (0,)]
print("fused route ok", total)
"""

NONFINITE_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import bh_experiment as bx
import bh_routing as br

INF, NAN = float("inf"), float("nan")
generator = torch.Generator().manual_seed(0)
logits = torch.randn(14, 64, generator=generator) * 4
logits[0, 5], logits[1, 7], logits[2, 9] = -INF, INF, NAN  # one logit each; the rest finite
logits[3], logits[4], logits[5, :40] = NAN, -INF, INF  # none finite; 24 finite
logits[6, 3:] = NAN  # 3 finite: fewer than the rule's width
logits[7, 10:20] = torch.linspace(9.0, 12.0, 10)  # experts that stand out, then finite rows 8-13
native_weights, native_index = torch.softmax(logits.nan_to_num(0.0, 0.0, 0.0), -1).topk(8)
model = bx.build_random_olmoe(seed=0)
br.fused_route_supported = lambda device: True  # Triton's interpreter runs the kernel on the CPU


calibration = br.fit_routing_calibration([torch.randn(2048, 64, generator=generator)] * 2)  # the empirical null


def first_layer(spec, fused):  # the first layer's patch of spec, routed by the kernel or torch, and its patcher
    patcher = br.MoERouterPatcher(model, fused_routing=fused, calibration=calibration)
    br.RoutingConfig.parse(spec).apply(patcher)
    return patcher, getattr(patcher.routers[0], br.PATCH_ATTRIBUTE)


for spec in ("bh:alpha=0.2,max_k=8", "bh:alpha=0.05,max_k=8,min_k=2", "bh:alpha=0.1,max_k=4,renormalize=True",
             "bh:alpha=0.3,max_k=16,temperature=0.7", "bh:alpha=0.1,max_k=8,pvalue_method=empirical"):
    patcher, patch = first_layer(spec, fused=False)
    weights, index, counts, nonfinite = patch.routed(patch.route, logits, native_weights, native_index)
    patcher.unpatch()
    patcher, fused = first_layer(spec, fused=True)
    assert fused.route_rules_nonfinite and not patch.route_rules_nonfinite, spec
    mine = fused.routed(fused.route, logits, native_weights, native_index)
    graphed = fused.eager_outputs(fused.route, True, logits, torch.float32, None, None)  # the eager path's form
    patcher.unpatch()
    assert torch.equal(mine[3], nonfinite) and nonfinite.tolist() == [True] * 7 + [False] * 7, spec
    assert torch.equal(mine[2], counts), (spec, mine[2], counts)
    assert torch.allclose(mine[0], weights, rtol=1e-5, atol=1e-7) and torch.isfinite(mine[0]).all(), spec
    decided = torch.isfinite(logits).sum(-1) >= 8  # rows whose kept experts are all finite and untied
    assert torch.equal(mine[1][decided], index[decided]), spec
    assert torch.equal(mine[1] == 64, index == 64), spec  # the same empty slots everywhere
    assert all(torch.equal(a, b) for a, b in zip(graphed[2:], mine[:1] + mine[2:])), spec
print("non-finite rule ok")
"""


def run_check(script: str, interpret: bool, **variables: str) -> subprocess.CompletedProcess:
    site = os.environ.get("BH_TRITON_INTERPRETER_SITE")
    if not site:
        pytest.skip("BH_TRITON_INTERPRETER_SITE not set (make test sets it)")
    env = {**os.environ, "PYTHONPATH": site, **variables}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", script, str(REPO)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_the_fused_route_keeps_the_torch_routes_experts_counts_and_weights_under_the_interpreter():
    result = run_check(INTERPRETER_CHECK, interpret=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fused route ok" in result.stdout


def test_the_fused_route_applies_the_patchers_non_finite_rule_as_its_torch_route_does():
    result = run_check(NONFINITE_CHECK, interpret=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "non-finite rule ok" in result.stdout


def test_the_patcher_refuses_a_fused_route_where_none_runs(tiny_model):
    import bh_routing as br

    assert br.MoERouterPatcher(tiny_model).fused_routing is False  # a CPU: the torch route
    with pytest.raises(ValueError, match=r"fused_routing=True needs routers on CUDA with Triton, got \[device"):
        br.MoERouterPatcher(tiny_model, fused_routing=True)
    with pytest.raises(ValueError, match="fused_routing must be True, False or None, got 'yes'"):
        br.MoERouterPatcher(tiny_model, fused_routing="yes")


COMPILE_CHECK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fused_bh_route as fr

kernel = fr._bh_route_kernel
for logits_type, num_experts in (("fp16", 64), ("bf16", 64), ("fp32", 64), ("bf16", 128), ("fp16", 128)):
    for capability in (75, 90):
        if capability == 75 and logits_type == "bf16":
            continue  # a T4 has no bfloat16: its models run in float16
        pointers = {"logits_ptr": "*" + logits_type, "critical_ptr": "*fp32", "weights_ptr": "*fp32",
                    "index_ptr": "*i64", "counts_ptr": "*i64", "nonfinite_ptr": "*i1"}
        scalars = {"num_rows": "i32", "num_experts": "i32", "temperature": "fp32", "min_k": "i32", "max_k": "i32",
                   "nonfinite_width": "i32"}
        constants = {"TRIMMED": num_experts // 4, "ROOT_EPS": fr.ROOT_EPS, "EXPERTS": num_experts, "SLOTS": 8,
                     "ROWS": fr.ROWS_PER_PROGRAM, "RENORMALIZE": False}
        signature = {name: pointers.get(name) or scalars.get(name) or "constexpr" for name in kernel.arg_names}
        constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
        options = {"num_warps": fr.launch_warps(num_experts)}  # as fused_bh_route launches it
        source = ASTSource(kernel, signature, constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
        assert compiled.asm["cubin"] and f".target sm_{capability}" in compiled.asm["ptx"], (logits_type, capability)
        print("compiled", logits_type, num_experts, f"for capability {capability}", flush=True)
print("compile ok")
"""


def test_the_fused_route_compiles_for_a_t4_and_an_h100_without_spilling_registers():
    # TRITON_DUMP_PTXAS_LOG prints ptxas's report of each compile: registers used and bytes spilled to local
    # memory, which a token's E x E comparisons fill when a program has too few threads for them (compiled
    # afresh: a cached kernel prints no report).
    result = run_check(COMPILE_CHECK, interpret=False, TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = re.findall(r"^compiled .* for capability (\d+)$", result.stdout, flags=re.MULTILINE)
    assert compiled.count("75") == 3 and compiled.count("90") == 5 and "compile ok" in result.stdout
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stdout)
    assert len(spills) == 8 and set(spills) == {("0", "0")}, result.stdout
