"""Where the host's time goes in generation (issues 10 and 29), under cProfile. Two modes (--mode):

"copies" (issue 10): each configuration on its own copy of the model, as in `bench_generate.py` (same model,
path, prompt and warm-up), then one `generate` per configuration; per function, its calls, own time and
cumulative time (its callees' included) per generated token; the functions whose own time differs most from
native's, and those whose cumulative time does (a chain from `generate` down to where the difference starts);
and the garbage collector's time and collections per token (inside some function's own time, which cProfile
cannot tell apart).

"switching" (issue 29, point 2): one model, each configuration patched, generated and unpatched in turn, as a
user and the notebook do (`bench_generate.Switcher`); after every configuration has been compiled once, a round
of switches profiles the first generate after each switch and the second of the same patch, and lists the
functions whose own time differs most between them (the switch's cost), with what moved in dynamo's and
inductor's counters during each (compilations, recompilations, CUDA-graph skips), the CUDA graphs captured
(calls of `capture_begin`), and the number of dynamo cache entries (guard sets checked in turn) of every
compiled code object after each switch, to show whether they grow with the configurations seen.

cProfile slows Python calls, so the times are relative: they locate host work a configuration or a switch adds
(a hook run eagerly, a guard evaluated in Python, a graph recorded again), they do not measure its cost in a
run without the profiler (bench_generate does).

    python benchmarks/profile_generate.py --configs native topk_k8_nostats bh_k8_a005 --out FILE.json
    python benchmarks/profile_generate.py --mode switching --configs native topk_k2 bh_k8_a005 --out FILE.json
"""

import argparse
import contextlib
import cProfile
import gc
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402 - the benchmark's model, copies, warm-up and generate

import bh_experiment  # noqa: E402


