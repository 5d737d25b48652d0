"""A Colab T4's time for the notebook, estimated from a measured GPU run (no T4 was measured): the work the
notebook counted before its run (`estimated_work` in colab_gpu_run.py's gpu_run.json, or its gpu_estimate.json)
and the rates it measured there, scaled by datasheet ratios and floors stated below.

    python benchmarks/t4_estimate.py benchmarks/results/colab_gpu_h100_run59/quick/gpu_run.json
    python benchmarks/t4_estimate.py benchmarks/results/colab_gpu_h100_run59/full_gpu_estimate.json \
        --host-factor-from benchmarks/results/colab_gpu_h100_run59/quick/gpu_run.json

The estimate is a range, each end from stated assumptions:
- Evaluation (batched forwards of whole windows) costs the measured run's time, which on a card far faster
  than a T4 is mostly the host's (Python, kernel launches), and the T4's arithmetic: 2 x active parameters
  FLOPs a token at a share of its fp16 tensor peak. Low end: the larger of the two, at `TENSOR_EFFICIENCY`
  (the host and the T4 overlapping); high end: their sum, the host `HOST_SLOWDOWN` slower (a Colab host of 2
  vCPUs against a 16-core server) and the T4 at `TENSOR_EFFICIENCY_LOW`.
- Generation at batch 1 (the dynamic path, which a T4 takes: no fused variable-k kernels on sm75): a token
  costs the measured host time per token and the T4's time to read the active weights once (float16).
  Low end: the larger; high end: the host `HOST_SLOWDOWN` slower plus the read.
- A compiled path's first calls are left out: a T4 takes the dynamic path unless its own probe says otherwise.
- The probes time one prompt and one batch of windows; a run's other configurations, its shorter calls and
  the allocation fit's small batches may cost more. Where the record is a finished run (its elapsed time
  beside its estimate), every measured host time is scaled by the run's elapsed over estimated time
  (`host_factor`); `--host-factor-from RUN.json` takes that ratio from another finished run of the same code
  (its probes made the same way: e.g. the quick profile's, for the full profile's estimate), else it is 1
  and the estimate is as optimistic as the probes.
Not included: the model's download (about 14 GB) and loading.
"""

import argparse
import json
from pathlib import Path

# Datasheet numbers (dense fp16/bf16 tensor TFLOP/s, memory GB/s): NVIDIA's T4, H100 SXM5 and H200 sheets.
CARDS = {"T4": (65.0, 320.0), "H100": (989.0, 3350.0), "H200": (989.0, 4800.0)}
HOST_SLOWDOWN = 2.0  # a Colab host (2 vCPUs) against a 16-core GPU server's, at most
TENSOR_EFFICIENCY, TENSOR_EFFICIENCY_LOW = 0.5, 0.2  # shares of the T4's fp16 tensor peak a forward reaches
REAL_SHAPE = Path(__file__).resolve().parent / "olmoe-1b-7b-0924.config.json"


def active_parameters(config: dict) -> float:
    """Parameters a token passes through: attention, its experts, the embedding row and the output head."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    attention = 4 * hidden * hidden * layers
    experts = config["num_experts_per_tok"] * 3 * hidden * config["intermediate_size"] * layers
    return attention + experts + 2 * config["vocab_size"] * hidden


def card_of(name: str) -> str:
    """The CARDS key a device name names (e.g. "NVIDIA H100 80GB HBM3" -> "H100")."""
    matches = [key for key in CARDS if key in name]
    if len(matches) != 1:
        raise ValueError(f"the measured card must be one of {sorted(CARDS)}, got {name!r}")
    return matches[0]


def host_factor(record: dict) -> float:
    """A finished run's elapsed time over the time it estimated before its work; 1 for an estimate alone."""
    minutes = record.get("runtime_minutes", {})
    return minutes["elapsed"] / minutes["estimated_total"] if "elapsed" in minutes else 1.0


def t4_minutes(record: dict, config: dict, factor: float | None = None) -> dict:
    """{"evaluation": (low, high), "sweep": (low, high), "total": (low, high)} minutes on a T4, the measured host
    times scaled by `factor` (None: the record's own `host_factor`)."""
    work = record.get("estimated_work", record)
    card_of(record["hardware"])  # a measured card of known speed (what the host-bound reading assumes)
    factor = host_factor(record) if factor is None else factor
    t4_flops, t4_bandwidth = CARDS["T4"]
    active = active_parameters(config)
    measured = factor * work["evaluated_tokens"] / work["evaluate_tokens_per_second"]
    arithmetic = work["evaluated_tokens"] * 2 * active / (t4_flops * 1e12)  # seconds at the whole peak
    evaluation = (
        max(measured, arithmetic / TENSOR_EFFICIENCY),
        measured * HOST_SLOWDOWN + arithmetic / TENSOR_EFFICIENCY_LOW,
    )
    dynamic = next(p for p in record["generation_probes"] if p["path"] == "dynamic")
    host, weights_read = factor / dynamic["tokens_per_second"], active * 2 / (t4_bandwidth * 1e9)  # float16: 2 bytes
    per_token = (max(host, weights_read), host * HOST_SLOWDOWN + weights_read)
    firsts = factor * work["configurations"] * dynamic["first_call_seconds"]
    sweep = tuple(firsts + work["generated_tokens"] * seconds for seconds in per_token)
    total = (evaluation[0] + sweep[0], evaluation[1] + sweep[1])
    return {name: (low / 60, high / 60) for name, (low, high) in
            {"evaluation": evaluation, "sweep": sweep, "total": total}.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("record", type=Path, help="gpu_run.json or gpu_estimate.json of colab_gpu_run.py")
    parser.add_argument("--host-factor-from", type=Path, help="a finished run's gpu_run.json (default: the record)")
    arguments = parser.parse_args()
    record = json.loads(arguments.record.read_text())
    source = arguments.host_factor_from or arguments.record
    finished = json.loads(source.read_text()) if arguments.host_factor_from else record
    if arguments.host_factor_from and "elapsed" not in finished.get("runtime_minutes", {}):
        parser.error(f"--host-factor-from must be a finished run's gpu_run.json (runtime_minutes with elapsed), "
                     f"got {source}")  # fmt: skip
    factor = host_factor(finished)
    minutes = t4_minutes(record, json.loads(REAL_SHAPE.read_text()), factor)
    print(json.dumps({"from": str(arguments.record), "card": record["hardware"], "host_factor": factor,
                      "host_factor_from": str(source), "t4_minutes": minutes}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
