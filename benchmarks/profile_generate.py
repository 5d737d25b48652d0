"""Where the host's time goes in generation (issue 10): each configuration on its own copy of the model, as in
`bench_generate.py` (same model, path, prompt and warm-up), then one `generate` per configuration under
cProfile; per function, its calls and own time per generated token, and the functions whose own time differs
most from native's. cProfile slows Python calls, so the times are relative: they locate host work a
configuration adds (a hook run eagerly, a guard evaluated in Python, a wrapper's bookkeeping), they do not
measure its cost in a run without the profiler (bench_generate does).

    python benchmarks/profile_generate.py --configs native topk_k8_nostats bh_k8_a005 --out FILE.json
"""

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402 - the benchmark's model, copies, warm-up and generate

import bh_experiment  # noqa: E402


def own_times(model, prompt, path: str, new_tokens: int) -> dict:
    """function -> [calls, own seconds] in one generate under cProfile."""
    profiler = cProfile.Profile()
    profiler.runcall(bench_generate.generate, model, prompt, path, new_tokens)
    bh_experiment.synchronize(prompt.device)
    return {
        f"{Path(file).name}:{line}({name})": [calls, own]
        for (file, line, name), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items()
    }


def differences(native: dict, other: dict, tokens: int, top: int) -> list[dict]:
    """The `top` functions whose own time per generated token differs most between two profiles."""
    rows = []
    for name in set(native) | set(other):
        (calls_a, own_a), (calls_b, own_b) = native.get(name, [0, 0.0]), other.get(name, [0, 0.0])
        rows.append({"function": name, "own_us_per_token": 1e6 * (own_b - own_a) / tokens,
                     "calls_per_token": (calls_b - calls_a) / tokens})  # fmt: skip
    return sorted(rows, key=lambda row: -abs(row["own_us_per_token"]))[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(bench_generate.REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None)
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
    copies = dict(zip(args.configs, bench_generate.model_copies(model, len(args.configs)), strict=True))
    bench_generate.prepare(copies, args.path, prompt, args)
    profiles = {}
    for name, copy in copies.items():
        bench_generate.generate(copy, prompt, args.path, args.new_tokens)  # the first call after the others
        profiles[name] = own_times(copy, prompt, args.path, args.new_tokens)
    tokens = args.batch * args.new_tokens
    results = {
        "environment": bh_experiment.environment_info(model, args.device),
        "settings": vars(args) | {"out": None},
    }
    for name, profile in profiles.items():
        results[name] = {"own_seconds_per_token": sum(own for _, own in profile.values()) / tokens,
                         "calls_per_token": sum(calls for calls, _ in profile.values()) / tokens,
                         "against_native": differences(profiles["native"], profile, tokens, args.top)}  # fmt: skip
        print(f"{name}: {1e3 * results[name]['own_seconds_per_token']:.2f} ms/token of host time under cProfile, "
              f"{results[name]['calls_per_token']:.0f} calls/token")  # fmt: skip
        for row in results[name]["against_native"][: 10 if name != "native" else 0]:
            print(f"  {row['own_us_per_token']:+8.1f} us/token {row['calls_per_token']:+6.1f} calls  {row['function']}")
    args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
