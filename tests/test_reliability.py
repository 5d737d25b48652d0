"""Inputs that cannot give a silent wrong answer (issue 28): non-finite router logits routed by one stated rule on
every path, temperatures the work dtype cannot hold refused, configurations checked when they are made,
calibrations that do not fit the model refused with the file and what differs, result files that two writers
cannot break, and the smaller refusals (a mask of the wrong shape, a router that returns NaN, a batch the
token-count buffer cannot hold, pickling a patched model)."""

import json
import math
import multiprocessing
import pickle
import re
import tempfile
import zlib

import pytest
import torch

import bh_allocation  # noqa: F401 - registers the allocation methods routed below
import bh_experiment as bx
import bh_routing as br

NAN, INF = float("nan"), float("inf")


# --- 1. non-finite router logits -------------------------------------------------------------------------


def non_finite_logits(rows: int = 8, experts: int = 64, seed: int = 3) -> torch.Tensor:
    logits = torch.randn(rows, experts, generator=torch.Generator().manual_seed(seed)) * 4
    logits[0, 5] = -INF  # one expert masked out, the rest finite
    logits[1, 7] = INF
    logits[2, 9] = NAN
    logits[3, :] = NAN
    logits[4, :] = -INF
    logits[5, :40] = INF
    return logits  # rows 6 and 7 finite


@pytest.fixture
def calibration(tiny_model):
    """The tiny model's calibration, with made-up allocations for the methods that route by one."""
    token_ids = torch.randint(0, tiny_model.config.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    calibration = br.fit_routing_calibration(bx.collect_router_logits(tiny_model, token_ids, window=100))
    table = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 2.0], [8.0, 8.0]])
    calibration.allocations = {name: table for name in ("schedule", "allocl", "lexi")}
    return calibration


def patched_route(model, spec: str, path: str = "eager", calibration=None):
    """The first layer's patched router as one function, logits [T, E] -> (weights [T, K] float32, index
    [T, K], counts [T] or None, non-finite rows [T]), on one path: "eager" (the function a CUDA graph replays,
    called directly), "compiled" (the same with the route fused by torch.compile: compile_routing=True) or
    "traced" (inside a compiled model); and its patcher."""
    patcher = br.MoERouterPatcher(model, compile_routing=path == "compiled", calibration=calibration)
    br.RoutingConfig.parse(spec).apply(patcher)
    patch = getattr(patcher.routers[0], br.PATCH_ATTRIBUTE)
    traced = torch.compile(lambda *args: patch.routed(patch.route, *args), fullgraph=True, backend="eager")

    def route(logits):
        native_weights, native_index = torch.softmax(logits.nan_to_num(0.0, 0.0, 0.0), -1).topk(8)
        if path == "traced":
            return traced(logits, native_weights, native_index)
        natives = (native_weights, native_index) if patch.reads_native else (None, None)
        _, index, weights, counts, nonfinite = patch.eager_route(logits, native_weights.dtype, *natives)
        return weights, index, counts, nonfinite

    return patcher, route


def on_every_path(model, spec: str, batches: list, calibration=None) -> dict:
    """{path: [(weights, index, counts, non-finite rows) of each batch of logits]} of the first layer's patched
    router, one patch at a time."""
    outputs = {}
    for path in ("eager", "compiled", "traced"):
        patcher, route = patched_route(model, spec, path, calibration)
        outputs[path] = [route(logits) for logits in batches]
        patcher.unpatch()
    return outputs


def same_routing(mine: tuple, theirs: tuple) -> bool:
    """The same experts, counts and non-finite rows, and weights equal up to float32 rounding (inductor's fused
    softmax rounds differently from eager's), every weight finite."""
    (weights, index, counts, nonfinite), (their_weights, their_index, their_counts, their_nonfinite) = mine, theirs
    same_counts = (counts is None and their_counts is None) or torch.equal(counts, their_counts)
    close = torch.allclose(weights, their_weights, rtol=1e-5, atol=1e-7) and bool(torch.isfinite(weights).all())
    return same_counts and close and torch.equal(index, their_index) and torch.equal(nonfinite, their_nonfinite)


