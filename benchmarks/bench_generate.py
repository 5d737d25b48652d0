"""Generation speed where users feel it (issue 10): `model.generate`, greedy, native against patched routing,
on the dynamic-cache path (eager) and the static-cache path (forward compiled by torch.compile with CUDA
graphs, as transformers' generate does for a static cache on a GPU).

OLMoE-1B-7B shape (benchmarks/olmoe-1b-7b-0924.config.json, all 16 layers, random bf16 weights) on a GPU, or
the embedded model on the CPU (--model embedded --device cpu). 48 new tokens after a 64-token prompt of random
ids, batch 1 and 16. Configurations: native (unpatched), top-k 8/4/2, top-p 0.5, BH alpha 0.05 and 0.2 at
max_k 8, BH alpha 0.05 on floors 2 and 4, and top-k 8 / BH alpha 0.05 with statistics off
(record_statistics=False). For each path and batch size, every configuration is timed `--repeats` times
after a warm-up generate (its time, compilation included on the static path, is reported apart); tokens/s
is the median (with its range), the ratio is to native on the same path in the same process.

The HBM floor: the weight bytes one decode step must read (every non-expert weight but the embedding
table, plus each layer's experts in use: at batch b and an average of k experts per token, the expected
number of distinct experts E * (1 - (1 - k/E)^b), assuming tokens pick experts independently and
uniformly), divided by the measured copy bandwidth of the card; floor tokens/s = b / that time.

Correctness, per path and batch size: patched top-8 generates the native tokens; after every configuration
the unpatched model generates the native logits again, bit for bit. With --check-counts, BH's per-token
counts on the static compiled path equal the dynamic path's on the same inputs (first 8 new tokens).

Results go to --out (JSON, merged with what is there: an interrupted run keeps its finished rows, and a
rerun skips them unless --redo), with the card, versions and date; --table prints the markdown table.

    python benchmarks/bench_generate.py --out benchmarks/results/bench_generate_h100.json --paths static_compiled
    python benchmarks/bench_generate.py --model embedded --device cpu --out benchmarks/results/bench_generate_cpu.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import bh_routing  # noqa: E402 - importable only once the repository root is on sys.path

CONFIGS = {  # name -> (routing configuration or None for the unpatched model, statistics on)
    "native": (None, True),
    "topk_k8": ("topk:k=8", True),
    "topk_k4": ("topk:k=4", True),
    "topk_k2": ("topk:k=2", True),
    "topp_p050": ("topp:p=0.5,max_k=8", True),
    "bh_k8_a005": ("bh:alpha=0.05,max_k=8", True),
    "bh_k8_a020": ("bh:alpha=0.2,max_k=8", True),
    "bh_k8_a005_min2": ("bh:alpha=0.05,max_k=8,min_k=2", True),
    "bh_k8_a005_min4": ("bh:alpha=0.05,max_k=8,min_k=4", True),
    "topk_k8_nostats": ("topk:k=8", False),
    "bh_k8_a005_nostats": ("bh:alpha=0.05,max_k=8", False),
}


def load(args):
    if args.model == "embedded":
        model, tokenizer = bh_routing.load_model("embedded", device=args.device)[:2]
        return model
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return bh_routing.build_random_moe(config=args.model, device=args.device, dtype=torch.bfloat16, **overrides)


def generate(model, prompt, path: str, new_tokens: int, logits: bool = False):
    """Greedy generate of exactly new_tokens: the output (ids, and logits per step if asked)."""
    settings = bh_routing.generation_settings(path, prompt.shape[1] + new_tokens, prompt.device)
    return model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=logits,
        **settings,
    )


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs so far (e.g. for a mutated input)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


def timed(function, device) -> float:
    bh_routing.synchronize(device)
    start = time.perf_counter()
    function()
    bh_routing.synchronize(device)
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


def run_config(model, patcher, name, path, prompt, args) -> dict:
    """Warm-up (compile) and timed repeats of one configuration; the routing statistics and the tokens."""
    spec, _ = CONFIGS[name]
    if spec is not None:
        bh_routing.RoutingConfig.parse(spec).apply(patcher)
    skips_before = cudagraph_skips()
    try:
        warm_up = timed(lambda: generate(model, prompt, path, args.new_tokens), args.device)
        if spec is not None and patcher.record_statistics:
            patcher.reset_stats()
        output = generate(model, prompt, path, args.new_tokens)
        seconds = [
            timed(lambda: generate(model, prompt, path, args.new_tokens), args.device) for _ in range(args.repeats)
        ]
        stats = patcher.get_stats() if spec is not None and patcher.record_statistics else {}
    finally:
        patcher.unpatch()
    return {
        "warm_up_s": warm_up,
        **bh_routing.throughput_summary(prompt.shape[0] * args.new_tokens, seconds),  # median tok/s and range
        "avg_experts": stats.get("avg_experts", bh_routing.find_moe_layers(model)[0].spec.top_k),
        "experts_implementation": stats.get("experts_implementation"),
        "cudagraph_skips": cudagraph_skips() - skips_before,  # compiled graphs that ran without CUDA graphs
        "tokens": output.sequences[:, prompt.shape[1] :].tolist(),
    }


def check_counts(model, prompt, args) -> dict:
    """BH's per-token counts on the static compiled path against the dynamic path, same inputs."""
    counts = {}
    with bh_routing.MoERouterPatcher(model, record_token_counts=True) as patcher:
        for path in ("dynamic", "static_compiled"):
            patcher.patch_with_bh(alpha=0.05, max_k=8)
            generate(model, prompt, path, 8)
            counts[path] = patcher.get_stats()["token_counts"]
    equal = bool(torch.equal(counts["dynamic"], counts["static_compiled"]))
    agreement = (counts["dynamic"] == counts["static_compiled"]).double().mean().item()
    return {"bh_counts_static_equal_dynamic": equal, "agreement": agreement, "decisions": counts["dynamic"].numel()}


