"""The variable-k experts path against transformers' native experts paths on one GPU (issues 5 and 13).

OLMoE-1B-7B shape (benchmarks/olmoe-1b-7b-0924.config.json) by default, or any MoE family's config.json
(--config, e.g. benchmarks/qwen3-30b-a3b.config.json with --layers 8), random weights, bf16. Prints markdown
tables and writes everything to --out (JSON). Counts below are for a native top-8 (the k of both shapes):

1. correctness: the Triton path against transformers' eager experts (relative error of the MoE output,
   each against a float32 eager reference too), for per-token counts 0..8 (tokens with no expert
   included), prefill and decode sizes, plainly and replayed as a CUDA graph.
2. layer: one MoE experts call (layer 0's weights), prefill 8 x 512 = 4096 tokens, decode batch 1 and 16:
   native top-8 with grouped_mm and eager, and the variable-k path at average counts 8, 6, 4, 2, with
   every token at exactly k ("forced") and with counts spread over k-2..k+2 ("spread"), in 8 slots with
   sentinels. Timed plainly and as CUDA-graph replay (device time without launch overhead).
3. end to end: the whole model, prefill 8 x 512 and decode (batch 1 and 16, one token per step after a
   64-token prompt; eager Python, measured in 3 rounds over all configurations in turn because it drifts
   with the host, and a decode step captured as one CUDA graph over a StaticCache), unpatched native
   (grouped_mm, eager), and patched (MoERouterPatcher, experts_path="variable_k"): top-k k = 8, 6, 4, 2
   (forced counts) and BH with floors min_k = 8, 6, 4, 2 and max_k = 8 (BH counts; on random weights BH
   keeps about the floor), plus BH min_k = 4 on the model's own grouped_mm (experts_path="model").

    python benchmarks/bench_experts.py --out benchmarks/results/bench_experts_h100.json
    python benchmarks/bench_experts.py --config benchmarks/qwen3-30b-a3b.config.json --layers 8 --out ...
"""

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import median_ms, relative_error

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import bh_experiment  # noqa: E402
import bh_routing  # noqa: E402 - importable only once the repository root is on sys.path
import variable_k_experts  # noqa: E402
from bh_routing import MoERouterPatcher  # noqa: E402

SLOTS = 8
COUNTS = (8, 6, 4, 2)


def first_experts(model):
    return bh_routing.find_moe_layers(model)[0].experts


def routing_with_counts(num_tokens: int, counts: torch.Tensor, generator, num_experts: int = 64):
    """Top-8 of a random softmax, token t keeping its counts[t] most probable experts (sentinel E after)."""
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=generator)
    weights, index = torch.softmax(logits, dim=-1).topk(SLOTS)
    kept = torch.arange(SLOTS, device="cuda")[None] < counts[:, None]
    return torch.where(kept, weights, 0.0), torch.where(kept, index, num_experts)


def spread_counts(num_tokens: int, mean: int, generator) -> torch.Tensor:
    low, high = max(0, mean - 2), min(SLOTS, mean + 2)
    if mean == SLOTS:  # no spread above 8: 6..8 would not average 8
        low = high = SLOTS
    return torch.randint(low, high + 1, (num_tokens,), device="cuda", generator=generator)


def correctness(model, generator) -> list[dict]:
    experts = first_experts(model)
    reference = copy.deepcopy(experts).float()
    rows = []
    for num_tokens in (4096, 16, 1):
        counts = (torch.arange(num_tokens, device="cuda") + SLOTS) % (SLOTS + 1)  # every count 0..8
        weights, index = routing_with_counts(num_tokens, counts, generator, experts.num_experts)
        hidden = torch.randn(num_tokens, experts.hidden_dim, device="cuda", generator=generator).bfloat16()
        model.set_experts_implementation("eager")
        eager = experts(hidden, index, weights)
        with torch.no_grad():
            fp32 = variable_k_experts.variable_k_experts_torch(hidden.float(), index, weights, reference)
        call = functools.partial(variable_k_experts.variable_k_experts_forward, experts, hidden, index, weights)
        ours = call()
        graph, graphed = variable_k_experts.capture_cuda_graph(call)
        graph.replay()
        torch.cuda.synchronize()
        zero_rows = counts == 0
        rows.append(
            dict(
                tokens=num_tokens,
                vs_eager_bf16=relative_error(ours, eager),
                eager_bf16_vs_fp32=relative_error(eager, fp32),
                ours_vs_fp32=relative_error(ours, fp32),
                graph_replay_equal=bool(torch.equal(graphed, ours)),
                zero_count_tokens_exactly_zero=bool((ours[zero_rows] == 0).all()) if zero_rows.any() else None,
            )
        )
    return rows


