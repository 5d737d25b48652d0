"""Generation speed where users feel it (issue 10): `model.generate`, greedy, native against patched routing,
on the dynamic-cache path (eager) and the static-cache path (forward compiled by torch.compile with CUDA
graphs, as transformers' generate does for a static cache on a GPU).

OLMoE-1B-7B shape (benchmarks/olmoe-1b-7b-0924.config.json, all 16 layers, random bf16 weights) on a GPU, or
the embedded model on the CPU (--model embedded --device cpu). 48 new tokens after a 64-token prompt of random
ids, batch 1 and 16. Configurations: native (unpatched, always timed), top-k 8/4/2, top-p 0.5, BH alpha 0.05
and 0.2 at max_k 8, BH alpha 0.05 on floors 2 and 4, top-k 8 / BH alpha 0.05 with statistics off
(record_statistics=False), and BH alpha 0.05 routed by torch's operations rather than the fused kernel
(fused_routing=False; on a CPU, where no kernel runs, the same route as bh_k8_a005).

Two modes (--modes). "switching", the way a user and the notebook work: one model, and in every round each
configuration is patched, generated with (timed: the first generate after a switch) and unpatched in turn,
after one warm-up of each; its rows also give the second generate of the same patch (steady state) and the
switch's penalty, their ratio, and a one-token generate after a switch of its own (the first token's time, as
below, in the state of the first generate after a switch).
"copies": as follows.

Timing, per path and batch size: each configuration runs on its own copy of the model (the module tree
copied, the weights shared), patched and warmed up once (the warm-up's time, compilation included on the
static path, is reported apart). Then `--repeats` rounds time one generate of every configuration each, in
turn: the host's speed, which drifts by more than the configurations differ at batch 1, falls on all of them
alike, and every round gives a ratio to native. Reported: tokens/s (median and range) and the ratio to
native (median over rounds, its range, and a distribution-free 95% interval for the median from the order
statistics, which assumes independent rounds). On CUDA, one more generate per configuration runs under
torch.profiler: the GPU's milliseconds per generated token, the device's share of a step.

The HBM floor: the weight bytes one decode step must read (every non-expert weight but the embedding
table, plus each layer's experts in use: at batch b and an average of k experts per token, the expected
number of distinct experts E * (1 - (1 - k/E)^b), assuming tokens pick experts independently and
uniformly), divided by the measured copy bandwidth of the card; floor tokens/s = b / that time.

Correctness, per path and batch size: patched top-8 generates the native tokens; each configuration with
statistics counted every position of its reference generate (`routed_positions`: its own routers ran every
step); each copy, unpatched after the rounds, generates the native logits again, bit for bit.
--check-counts BATCH...: BH's decisions on the static compiled path against the eager computation on the
same inputs (`check_counts`): the compiled forward's decode decisions replayed eagerly on the logits it
routed, and a whole generate's per-token counts against the dynamic and static eager paths, with the native
router's own choices on those paths beside them.

--targets runs `TARGET_BLOCKS`, the blocks that the issue's targets (`TARGETS`) read, in one process and in
each mode of --modes; the targets table (`target_table`) reads them in each mode and follows the rows' table.
Beside each target, not a target itself: the ratio of the decode steps alone and the first token's share of
the baseline's time (`decode_ratio`), since the prefill runs eagerly on every path and takes about as long
for every configuration, so that its share, which grows on a slower host, pulls every ratio towards 1.

Results go to --out (JSON, merged with what is there: an interrupted run keeps its finished blocks of
path and batch size, and a rerun skips them unless --redo), with the card, versions and date; --table
prints the tables.

    python benchmarks/bench_generate.py --targets --check-counts 1 16 --out benchmarks/results/bench_generate_h100.json
    python benchmarks/bench_generate.py --out benchmarks/results/bench_generate_h100.json --paths static_compiled
    python benchmarks/bench_generate.py --model embedded --device cpu --out benchmarks/results/bench_generate_cpu.json
"""

import argparse
import copy
import functools
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch._inductor.config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import bh_experiment  # noqa: E402
import bh_routing  # noqa: E402 - importable only once the repository root is on sys.path
import routing_statistics  # noqa: E402

CHECKED_K, CHECKED_TOKENS = 8, 32  # --check-counts: BH at max_k 8 and top-8, 32 new tokens
CHECKED_BH = f"bh:alpha=0.05,max_k={CHECKED_K}"
NO_STATISTICS, TORCH_ROUTE = {"record_statistics": False}, {"fused_routing": False}
CONFIGS = {  # name -> (routing configuration or None for the unpatched model, the patcher's options)
    "native": (None, {}),
    "topk_k8": ("topk:k=8", {}),
    "topk_k4": ("topk:k=4", {}),
    "topk_k2": ("topk:k=2", {}),
    "topp_p050": ("topp:p=0.5,max_k=8", {}),
    "bh_k8_a005": ("bh:alpha=0.05,max_k=8", {}),
    "bh_k8_a020": ("bh:alpha=0.2,max_k=8", {}),
    "bh_k8_a005_min2": ("bh:alpha=0.05,max_k=8,min_k=2", {}),
    "bh_k8_a005_min4": ("bh:alpha=0.05,max_k=8,min_k=4", {}),
    "topk_k8_nostats": ("topk:k=8", NO_STATISTICS),
    "bh_k8_a005_nostats": ("bh:alpha=0.05,max_k=8", NO_STATISTICS),
    "bh_k8_a005_torchroute": ("bh:alpha=0.05,max_k=8", TORCH_ROUTE),  # BH's torch route, not the fused kernel
}


def load(model: str, device: str, layers: int | None = None, dtype: str | None = None):
    """The model: the embedded one (in `dtype`, or its device's native dtype) or random weights of a config's
    shape (`layers` of them, or all; in `dtype`, or bf16)."""
    if model == "embedded":
        return bh_experiment.load_model("embedded", device=device, dtype=dtype or "auto")[0]
    overrides = {"num_hidden_layers": layers} if layers else {}
    weights = getattr(torch, dtype or "bfloat16")
    return bh_experiment.build_random_moe(config=model, device=device, dtype=weights, **overrides)


