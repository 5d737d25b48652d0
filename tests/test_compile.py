"""The patched routing under torch.compile on the CPU (issue 10): every method's layer route traces as one
graph (fullgraph=True), the statistics updated inside compiled graphs equal a plain computation, and a
static-cache generate compiled whole (as transformers compiles it on a GPU) gives the eager path's tokens
and per-token counts, and the model back bit for bit after unpatch."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CompileConfig

import bh_allocation  # noqa: F401 - registers the allocation methods compiled below
import bh_experiment as bx
import bh_routing as br
import routing_statistics as rs
import variable_k_experts as vk

# Every registered method, with the calibrated tables where it reads them.
LAYER_ROUTES = [
    "bh:alpha=0.2,max_k=8",
    "bh:alpha=0.05,max_k=8,min_k=2",
    "bh:pvalue_method=one_minus_prob,max_k=8",
    "bh:pvalue_method=empirical,alpha=0.2,max_k=8",
    "bh:pvalue_method=pooled,max_k=8",
    "topk:k=4",
    "topp:p=0.5,max_k=8",
    "hc:beta=0.3,max_k=8",
    "hc:beta=0.3,max_k=8,pvalue_method=empirical",
    "skip:beta=median",
    "entropy:max_k=4",
]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def calibration(tiny_model):
    token_ids = torch.randint(0, tiny_model.config.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    calibration = br.fit_routing_calibration(bx.collect_router_logits(tiny_model, token_ids, window=100))
    calibration.allocations = {"schedule": torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 2.0], [8.0, 8.0]])}
    return calibration


def eager_and_compiled(model, calibration, method_name: str, given: dict, logits):
    """(layer, eager outputs, outputs of the route compiled as one graph) of each layer's route on `logits`."""
    patcher = br.MoERouterPatcher(model, calibration=calibration)
    method = br.routing_method(method_name)
    params = method.parameters(patcher.shape, **given)
    patcher.params = params
    native_weights, native_index = torch.softmax(logits, -1).topk(8)
    for layer, context in enumerate(patcher.contexts()):
        route = method.layer_route(params, context)
        expected = route(logits, native_weights, native_index)
        compiled = torch.compile(route, fullgraph=True, backend="eager")
        yield layer, expected, compiled(logits, native_weights, native_index)


@pytest.mark.parametrize("spec", LAYER_ROUTES)
def test_every_layer_route_compiles_as_one_graph_and_routes_as_eager(tiny_model, calibration, spec):
    config = br.RoutingConfig.parse(spec)
    logits = torch.randn(13, 64, generator=torch.Generator().manual_seed(1)) * 4
    for layer, expected, actual in eager_and_compiled(tiny_model, calibration, config.method, config.kwargs, logits):
        for mine, theirs in zip(actual, expected, strict=True):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), (spec, layer)


PER_LAYER_ROUTES = [  # the tiny model's 2 MoE layers, one value each; the schedule is the calibration fixture's
    ("bh", {"alpha": (0.05, 0.2), "max_k": 8}),
    ("topp", {"p": (0.3, 0.6), "max_k": 8}),
    ("skip", {"beta": (0.2, 0.5)}),
    ("entropy", {"bands": (2.0, 5.0)}),
    ("layerk", {"budgets": (1.5, 3.0)}),
    ("schedule", {"budget": 2.5}),
    ("alloct", {"budget": 2.5}),
]


@pytest.mark.parametrize(("method_name", "given"), PER_LAYER_ROUTES, ids=[name for name, _ in PER_LAYER_ROUTES])
def test_per_layer_and_allocated_routes_compile_as_one_graph_and_route_as_eager(
    tiny_model, calibration, method_name, given
):
    logits = torch.randn(13, 64, generator=torch.Generator().manual_seed(1)) * 4
    for layer, expected, actual in eager_and_compiled(tiny_model, calibration, method_name, given, logits):
        for mine, theirs in zip(actual, expected, strict=True):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs), (method_name, layer)


# Non-finite logits never reach a layer route: the patched router routes such rows by one rule on every path
# (tests/test_reliability.py, `PatchedRouter.routed`).


def reference(records, num_experts):
    """Histogram, selections, entropy sum and decisions of (weights, index, counts, keep) records, directly."""
    histogram, selections = torch.zeros(num_experts + 1, dtype=torch.int64), torch.zeros(num_experts + 1)
    entropy, decisions, kept_counts = 0.0, 0, []
    for weights, index, counts, keep in records:
        rows = keep if keep is not None else torch.ones(index.shape[0], dtype=torch.bool)
        counts = counts if counts is not None else torch.full((index.shape[0],), index.shape[1])
        histogram += torch.bincount(counts[rows], minlength=num_experts + 1)
        selections += torch.bincount(index[rows].flatten(), minlength=num_experts + 1)
        shares = weights[rows].double() / weights[rows].double().sum(-1, keepdim=True).clamp_min(1e-30)  # 0 kept: 0
        entropy -= torch.xlogy(shares, shares).sum().item()
        decisions += int(rows.sum())
        kept_counts.append(torch.where(rows, counts, -1))
    return histogram, selections, entropy, decisions, torch.cat(kept_counts)