ROUTES = ["bh:alpha=0.2,max_k=8", "bh:pvalue_method=one_minus_prob,max_k=8", "hc:beta=0.3,max_k=8",
          "topp:p=0.5", "topk:k=2", "skip:beta=0.3", "entropy:max_k=4", "bh:alpha=0.05,max_k=8,min_k=2"]  # fmt: skip


@pytest.mark.parametrize("spec", ROUTES)
def test_a_row_with_a_non_finite_logit_routes_by_the_native_top_k_of_its_finite_logits(tiny_model, calibration, spec):
    logits = non_finite_logits()
    patcher, route = patched_route(tiny_model, spec, calibration=calibration)
    weights, index, counts, nonfinite = route(logits)
    assert nonfinite.tolist() == [True] * 6 + [False] * 2
    params = patcher.params
    width = min(max(patcher.native_top_k, params["min_k"]), params["max_k"])
    assert torch.isfinite(weights).all()
    for row in range(6):
        finite = torch.isfinite(logits[row])
        kept = index[row][index[row] < 64]
        assert kept.numel() == width and (counts is None or int(counts[row]) == width), (spec, row)
        if finite.sum() >= width:  # the most probable of the finite logits, weighted by their softmax
            expected = logits[row].masked_fill(~finite, -INF).topk(width).indices
            assert set(kept.tolist()) == set(expected.tolist()), (spec, row)
            assert float(weights[row].sum()) == pytest.approx(
                float(torch.softmax(logits[row].masked_fill(~finite, -INF), -1)[expected].sum()), rel=1e-5
            )
        if finite.sum() == 0:
            assert float(weights[row].abs().sum()) == 0.0  # nothing to weight: the token's routed experts add 0
    patcher.unpatch()


@pytest.mark.parametrize("spec", ROUTES)
def test_every_path_routes_non_finite_rows_alike(tiny_model, calibration, spec):
    outputs = on_every_path(tiny_model, spec, [non_finite_logits()], calibration)
    for path in ("compiled", "traced"):
        assert same_routing(outputs[path][0], outputs["eager"][0]), (spec, path)


# Every registered method (and every p-value method of BH and HC), as the property test below routes them.
EVERY_METHOD = ["bh:alpha=0.2,max_k=8", "bh:alpha=0.05,max_k=8,min_k=2", "bh:pvalue_method=one_minus_prob,max_k=8",
                "bh:pvalue_method=empirical,alpha=0.2,max_k=8", "bh:pvalue_method=pooled,max_k=8",
                "hc:beta=0.3,max_k=8", "hc:beta=0.3,max_k=8,pvalue_method=empirical", "topk:k=3", "topp:p=0.5",
                "skip:beta=median", "entropy:max_k=4", "schedule:budget=2.5", "allocl:budget=2",
                "lexi:budget=3", "alloct:budget=2.5"]  # fmt: skip


def zlib_crc(text: str) -> int:
    return zlib.crc32(text.encode())


INJECTIONS = ("none", "-inf", "+inf", "nan", "all nan", "all -inf", "half +inf", "tied row", "tied top", "scale")