def generate(model, prompt, path: str, new_tokens: int, logits: bool = False, cache_tokens: int | None = None):
    """Greedy generate of exactly new_tokens: the output (ids, and logits per step if asked). cache_tokens:
    the static cache's length (default prompt + new tokens); one length keeps one cache and compiled graph."""
    settings = bh_experiment.generation_settings(path, cache_tokens or prompt.shape[1] + new_tokens, prompt.device)
    return bh_experiment.generate_with(
        model,
        prompt,
        settings,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=logits,
    )


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs so far (e.g. for a mutated input)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def timed(function, device) -> float:
    bh_experiment.synchronize(device)
    start = time.perf_counter()
    function()
    bh_experiment.synchronize(device)
    return time.perf_counter() - start


def weight_bytes(model) -> dict:
    """Bytes of one expert, of all experts, and of every other weight a decode step reads (not the embedding
    table, of which a step reads b rows)."""
    layers = bh_routing.find_moe_layers(model)
    experts = sum(p.numel() * p.element_size() for layer in layers for p in layer.experts.parameters())
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "expert": experts / (len(layers) * layers[0].spec.num_experts),
        "layers": len(layers),
        "num_experts": layers[0].spec.num_experts,
        "other": total - experts - embedding.numel() * embedding.element_size(),
    }


def hbm_floor(weights: dict, avg_experts: float, batch: int, bandwidth: float) -> float:
    """Floor tokens/s of a decode step that reads its weights once at `bandwidth` bytes/s (module docstring)."""
    num_experts = weights["num_experts"]
    distinct = num_experts * (1 - (1 - min(avg_experts, num_experts) / num_experts) ** batch)
    step_bytes = weights["other"] + weights["layers"] * distinct * weights["expert"]
    return batch / (step_bytes / bandwidth)


def copy_bandwidth(device) -> float | None:
    """Bytes/s of a 1 GiB device copy (read + write), the median of 10; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = [timed(lambda: target.copy_(source), device) for _ in range(12)][2:]
    return 2 * source.numel() / statistics.median(times)


def model_copies(model, count: int) -> list:
    """`count` copies of the model's module tree sharing its weights and buffers (no memory for them). Each is
    patched and compiled on its own, so that configurations can be timed in turn, round after round."""
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    copies = [copy.deepcopy(model, memo=dict(shared)) for _ in range(count)]
    for twin in copies:  # after a compiled generate of `model`, a copy would decode with its forward (run 64)
        bh_routing.drop_copied_compiled_call(twin)
    return copies


def patch_copy(model, name: str):
    """The patcher of configuration `name` (`CONFIGS`) on this copy of the model, patched; None for native."""
    spec, options = CONFIGS[name]
    if spec is None:
        return None
    patcher = bh_routing.MoERouterPatcher(model, **options)
    bh_routing.RoutingConfig.parse(spec).apply(patcher)
    return patcher


def prepare(copies: dict, path: str, prompt, args) -> dict:
    """Each copy patched with its configuration (native: none), warmed up (compiled on the static path; the
    time apart) and its reference generate kept (`reference_generate`): name -> {"patcher", "warm_up_s",
    "cudagraph_skips", "output", "stats"}."""
    states = {}
    for name, model in copies.items():
        patcher = patch_copy(model, name)
        skips_before = cudagraph_skips()
        warm_up = timed(functools.partial(generate, model, prompt, path, args.new_tokens), args.device)
        reference = reference_generate(patcher, model, prompt, path, args)
        states[name] = {"patcher": patcher, "warm_up_s": warm_up,
                        "cudagraph_skips": cudagraph_skips() - skips_before,  # compiled graphs run without CUDA graphs
                        **reference}  # fmt: skip
        if records_statistics(patcher):
            patcher.reset_stats()  # the statistics of the timed rounds only
    return states


def records_statistics(patcher) -> bool:
    """Whether a configuration's patcher (None: native) records the routing statistics."""
    return patcher is not None and patcher.record_statistics


def reference_generate(patcher, model, prompt, path: str, args) -> dict:
    """The configuration's reference generate (its logits kept) and the statistics of that generate alone:
    {"output", "stats"} ({} without statistics)."""
    if records_statistics(patcher):
        patcher.reset_stats()
    output = generate(model, prompt, path, args.new_tokens, logits=True)
    stats = patcher.get_stats() if records_statistics(patcher) else {}
    return {"output": output, "stats": stats}


def routed_positions(stats: dict, prompt, args) -> dict:
    """The positions the configuration's statistics counted in its reference generate, and whether they are
    every position it forwarded (the prompt, then each decode step but the last: a compiled decode step that
    ran another model's forward, as a copy's did before `drop_copied_compiled_call`, routes none of them);
    None without statistics."""
    if "num_tokens" not in stats:
        return {"routed_positions": None, "every_position_routed": None}
    expected = prompt.shape[0] * (prompt.shape[1] + args.new_tokens - 1)
    return {"routed_positions": stats["num_tokens"], "every_position_routed": stats["num_tokens"] == expected}