def test_statistics_updated_in_a_compiled_graph_equal_a_plain_computation():
    accumulators = rs.LayerAccumulators(64, "cpu", token_capacity=64)
    compiled = torch.compile(rs.accumulate_routing, fullgraph=True, backend="inductor")
    generator = torch.Generator().manual_seed(2)
    records = []
    for num_tokens, masked in ((7, False), (5, True), (9, True), (1, False)):
        logits = torch.randn(num_tokens, 64, generator=generator) * 3
        weights, index, counts = br.route_bh_tensors(logits, None, 0.2, 1.0, 0, 6, "robust_z", False)
        keep = torch.rand(num_tokens, generator=generator) < 0.6 if masked else None
        records.append((weights, index, counts, keep))
        compiled(accumulators, weights, index, counts, keep)
    histogram, selections, entropy, decisions, counts = reference(records, 64)
    assert torch.equal(accumulators.histogram.long(), histogram)  # float64 counts: integers, exactly
    assert torch.equal(accumulators.selections.double(), selections)
    assert accumulators.entropy_sum.item() == pytest.approx(entropy, rel=1e-6)  # float32 entropies, float64 sum
    assert int(accumulators.decisions) == decisions and int(accumulators.written) == counts.numel()
    assert torch.equal(accumulators.token_counts[: counts.numel()].long(), counts)
    # Without token counts a layer's statistics are one tensor: a compiled decode step guards on each one.
    assert len(rs.LayerAccumulators(64, "cpu", token_capacity=None).tensors()) == 1


def test_several_layers_fold_in_with_one_scatter_add_per_eight_as_each_would_alone():
    statistics = rs.RoutingStatistics(11, 64)
    statistics.allocate_layers(["cpu"] * 11)
    [(counters, layers)] = statistics.groups  # one device: the layers' counters are rows of one tensor
    assert layers == list(range(11))
    assert all(statistics.layers[i].counters.data_ptr() == counters[i].data_ptr() for i in layers)
    generator = torch.Generator().manual_seed(7)
    keep = torch.rand(9, generator=generator) < 0.7
    routings, alone = {}, []
    for layer in layers:
        logits = torch.randn(9, 64, generator=generator) * 3
        weights, index, counts = br.route_bh_tensors(logits, None, 0.2, 1.0, 0, 6, "robust_z", False)
        nonfinite = torch.rand(9, generator=generator) < 0.2  # rows the patcher routed by its non-finite rule
        routings[layer] = (weights, index, counts, keep, nonfinite)
        alone.append(rs.LayerAccumulators(64, "cpu", token_capacity=None))
        rs.accumulate_sums(alone[-1], weights, index, counts, keep, nonfinite)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(statistics.accumulate_step, backend=backend, fullgraph=True)(routings)
    scatter_adds = [node for node in graphs[0].graph.nodes if "index_add" in str(node.target)]
    assert len(scatter_adds) == 2  # layers 0-7, then 8-10 (inductor fuses a concatenation of up to 8 inputs)
    statistics.accumulate_step({0: routings[0], 2: routings[2]})  # not every layer routed: folded one by one
    for accumulators, routing in zip((alone[0], alone[2]), (routings[0], routings[2]), strict=True):
        rs.accumulate_sums(accumulators, *routing)
    for layer in layers:
        mine, theirs = statistics.layers[layer], alone[layer]
        assert torch.equal(mine.selections, theirs.selections) and torch.equal(mine.histogram, theirs.histogram)
        assert torch.equal(mine.decisions, theirs.decisions) and torch.equal(mine.nonfinite, theirs.nonfinite)
        assert mine.entropy_sum.item() == pytest.approx(theirs.entropy_sum.item(), rel=1e-12)
    kept = int(keep.sum())
    assert [int(statistics.layers[layer].decisions) for layer in layers] == [2 * kept, kept, 2 * kept] + [kept] * 8


