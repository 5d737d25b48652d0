"""lm-evaluation-harness throughput on the OLMoE-1B-7B shape on a GPU (issue 14): how long `evaluate_task`
takes per configuration, the basis of the README's runtime estimate for the standard tasks.

    python benchmarks/bench_downstream.py OUT.json

Random bf16 weights of the real shape (benchmarks/olmoe-1b-7b-0924.config.json; the first experts' router
rows strengthened so that BH keeps different counts for different tokens), the embedded tokenizer. For
batch sizes 8 and 32, the native routing, top-2 and BH (alpha 0.05, max_k 8) on the two offline tasks:
`heldout_continuation` (1600 short log-likelihood requests) and the first 20 documents of
`heldout_perplexity` (long rolling windows). Each (configuration, batch size) runs once untimed on 4 samples
first (Triton compilation, CUDA-graph capture). Records seconds, real tokens forwarded, tokens/s, samples/s,
average experts, the card and versions.
"""

import json
import sys
import time
from pathlib import Path

import torch
from common import strengthen_experts

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bh_downstream as bd  # noqa: E402
import bh_experiment as bx  # noqa: E402
import bh_routing as br  # noqa: E402

REAL_SHAPE = REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"
CONFIGS = ("native:k=8", "topk:k=2", "bh:alpha=0.05,max_k=8")
TASK_LIMITS = {"heldout_continuation": None, "heldout_perplexity": 20}
BATCH_SIZES = (8, 32)


def measure(model, tokenizer, batch_size: int, spec: str, task: str) -> dict:
    harness = bd.harness_model(model, tokenizer, batch_size)
    patcher = br.OLMoERouterPatcher(model)
    config = br.RoutingConfig.parse(spec)
    bd.evaluate_task(harness, patcher, config, task, limit=4)  # warm-up
    torch.cuda.synchronize()
    result = bd.evaluate_task(harness, patcher, config, task, limit=TASK_LIMITS[task])
    return {
        "config": config.name,
        "task": task,
        "batch_size": batch_size,
        "seconds": result["seconds"],
        "num_samples": result["num_samples"],
        "num_tokens": result["num_tokens"],
        "tokens_per_second": result["num_tokens"] / result["seconds"],
        "samples_per_second": result["num_samples"] / result["seconds"],
        "avg_experts": result["avg_experts"],
        "experts_implementation": patcher.experts_implementation,
        "primary_metric": result["metrics"][result["primary_metric"]]["value"],
    }


def main(output: Path) -> None:
    import lm_eval
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model = bx.build_random_olmoe(REAL_SHAPE, device="cuda", dtype=torch.bfloat16)
    strengthen_experts(model)
    tokenizer = AutoTokenizer.from_pretrained(bx.EMBEDDED_MODEL_DIR)
    rows = []
    for batch_size in BATCH_SIZES:
        for task in TASK_LIMITS:
            for spec in CONFIGS:
                rows.append(measure(model, tokenizer, batch_size, spec, task))
                print(json.dumps(rows[-1]), flush=True)
    record = {
        "benchmark": "bench_downstream",
        "lm_eval": lm_eval.__version__,
        "wall_seconds": time.perf_counter() - started,
        **bx.environment_info(model),
        "rows": rows,
    }
    output.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