def rotated_rounds(names: list[str], repeats: int, time_one) -> tuple[dict, ...]:
    """`repeats` rounds, each calling time_one(name) -> a tuple of seconds for every configuration once, in an
    order rotated by one each round, after a round that is not kept (the first calls after compiling others).
    One dict per position of that tuple: name -> its times per round."""
    kept = {name: [] for name in names}
    for round_index in range(-1, repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times = time_one(name)
            if round_index >= 0:
                kept[name].append(times)
    return tuple({name: [times[i] for times in kept[name]] for name in names} for i in range(len(times)))


def first_token_generate(model, prompt, path: str, args):
    """A one-token generate (the prefill alone) on the static cache of the whole generate's length, so that it
    shares the whole generate's cache and compiled graph."""
    return functools.partial(generate, model, prompt, path, 1, cache_tokens=prompt.shape[1] + args.new_tokens)


def time_rounds(copies: dict, path: str, prompt, repeats: int, args) -> tuple[dict, dict]:
    """`rotated_rounds` of every copy: a drift in the host's speed (most of a decode step at batch 1) falls on
    every configuration alike, and each round gives a ratio to native. Each configuration also generates one
    token (the prefill, eager on every path) just before, so that a step of decoding can be told apart.
    (name -> seconds per round, name -> seconds of the one-token generate per round)."""

    def time_one(name):
        work = functools.partial(generate, copies[name], prompt, path, args.new_tokens)
        return timed(first_token_generate(copies[name], prompt, path, args), args.device), timed(work, args.device)

    first_token, seconds = rotated_rounds(list(copies), repeats, time_one)
    return seconds, first_token


HOST_EVENTS = {  # profiler CPU events counted per generated token: the host's share of a step
    "dynamo_lookups": "TorchDynamo Cache Lookup",  # guard evaluations before a compiled call
    "graph_launches": "cudaGraphLaunch",  # CUDA graphs replayed
    "kernel_launches": "cudaLaunchKernel",  # kernels launched one by one, outside a graph
}


def device_profile(model, prompt, path: str, args) -> dict:
    """GPU work per generated token in one generate, from torch.profiler (empty off CUDA): its milliseconds
    (kernels, copies; against the wall time it splits a step into the device's work and the host's), its
    number of kernels (a decode step at batch 1 is bound by them), the 12 kernels that take the most time
    (name -> [launches per token, microseconds per token]) and the host events of `HOST_EVENTS` per token,
    counted and timed (host times with the profiler on, which lengthens them)."""
    if torch.device(args.device).type != "cuda":
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        generate(model, prompt, path, args.new_tokens)
        bh_experiment.synchronize(args.device)
    tokens, kernels, host = prompt.shape[0] * args.new_tokens, {}, {}
    for event in profiler.events():
        table = kernels if event.device_type == DeviceType.CUDA else host
        if table is kernels or event.name in HOST_EVENTS.values():
            launches, microseconds = table.get(event.name, (0, 0.0))
            table[event.name] = (launches + 1 / tokens, microseconds + event.time_range.elapsed_us() / tokens)
    events = {key: host.get(name, (0.0, 0.0)) for key, name in HOST_EVENTS.items()}
    return {
        "device_ms_per_token": sum(us for _, us in kernels.values()) / 1000,
        "kernels_per_token": sum(launches for launches, _ in kernels.values()),
        "top_kernels": dict(sorted(kernels.items(), key=lambda item: -item[1][1])[:12]),
        **{f"{key}_per_token": count for key, (count, _) in events.items()},
        **{f"{key}_us_per_token": microseconds for key, (_, microseconds) in events.items()},  # profiler on
    }


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval for the median of independent, identically distributed values: the order
    statistics (x_(k), x_(n+1-k)) with the largest k whose coverage 1 - 2 P(B <= k - 1), B ~ Binomial(n, 1/2),
    is still >= level (the whole range when n is too small to reach it). Rounds are only close to that
    assumption: a drift of the host's speed within a round is shared by its configurations, not removed."""
    ordered, n = sorted(values), len(values)
    below = [math.comb(n, i) / 2**n for i in range(n + 1)]  # P(B = i)
    k = 1
    while k < (n + 1) // 2 and 1 - 2 * sum(below[: k + 1]) >= level:  # the coverage of (x_(k+1), x_(n-k))
        k += 1
    return ordered[k - 1], ordered[n - k]


def ratio_fields(seconds: dict, name: str, tokens: int) -> dict:
    """`name`'s tokens/s over its rounds (median and range) and its ratio to native per round (median, range,
    95% interval of the median), with the raw seconds per round for any other statistic."""
    ratios = sorted(a / b for a, b in zip(seconds["native"], seconds[name], strict=True))
    return {
        **bh_experiment.throughput_summary(tokens, seconds[name]),
        "ratio_to_native": statistics.median(ratios),
        "ratio_to_native_min": ratios[0],
        "ratio_to_native_max": ratios[-1],
        "ratio_to_native_ci95": median_interval(ratios),
        "seconds_per_round": seconds[name],
    }


def outcome_fields(model, name: str, state: dict, stats: dict, native, prompt, args) -> dict:
    """What a configuration's routing did: its experts (native: the router's k; None where no statistics were
    read, until `add_floors` takes its twin's with statistics), its experts path, compiled graphs run without
    CUDA graphs, its tokens against native's, and whether its statistics counted every position of its
    reference generate (`routed_positions`)."""
    unread = bh_routing.find_moe_layers(model)[0].spec.top_k if CONFIGS[name][0] is None else None
    return {
        "avg_experts": stats.get("avg_experts", unread),
        "experts_implementation": stats.get("experts_implementation"),
        "cudagraph_skips": state["cudagraph_skips"],
        "tokens": state["output"].sequences[:, prompt.shape[1] :].tolist(),
        "same_tokens_as_native": bool(torch.equal(state["output"].sequences, native.sequences)),
        **routed_positions(state["stats"], prompt, args),
    }


def decode_seconds(seconds: list[float], first_token: list[float]) -> list[float]:
    """Per round, the decode steps' seconds: the generate's time less its first token's."""
    return [total - first for total, first in zip(seconds, first_token, strict=True)]


def decode_steps(seconds: list[float], first_token: list[float], args) -> list[float]:
    """Per round, a decode step's seconds: `decode_seconds` over the tokens after the first."""
    return [decode / (args.new_tokens - 1) for decode in decode_seconds(seconds, first_token)]


def block_rows(copies: dict, states: dict, timings: tuple, path: str, prompt, args) -> dict:
    """One row per configuration: tokens/s and the ratio to native per round (`ratio_fields`), the first
    token's time and a decode step's (medians over rounds), the device's share, the routing's outcome."""
    (seconds, first_token), native, rows = timings, states["native"]["output"], {}
    tokens = prompt.shape[0] * args.new_tokens
    for name, state in states.items():
        patcher = state["patcher"]
        stats = patcher.get_stats() if records_statistics(patcher) else {}
        steps = decode_steps(seconds[name], first_token[name], args)
        rows[name] = {
            "warm_up_s": state["warm_up_s"],
            **ratio_fields(seconds, name, tokens),
            "first_token_seconds_per_round": first_token[name],
            "first_token_ms": 1000 * statistics.median(first_token[name]),
            "decode_step_ms": 1000 * statistics.median(steps),
            "device_ms_per_token": None,  # on CUDA, with kernels_per_token and top_kernels: `device_profile`
            **device_profile(copies[name], prompt, path, args),
            **outcome_fields(copies[name], name, state, stats, native, prompt, args),
        }
    return rows


class RouteRecorder:
    """A layer's traced route (`PatchedRouter.route`, what a compiled forward runs; None: the native routing,
    observed) that also keeps, in a device ring updated in place (`routing_statistics.ring_write`), the logits it was
    given, the experts it chose and its count, one float64 row [E + K + 1] per routed row (exact for any float
    dtype and for the integers): the compiled path's decisions and their very inputs, to replay eagerly
    (`check_counts`). The prefill runs eagerly on every path and does not reach it: decode steps only."""

    def __init__(self, route, capacity: int, num_experts: int, slots: int, device):
        self.route, self.num_experts = route, num_experts
        self.rows = routing_statistics.static_zeros((capacity, num_experts + slots + 1), torch.float64, device)
        self.written = routing_statistics.static_zeros((1,), torch.int64, device)

    def __call__(self, logits, native_weights, native_index):
        routed = (native_weights, native_index, None)  # the patch observes the native routing (top-k at its k)
        if self.route is not None:  # a route that applies the non-finite rule returns a fourth output, passed on
            routed = self.route(logits, native_weights, native_index)
        _, top_index, expert_counts = routed[:3]
        counts = routing_statistics.flat_counts(top_index, expert_counts)
        row = torch.cat([logits.double(), top_index.double(), counts.double().unsqueeze(-1)], dim=-1)
        routing_statistics.ring_write(self.rows, self.written, row)
        return routed

    def recorded(self) -> dict:
        """The rows recorded so far, in order (a run must not write more than the capacity): logits [N, E]
        float64, index [N, K] and counts [N] int64."""
        written, capacity = int(self.written), self.rows.shape[0]
        if written > capacity:
            raise ValueError(f"{written} rows recorded in a ring of {capacity}: raise the capacity")
        rows = self.rows[:written]
        experts = self.num_experts
        return {"logits": rows[:, :experts], "index": rows[:, experts:-1].long(), "counts": rows[:, -1].long()}


def record_routes(patcher, capacity: int, slots: int) -> list[RouteRecorder]:
    """Each patched layer's traced route replaced by a `RouteRecorder` of it (before the first compiled call)."""
    recorders = []
    for router in patcher.routers:
        patch = getattr(router, bh_routing.PATCH_ATTRIBUTE)
        patch.route = RouteRecorder(patch.route, capacity, patcher.shape.num_experts, slots, router.weight.device)
        recorders.append(patch.route)
    return recorders


def decode_choices(model, prompt, path: str, new_tokens: int) -> torch.Tensor:
    """[L, decode rows, k] the unpatched model's expert choices, sorted, in its decode steps on `path` (an
    eager path: forward hooks on the routers)."""
    batch, layers = prompt.shape[0], bh_routing.find_moe_layers(model)
    choices = [[] for _ in layers]

    def keep(layer: int, module, args, output) -> None:
        if output[2].shape[0] == batch:  # a decode step: one row per sequence
            choices[layer].append(output[2].sort(dim=-1).values)

    handles = [layer.router.register_forward_hook(functools.partial(keep, i)) for i, layer in enumerate(layers)]
    try:
        generate(model, prompt, path, new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.cat(layer_choices) for layer_choices in choices])