def test_a_compiled_forward_folds_every_layers_statistics_in_with_one_scatter_add(tiny_model):
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    input_ids = torch.randint(2, 512, (2, 6), generator=torch.Generator().manual_seed(8))
    with br.MoERouterPatcher(tiny_model) as patcher:
        patcher.patch_with_bh(alpha=0.2, max_k=8)
        with torch.no_grad():
            tiny_model(input_ids)
            eager = patcher.get_stats()
            patcher.reset_stats()
            torch.compile(tiny_model, backend=backend, fullgraph=True)(input_ids)
        compiled = patcher.get_stats()
    scatter_adds = [node for node in graphs[0].graph.nodes if "index_add" in str(node.target)]
    assert len(graphs) == 1 and len(scatter_adds) == 1  # one for both layers, not one per layer
    assert compiled["expert_utilization_per_layer"] == eager["expert_utilization_per_layer"]
    assert compiled["avg_experts"] == eager["avg_experts"] and compiled["num_tokens"] == input_ids.numel()


def generate(model, input_ids, compiled: bool):
    """Greedy generation of 6 tokens: dynamic cache and eager, or a static cache and the forward compiled
    whole with fullgraph=True (inductor, as generate does on a GPU)."""
    settings = {}
    if compiled:
        config = CompileConfig(fullgraph=True, mode="default")
        config._compile_all_devices = True  # generate compiles on GPUs only, unless asked
        settings = {"cache_implementation": "static", "compile_config": config}
    return model.generate(input_ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=1, **settings)


def test_compiled_static_generate_routes_and_counts_as_eager_and_unpatches_bit_for_bit(tiny_model):
    # With dynamo's default settings (no guards on module hooks, which every compiled model would pay for):
    # the routers' patched class is what makes each patch compile its own graph and unpatch find native's.
    assert torch._dynamo.config.skip_nnmodule_hook_guards
    input_ids = torch.randint(2, 512, (1, 9), generator=torch.Generator().manual_seed(3))
    native = generate(tiny_model, input_ids, compiled=True)
    with torch.no_grad():
        native_logits = tiny_model(input_ids).logits
    with br.MoERouterPatcher(tiny_model, record_token_counts=True) as patcher:
        for patch in (lambda: patcher.patch_with_topk(8), lambda: patcher.patch_with_bh(alpha=0.2, max_k=8)):
            patch()
            eager_tokens = generate(tiny_model, input_ids, compiled=False)
            eager = patcher.get_stats()
            patcher.reset_stats()
            compiled_tokens = generate(tiny_model, input_ids, compiled=True)
            compiled = patcher.get_stats()
            assert torch.equal(compiled_tokens, eager_tokens), patcher.method
            assert torch.equal(compiled["token_counts"], eager["token_counts"]), patcher.method
            assert compiled["weight_entropy"] == pytest.approx(eager["weight_entropy"], rel=1e-5)
            assert compiled["expert_utilization_per_layer"] == eager["expert_utilization_per_layer"]
        assert eager["token_counts"].double().std() > 0  # BH kept varying counts
    assert torch._dynamo.config.skip_nnmodule_hook_guards  # the patcher left dynamo's settings alone
    assert torch.equal(generate(tiny_model, input_ids, compiled=True), native)
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids).logits, native_logits)


def test_a_copy_made_after_a_compiled_generate_routes_its_decode_steps_by_its_own_patch(tiny_model):
    # transformers keeps a model's compiled forward on it (`_compiled_call`), which copy.deepcopy shares:
    # unchecked, a patched copy's compiled decode steps ran the original's native routers (gpu_notes run 64).
    import copy

    input_ids = torch.randint(2, 512, (1, 5), generator=torch.Generator().manual_seed(6))
    generate(tiny_model, input_ids, compiled=True)
    twin = copy.deepcopy(tiny_model)
    assert twin._compiled_call is tiny_model._compiled_call  # what deepcopy does, and why the patcher looks
    assert not br.drop_copied_compiled_call(tiny_model)  # the original's own compiled call is kept
    with br.MoERouterPatcher(twin) as patcher:
        patcher.patch_with_topk(2)
        assert not hasattr(twin, "_compiled_call")  # dropped at patch: generate compiles the copy's own
        eager = generate(twin, input_ids, compiled=False)
        patcher.reset_stats()
        assert torch.equal(generate(twin, input_ids, compiled=True), eager)
        assert patcher.get_stats()["num_tokens"] == 5 + 5  # the prompt, then every decode step but the last
        assert twin._compiled_call.__wrapped__.__self__ is twin
    assert not br.drop_copied_compiled_call(twin)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_generate

    assert not any(hasattr(made, "_compiled_call") for made in bench_generate.model_copies(tiny_model, 2))


