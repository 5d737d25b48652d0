"""Speed of BH routing against softmax+top-k, and of a patched OLMoE forward against the native one.

    python benchmarks/bench_routing.py [--device cpu|cuda] [--model-config PATH] [--out DIR]

1. Routing alone on [N, 64] router logits (N = 4096 and 65536): native softmax + top-8 versus the
   patcher's BH path (robust_z p-values, BH step-up, keep top counts; max_k = 8) and the design's
   one_minus_prob. Targets (issue 2): BH <= 4x softmax+top-8 on CPU, <= 2x on GPU.
2. A whole forward pass (prefill): native model versus the model patched to keep 8 experts per token
   (patch_with_topk(8), and BH with min_k = max_k = 8, so BH runs but every token keeps 8 experts),
   and BH at alpha = 0.05, max_k = 8 for reference. Target: the 8-expert patches within 5% of native
   end to end on GPU. On GPU the model is the OLMoE-1B-7B shape with random weights in bf16
   (benchmarks/olmoe-1b-7b-0924.config.json, a copy of ../shared/, or --model-config); on CPU a small random OLMoE.

Times are medians over repetitions after warm-up, with the device synchronised. Results are written as
JSON (card, versions, date) to --out and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bh_experiment  # noqa: E402
import bh_routing  # noqa: E402 - importable only once the repository root is on sys.path
import variable_k_experts  # noqa: E402
from bh_routing import OLMoERouterPatcher, route_bh  # noqa: E402


def timed(function, device: str, repeats: int, warmup: int = 3) -> float:
    """Median wall time of function() in milliseconds, synchronising the device around each call."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def routing_candidates(logits: torch.Tensor, device: str) -> dict:
    """Name -> routing call on `logits`: softmax + top-8 first (the baseline), then the BH variants."""

    def native():
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float)
        return torch.topk(probabilities, 8, dim=-1)

    candidates = {
        "softmax+top8": native,
        "bh robust_z max_k=8": lambda: route_bh(logits, 0.05, 1.0, 1, 8, "robust_z", False),
        "bh one_minus_prob max_k=8": lambda: route_bh(logits, 0.05, 1.0, 1, 8, "one_minus_prob", False),
    }
    if device == "cuda":  # the patcher's options on CUDA: CUDA graph (default), torch.compile, both
        critical = bh_routing.robust_z_critical_statistics(0.05, 64, logits.device)
        compiled = variable_k_experts.compile_once(bh_routing.route_bh_tensors)
        graphed = variable_k_experts.CudaGraphed(bh_routing.route_bh_tensors)
        compiled_graphed = variable_k_experts.CudaGraphed(compiled)
        constants = (critical, 0.05, 1.0, 1, 8, "robust_z", False)
        candidates["bh robust_z max_k=8 (CUDA graph, default)"] = lambda: graphed(logits, *constants)
        candidates["bh robust_z max_k=8 (compiled)"] = lambda: compiled(logits, *constants)
        candidates["bh robust_z max_k=8 (compiled + CUDA graph)"] = lambda: compiled_graphed(logits, *constants)
    return candidates


def bench_routing(device: str, dtype: torch.dtype, repeats: int) -> list[dict]:
    rows = []
    for num_tokens in (4096, 65536):
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(num_tokens, 64, generator=generator).to(device=device, dtype=dtype)
        bh_routing.robust_z_null_table(64, logits.device)  # built once, outside the timing
        baseline = None
        for name, function in routing_candidates(logits, device).items():
            milliseconds = timed(function, device, repeats)
            baseline = baseline or milliseconds
            row = dict(part="routing", tokens=num_tokens, method=name, ms=milliseconds, ratio=milliseconds / baseline)
            rows.append(row)
    return rows


def forward_model(device: str, model_config: str | None):
    """The OLMoE-1B-7B shape in bf16 on CUDA; a small float32 OLMoE on CPU. Random weights."""
    if device == "cuda":
        model = bh_experiment.build_random_olmoe(model_config, seed=0, device=device, dtype=torch.bfloat16)
    else:
        model = bh_experiment.build_random_olmoe(
            None, seed=0, num_hidden_layers=4, hidden_size=128, intermediate_size=64
        )
    return model.eval()