def own_times(model, prompt, path: str, new_tokens: int) -> dict:
    """function -> [calls, own seconds, cumulative seconds] in one generate under cProfile."""
    profiler = cProfile.Profile()
    profiler.runcall(bench_generate.generate, model, prompt, path, new_tokens)
    bh_experiment.synchronize(prompt.device)
    return {
        f"{Path(file).name}:{line}({name})": [calls, own, cumulative]
        for (file, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items()
    }


@contextlib.contextmanager
def collections_timed():
    """The garbage collector's collections inside the block, as [start, stop] pairs of time.perf_counter (their
    time falls inside some function's own time, which cProfile cannot tell apart)."""
    collections = []

    def collecting(phase: str, info: dict) -> None:  # gc.callbacks: called as a collection starts and stops
        if phase == "start":
            collections.append([time.perf_counter(), None])
        else:
            collections[-1][1] = time.perf_counter()

    gc.callbacks.append(collecting)
    try:
        yield collections
    finally:
        gc.callbacks.remove(collecting)


COLUMNS = {"own_us_per_token": 1, "cumulative_us_per_token": 2}  # `differences`' keys: own or cumulative time


def differences(native: dict, other: dict, tokens: int, top: int, key: str = "own_us_per_token") -> list[dict]:
    """The `top` functions whose own time ("own_us_per_token") or cumulative time ("cumulative_us_per_token")
    per generated token differs most between two profiles."""
    column, rows = COLUMNS[key], []
    for name in set(native) | set(other):
        before, after = native.get(name, [0, 0.0, 0.0]), other.get(name, [0, 0.0, 0.0])
        rows.append({"function": name, key: 1e6 * (after[column] - before[column]) / tokens,
                     "calls_per_token": (after[0] - before[0]) / tokens})  # fmt: skip
    return sorted(rows, key=lambda row: -abs(row[key]))[:top]


def print_differences(rows: list[dict], key: str = "own_us_per_token") -> None:
    for row in rows:
        print(f"  {row[key]:+8.1f} us/token {row['calls_per_token']:+6.1f} calls  {row['function']}")


def counter_values() -> dict:
    """dynamo's and inductor's counters (compilations, graph breaks, CUDA-graph skips...) as "group.key" -> n."""
    from torch._dynamo.utils import counters

    return {f"{group}.{key}": value for group, values in counters.items() for key, value in values.items()}


def cache_entries() -> dict:
    """Compiled code object -> its dynamo cache entries, each a set of guards a call may check before one
    passes. Read through dynamo's private tracker of compiled code, the one place that lists them."""
    from torch._dynamo import convert_frame, eval_frame

    codes = [reference() for reference in convert_frame.input_codes.seen]
    entries = {f"{Path(code.co_filename).name}:{code.co_firstlineno}({code.co_name})":
               len(eval_frame._debug_get_cache_entry_list(code)) for code in codes if code is not None}  # fmt: skip
    return {name: count for name, count in entries.items() if count}


def moved_inputs(node, inputs: list) -> list[str]:
    """The graph inputs held by address (static, or in the graphs' pool: those `node` kept an address of) that
    are not where `node` recorded them: name, shape and dtype."""
    return [
        f"{node.wrapped_function.placeholders[i].name} {tuple(inputs[i].shape)} {inputs[i].dtype}"
        for i, address in enumerate(node.static_input_data_ptrs)
        if address is not None and isinstance(inputs[i], torch.Tensor) and inputs[i].data_ptr() != address
    ]


@contextlib.contextmanager
def graph_recordings(events: list):
    """Appends to `events` each recording inductor's CUDA-graph trees make (the function, the graph it is recorded
    under, None at a root, and how many graphs of the same function that place already had: more than 0 is a
    re-recording) and each failed check of a recorded node (its status, and the inputs whose address
    moved). The reasons are read here rather than through TORCH_LOGS=cudagraphs, whose formatting of an address
    mismatch can fail inside torch's logging. Reads torch's private classes: a diagnostic, not an interface."""
    from torch._inductor import cudagraph_trees as trees

    record, check = trees.CUDAGraphTreeManager.record_function, trees.CUDAGraphNode.check_invariants

    def recording(manager, new_inputs, function_id):
        parent = manager.current_node
        siblings = (manager.roots if parent is None else parent.children).get(function_id, [])
        events.append({"recorded": manager.get_func_name(function_id), "under_graph": None if parent is None
                       else parent.id.id, "same_function_nodes_there": len(siblings)})  # fmt: skip
        return record(manager, new_inputs, function_id)

    def checked(node, inputs):
        status, reason = check(node, inputs)
        if status != trees.CheckInvariantStatus.SUCCESS:  # a failed check returns before it drops any input
            moved = moved_inputs(node, inputs)
            events.append({"check_failed_graph": node.id.id, "status": status.name, "moved_inputs": moved})
        return status, reason

    trees.CUDAGraphTreeManager.record_function, trees.CUDAGraphNode.check_invariants = recording, checked
    try:
        yield events
    finally:
        trees.CUDAGraphTreeManager.record_function, trees.CUDAGraphNode.check_invariants = record, check


def observed(model, prompt, path: str, new_tokens: int) -> dict:
    """One generate under cProfile: its profile, the counters that moved, the CUDA graphs captured, and
    inductor's CUDA-graph recordings with their reasons (`graph_recordings`)."""
    before = counter_values()
    with graph_recordings([]) as recordings:
        profile = own_times(model, prompt, path, new_tokens)
    moved = {key: value - before.get(key, 0) for key, value in counter_values().items() if value != before.get(key, 0)}
    captures = sum(calls for name, (calls, _, _) in profile.items() if name.endswith("(capture_begin)"))
    return {"profile": profile, "counters": moved, "graph_captures": captures, "graph_recordings": recordings}


def switching_profiles(model, prompt, args) -> dict:
    """The switching mode's results per configuration: the switch's cost (first generate after it against the
    second), what moved in each, and the cache entries after it."""
    switcher, tokens = bench_generate.Switcher(model), args.batch * args.new_tokens
    for name in args.configs:  # each configuration compiled once, as bench_generate's switching mode does
        switcher.twice(name, lambda: bench_generate.generate(model, prompt, args.path, args.new_tokens))
    results = {}
    for name in args.configs:
        first, steady = switcher.twice(name, lambda: observed(model, prompt, args.path, args.new_tokens))
        results[name] = {
            "first_own_seconds_per_token": sum(own for _, own, _ in first["profile"].values()) / tokens,
            "steady_own_seconds_per_token": sum(own for _, own, _ in steady["profile"].values()) / tokens,
            "first": {key: first[key] for key in ("counters", "graph_captures", "graph_recordings")},
            "steady": {key: steady[key] for key in ("counters", "graph_captures", "graph_recordings")},
            "cache_entries": cache_entries(),
            "switch_cost": differences(steady["profile"], first["profile"], tokens, args.top),
        }
        row = results[name]
        print(f"{name}: first after the switch {1e3 * row['first_own_seconds_per_token']:.2f} ms/token, steady "
              f"{1e3 * row['steady_own_seconds_per_token']:.2f}; first {row['first']}, steady {row['steady']}; "
              f"cache entries {row['cache_entries']}")  # fmt: skip
        print_differences(row["switch_cost"][:10])
    return results


def copies_profiles(model, prompt, args) -> dict:
    """The copies mode's results per configuration: its host time and the functions that differ from native."""
    copies = dict(zip(args.configs, bench_generate.model_copies(model, len(args.configs)), strict=True))
    bench_generate.prepare(copies, args.path, prompt, args)
    profiles, collections = {}, {}
    for name, copy in copies.items():
        bench_generate.generate(copy, prompt, args.path, args.new_tokens)  # the first call after the others
        with collections_timed() as collections[name]:
            profiles[name] = own_times(copy, prompt, args.path, args.new_tokens)
    tokens, results, native = args.batch * args.new_tokens, {}, profiles["native"]
    for name, profile in profiles.items():
        collected = sum(stop - start for start, stop in collections[name])
        results[name] = {
            "own_seconds_per_token": sum(own for _, own, _ in profile.values()) / tokens,
            "calls_per_token": sum(calls for calls, _, _ in profile.values()) / tokens,
            "gc_collections_per_token": len(collections[name]) / tokens,
            "gc_seconds_per_token": collected / tokens,
            "against_native": differences(native, profile, tokens, args.top),
            "against_native_cumulative": differences(native, profile, tokens, args.top, "cumulative_us_per_token"),
        }
        print(f"{name}: {1e3 * results[name]['own_seconds_per_token']:.2f} ms/token of host time under cProfile, "
              f"{results[name]['calls_per_token']:.0f} calls/token, garbage collector {1e3 * collected / tokens:.2f} "
              f"ms/token ({len(collections[name]) / tokens:.2f} collections)")  # fmt: skip
        if name != "native":
            print_differences(results[name]["against_native"][:10])
            print(" cumulative:")
            print_differences(results[name]["against_native_cumulative"][:20], "cumulative_us_per_token")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bench_generate.REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--mode", default="copies", choices=["copies", "switching"])
    parser.add_argument("--path", default="static_compiled", choices=list(bh_experiment.GENERATION_PATHS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=["native", "topk_k8_nostats", "bh_k8_a005"],
                        choices=list(bench_generate.CONFIGS))  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.configs = bench_generate.native_first(args.configs)
    model = bench_generate.load(args.model, args.device, args.layers)
    prompt = bench_generate.random_prompt(model, args.batch, args)
    profiles = (copies_profiles if args.mode == "copies" else switching_profiles)(model, prompt, args)
    results = {
        "environment": bh_experiment.environment_info(model, args.device),
        "settings": vars(args) | {"out": None},
        **profiles,
    }
    args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