def dynamo_lookups(model, input_ids) -> int:
    """How many times dynamo looks up compiled code (evaluates guards) in a compiled generate."""
    from torch.profiler import ProfilerActivity, profile

    generate(model, input_ids, compiled=True)  # compiled first: the profile sees only lookups
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        generate(model, input_ids, compiled=True)
    return sum(event.count for event in profiler.key_averages() if event.key == "TorchDynamo Cache Lookup")


def test_a_patched_compiled_decode_step_makes_one_dynamo_lookup_as_native_does(tiny_model):
    # Hooks on the module a compiled call starts from split it into two frames: two guard evaluations per
    # step (about 0.4 ms each on the OLMoE-1B-7B shape, gpu_notes run 34), more than fewer experts save.
    input_ids = torch.randint(2, 512, (1, 5), generator=torch.Generator().manual_seed(5))
    native = dynamo_lookups(tiny_model, input_ids)
    with br.MoERouterPatcher(tiny_model) as patcher:
        for patch in (lambda: patcher.patch_with_topk(8), lambda: patcher.patch_with_bh(alpha=0.2, max_k=8)):
            patch()
            assert dynamo_lookups(tiny_model, input_ids) == native == 5, patcher.method  # one per decode step


def test_top_k_at_the_native_k_generates_the_native_tokens_on_both_paths(tiny_model):
    input_ids = torch.randint(2, 512, (2, 7), generator=torch.Generator().manual_seed(4))
    for compiled in (False, True):
        native = generate(tiny_model, input_ids, compiled)
        with br.MoERouterPatcher(tiny_model, experts_path=vk.VARIABLE_K_EXPERTS) as patcher:
            patcher.patch_with_topk(8)
            assert torch.equal(generate(tiny_model, input_ids, compiled), native)
            assert patcher.get_stats()["avg_experts"] == 8


def test_statistics_of_the_native_routing_leave_a_compiled_bf16_model_bit_for_bit_native():
    # A second reader of the router's weights made inductor store them rounded to bf16 before the experts
    # read them (native's graph computes them inside the experts' kernel): logits off in the last bits from
    # the first compiled decode step, greedy tokens off where two logits nearly tie (batch 16 on a GPU).
    model = bx.build_random_olmoe(seed=0, num_hidden_layers=4).to(torch.bfloat16)
    input_ids = torch.randint(2, 512, (16, 9), generator=torch.Generator().manual_seed(3))
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    settings = {"cache_implementation": "static", "compile_config": config, "max_new_tokens": 3,
                "min_new_tokens": 3, "do_sample": False, "pad_token_id": 1, "return_dict_in_generate": True,
                "output_logits": True}  # fmt: skip
    native = model.generate(input_ids, **settings).logits
    with br.MoERouterPatcher(model) as patcher:
        for patch in (lambda: patcher.patch_with_topk(8), patcher.observe):
            patch()
            logits = model.generate(input_ids, **settings).logits
            assert all(map(torch.equal, logits, native)), patcher.method
            assert patcher.get_stats()["avg_experts"] == 8 and patcher.get_stats()["weight_entropy"] > 0


def test_generation_settings_name_the_paths():
    assert bx.generation_settings("dynamic") == {}
    assert bx.generation_settings("static", 40) == {
        "cache_implementation": "static",
        "max_cache_len": 40,
        "disable_compile": True,
    }
    assert bx.generation_settings("static_compiled", 40, "cpu")["compile_config"]._compile_all_devices
    assert "compile_config" not in bx.generation_settings("static_compiled", 40, "cuda")  # generate's own
    assert bx.fastest_generation_path("cpu") == "dynamic" and bx.fastest_generation_path("cuda:0") == "static_compiled"
    with pytest.raises(ValueError, match=r"path must be one of \['dynamic', 'static', 'static_compiled'\]"):
        bx.generation_settings("compiled")