def native_layer_rows(model, experts, phase: str, hidden, generator) -> list[dict]:
    """The layer through transformers' grouped_mm (plain and graphed) and eager paths, top-8."""
    full = torch.full((hidden.shape[0],), SLOTS, device="cuda")
    weights, index = routing_with_counts(hidden.shape[0], full, generator, experts.num_experts)
    call = functools.partial(experts, hidden, index, weights)
    rows = []
    for implementation in ("grouped_mm", "eager"):
        model.set_experts_implementation(implementation)
        graphed = None
        if implementation == "grouped_mm":
            graph, _ = variable_k_experts.capture_cuda_graph(call)
            graphed = median_ms(graph.replay)
        rows.append(
            dict(
                phase=phase,
                path=f"native {implementation}",
                counts="top-8",
                mean_k=8.0,
                plain_ms=median_ms(call),
                graph_ms=graphed,
            )
        )
    return rows


def variable_k_layer_rows(experts, phase: str, hidden, generator) -> list[dict]:
    """The layer through the variable-k path, plain and graphed, at forced and spread counts."""
    num_tokens, rows = hidden.shape[0], []
    for kind in ("forced", "spread"):
        for mean_k in COUNTS:
            if kind == "spread" and mean_k == SLOTS:
                continue
            if kind == "forced":
                counts = torch.full((num_tokens,), mean_k, device="cuda")
            else:
                counts = spread_counts(num_tokens, mean_k, generator)
            weights, index = routing_with_counts(num_tokens, counts, generator, experts.num_experts)
            call = functools.partial(variable_k_experts.variable_k_experts_forward, experts, hidden, index, weights)
            graph, _ = variable_k_experts.capture_cuda_graph(call)
            mean = counts.float().mean().item()
            plain, graphed = median_ms(call), median_ms(graph.replay)
            rows.append(
                dict(phase=phase, path="variable_k", counts=kind, mean_k=mean, plain_ms=plain, graph_ms=graphed)
            )
    return rows


def layer_times(model, generator) -> list[dict]:
    experts = first_experts(model)
    rows = []
    for phase, num_tokens in (("prefill 8x512", 4096), ("decode b1", 1), ("decode b16", 16)):
        hidden = torch.randn(num_tokens, experts.hidden_dim, device="cuda", generator=generator).bfloat16()
        rows += native_layer_rows(model, experts, phase, hidden, generator)
        rows += variable_k_layer_rows(experts, phase, hidden, generator)
    for row in rows:
        native = next(r for r in rows if r["phase"] == row["phase"] and r["path"] == "native grouped_mm")
        row["plain_ratio"] = row["plain_ms"] / native["plain_ms"]
        row["graph_ratio"] = row["graph_ms"] / native["graph_ms"] if row["graph_ms"] else None
        row["prefill_target"] = 1.15 * row["mean_k"] / 8 if row["phase"].startswith("prefill") else None
    return rows


def end_to_end_configs():
    yield "native grouped_mm", "grouped_mm", None, None
    yield "native eager", "eager", None, None
    for k in COUNTS:
        yield f"top-{k} variable_k", "grouped_mm", "variable_k", ("topk", dict(k=k))
    for floor in COUNTS:
        yield (
            f"BH min_k={floor} max_k=8 variable_k",
            "grouped_mm",
            "variable_k",
            ("bh", dict(alpha=0.05, min_k=floor, max_k=8)),
        )
    yield "BH min_k=4 max_k=8 model grouped_mm", "grouped_mm", "model", ("bh", dict(alpha=0.05, min_k=4, max_k=8))


def decode_eager_ms(model, batch: int, prompt: torch.Tensor, steps: int = 16) -> float:
    """Per-token time of `steps` greedy one-token forwards with a DynamicCache (Python launches included)."""

    def run():
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / steps

    run()
    return statistics.median(run() for _ in range(3))


def decode_graphed_ms(model, batch: int, prompt: torch.Tensor, steps: int = 32) -> float:
    """Per-token time of a decode step captured as one CUDA graph over a StaticCache (device time)."""
    from transformers import StaticCache

    prompt_len = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + steps + 32)
    model(input_ids=prompt, cache=cache, use_cache=True)
    token = prompt[:, -1:].clone()
    position = torch.full((batch, 1), prompt_len, device="cuda")

    def step():
        return model(input_ids=token, cache=cache, use_cache=True, position_ids=position).logits

    graph, _ = variable_k_experts.capture_cuda_graph(step)
    return median_ms(graph.replay, warmup=2, reps=steps)


def apply(model, implementation, experts_path, patch):
    """Set up one end-to-end configuration; returns the patcher (None for the unpatched model)."""
    model.set_experts_implementation(implementation)
    if patch is None:
        return None
    patcher = MoERouterPatcher(model, record_token_counts=False, experts_path=experts_path)
    getattr(patcher, f"patch_with_{patch[0]}")(**patch[1])
    return patcher


