"""The notebook end to end on the OLMoE-1B-7B shape on a GPU, as Colab would run it (issue 11): a random-weight
checkpoint of the real shape (vocabulary 50304, the embedded tokenizer) saved locally and loaded with
`load_model` as the notebook does, with the README's hub parameters, under a T4-sized cap of GPU memory or
on the full card.

    python benchmarks/colab_gpu_run.py build DIR                 # the checkpoint (bf16, random weights)
    python benchmarks/colab_gpu_run.py load DIR OUT.json          # peak host memory while load_model reads it
    python benchmarks/colab_gpu_run.py notebook DIR OUT_DIR [--cap-gib 15] [name=JSON ...]
    python benchmarks/colab_gpu_run.py estimate DIR OUT_DIR [--cap-gib 15] [name=JSON ...]   # up to the estimate

`notebook` runs the notebook's cells (scripts/run_notebook_cells.py) with model_name_or_path=DIR,
eval_window=1024 and the given overrides, GPU memory capped with torch.cuda.set_per_process_memory_fraction,
and writes OUT_DIR/gpu_run.json: wall time, peak GPU memory allocated and reserved, peak host memory, card,
versions and parameters, and the runtime the notebook estimated before its work beside the time it took.
`estimate` runs the cells up to the notebook's runtime estimate (the model loaded, the paths probed, no work)
and writes OUT_DIR/gpu_estimate.json.
"""

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bh_experiment as bx  # noqa: E402

REAL_SHAPE = REPO / "benchmarks" / "olmoe-1b-7b-0924.config.json"
HUB_PARAMETERS = {"eval_window": 1024}  # the README's hub settings (eval_text: the embedded text, offline here)


def peak_host_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / bx.GIB  # ru_maxrss is in KiB on Linux


def anonymous_gib() -> float:
    """Resident memory not backed by a file (RssAnon): what a load needs free, unlike the pages of a mapped
    safetensors file, which count in RSS but are page cache the kernel can drop."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024 / bx.GIB
    return float("nan")


def sampled_peak(function, interval: float = 0.01):
    """(function(), peak RssAnon in GiB sampled every `interval` seconds while it ran)."""
    import threading

    peak, done = [anonymous_gib()], threading.Event()

    def sample():
        while not done.wait(interval):
            peak.append(anonymous_gib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return function(), max(peak)
    finally:
        done.set()
        sampler.join()


def build(directory: Path) -> None:
    model = bx.build_random_olmoe(REAL_SHAPE, device="cuda", dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="5GB")  # shards of the hub checkpoint's size
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bx.EMBEDDED_MODEL_DIR / name, directory / name)
    print(json.dumps({"checkpoint": str(directory), "weights_gib": bx.weights_gib(model)}))


def load(directory: Path, output: Path) -> None:
    started, before = time.perf_counter(), anonymous_gib()
    (model, _), peak_anonymous = sampled_peak(lambda: bx.load_model(directory))
    seconds = time.perf_counter() - started
    files = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / bx.GIB
    record = {
        "load_seconds": seconds,
        "weights_gib": bx.weights_gib(model),
        "checkpoint_files_gib": files,
        "peak_host_rss_gib": peak_host_gib(),
        "peak_anonymous_rss_gib": peak_anonymous,
        "anonymous_rss_before_gib": before,
        **bx.environment_info(model),
    }
    output.write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def run_capped(directory: Path, output_dir: Path, cap_gib: float | None, overrides: dict, until=None):
    """The notebook's cells (up to the cell holding `until`, if given) on the checkpoint `directory` with the
    hub parameters and `overrides`, GPU memory capped at `cap_gib`: (the parameters, the cells' namespace)."""
    from run_notebook_cells import run_cells

    if cap_gib is not None:
        torch.cuda.set_per_process_memory_fraction(cap_gib * bx.GIB / torch.cuda.get_device_properties(0).total_memory)
    parameters = {**HUB_PARAMETERS, "model_name_or_path": str(directory), "output_dir": str(output_dir), **overrides}
    return parameters, run_cells(parameters, log=lambda line: print(line, flush=True), until=until)


def notebook(directory: Path, output_dir: Path, cap_gib: float | None, overrides: dict) -> None:
    started = time.perf_counter()
    parameters, namespace = run_capped(directory, output_dir, cap_gib, overrides)
    record = {
        "wall_seconds": time.perf_counter() - started,
        "cap_gib": cap_gib,
        "card_total_gib": torch.cuda.get_device_properties(0).total_memory / bx.GIB,
        "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / bx.GIB,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / bx.GIB,
        "peak_host_rss_gib": peak_host_gib(),
        "parameters": parameters,
        "memory_plan_gib": namespace["plan"],
        "quality_batch_sizes": {name: r.get("batch_size") for name, r in namespace["quality"].items()},
        "failed": namespace["failed"] + [f"{name} (quality)" for name in namespace["quality_failed"]],
        "runtime_minutes": namespace["metadata"]["runtime_minutes"],  # the notebook's estimate, and its elapsed
        "estimated_work": namespace["metadata"]["estimated_work"],
        "generation_probes": namespace["metadata"]["generation_probes"],
        **bx.environment_info(namespace["model"]),
    }
    (output_dir / "gpu_run.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in record.items() if k != "quality_batch_sizes"}))


def estimate(directory: Path, output_dir: Path, cap_gib: float | None, overrides: dict) -> None:
    parameters, namespace = run_capped(directory, output_dir, cap_gib, overrides, until="bx.estimate_runtime(")
    record = {
        "estimate_minutes": {part: seconds / 60 for part, seconds in namespace["estimate"].items()},
        "configurations": len(namespace["configs"]),
        "generated_tokens": namespace["sweep_tokens"],
        "evaluated_tokens": namespace["evaluated_tokens"],
        "evaluate_tokens_per_second": namespace["evaluate_rate"],
        "generation_probes": [probe._asdict() for probe in namespace["generation_probes"]],
        "cap_gib": cap_gib,
        "parameters": parameters,
        **bx.environment_info(namespace["model"]),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "gpu_estimate.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("build", "load", "notebook", "estimate"))
    parser.add_argument("directory", type=Path)
    parser.add_argument("output", type=Path, nargs="?")
    parser.add_argument("--cap-gib", type=float, default=None)
    parser.add_argument("overrides", nargs="*", help="notebook parameters as name=JSON")
    arguments = parser.parse_intermixed_args()
    if arguments.step == "build":
        build(arguments.directory)
    elif arguments.step == "load":
        load(arguments.directory, arguments.output)
    else:
        overrides = {name: json.loads(value) for name, _, value in (o.partition("=") for o in arguments.overrides)}
        step = notebook if arguments.step == "notebook" else estimate
        step(arguments.directory, arguments.output, arguments.cap_gib, overrides)


if __name__ == "__main__":
    main()