def test_the_generation_benchmark_runs_on_the_cpu_and_resumes(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_generate.py"
    out = tmp_path / "generate.json"
    command = [sys.executable, str(script), "--model", "embedded", "--device", "cpu", "--paths", "dynamic", "static",
               "--batch-sizes", "2", "--configs", "native", "topk_k8", "bh_k8_a005_nostats", "--new-tokens", "3",
               "--prompt-tokens", "5", "--repeats", "2", "--check-counts", "2", "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    rows, checks = json.loads(out.read_text())["rows"], json.loads(out.read_text())["checks"]
    # The compiled decode decisions, replayed eagerly on the logits they routed, and whole generates.
    counts = checks["b2/counts"]
    assert counts["routing"] == {"decisions": 4 * 2 * 31, "different": 0, "equal": True}  # 4 layers, 31 steps
    assert counts["routing_experts"]["equal"] and counts["generation_vs_dynamic"]["decisions"] == 4 * 2 * (5 + 31)
    assert counts["routing_torch_route"] == counts["routing"]  # no fused kernel on a CPU: torch's route is the route
    assert all(
        counts[f"{key}_{path}"]["equal"]
        for key in ("generation_vs", "native_sets_vs")
        for path in ("dynamic", "static")
    )
    assert len(rows) == 12 and {row["batch"] for row in rows.values()} == {2}
    assert {row["mode"] for row in rows.values()} == {"copies", "switching"}  # both by default
    for path in ("dynamic", "static"):  # one model, configurations patched in turn: the notebook's flow
        native, top8 = rows[f"switching/{path}/b2/native"], rows[f"switching/{path}/b2/topk_k8"]
        assert top8["same_tokens_as_native"] and top8["unpatched_bit_identical"] and native["ratio_to_native"] == 1.0
        assert len(top8["seconds_per_round"]) == len(top8["steady_seconds_per_round"]) == 2
        assert top8["switch_penalty"] == pytest.approx(
            statistics.median(
                a / b for a, b in zip(top8["seconds_per_round"], top8["steady_seconds_per_round"], strict=True)
            )
        )
        assert not rows[f"switching/{path}/b2/bh_k8_a005_nostats"]["same_tokens_as_native"]  # its routing ran
        for mode in ("switching/", ""):  # the reference generate's statistics counted the prompt and each step
            assert rows[f"{mode}{path}/b2/topk_k8"]["routed_positions"] == 2 * (5 + 3 - 1)
            assert rows[f"{mode}{path}/b2/topk_k8"]["every_position_routed"] is True
            assert rows[f"{mode}{path}/b2/bh_k8_a005_nostats"]["every_position_routed"] is None
        assert len(top8["first_token_seconds_per_round"]) == 2 and 0 < top8["first_token_ms"]  # own switch
        assert 0 < top8["decode_step_ms"] < 1000 * max(top8["seconds_per_round"])
    for path in ("dynamic", "static"):
        native, top8 = rows[f"{path}/b2/native"], rows[f"{path}/b2/topk_k8"]
        assert top8["tokens"] == native["tokens"] and top8["same_tokens_as_native"] and top8["unpatched_bit_identical"]
        assert native["ratio_to_native"] == native["ratio_to_native_min"] == 1.0 and native["timing_repeats"] == 2
        assert top8["ratio_to_native_min"] <= top8["ratio_to_native"] <= top8["ratio_to_native_max"]
        assert top8["ratio_to_native_ci95"] == [top8["ratio_to_native_min"], top8["ratio_to_native_max"]]  # n = 2
        assert len(top8["seconds_per_round"]) == len(top8["first_token_seconds_per_round"]) == 2
        bh = rows[f"{path}/b2/bh_k8_a005_nostats"]
        assert bh["experts_implementation"] is None and bh["unpatched_bit_identical"]  # no statistics read
        assert bh["avg_experts"] is None and bh["hbm_floor_tokens_per_second"] is None  # no twin: not the router's k
        assert not bh["same_tokens_as_native"]  # its own routing ran: the copies share no compiled graph
        assert bh["device_ms_per_token"] is None and 0 < bh["decode_step_ms"] < bh["first_token_ms"] + 1e3
    first = out.read_text()
    subprocess.run(command, check=True, capture_output=True, timeout=600)  # every row done: nothing reruns
    assert json.loads(out.read_text())["rows"] == json.loads(first)["rows"]
    table = subprocess.run(command + ["--table"], check=True, capture_output=True, text=True).stdout
    assert table.count("\n| copies | static | 2 |") == table.count("\n| switching | static | 2 |") == 3
    assert "1.00x" in table
    for mode in ("copies", "switching"):
        line = f"- {mode}, static, batch 2: top-8 generates native's tokens: yes; unpatched bit-identical: 3 of 3"
        assert line + " configurations; every position routed by the configuration: 1 of 1 with statistics" in table
    assert "routing: 248 of 248 equal" in table
    refused = subprocess.run(command[:-2] + ["--new-tokens", "1", "--out", str(out)], capture_output=True, text=True)
    assert refused.returncode == 2 and "--new-tokens must be >= 2" in refused.stderr


def test_the_guard_benchmark_finds_each_configurations_compiled_decode_step(tmp_path):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_guards.py"
    out = tmp_path / "guards.json"
    command = [sys.executable, str(script), "--configs", "topk_k8", "bh_k8_a005", "--layers", "2", "--rounds", "2",
               "--calls", "2", "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    results = json.loads(out.read_text())
    assert list(results["rows"]) == ["native", "topk_k8", "bh_k8_a005"]  # native first: the baseline
    assert results["rows"]["native"]["over_native_us"] == 0.0
    assert all(row["guard_check_us"] > 0 for row in results["rows"].values())
    assert results["settings"]["layers"] == 2 and results["environment"]["torch"] == torch.__version__


def test_the_benchmark_targets_read_ratios_of_one_process_with_their_interval():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_generate

    def row(config, seconds, process="p", mode="copies"):
        return {"path": "dynamic", "batch": 1, "config": config, "seconds_per_round": seconds, "process": process,
                "mode": mode, "same_tokens_as_native": True, "unpatched_bit_identical": True}  # fmt: skip

    native = [1.0] * 9
    results = {"checks": {}, "rows": {
        "dynamic/b1/native": row("native", native),
        "dynamic/b1/topk_k8": row("topk_k8", [0.99] * 5 + [1.1] * 4),  # median ratio 1/0.99: met
        "dynamic/b1/topk_k8_nostats": row("topk_k8_nostats", [0.9] * 9),  # top-8 at 0.9/0.99 of it: below 3%
        "dynamic/b1/bh_k8_a005": row("bh_k8_a005", [1.2] * 9, process="q"),  # another process: no target
        "switching/dynamic/b1/native": row("native", native, mode="switching"),  # targets are read there too
        "switching/dynamic/b1/topk_k8": row("topk_k8", [1.25] * 9, mode="switching"),
    }}  # fmt: skip
    every = bench_generate.target_rows(results)
    switching = [row for row in every if row["mode"] == "switching"]
    targets = [(row["issue"], row["config"], row["baseline"], row["bounds"][0], row["ratio"]) for row in switching]
    assert targets == [(10, "topk_k8", "native", 0.95, 0.8), (29, "topk_k8", "native", 0.97, 0.8)]
    found = {(row["config"], row["baseline"]): row for row in every if row["mode"] == "copies"}
    assert set(found) == {("topk_k8", "native"), ("topk_k8", "topk_k8_nostats")}
    top8 = found["topk_k8", "native"]
    assert top8["ratio"] == pytest.approx(1 / 0.99) and top8["met"] and top8["rounds"] == 9
    assert top8["ci95"] == (pytest.approx(1 / 1.1), pytest.approx(1 / 0.99)) and not top8["interval_met"]  # n = 9
    assert found["topk_k8", "topk_k8_nostats"]["ratio"] == pytest.approx(0.9 / 0.99)
    assert not found["topk_k8", "topk_k8_nostats"]["met"]
    text = bench_generate.target_table(results)
    assert "| 10 | copies | dynamic | 1 | topk_k8 | native | >= 0.95x | 1.01x (0.91-1.01) | 9 | yes | no |" in text
    assert "| 29 | copies | dynamic | 1 | topk_k8 | native | >= 0.97x | 1.01x (0.91-1.01) | 9 | yes | no |" in text
    assert "| 10 | switching | dynamic | 1 | topk_k8 | native | >= 0.95x | 0.80x (0.80-0.80) | 9 | no | no |" in text
    assert "- copies, dynamic, batch 1: top-8 generates native's tokens: yes; unpatched bit-identical: 4 of 4" in text
    assert (
        "- switching, dynamic, batch 1: top-8 generates native's tokens: yes; unpatched bit-identical: 2 of 2" in text
    )
    timed = (("native", native), ("topk_k2", [0.75] * 9), ("bh_k8_a005", [0.7] * 9))
    static = {f"static_compiled/b1/{name}": row(name, seconds) | {"path": "static_compiled"} for name, seconds in timed}
    for dtype, expected in (("float16", {(29, "float16")}), ("bfloat16", {(10, "bfloat16"), (29, "bfloat16")})):
        rows = bench_generate.target_rows({"checks": {}, "rows": static, "settings": {"dtype": dtype}})
        assert {(row["issue"], row["dtype"]) for row in rows} == expected  # a file's dtype reads its own targets
    for name, first_token in (("native", [0.2] * 9), ("topk_k2", [0.3] * 9), ("bh_k8_a005", [0.1] * 9)):
        static[f"static_compiled/b1/{name}"]["first_token_seconds_per_round"] = first_token
    decode = {row["config"]: row for row in bench_generate.target_rows({"checks": {}, "rows": static})}
    assert decode["topk_k2"]["decode_ratio"] == pytest.approx(0.8 / 0.45)  # each round's time less its first token
    assert decode["bh_k8_a005"]["decode_ci95"] == (pytest.approx(0.8 / 0.6),) * 2
    assert decode["bh_k8_a005"]["first_token_share"] == pytest.approx(0.2)  # of the baseline's time
    assert "| 1.78x (1.78-1.78); 20% |" in bench_generate.target_table({"checks": {}, "rows": static})
    float16 = bench_generate.target_rows({"checks": {}, "rows": static, "settings": {"dtype": "float16"}})
    assert {(row["config"], row["bounds"][0], row["met"]) for row in float16} == {("bh_k8_a005", 1.25, True),
                                                                                   ("topk_k2", 1.25, True)}  # fmt: skip


def test_the_counts_checks_recorder_passes_on_the_non_finite_rows_of_a_route_that_returns_them():
    """A route that applies the non-finite rule itself (the fused BH kernel, on CUDA) returns four outputs,
    which `PatchedRouter.routed` hands on as they are: the recorder keeps its decisions and passes all four."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_generate

    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[1, 8], [2, 3], [5, 8]])
    routed = (torch.ones(3, 2), index, torch.tensor([1, 2, 1]), torch.tensor([False, True, False]))
    recorder = bench_generate.RouteRecorder(lambda *args: routed, 6, 8, 2, "cpu")
    assert recorder(logits, None, None) is routed
    recorder.route = lambda *args: routed[:3]  # torch's route: three outputs
    assert recorder(logits, None, None) == routed[:3]
    recorded = recorder.recorded()
    assert torch.equal(recorded["counts"], torch.tensor([1, 2, 1] * 2)) and torch.equal(recorded["index"][:3], index)
    assert torch.equal(recorded["logits"][3:].float(), logits)


def test_the_benchmark_interval_for_a_median_is_the_order_statistics_of_the_binomial_table():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_generate

    shuffled = torch.randperm(100, generator=torch.Generator().manual_seed(0)).add(1).tolist()
    assert bench_generate.median_interval(shuffled) == (40, 61)  # the textbook 95% interval for n = 100
    assert bench_generate.median_interval(list(range(20, 0, -1))) == (6, 15)  # n = 20: coverage 95.9%
    assert bench_generate.median_interval(list(range(1, 9))) == (1, 8)  # n = 8 cannot reach 95% inside
    assert bench_generate.median_interval(list(range(1, 21)), level=0.5) == (8, 13)  # coverage 73.7%; (9, 12): 49.7%


def host_profile(tmp_path, *arguments: str) -> dict:
    """benchmarks/profile_generate.py on the embedded model on the CPU (3 new tokens after 5): its results."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_generate.py"
    out = tmp_path / "profile.json"
    command = [sys.executable, str(script), "--model", "embedded", "--device", "cpu", "--new-tokens", "3",
               "--prompt-tokens", "5", *arguments, "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_the_host_profile_compares_each_configuration_with_native(tmp_path):
    results = host_profile(tmp_path, "--configs", "topk_k8_nostats", "--top", "100000")
    assert results["settings"]["configs"] == ["native", "topk_k8_nostats"]  # native added, first
    assert all(row["own_us_per_token"] == 0 for row in results["native"]["against_native"])
    patched = results["topk_k8_nostats"]
    assert patched["own_seconds_per_token"] > 0
    added = {row["function"] for row in patched["against_native"] if row["calls_per_token"] > 0}
    assert any(name.startswith("bh_routing.py:") for name in added)  # the patcher's hooks ran, native's did not
    cumulative = {row["function"]: row["cumulative_us_per_token"] for row in patched["against_native_cumulative"]}
    patch_call = next(name for name in cumulative if name.endswith("(__call__)") and name.startswith("bh_routing"))
    assert cumulative[patch_call] > 0  # the patch's whole call, its callees included, added to native's time
    assert patched["gc_seconds_per_token"] >= 0 and patched["gc_collections_per_token"] >= 0


def test_the_switching_profile_finds_no_recompilation_after_each_configuration_was_compiled(tmp_path):
    results = host_profile(tmp_path, "--mode", "switching", "--configs", "topk_k2")
    for name in ("native", "topk_k2"):
        row = results[name]
        assert row["first_own_seconds_per_token"] > 0 and row["steady_own_seconds_per_token"] > 0
        for generate in ("first", "steady"):  # dynamo converts no frame once both were compiled (CPU: no graphs)
            assert not any(key.startswith("frames.") for key in row[generate]["counters"]), row[generate]
            assert row[generate]["graph_captures"] == 0 and row[generate]["graph_recordings"] == []
        assert row["switch_cost"] and all(cost["function"] for cost in row["switch_cost"])
        assert row["cache_entries"] and all(count >= 1 for count in row["cache_entries"].values())


def route_tensors(route) -> list[torch.Tensor]:
    """The tensors a layer's route (a functools.partial) reads: bound directly, or in its tables."""
    bound = [v for value in route.args for v in (value.values() if isinstance(value, dict) else [value])]
    return [t for t in (getattr(v, "log_survival", v) for v in bound) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize(
    "method, params",
    [("bh", {"alpha": 0.05}), ("bh", {"alpha": 0.05, "pvalue_method": "empirical"}),
     ("hc", {"beta": 0.3, "pvalue_method": "empirical"})],
)  # fmt: skip
def test_a_configuration_patched_again_routes_with_the_same_layer_tensors(tiny_model, calibration, method, params):
    # A compiled model's CUDA graphs hold these tensors by address: new ones at every patch made each switch back
    # to BH record its decode graph again and every later step check the stale graph first (gpu_notes, run 59).
    patcher = br.MoERouterPatcher(tiny_model, calibration=calibration)

    def layer_tensors(method, **params):
        patcher.patch(method, **params)
        found = [route_tensors(getattr(router, br.PATCH_ATTRIBUTE).route) for router in patcher.routers]
        patcher.unpatch()
        return found

    first = layer_tensors(method, **params)
    assert all(len(tensors) == 1 for tensors in first)  # the critical statistics, or the null table
    assert first[0][0] is not first[1][0]  # each layer its own, even with equal values (one guard each)
    other = layer_tensors(method, **(params | {"alpha" if method == "bh" else "beta": 0.2}))
    assert method == "hc" or not torch.equal(other[0][0], first[0][0])  # HC's null does not depend on beta
    layer_tensors("topk", k=2)
    again = layer_tensors(method, **params)
    pairs = [pair for tensors in zip(first, again, strict=True) for pair in zip(*tensors, strict=True)]
    assert all(kept is given and kept.data_ptr() == given.data_ptr() for kept, given in pairs)


def test_a_layer_tensor_is_kept_per_place_and_value_up_to_a_bound():
    place = ("a table", "test")
    kept = br.layer_tensor(place, torch.arange(4.0), "cpu")
    assert br.layer_tensor(place, torch.arange(4.0), "cpu") is kept  # equal values: the same object
    assert br.layer_tensor(("another table", "test"), torch.arange(4.0), "cpu") is not kept
    assert br.layer_tensor(place, torch.arange(4, dtype=torch.float64), "cpu") is not kept  # another dtype
    for value in range(br.KEPT_PER_PLACE):  # older values make way for newer ones, each a copy of its own
        assert not torch.equal(br.layer_tensor(place, torch.full((4,), float(value + 10)), "cpu"), kept)
    assert br.layer_tensor(place, torch.arange(4.0), "cpu") is not kept


def test_static_generates_reuse_one_cache_whose_tensors_stay_where_a_recorded_graph_reads_them(tiny_model):
    ids = torch.randint(2, 512, (1, 6), generator=torch.Generator().manual_seed(3))
    settings = bx.generation_settings("static", 16)
    options = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 1}
    own = tiny_model.generate(ids, **settings, **options)  # transformers' generate: a new cache each call
    first = bx.generate_with(tiny_model, ids, settings, return_dict_in_generate=True, **options)
    pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in first.past_key_values.layers]
    second = bx.generate_with(tiny_model, ids, settings, return_dict_in_generate=True, **options)
    assert second.past_key_values is first.past_key_values  # one cache, reset in place between generates
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in second.past_key_values.layers] == pointers
    assert torch.equal(first.sequences, own) and torch.equal(second.sequences, own)  # reset: nothing carried over
    batch = bx.generate_with(tiny_model, ids.repeat(2, 1), settings, return_dict_in_generate=True, **options)
    assert batch.past_key_values is not first.past_key_values and torch.equal(batch.sequences[1:], own)
    assert bx.generate_with(tiny_model, ids, bx.generation_settings("dynamic"), **options).shape == own.shape
    with pytest.raises(ValueError, match="a static cache needs its length: max_cache_len in settings, or max_new"):
        bx.generate_with(tiny_model, ids, bx.generation_settings("static"), do_sample=False)


def test_copies_of_a_model_share_its_static_cache_and_another_layout_gets_its_own(tiny_model):
    import copy

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_generate

    ids = torch.randint(2, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    settings, options = bx.generation_settings("static", 16), {"max_new_tokens": 3, "return_dict_in_generate": True}
    twin = bench_generate.model_copies(tiny_model, 1)[0]  # its own module tree on the same weights
    first = bx.generate_with(tiny_model, ids, settings, do_sample=False, **options).past_key_values
    assert bx.generate_with(twin, ids, settings, do_sample=False, **options).past_key_values is first
    half = copy.deepcopy(tiny_model).to(torch.bfloat16)  # another dtype: a cache of its own
    assert bx.generate_with(half, ids, settings, do_sample=False, **options).past_key_values is not first