def agreement(first: torch.Tensor, second: torch.Tensor) -> dict:
    """How many decisions two runs share: elements of [L, rows] counts, or rows of [L, rows, k] expert sets."""
    if first.shape != second.shape:
        return {"shapes": [list(first.shape), list(second.shape)], "equal": False}
    same = first.cpu() == second.cpu()
    same = same.all(dim=-1) if same.dim() == 3 else same
    return {"decisions": same.numel(), "different": int((~same).sum()), "equal": bool(same.all())}


def compiled_decode_records(model, prompt, spec: str, new_tokens: int) -> tuple[list[dict], list, torch.Tensor]:
    """A generate of configuration `spec` on the static compiled path: its decode decisions (every layer's
    `RouteRecorder` rows), the layer routes they replay with, and the per-token counts [rows, L] of the
    whole generate (prefill rows, then decode rows)."""
    capacity = prompt.shape[0] * new_tokens
    with bh_routing.MoERouterPatcher(model, record_token_counts=True) as patcher:
        bh_routing.RoutingConfig.parse(spec).apply(patcher)
        recorders = record_routes(patcher, capacity, slots=CHECKED_K)
        generate(model, prompt, "static_compiled", new_tokens)
        return [r.recorded() for r in recorders], [r.route for r in recorders], patcher.statistics.token_counts()


def bh_counts_of(model, prompt, path: str, new_tokens: int) -> torch.Tensor:
    """[rows, L] `CHECKED_BH`'s per-token counts of a generate on `path` (prefill rows, then decode rows)."""
    with bh_routing.MoERouterPatcher(model, record_token_counts=True) as patcher:
        bh_routing.RoutingConfig.parse(CHECKED_BH).apply(patcher)
        generate(model, prompt, path, new_tokens)
        return patcher.statistics.token_counts()


def torch_routes(model) -> list:
    """`CHECKED_BH`'s layer routes through torch's operations (fused_routing=False), as the patcher builds them
    (`PatchedRouter.route`, read as `record_routes` does): on CUDA, the reference the fused kernel
    (`fused_bh_route`) that the patcher routes with is checked against."""
    with bh_routing.MoERouterPatcher(model, record_statistics=False, fused_routing=False) as patcher:
        bh_routing.RoutingConfig.parse(CHECKED_BH).apply(patcher)
        return [getattr(router, bh_routing.PATCH_ATTRIBUTE).route for router in patcher.routers]


