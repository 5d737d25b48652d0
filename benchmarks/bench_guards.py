"""How long dynamo's guard evaluation before a compiled static-cache decode step takes, per configuration
(issue 10), on the CPU. A decode step at batch 1 is bound by host work, and every compiled call first checks
its guards: each object the traced forward read, patched routers included.

A random model of the OLMoE layout (the test size, `--layers` MoE layers), each configuration on its own copy
as in bench_generate.py, generated with a static cache and compiled by dynamo's eager backend (the guards are
dynamo's whichever backend compiles); then each copy's guards are checked against the inputs of its last decode
step, the copies in turn for `--rounds` rounds, and the fastest round kept: microseconds per check, and over
native's. `--hook-guards` first turns on dynamo's guards on module hooks (off by default; the patcher turned
them on until run 41 of gpu_notes.md), to show what they cost every compiled model of a process.

    python benchmarks/bench_guards.py --configs native topk_k8 topk_k2 bh_k8_a005 --out FILE.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402 - the benchmark's configurations and model copies

import bh_experiment  # noqa: E402


def compiled_step_inputs(model) -> dict:
    """The keyword arguments of the model's last compiled call (filled in by generate, as it calls it)."""
    captured = {}
    compiled_call = model.get_compiled_call

    def get_compiled_call(config):
        function = compiled_call(config)

        def call(*args, **kwargs):
            captured["kwargs"] = kwargs
            return function(*args, **kwargs)

        return call

    model.get_compiled_call = get_compiled_call
    return captured


def decode_step_guards(model, prompt, new_tokens: int):
    """(the guard manager that accepts the model's last compiled decode step, that step's frame locals)."""
    captured = compiled_step_inputs(model)
    settings = bh_experiment.generation_settings("static_compiled", prompt.shape[1] + new_tokens, "cpu")
    settings["compile_config"].backend = "eager"
    for _ in range(2):  # the second generate runs the compiled step without compiling
        bh_experiment.generate_with(model, prompt, settings, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False)  # fmt: skip
    function = type(model).forward  # the outermost of its decorators is the frame dynamo compiled
    while not torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__):
        function = function.__wrapped__
    frame = {"self": model, "args": (), "kwargs": captured["kwargs"], "func": function.__wrapped__}
    with torch.no_grad():  # generate's grad mode, part of what the guards check
        accepting = [
            entry.guard_manager
            for entry in torch._dynamo.eval_frame._debug_get_cache_entry_list(function.__code__)
            if entry.guard_manager.check(frame)
        ]
    if len(accepting) != 1:
        raise RuntimeError(f"{len(accepting)} compiled graphs accept the decode step; expected one")
    return accepting[0], frame


def fastest_checks(guards: dict, rounds: int, calls: int) -> dict:
    """name -> the fastest round's microseconds per guard check, the configurations in turn each round."""
    fastest = dict.fromkeys(guards, float("inf"))
    with torch.no_grad():
        for _ in range(rounds):
            for name, (manager, frame) in guards.items():
                start = time.perf_counter()
                for _ in range(calls):
                    manager.check(frame)
                fastest[name] = min(fastest[name], (time.perf_counter() - start) / calls * 1e6)
    return fastest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["native", "topk_k8", "topk_k2", "bh_k8_a005"],
                        choices=list(bench_generate.CONFIGS))  # fmt: skip
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--hook-guards", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch._dynamo.config.skip_nnmodule_hook_guards = not args.hook_guards
    model = bh_experiment.build_random_olmoe(seed=0, num_hidden_layers=args.layers)
    prompt = torch.randint(2, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    configs = bench_generate.native_first(args.configs)
    guards, patchers = {}, []
    for name, copy in zip(configs, bench_generate.model_copies(model, len(configs)), strict=True):
        patchers.append(bench_generate.patch_copy(copy, name))  # kept: each patch lives as long as the run
        guards[name] = decode_step_guards(copy, prompt, new_tokens=4)
    fastest = fastest_checks(guards, args.rounds, args.calls)
    rows = {name: {"guard_check_us": us, "over_native_us": us - fastest["native"]} for name, us in fastest.items()}
    for name, row in rows.items():
        print(f"{name}: {row['guard_check_us']:.1f} us per guard check, {row['over_native_us']:+.1f} over native's")
    environment = bh_experiment.environment_info(model, "cpu") | {"threads": torch.get_num_threads()}
    results = {"environment": environment, "settings": vars(args) | {"out": None}, "rows": rows}
    bh_experiment.atomic_write_text(args.out, json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