def graphed_rows(model, prefill_ids: torch.Tensor, prompts: dict) -> list[dict]:
    """Per configuration: experts kept, prefill time and CUDA-graphed decode time per batch size."""
    rows = []
    for name, implementation, experts_path, patch in end_to_end_configs():
        patcher = apply(model, implementation, experts_path, patch)
        row = dict(config=name)
        if patcher is not None:
            model(prefill_ids[:2, :128])
            row["mean_k"] = patcher.get_stats()["avg_experts"]
            row["experts_implementation"] = patcher.experts_implementation
        else:
            row["mean_k"] = 8.0
            row["experts_implementation"] = implementation
        row["prefill_ms"] = median_ms(functools.partial(model, prefill_ids, use_cache=False), reps=10)
        for batch, prompt in prompts.items():
            try:
                row[f"decode_b{batch}_graph_ms"] = decode_graphed_ms(model, batch, prompt)
            except Exception as error:  # noqa: BLE001 - record why a path cannot be captured
                row[f"decode_b{batch}_graph_ms"] = None
                message = f"graphed decode b{batch}: {type(error).__name__}: {str(error)[:200]}"
                row.setdefault("errors", []).append(message)
        if patcher is not None:
            patcher.unpatch()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def add_eager_decode(model, rows: list[dict], prompts: dict, rounds: int) -> None:
    """Eager decode times per configuration and batch size: the median of `rounds` rounds.

    Eager decode is bound by Python launches and drifts with the host's state: the configurations are
    measured in turn, round after round, and each keeps its median round."""
    eager = {(row["config"], batch): [] for row in rows for batch in prompts}
    for _ in range(rounds):
        for name, implementation, experts_path, patch in end_to_end_configs():
            patcher = apply(model, implementation, experts_path, patch)
            for batch, prompt in prompts.items():
                eager[name, batch].append(decode_eager_ms(model, batch, prompt))
            if patcher is not None:
                patcher.unpatch()
    for row in rows:
        for batch in prompts:
            row[f"decode_b{batch}_eager_ms"] = statistics.median(eager[row["config"], batch])
            row[f"decode_b{batch}_eager_rounds_ms"] = eager[row["config"], batch]


def end_to_end(model, generator, eager_rounds: int = 3) -> list[dict]:
    vocab = model.config.vocab_size
    prefill_ids = torch.randint(2, vocab, (8, 512), device="cuda", generator=generator)
    prompts = {batch: torch.randint(2, vocab, (batch, 64), device="cuda", generator=generator) for batch in (1, 16)}
    rows = graphed_rows(model, prefill_ids, prompts)
    add_eager_decode(model, rows, prompts, eager_rounds)
    native = rows[0]
    for row in rows:
        for key in list(row):
            if key.endswith("_ms") and isinstance(row[key], float) and native.get(key):
                row[key.replace("_ms", "_ratio")] = row[key] / native[key]
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


LAYER_COLUMNS = [
    "phase",
    "path",
    "counts",
    "mean_k",
    "plain_ms",
    "plain_ratio",
    "graph_ms",
    "graph_ratio",
    "prefill_target",
]
END_TO_END_COLUMNS = ["config", "experts_implementation", "mean_k", "prefill_ms", "prefill_ratio"] + [
    f"decode_b{batch}_{mode}_{unit}" for batch in (1, 16) for mode in ("eager", "graph") for unit in ("ms", "ratio")
]


def environment(config: str, model) -> dict:
    import transformers
    import triton

    return dict(
        card=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        config=Path(config).name,
        model_type=model.config.model_type,
        layers=model.config.num_hidden_layers,
        routing=bh_routing.find_moe_layers(model)[0].spec.describe(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_experts.json"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["correctness", "layer", "end_to_end"])
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the config (a large shape)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    assert variable_k_experts.triton is not None, "needs Triton"

    torch.backends.cuda.matmul.allow_tf32 = True
    generator = torch.Generator("cuda").manual_seed(0)
    started = time.time()
    layers = {} if args.layers is None else {"num_hidden_layers": args.layers}
    model = bh_experiment.build_random_moe(config=args.config, seed=0, device="cuda", dtype=torch.bfloat16, **layers)
    assert bh_routing.moe_shape(model.config).top_k == SLOTS, "the counts below are for a native top-8"
    variable_k_experts.register_variable_k_experts()
    report = environment(args.config, model)
    print(report, f"model built in {time.time() - started:.0f} s", flush=True)
    with torch.no_grad():
        if "correctness" not in args.skip:
            report["correctness"] = correctness(model, generator)
            print(markdown(report["correctness"], list(report["correctness"][0])), flush=True)
        if "layer" not in args.skip:
            report["layer"] = layer_times(model, generator)
            print(markdown(report["layer"], LAYER_COLUMNS), flush=True)
        if "end_to_end" not in args.skip:
            report["end_to_end"] = end_to_end(model, generator)
            print(markdown(report["end_to_end"], END_TO_END_COLUMNS), flush=True)
    report["seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