def forward_configurations(patcher, plain, fused, device: str) -> dict:
    """Name -> call that patches the model for it (the first, "native", leaves it unpatched)."""
    eight = dict(alpha=0.05, min_k=8, max_k=8)
    configurations = {
        "native": lambda: patcher.unpatch(),
        "patched topk k=8": lambda: patcher.patch_with_topk(8),
        "patched bh min_k=max_k=8": lambda: patcher.patch_with_bh(**eight),
        "patched bh alpha=0.05 max_k=8": lambda: patcher.patch_with_bh(alpha=0.05, max_k=8),
        # min_k = 7 < max_k: the experts path must handle the sentinel index (grouped_mm's masking)
        "patched bh min_k=7 max_k=8": lambda: patcher.patch_with_bh(alpha=0.05, min_k=7, max_k=8),
    }
    if device == "cuda":
        configurations["patched bh min_k=max_k=8 (no CUDA graph)"] = lambda: plain.patch_with_bh(**eight)
        configurations["patched bh min_k=max_k=8 (compiled + CUDA graph)"] = lambda: fused.patch_with_bh(**eight)
    return configurations


def bench_forward(device: str, model_config: str | None, batch: int, seq_len: int, repeats: int) -> list[dict]:
    model = forward_model(device, model_config)
    input_ids = torch.randint(2, model.config.vocab_size, (batch, seq_len), device=device)
    patcher = OLMoERouterPatcher(model, record_token_counts=False)  # defaults: CUDA graphs on CUDA
    plain = OLMoERouterPatcher(model, record_token_counts=False, cuda_graphs=False)
    fused = OLMoERouterPatcher(model, record_token_counts=False, compile_routing=True)
    others = (plain, fused)
    configurations = forward_configurations(patcher, plain, fused, device)
    rows, baseline = [], None

    @torch.no_grad()
    def forward():
        return model(input_ids, use_cache=False).logits

    for name, apply in configurations.items():
        for candidate in (patcher, *others):
            candidate.unpatch()
        apply()
        active = next((p for p in others if p.is_patched), patcher)
        milliseconds = timed(forward, device, repeats)
        active.reset_stats()
        forward()
        average = active.get_stats()["avg_experts"] if active.is_patched else float(model.config.num_experts_per_tok)
        baseline = baseline or milliseconds
        rows.append(
            dict(
                part="forward",
                tokens=batch * seq_len,
                method=name,
                ms=milliseconds,
                ratio=milliseconds / baseline,
                avg_experts=average,
                experts_implementation=model.config._experts_implementation,
            )
        )
    for candidate in (patcher, *others):
        candidate.unpatch()
    return rows


def environment(device: str) -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device,
        "card": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "grouped_mm_masks_sentinels": variable_k_experts.grouped_mm_masks_sentinels(),
    }
    if device == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-config", default=str(Path(__file__).resolve().parent / "olmoe-1b-7b-0924.config.json"))
    parser.add_argument("--batch", type=int, default=None, help="prefill batch (default 8 on cuda, 2 on cpu)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    device = args.device
    repeats = args.repeats or (30 if device == "cuda" else 10)
    batch = args.batch or (8 if device == "cuda" else 2)
    logits_dtype = torch.bfloat16 if device == "cuda" else torch.float32

    info = environment(device)
    rows = bench_routing(device, logits_dtype, repeats)
    rows += bench_forward(device, args.model_config if device == "cuda" else None, batch, args.seq_len, repeats)

    print(json.dumps(info))
    print("| part | tokens | method | ms (median) | ratio to first | avg experts |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['part']} | {row['tokens']} | {row['method']} | {row['ms']:.3f} | {row['ratio']:.2f}x "
            f"| {row.get('avg_experts', '')} |"
        )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_routing_{device}_{info['date'][:10]}.json"
    (out_dir / name).write_text(json.dumps({"environment": info, "rows": rows}, indent=2))
    print(f"wrote {out_dir / name}")


if __name__ == "__main__":
    main()