def random_case(generator: torch.Generator, experts: int = 64) -> torch.Tensor:
    """One token's router logits with one of INJECTIONS, at a random scale from 1e-30 to 1e30."""
    logits = torch.randn(experts, generator=generator) * 10 ** (torch.rand(1, generator=generator).item() * 4 - 1)
    kind = INJECTIONS[int(torch.randint(len(INJECTIONS), (1,), generator=generator))]
    where = torch.randint(experts, (3,), generator=generator)
    if kind in ("-inf", "+inf", "nan"):
        logits[where] = float(kind.replace("nan", "NaN"))
    elif kind in ("all nan", "all -inf"):
        logits[:] = float(kind.split()[1].replace("nan", "NaN"))
    elif kind == "half +inf":
        logits[: experts // 2] = INF
    elif kind == "tied row":
        logits[:] = logits[0]
    elif kind == "tied top":
        logits[where] = logits.max()
    elif kind == "scale":
        logits *= 10.0 ** float(torch.randint(-30, 31, (1,), generator=generator))
    return logits


@pytest.mark.parametrize("spec", EVERY_METHOD)
def test_property_every_method_routes_random_and_adversarial_logits_alike_on_every_path(tiny_model, calibration, spec):
    """1,024 seeded cases (8 calls of 128 tokens), each token's logits with an injected NaN, inf, tie or extreme
    scale or none: every CPU path gives the same experts, counts and non-finite rows, and finite weights."""
    generator = torch.Generator().manual_seed(zlib_crc(spec))
    batches = [torch.stack([random_case(generator) for _ in range(128)]) for _ in range(8)]
    outputs = on_every_path(tiny_model, spec, batches, calibration)
    for batch, logits in enumerate(batches):
        expected_nonfinite = ~torch.isfinite(logits).all(-1)
        eager = outputs["eager"][batch]
        assert torch.equal(eager[3], expected_nonfinite) and torch.isfinite(eager[0]).all(), (spec, batch)
        for path in ("compiled", "traced"):
            assert same_routing(outputs[path][batch], eager), (spec, path, batch)


@pytest.mark.parametrize(("method", "params", "layers"), [("bh", {"alpha": 0.2, "max_k": 8}, 1), ("topk", {"k": 8}, 2)])
def test_the_statistics_count_the_non_finite_rows_and_stay_finite(tiny_model, input_ids, method, params, layers):
    """BH routes (the rule's finite weights keep layer 1's logits finite); top-k at the router's own k observes
    the router, whose non-finite weights carry into layer 1 (its rows' logits read at the fold)."""
    patcher = br.MoERouterPatcher(tiny_model).patch(method, **params)
    with torch.no_grad():
        tiny_model(input_ids)
    assert patcher.get_stats()["nonfinite_rows"] == 0
    patcher.reset_stats()
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.gate.weight[7] = INF  # an overflowed router row: inf or nan logits
        tiny_model(input_ids)
    with pytest.warns(UserWarning, match="non-finite router logits"):
        stats = patcher.get_stats()
    assert stats["nonfinite_rows"] == layers * input_ids.numel()  # every token of the layers hit
    assert math.isfinite(stats["weight_entropy"]) and stats["per_layer_avg_experts"][0] == 8.0
    patcher.unpatch()


def test_a_compiled_forward_counts_and_routes_an_overflowed_router_as_eager(tiny_model, input_ids):
    """The traced path's statistics (deferred to the end of a compiled forward) meet the rule as eager's do."""
    patcher = br.MoERouterPatcher(tiny_model, record_token_counts=True).patch("bh", alpha=0.2, max_k=8)
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.gate.weight[11] = -INF  # x . w: +inf or -inf by the sign of each input
    with torch.no_grad(), pytest.warns(UserWarning, match="non-finite"):
        eager_logits = tiny_model(input_ids).logits
        eager = patcher.get_stats()
        patcher.reset_stats()
        compiled_logits = torch.compile(tiny_model, backend="eager", fullgraph=True)(input_ids).logits
        compiled = patcher.get_stats()
    assert torch.isfinite(eager_logits).all() and torch.allclose(compiled_logits, eager_logits, atol=1e-5)
    assert compiled["nonfinite_rows"] == eager["nonfinite_rows"] == input_ids.numel()
    assert torch.equal(compiled["token_counts"], eager["token_counts"])
    assert (eager["token_counts"][:, 1] == 8).all()  # layer 1: the native k, every token
    patcher.unpatch()


def test_higher_criticism_routes_a_model_whose_router_overflows(tiny_model, input_ids):
    patcher = br.MoERouterPatcher(tiny_model).patch("hc", beta=0.3, max_k=8)
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.gate.weight[3] = INF
    with torch.no_grad(), pytest.warns(UserWarning, match="non-finite"):
        tiny_model(input_ids)
        assert patcher.get_stats()["nonfinite_rows"] > 0
    patcher.unpatch()


@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_p_values_of_non_finite_logits_are_refused_by_name(bad):
    logits = torch.randn(3, 64)
    logits[1, 2] = bad
    for method in br.PVALUE_METHODS:
        if not br.PVALUE_METHODS[method].fitted:
            with pytest.raises(ValueError, match="router_logits must be finite"):
                br.compute_p_values(logits, method)


def test_null_table_reads_a_nan_statistic_as_no_evidence():
    table = br.robust_z_null(64)
    p = table.p_values(torch.tensor([NAN, -INF, INF, 0.0]))
    assert p[0] == 1.0 and p[1] == 1.0 and 0 < p[2] < 1e-3 and 0 < p[3] <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_below_the_routers_k_is_the_routers_first_slots_bit_for_bit_and_routes_non_finite_rows(tiny_model, dtype):
    """Top-k at k below the router's own (a plain, sorted softmax router) computes the router's first k slots itself,
    with the non-finite rule in the same top-k (so that a compiled forward drops the router's): on finite rows the
    same experts in the same order and the same weights as the router's own output, ties of coarse dtypes included."""
    router = br.find_moe_layers(tiny_model)[0].router
    hidden = torch.randn(2048, router.weight.shape[1], generator=torch.Generator().manual_seed(5)) * 3
    patcher = br.MoERouterPatcher(tiny_model).patch("topk", k=2)
    patch = getattr(patcher.routers[0], br.PATCH_ATTRIBUTE)
    assert patch.route_rules_nonfinite  # one top-k for the route and the rule
    router_class = type(router).unpatched_class
    with torch.no_grad():
        logits, native_weights, native_index = router_class.forward(router.to(dtype), hidden.to(dtype))
        weights, index, counts, nonfinite = patch.routed(patch.route, logits, native_weights, native_index)
    router.float()
    patcher.unpatch()
    assert counts is None and not nonfinite.any()
    assert torch.equal(index, native_index[:, :2]) and torch.equal(weights.to(dtype), native_weights[:, :2])


def test_top_k_below_the_routers_k_never_keeps_a_non_finite_logit_before_an_underflowed_finite_one(tiny_model):
    logits = torch.full((2, 64), -200.0)
    logits[:, 0] = 100.0  # every other finite logit's probability underflows to 0 in float32
    logits[0, 1:40], logits[1, 30:] = NAN, INF
    patcher = br.MoERouterPatcher(tiny_model).patch("topk", k=2)
    patch = getattr(patcher.routers[0], br.PATCH_ATTRIBUTE)
    native_weights, native_index = torch.softmax(logits.nan_to_num(0.0, 0.0, 0.0), -1).topk(8)
    weights, index, counts, nonfinite = patch.routed(patch.route, logits, native_weights, native_index)
    patcher.unpatch()
    assert nonfinite.tolist() == [True, True] and counts is None
    assert torch.isfinite(logits.gather(-1, index)).all()  # 0 and a finite -200, never a NaN or inf expert
    assert index[:, 0].tolist() == [0, 0] and weights[:, 0].tolist() == [1.0, 1.0] and weights[:, 1].tolist() == [0, 0]


# --- 2. temperatures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, torch.finfo(torch.float32).tiny])
def test_a_temperature_below_float32_resolution_is_refused_by_name(temperature):
    with pytest.raises(ValueError, match="temperature"):
        br.check_temperature(temperature)
    with pytest.raises(ValueError, match="temperature"):
        br.RoutingConfig.of("bh", temperature=temperature)


@pytest.mark.parametrize("method", ["bh", "hc", "topp", "skip", "topk"])
def test_the_smallest_temperature_allowed_routes_to_finite_weights(method):
    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 1000
    routing = br.route_logits(method, logits, temperature=br.MIN_TEMPERATURE, with_stats=method != "topk")
    assert torch.isfinite(routing.top_weights).all() and (routing.expert_counts >= 1).all()


# --- 3. configurations checked when they are made ------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: br.RoutingConfig.of("bh", alpha="0.05"), "alpha"),
        (lambda: br.RoutingConfig.parse("bh:alpha=0"), "alpha"),
        (lambda: br.RoutingConfig.parse("bh:max_k=100", br.moe_shape(bx.build_random_olmoe(seed=0).config)), "max_k"),
        (lambda: br.RoutingConfig.parse("topk:k=0"), "k"),
        (lambda: br.RoutingConfig.parse("topp:p=1.5"), "p"),
        (lambda: br.RoutingConfig.parse("bh:pvalue_method=robust"), "pvalue_method"),
        (lambda: br.RoutingConfig.parse("bh:renormalize=yes"), "renormalize"),
        (lambda: br.RoutingConfig.of("topk", k=2, renormalize="false"), "renormalize"),
        (lambda: br.RoutingConfig.parse("skip:beta=mean"), "beta"),
        (lambda: br.RoutingConfig.of("bh", min_k=9, max_k=8), "min_k"),
    ],
)
def test_a_configuration_is_checked_when_it_is_made(make, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        make()


def test_text_booleans_parse_strictly():
    config = br.RoutingConfig.parse("topk:k=2,renormalize=false")
    assert config.kwargs["renormalize"] is False and config == br.RoutingConfig.of("topk", k=2, renormalize=False)
    assert br.RoutingConfig.parse("topk:k=2,renormalize=True").kwargs["renormalize"] is True
    assert br.RoutingConfig.parse("topk:k=2,renormalize=none").kwargs["renormalize"] is None


def test_a_configuration_too_wide_for_the_model_is_refused_at_patch_time_too(tiny_model):
    config = br.RoutingConfig.parse("bh:max_k=100")  # no model given: checked against any model
    with pytest.raises(ValueError, match="max_k"):
        config.apply(br.MoERouterPatcher(tiny_model))


# --- 4. calibrations that do not fit the model -----------------------------------------------------------------


def calibration_of(num_layers: int, num_experts: int) -> br.RoutingCalibration:
    generator = torch.Generator().manual_seed(0)
    return br.fit_routing_calibration([torch.randn(300, num_experts, generator=generator) for _ in range(num_layers)])


def test_a_calibration_of_other_experts_is_refused_naming_both(tiny_model):
    with pytest.raises(ValueError, match=r"16 experts.*64"):
        br.MoERouterPatcher(tiny_model, calibration=calibration_of(2, 16))
    patcher = br.MoERouterPatcher(tiny_model)
    with pytest.raises(ValueError, match=r"16 experts.*64"):
        patcher.calibration = calibration_of(2, 16)
    with pytest.raises(ValueError, match=r"3 layers.*2"):
        patcher.calibration = calibration_of(3, 64)
    patcher.calibration = calibration_of(2, 64)  # one that fits


def test_a_calibration_whose_tables_disagree_is_refused(tiny_model):
    calibration = calibration_of(2, 64)
    calibration.entropy_knots = calibration.entropy_knots[:1]
    with pytest.raises(ValueError, match="entropy_knots"):
        br.MoERouterPatcher(tiny_model, calibration=calibration)


def test_a_truncated_calibration_file_is_named(tmp_path):
    path = calibration_of(2, 64).save(tmp_path / "calibration.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="calibration.pt"):
        br.RoutingCalibration.load(path)


def test_a_calibration_file_missing_a_table_names_the_file_and_the_table(tmp_path):
    path = calibration_of(2, 64).save(tmp_path / "calibration.pt")
    state = torch.load(path, weights_only=True)
    del state["skip_beta"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"calibration\.pt.*skip_beta"):
        br.RoutingCalibration.load(path)


def test_a_saved_calibration_loads_back_with_its_source(tmp_path):
    path = calibration_of(2, 64).save(tmp_path / "calibration.pt")
    loaded = br.RoutingCalibration.load(path)
    assert loaded.num_layers == 2 and loaded.info["num_experts"] == 64 and loaded.source == str(path)


# --- 5. result files ------------------------------------------------------------------------------------------


def save_repeatedly(directory: str, writer: int, times: int, queue) -> None:
    store = bx.ResultStore(directory, {"seed": 0})
    failures = 0
    for iteration in range(times):
        try:
            store.save("bh_k8_a005", {"writer": writer, "iteration": iteration, "padding": "x" * 4000})
        except Exception:  # noqa: BLE001 - counted: the test expects none
            failures += 1
    queue.put(failures)


def test_two_processes_saving_one_configuration_break_nothing(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    writers = [context.Process(target=save_repeatedly, args=(str(tmp_path), w, 400, queue)) for w in (0, 1)]
    for process in writers:
        process.start()
    store, reads, empty = bx.ResultStore(tmp_path, {"seed": 0}), 0, 0
    while any(process.is_alive() for process in writers):
        path = store.path("bh_k8_a005")
        if path.exists():
            text = path.read_text()
            empty += not text
            reads += bool(text) and json.loads(text)["name"] == "bh_k8_a005"
    for process in writers:
        process.join()
    assert [queue.get(timeout=10), queue.get(timeout=10)] == [0, 0] and empty == 0
    final = json.loads(store.path("bh_k8_a005").read_text())
    assert final["iteration"] == 399 and final["writer"] in (0, 1)  # the last write of one of them, whole
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"


def test_atomic_write_gives_each_write_its_own_temporary(tmp_path, monkeypatch):
    seen = []
    bx.atomic_write(tmp_path / "a.json", lambda temporary: seen.append(temporary) or temporary.write_text("1"))
    bx.atomic_write(tmp_path / "a.json", lambda temporary: seen.append(temporary) or temporary.write_text("2"))
    assert seen[0] != seen[1] and seen[0].parent == tmp_path and seen[0].suffix == ".json"
    assert (tmp_path / "a.json").read_text() == "2"


def test_an_unwritable_store_is_found_before_the_configuration_is_computed(tmp_path, monkeypatch):
    store = bx.ResultStore(tmp_path, {"seed": 0})
    real = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(tmp_path):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    computed = []
    with pytest.raises(PermissionError, match=re.escape(str(tmp_path))):
        store.run("bh_k8_a005", lambda: computed.append(1) or {"value": 1})
    assert computed == []


@pytest.mark.parametrize("name", ["../outside", "a/b", "/etc/passwd", "..", "", "a\\b", "x\0y"])
def test_a_result_name_stays_inside_the_store(tmp_path, name):
    store = bx.ResultStore(tmp_path / "store", {"seed": 0})
    with pytest.raises(ValueError, match="name"):
        store.run(name, lambda: {"value": 1})
    assert not (tmp_path / "outside.json").exists()


# --- 6. smaller ones ----------------------------------------------------------------------------------------


def test_a_set_attention_mask_of_the_wrong_shape_is_refused(tiny_model, input_ids):
    patcher = br.MoERouterPatcher(tiny_model).patch("bh", alpha=0.2, max_k=8)
    patcher.set_attention_mask(torch.ones(input_ids.shape[0] + 1, input_ids.shape[1], dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"), torch.no_grad():
        tiny_model(input_ids)
    patcher.set_attention_mask(torch.ones(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"), torch.no_grad():
        tiny_model(input_ids)
    patcher.set_attention_mask(torch.ones_like(input_ids))
    with torch.no_grad():
        tiny_model(input_ids)
    assert patcher.get_stats()["num_tokens"] == input_ids.numel()
    patcher.unpatch()


def test_a_router_that_returns_nan_is_named(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[0].mlp.gate.weight.fill_(NAN)
    with pytest.raises(ValueError, match="NaN"):
        br.MoERouterPatcher(tiny_model)


def test_a_batch_larger_than_the_token_count_buffer_is_refused_before_any_forward(tiny_model, monkeypatch):
    patcher = br.MoERouterPatcher(tiny_model, record_token_counts=True, token_capacity=100).patch("topk", k=2)
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: pytest.fail("ran a forward pass"))
    with pytest.raises(ValueError, match=r"token_capacity.*100"):
        bx.evaluate_language_model(tiny_model, torch.arange(2, 500), window=64, batch_size=2, patcher=patcher)
    patcher.unpatch()


def test_a_patched_model_refuses_pickling_by_name_and_pickles_after_unpatch(tiny_model):
    patcher = br.MoERouterPatcher(tiny_model).patch("bh", alpha=0.2, max_k=8)
    with pytest.raises(TypeError, match="unpatch"):
        pickle.dumps(tiny_model)
    patcher.unpatch()
    assert pickle.loads(pickle.dumps(tiny_model)) is not None