def check_counts(model, prompt) -> dict:
    """BH's counts on the static compiled path against the eager computation, on the same inputs:
    routing: the compiled forward's decode decisions against BH's layer route run eagerly on the very logits
        that forward routed (`RouteRecorder`), and against torch's route of them (`torch_routes`);
    generation: the per-token counts of a whole generate, static compiled path against the dynamic and the
        static eager paths; their router inputs differ by the kernels' bf16 rounding, so native_sets gives
        the unpatched router's own decode choices on those paths against the compiled path's (top-8 patch)."""
    new_tokens, decode_start = CHECKED_TOKENS, prompt.shape[1] * prompt.shape[0]
    records, routes, compiled_counts = compiled_decode_records(model, prompt, CHECKED_BH, new_tokens)
    dtype = bh_routing.find_moe_layers(model)[0].router.weight.dtype
    replayed = [route(r["logits"].to(dtype), None, None) for r, route in zip(records, routes, strict=True)]
    by_torch = [route(r["logits"].to(dtype), None, None) for r, route in zip(records, torch_routes(model), strict=True)]
    recorded = {name: torch.stack([r[name] for r in records]) for name in ("counts", "index")}
    result = {"new_tokens": new_tokens, "config": CHECKED_BH,
              "routing": agreement(recorded["counts"], torch.stack([r[2] for r in replayed])),
              "routing_experts": agreement(recorded["index"], torch.stack([r[1] for r in replayed])),
              "routing_torch_route": agreement(recorded["counts"], torch.stack([r[2] for r in by_torch]))}  # fmt: skip
    counts = {path: bh_counts_of(model, prompt, path, new_tokens) for path in ("dynamic", "static")}
    native = compiled_decode_records(model, prompt, f"topk:k={CHECKED_K}", new_tokens)[0]
    compiled_sets = torch.stack([r["index"].sort(dim=-1).values for r in native])
    for path in ("dynamic", "static"):
        result[f"generation_vs_{path}"] = agreement(compiled_counts, counts[path])
        result[f"generation_vs_{path}_decode"] = agreement(compiled_counts[decode_start:], counts[path][decode_start:])
        result[f"native_sets_vs_{path}"] = agreement(compiled_sets, decode_choices(model, prompt, path, new_tokens))
    return result


def random_prompt(model, batch: int, args):
    """[batch, --prompt-tokens] random token ids on --device, the same for a batch size in every run."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(3, model.config.vocab_size, (batch, args.prompt_tokens), generator=generator)
    return prompt.to(args.device)


def native_first(configs: list[str]) -> list[str]:
    """The configurations without repeats, native (the baseline of every ratio) first."""
    return ["native"] + [name for name in dict.fromkeys(configs) if name != "native"]


MODES = ("copies", "switching")  # a copy of the model per configuration; one model, configurations in turn


class Block(NamedTuple):
    """Configurations timed together on one path and batch size, in `repeats` rounds, in one of `MODES`."""

    path: str
    batch: int
    configs: tuple[str, ...]  # native first
    repeats: int
    mode: str = "copies"


def row_key(mode: str, path: str, batch: int, name: str) -> str:
    """A row's key in the results: the copies mode's as before the modes, the switching mode's prefixed."""
    return f"{'' if mode == 'copies' else mode + '/'}{path}/b{batch}/{name}"


_TOP8_BH = ("native", "topk_k8", "topk_k8_nostats", "bh_k8_a005", "bh_k8_a005_nostats")  # statistics on and off
TARGET_BLOCKS = (  # --targets: every block that the issue's targets (`TARGETS`) read, in one process, in the
    # order a run that device time cuts short should keep them: batch 16 before the dynamic path, the longest,
    # since run 64's batch-16 rows were void and its targets are unmeasured since run 48
    Block("static_compiled", 1, (*_TOP8_BH, "topk_k2", "bh_k8_a005_torchroute"), 20),
    Block("static_compiled", 16, ("native", "topk_k8", "topk_k2", "bh_k8_a005"), 10),
    Block("dynamic", 1, _TOP8_BH, 30),  # the eager path's host time varies the most from round to round
)


def blocks(args) -> list[Block]:
    """The blocks to run: `TARGET_BLOCKS` with --targets (--repeats, if given, for all of them), each in every
    mode before the next, so that a run cut short has its first blocks' targets in both modes; else every
    --paths and --batch-sizes with --configs."""
    if args.targets:
        return [block._replace(repeats=args.repeats or block.repeats, mode=mode)
                for block in TARGET_BLOCKS for mode in args.modes]  # fmt: skip
    configs = tuple(native_first(args.configs))
    return [Block(path, batch, configs, args.repeats or 3, mode)
            for mode in args.modes for path in args.paths for batch in args.batch_sizes]  # fmt: skip


def copies_rows(model, block: Block, prompt, args) -> dict:
    """The copies mode: each configuration on its own copy, patched once, timed in turn (`time_rounds`); then
    each copy unpatched must generate native's logits again, bit for bit."""
    copies = dict(zip(block.configs, model_copies(model, len(block.configs)), strict=True))
    states = prepare(copies, block.path, prompt, args)
    timings = time_rounds(copies, block.path, prompt, block.repeats, args)
    rows = block_rows(copies, states, timings, block.path, prompt, args)
    native_logits = states["native"]["output"].logits
    for name, state in states.items():
        if state["patcher"] is not None:
            state["patcher"].unpatch()
        after = generate(copies[name], prompt, block.path, args.new_tokens, logits=True).logits
        rows[name]["unpatched_bit_identical"] = all(map(torch.equal, after, native_logits))
    return rows


class Switcher:
    """One model patched with one configuration at a time, as the notebook does: a patcher per statistics
    setting (the notebook keeps one), each configuration applied to it and unpatched after its use."""

    def __init__(self, model):
        self.model, self.patchers = model, {}

    def patch(self, name: str):
        """The model patched with `name` (`CONFIGS`): its patcher, or None for native."""
        spec, options = CONFIGS[name]
        if spec is None:
            return None
        key = tuple(sorted(options.items()))
        if key not in self.patchers:
            self.patchers[key] = bh_routing.MoERouterPatcher(self.model, **options)
        bh_routing.RoutingConfig.parse(spec).apply(self.patchers[key])
        return self.patchers[key]

    def in_turn(self, name: str, *measures) -> tuple:
        """Patch `name`, call each of `measures` in turn (the first: the first generate after the switch),
        unpatch."""
        patcher = self.patch(name)
        try:
            return tuple(measure() for measure in measures)
        finally:
            if patcher is not None:
                patcher.unpatch()

    def twice(self, name: str, measure) -> tuple:
        """Patch `name`, call measure() for the first generate after the switch and again, unpatch."""
        return self.in_turn(name, measure, measure)

    def timed(self, name: str, path: str, prompt, args) -> tuple[float, float, float]:
        """Patch `name`, time the first generate after the switch and a second one, unpatch; then a one-token
        generate (the prefill alone) as the first generate after a switch of its own, so that its prefill runs
        as the first whole generate's did: a third generate of the same patch would capture the eager route's
        CUDA graphs for the prompt's shape (`CudaGraphed`, at a shape's third call) and time the capture."""
        work = functools.partial(generate, self.model, prompt, path, args.new_tokens)
        measure = functools.partial(timed, work, args.device)
        one = functools.partial(timed, first_token_generate(self.model, prompt, path, args), args.device)
        return self.in_turn(name, measure, measure) + self.in_turn(name, one)