def run_block(model, patchers, path, batch, args, results, save) -> None:
    """Every configuration on one path and batch size, native first; each row saved as it finishes."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(3, model.config.vocab_size, (batch, args.prompt_tokens), generator=generator)
    prompt = prompt.to(args.device)
    generate(model, prompt, path, args.new_tokens)  # compiles the unpatched forward on the static path
    native_logits = generate(model, prompt, path, args.new_tokens, logits=True).logits
    for name in args.configs:
        key = f"{path}/b{batch}/{name}"
        if key in results["rows"] and not args.redo:
            continue
        row = run_config(model, patchers[CONFIGS[name][1]], name, path, prompt, args)
        after = generate(model, prompt, path, args.new_tokens, logits=True).logits
        row["unpatched_bit_identical"] = all(torch.equal(a, b) for a, b in zip(after, native_logits, strict=True))
        row |= {"path": path, "batch": batch, "config": name, "process": results["process"]}
        results["rows"][key] = row
        save()
        print(f"{key}: {row['tokens_per_second']:.1f} tok/s, {row['avg_experts']:.2f} experts, "
              f"warm-up {row['warm_up_s']:.1f} s", flush=True)  # fmt: skip
    if args.check_counts and f"b{batch}/counts" not in results["checks"]:
        results["checks"][f"b{batch}/counts"] = check_counts(model, prompt, args)
        save()


def table(results: dict) -> str:
    """Markdown: one row per path, batch and configuration, ratios to native of the same process."""
    rows = list(results["rows"].values())
    lines = [
        "| path | batch | config | avg experts | tok/s (range) | vs native | HBM floor tok/s | of floor | "
        "warm-up s | same tokens as native | unpatched bit-identical |",
        "|" + " --- |" * 11,
    ]
    for row in rows:
        native = results["rows"].get(f"{row['path']}/b{row['batch']}/native")
        same_process = native is not None and native["process"] == row["process"]
        ratio = f"{row['tokens_per_second'] / native['tokens_per_second']:.2f}x" if same_process else "-"
        floor = row.get("hbm_floor_tokens_per_second")
        same_tokens = "-" if not same_process else "yes" if row["tokens"] == native["tokens"] else "no"
        speed = row["tokens_per_second"]
        floor_cells = f"{floor:.0f} | {speed / floor:.0%}" if floor else "- | -"
        lines.append(
            f"| {row['path']} | {row['batch']} | {row['config']} | {row['avg_experts']:.2f} | "
            f"{speed:.1f} ({row['tokens_per_second_min']:.1f}-{row['tokens_per_second_max']:.1f}) | {ratio} | "
            f"{floor_cells} | {row['warm_up_s']:.1f} | {same_tokens} | "
            f"{'yes' if row['unpatched_bit_identical'] else 'no'} |"
        )
    return "\n".join(lines)


def add_floors(results: dict, model) -> None:
    """Each row's HBM floor (module docstring), from the card's measured copy bandwidth."""
    bandwidth = results["environment"].get("copy_bandwidth_bytes_per_s")
    weights = weight_bytes(model)
    results["weight_bytes"] = weights
    for row in results["rows"].values():
        experts = row["avg_experts"]
        if row["config"].endswith("_nostats"):  # same routing as with statistics: read its count
            twin = results["rows"].get(f"{row['path']}/b{row['batch']}/{row['config'][: -len('_nostats')]}")
            experts = row["avg_experts"] = twin["avg_experts"] if twin else float("nan")
        row["hbm_floor_tokens_per_second"] = hbm_floor(weights, experts, row["batch"], bandwidth) if bandwidth else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"),
                        help="a config.json (random bf16 weights) or 'embedded'")  # fmt: skip
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the config's (a quick check)")
    parser.add_argument("--paths", nargs="+", default=["dynamic", "static_compiled"],
                        choices=list(bh_routing.GENERATION_PATHS))  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-counts", action="store_true")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--emulate-precision-casts", action="store_true",
                        help="inductor rounds at every dtype cast, as eager does")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.configs[0] != "native" and "native" in args.configs:
        args.configs = ["native"] + [name for name in args.configs if name != "native"]
    results = json.loads(args.out.read_text()) if args.out.exists() else {"rows": {}, "checks": {}}
    if args.table:
        print(table(results))
        return
    measure(args, results)


def measure(args, results: dict) -> None:
    if args.emulate_precision_casts:
        torch._inductor.config.emulate_precision_casts = True
    model = load(args)
    environment = bh_routing.environment_info(model, args.device)
    environment["copy_bandwidth_bytes_per_s"] = copy_bandwidth(args.device)
    results["environment"] = results.get("environment", {}) | environment
    results["process"] = f"{environment.get('date', time.time())}-{id(results)}"
    results["settings"] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                           "repeats": args.repeats, "model": args.model, "configs": CONFIGS,
                           "emulate_precision_casts": args.emulate_precision_casts}  # fmt: skip

    def save():
        add_floors(results, model)
        bh_routing.atomic_write_text(args.out, json.dumps(results, indent=1, default=str))

    patchers = {statistics_on: bh_routing.MoERouterPatcher(model, record_statistics=statistics_on)
                for statistics_on in (True, False)}  # fmt: skip
    for path in args.paths:
        for batch in args.batch_sizes:
            run_block(model, patchers, path, batch, args, results, save)
    save()
    print(table(results))


if __name__ == "__main__":
    main()