def switching_state(switcher: Switcher, name: str, path: str, prompt, args) -> dict:
    """One configuration's warm-up on the shared model (its compilation, timed apart), then its reference
    output, statistics and device profile while patched."""
    patcher = switcher.patch(name)
    try:
        skips_before = cudagraph_skips()
        warm_up = timed(functools.partial(generate, switcher.model, prompt, path, args.new_tokens), args.device)
        reference = reference_generate(patcher, switcher.model, prompt, path, args)
        profile = device_profile(switcher.model, prompt, path, args)
    finally:
        if patcher is not None:
            patcher.unpatch()
    return {"warm_up_s": warm_up, "cudagraph_skips": cudagraph_skips() - skips_before, **reference,
            "profile": profile}  # fmt: skip


def switching_rows(model, block: Block, prompt, args) -> dict:
    """The switching mode: every configuration warmed up once on the one model, then `rotated_rounds`, each
    switching to every configuration (the first generate after the switch timed, then a second), the ratio to
    native per round from the first; finally the model, unpatched after every switch, must generate native's
    logits bit for bit."""
    switcher, names = Switcher(model), list(block.configs)
    states = {name: switching_state(switcher, name, block.path, prompt, args) for name in names}
    timing = rotated_rounds(names, block.repeats, lambda name: switcher.timed(name, block.path, prompt, args))
    first, steady, first_token = timing
    after = generate(model, prompt, block.path, args.new_tokens, logits=True).logits
    restored = all(map(torch.equal, after, states["native"]["output"].logits))
    tokens, native, rows = prompt.shape[0] * args.new_tokens, states["native"]["output"], {}
    for name, state in states.items():
        penalties = [a / b for a, b in zip(first[name], steady[name], strict=True)]
        rows[name] = {
            "warm_up_s": state["warm_up_s"],
            **ratio_fields(first, name, tokens),  # the first generate after each switch
            "steady_seconds_per_round": steady[name],  # the second generate of the same patch
            "switch_penalty": statistics.median(penalties),  # first after the switch over steady: 1 = none
            "first_token_seconds_per_round": first_token[name],  # a one-token generate after a switch of its own
            "first_token_ms": 1000 * statistics.median(first_token[name]),
            "decode_step_ms": 1000 * statistics.median(decode_steps(first[name], first_token[name], args)),
            "device_ms_per_token": None,
            **state["profile"],
            **outcome_fields(model, name, state, state["stats"], native, prompt, args),
            "unpatched_bit_identical": restored,  # the one model, after every switch of the block
        }
    return rows


def run_block(model, block: Block, args, results: dict, save) -> None:
    """Every configuration of a block timed in its mode (`copies_rows` or `switching_rows`). The block's rows
    are saved together, as their ratios come from the same rounds; a rerun skips a finished block."""
    keys = {name: row_key(block.mode, block.path, block.batch, name) for name in block.configs}
    if not args.redo and all(key in results["rows"] for key in keys.values()):
        return
    prompt = random_prompt(model, block.batch, args)
    rows = (copies_rows if block.mode == "copies" else switching_rows)(model, block, prompt, args)
    for name, row in rows.items():
        results["rows"][keys[name]] = row | {"path": block.path, "batch": block.batch, "config": name,
                                             "mode": block.mode, "process": results["process"]}  # fmt: skip
        print(f"{keys[name]}: {row['tokens_per_second']:.1f} tok/s, {row['ratio_to_native']:.2f}x native, "
              f"{number(row['avg_experts'])} experts, warm-up {row['warm_up_s']:.1f} s", flush=True)  # fmt: skip
    save()


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    """Markdown: one row per path, batch and configuration; the ratio to native is the median over rounds
    of the same process, with its range and the 95% interval of the median (`median_interval`)."""
    lines = [
        "| mode | path | batch | config | avg experts | tok/s (range) | vs native (range over rounds; 95% interval of "
        "the median) | first token ms | decode step ms | GPU ms/token | kernels/token | HBM floor tok/s | of floor | "
        "warm-up s | same tokens as native | unpatched bit-identical |",
        "|" + " --- |" * 16,
    ]
    for row in results["rows"].values():
        speed, floor, device_ms = (
            row["tokens_per_second"],
            row.get("hbm_floor_tokens_per_second"),
            row.get("device_ms_per_token"),
        )
        ratio = "-"
        if "ratio_to_native" in row:  # rows of runs before the interleaved rounds have none
            ratio = f"{row['ratio_to_native']:.2f}x ({row['ratio_to_native_min']:.2f}-{row['ratio_to_native_max']:.2f}"
            interval = row.get("ratio_to_native_ci95")  # rows of runs 28-31 have none
            ratio += f"; median in {interval[0]:.2f}-{interval[1]:.2f})" if interval else ")"
        floor_cells = f"{floor:.0f} | {speed / floor:.0%}" if floor else "- | -"
        same_tokens = {True: "yes", False: "no", None: "-"}[row.get("same_tokens_as_native")]
        lines.append(
            f"| {row.get('mode', 'copies')} | {row['path']} | {row['batch']} | {row['config']} | "
            f"{number(row['avg_experts'])} | "
            f"{speed:.1f} ({row['tokens_per_second_min']:.1f}-{row['tokens_per_second_max']:.1f}) | {ratio} | "
            f"{number(row.get('first_token_ms'))} | {number(row.get('decode_step_ms'))} | "
            f"{number(device_ms)} | {number(row.get('kernels_per_token'), 0)} | {floor_cells} | "
            f"{row['warm_up_s']:.1f} | {same_tokens} | "
            f"{'yes' if row['unpatched_bit_identical'] else 'no'} |"
        )
    return "\n".join(lines)


TARGETS = (  # the issues' speed targets: (issue, dtype, path, batch, config, baseline, lowest, highest) on tokens/s
    # of config over baseline's, the median over the rounds of one block (one process); highest None: no bound
    (10, "bfloat16", "static_compiled", 1, "topk_k8", "native", 0.97, None),
    (10, "bfloat16", "static_compiled", 1, "topk_k2", "native", 1.25, None),
    (10, "bfloat16", "static_compiled", 1, "bh_k8_a005", "native", 1.25, None),
    (10, "bfloat16", "static_compiled", 16, "topk_k2", "native", 1.3, None),
    (10, "bfloat16", "static_compiled", 16, "bh_k8_a005", "native", 1.3, None),
    (10, "bfloat16", "dynamic", 1, "topk_k8", "native", 0.95, None),
    (10, "bfloat16", "dynamic", 1, "bh_k8_a005", "native", 0.95, None),
    (10, "bfloat16", "static_compiled", 1, "topk_k8", "topk_k8_nostats", 0.97, 1.03),  # statistics on vs off: within 3%
    (10, "bfloat16", "static_compiled", 1, "bh_k8_a005", "bh_k8_a005_nostats", 0.97, 1.03),
    (10, "bfloat16", "dynamic", 1, "topk_k8", "topk_k8_nostats", 0.97, 1.03),
    (10, "bfloat16", "dynamic", 1, "bh_k8_a005", "bh_k8_a005_nostats", 0.97, 1.03),
    # issue 29's, in both modes: BH at about one expert beats top-2; batch 16 against top-8 on the variable-k path
    (29, "bfloat16", "static_compiled", 1, "bh_k8_a005", "native", 1.35, None),
    (29, "bfloat16", "static_compiled", 1, "topk_k2", "native", 1.30, None),
    (29, "bfloat16", "static_compiled", 16, "bh_k8_a005", "topk_k8", 1.3, None),
    (29, "bfloat16", "static_compiled", 16, "topk_k2", "topk_k8", 1.3, None),
    (29, "bfloat16", "dynamic", 1, "topk_k8", "native", 0.97, None),
    (29, "bfloat16", "dynamic", 1, "bh_k8_a005", "native", 0.97, None),
    (29, "bfloat16", "static_compiled", 1, "bh_k8_a005", "bh_k8_a005_torchroute", 1.0, None),  # the fused BH route pays
    # issue 29's T4 dtype, on an H100: the variable-k path without torch's grouped GEMM against native in float16
    (29, "float16", "static_compiled", 1, "bh_k8_a005", "native", 1.25, None),
    (29, "float16", "static_compiled", 1, "topk_k2", "native", 1.25, None),
)


def target_rows(results: dict) -> list[dict]:
    """Each speed target of `TARGETS` whose rows `results` holds from one process, in each mode: the per-round ratio
    (baseline's seconds over config's), its median and the 95% interval of the median (`median_interval`),
    whether the median meets the target and whether the whole interval does."""
    found, measured = [], results.get("settings", {}).get("dtype") or "bfloat16"  # files before --dtype: bf16
    for mode, (issue, dtype, path, batch, config, baseline, lowest, highest) in itertools.product(MODES, TARGETS):
        rows = [results["rows"].get(row_key(mode, path, batch, name)) for name in (config, baseline)]
        if dtype != measured or None in rows or rows[0]["process"] != rows[1]["process"]:
            continue
        ratios = [b / a for a, b in zip(rows[0]["seconds_per_round"], rows[1]["seconds_per_round"], strict=True)]
        median, interval = statistics.median(ratios), median_interval(ratios)
        inside = [lowest <= value and (highest is None or value <= highest) for value in (median, *interval)]
        found.append({"issue": issue, "mode": mode, "dtype": dtype, "path": path, "batch": batch, "config": config,
                      "baseline": baseline, "bounds": (lowest, highest),
                      "ratio": median, "ci95": interval, "rounds": len(ratios),
                      "met": inside[0], "interval_met": all(inside[1:]), **decode_ratio(*rows)})  # fmt: skip
    return found


def decode_ratio(row: dict, baseline: dict) -> dict:
    """Not a target: the per-round ratio of the decode steps alone (each round's seconds less its first token,
    the prompt's prefill, which runs eagerly on every path and takes about as long for every configuration),
    its median and 95% interval, and the first token's median share of the baseline's rounds; None where the
    rows have no first-token times (switching rows of run 63 and before)."""
    if "first_token_seconds_per_round" not in row or "first_token_seconds_per_round" not in baseline:
        return {"decode_ratio": None, "decode_ci95": None, "first_token_share": None}
    rounds = [(r["seconds_per_round"], r["first_token_seconds_per_round"]) for r in (row, baseline)]
    ratios = [b / a for a, b in zip(*(decode_seconds(*pair) for pair in rounds), strict=True)]
    share = statistics.median(first / total for total, first in zip(*rounds[1], strict=True))
    return {"decode_ratio": statistics.median(ratios), "decode_ci95": median_interval(ratios),
            "first_token_share": share}  # fmt: skip


def correctness_lines(results: dict) -> list[str]:
    """The correctness targets: top-8 generates native's tokens and unpatch restores native's logits bit for
    bit in every block; BH's counts of `check_counts`."""
    lines = []

    def block_of(row):
        return row.get("mode", "copies"), row["path"], row["batch"]

    for block in sorted({block_of(row) for row in results["rows"].values()}):
        rows = [row for row in results["rows"].values() if block_of(row) == block]
        top8 = [row["same_tokens_as_native"] for row in rows if row["config"] == "topk_k8"]
        restored = sum(row["unpatched_bit_identical"] for row in rows)
        routed = [row["every_position_routed"] for row in rows if row.get("every_position_routed") is not None]
        lines.append(f"- {block[0]}, {block[1]}, batch {block[2]}: top-8 generates native's tokens: "
                     f"{'yes' if top8 and all(top8) else 'no' if top8 else '-'}; unpatched bit-identical: "
                     f"{restored} of {len(rows)} configurations; every position routed by the configuration: "
                     + (f"{sum(routed)} of {len(routed)} with statistics" if routed else "not recorded"))  # fmt: skip
    for name, check in results["checks"].items():
        parts = [f"{key}: " + (f"{part['decisions'] - part['different']} of {part['decisions']} equal"
                               if "decisions" in part else f"shapes differ {part['shapes']}")
                 for key, part in check.items() if isinstance(part, dict)]  # fmt: skip
        lines.append(f"- counts {name} ({check.get('config', 'BH')}, {check.get('new_tokens', 8)} new tokens): "
                     + "; ".join(parts))  # fmt: skip
    return lines


def target_table(results: dict) -> str:
    """Markdown: the speed targets of `TARGETS` found in `results` (`target_rows`), then the correctness ones."""
    lines = ["| issue | mode | path | batch | config | against | target | median ratio (95% interval) | rounds | met | "
             "interval met | not a target: decode steps alone (95% interval); first token's share of the baseline |",
             "|" + " --- |" * 12]  # fmt: skip
    for row in target_rows(results):
        lowest, highest = row["bounds"]
        target = f">= {lowest:.2f}x" if highest is None else f"{lowest:.2f}-{highest:.2f}x"
        decode = "-"
        if row["decode_ratio"] is not None:
            low, high = row["decode_ci95"]
            decode = f"{row['decode_ratio']:.2f}x ({low:.2f}-{high:.2f}); {row['first_token_share']:.0%}"
        lines.append(f"| {row['issue']} | {row['mode']} | {row['path']} | {row['batch']} | {row['config']} | "
                     f"{row['baseline']} | {target} | "
                     f"{row['ratio']:.2f}x ({row['ci95'][0]:.2f}-{row['ci95'][1]:.2f}) | {row['rounds']} | "
                     f"{'yes' if row['met'] else 'no'} | {'yes' if row['interval_met'] else 'no'} | "
                     f"{decode} |")  # fmt: skip
    return "\n".join(lines + [""] + correctness_lines(results))


def add_floors(results: dict, model) -> None:
    """Each row's HBM floor (module docstring), from the card's measured copy bandwidth."""
    bandwidth = results["environment"].get("copy_bandwidth_bytes_per_s")
    weights = weight_bytes(model)
    results["weight_bytes"] = weights
    for row in results["rows"].values():
        experts = row["avg_experts"]
        if row["config"].endswith("_nostats"):  # same routing as with statistics: read its count
            twin_name = row["config"][: -len("_nostats")]
            twin = results["rows"].get(row_key(row.get("mode", "copies"), row["path"], row["batch"], twin_name))
            experts = row["avg_experts"] = twin["avg_experts"] if twin else None  # None: not measured
        known = bandwidth and experts is not None
        row["hbm_floor_tokens_per_second"] = hbm_floor(weights, experts, row["batch"], bandwidth) if known else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"),
                        help="a config.json (random bf16 weights) or 'embedded'")  # fmt: skip
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the config's (a quick check)")
    parser.add_argument("--paths", nargs="+", default=["dynamic", "static_compiled"],
                        choices=list(bh_experiment.GENERATION_PATHS))  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="switching: one model, configurations patched in turn (the user's flow); copies: a "
                             "copy of the model per configuration")  # fmt: skip
    parser.add_argument("--targets", action="store_true",
                        help="run TARGET_BLOCKS, not --paths, --batch-sizes and --configs")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=None, help="rounds per block (default 3; --targets: its own)")
    parser.add_argument("--check-counts", nargs="*", type=int, default=[], metavar="BATCH",
                        help="after the blocks, `check_counts` at these batch sizes")  # fmt: skip
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="the weights' dtype (default: bf16 for a config's shape, the device's for 'embedded')",
    )
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--emulate-precision-casts", action="store_true",
                        help="inductor rounds at every dtype cast, as eager does")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the tables of --out and exit")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.new_tokens < 2 or (args.repeats is not None and args.repeats < 1):
        parser.error(f"--new-tokens must be >= 2 and --repeats >= 1, got {args.new_tokens} and {args.repeats}")
    if any(batch < 1 for batch in args.batch_sizes + args.check_counts):
        parser.error(f"batch sizes must be >= 1, got {args.batch_sizes} and --check-counts {args.check_counts}")
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}, "checks": {}}
    if not args.table:
        measure(args, results)
    print(table(results))
    print(target_table(results))


def measure(args, results: dict) -> None:
    if args.emulate_precision_casts:
        torch._inductor.config.emulate_precision_casts = True
    model = load(args.model, args.device, args.layers, args.dtype)
    dtype, saved = str(model.dtype).removeprefix("torch."), results.get("settings", {}).get("dtype")
    if results["rows"] and saved not in (None, dtype):  # one file, one dtype: its targets read one
        raise SystemExit(f"--out {args.out} holds rows in {saved}, this run's model is in {dtype}: use another --out")
    environment = bh_experiment.environment_info(model, args.device)
    environment["copy_bandwidth_bytes_per_s"] = copy_bandwidth(args.device)
    results["environment"] = results.get("environment", {}) | environment
    results["process"] = f"{environment.get('date', time.time())}-{id(results)}"
    planned = blocks(args)
    results["settings"] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "model": args.model,
                           "blocks": [block._asdict() for block in planned], "configs": CONFIGS,
                           "emulate_precision_casts": args.emulate_precision_casts,
                           "dtype": dtype}  # fmt: skip

    def save():
        add_floors(results, model)
        bh_experiment.atomic_write_text(args.out, json.dumps(results, indent=1, default=str))

    for block in planned:
        run_block(model, block, args, results, save)
    for batch in args.check_counts:
        if args.redo or f"b{batch}/counts" not in results["checks"]:
            check = check_counts(model, random_prompt(model, batch, args))
            results["checks"][f"b{batch}/counts"] = check | {"process": results["process"]}
            save()
    save()


if __name__ == "__main__":
    main()
