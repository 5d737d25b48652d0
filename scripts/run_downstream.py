"""`make eval`: routing configurations on lm-evaluation-harness tasks (bh_downstream.evaluate_downstream).

    python scripts/run_downstream.py                                  # the embedded model, offline tasks
    python scripts/run_downstream.py --model allenai/OLMoE-1B-7B-0924 --tasks hellaswag,arc_easy --limit 500 \
        --configs native:k=8 bh:alpha=0.05,max_k=8 topk:k=2 topp:p=0.5,max_k=8

Each (configuration, task) result is saved to <output-dir>/configs/<config>.<task>.json as it finishes and
resumed by a rerun with the same settings; then <output-dir>/downstream.csv, downstream.png and
downstream.md (the report section) are written from every result (default output-dir: results/lm_eval;
the notebook writes its own to <its output_dir>/downstream). Exits 1 if a task cannot be loaded or an
evaluation failed (its error is in the CSV and the markdown); what finished is kept either way.
Needs lm-eval: pip install -r requirements-eval.txt.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import bh_downstream as bd  # noqa: E402
import bh_experiment as bx  # noqa: E402
import bh_routing as br  # noqa: E402 - after the repository is on the path


def default_configs(native_k: int) -> list[str]:
    """The native routing, BH at the design's alpha and on a floor of 2, and the two baselines near 2 experts."""
    return [
        f"native:k={native_k}",
        f"bh:alpha=0.05,max_k={native_k}",
        f"bh:alpha=0.2,max_k={native_k},min_k=2",
        "topk:k=2",
        f"topp:p=0.5,max_k={native_k}",
    ]


def limit(text: str) -> int | float | None:
    """--limit: None, a number of samples per task (>= 1) or a fraction of each task (0 < f < 1)."""
    try:
        value = None if text.lower() == "none" else float(text)
    except ValueError:
        value = text  # not a number: check_limit names it
    try:
        return bd.check_limit(int(value) if isinstance(value, float) and value.is_integer() else value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--{error}") from error


def batch_size(text: str) -> int:
    """--batch-size: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be an integer >= 1, got {text!r}")
    return int(text)


def parse_arguments(arguments: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded', a local directory or a hub id")
    parser.add_argument("--tasks", default=",".join(bd.OFFLINE_TASKS), help="lm-eval task names, comma-separated")
    parser.add_argument("--configs", nargs="+", help="method:name=value,... (default: default_configs)")
    parser.add_argument("--limit", type=limit, default=None, help="samples per task (default: all)")
    parser.add_argument("--batch-size", type=batch_size, default=8)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--output-dir", default="results/lm_eval")
    parser.add_argument("--redo", action="store_true", help="recompute configurations already saved")
    return parser.parse_args(arguments)


def main(arguments: list[str]) -> int:
    options = parse_arguments(arguments)
    native_k = bx.load_config(options.model).num_experts_per_tok
    configs = [br.RoutingConfig.parse(spec) for spec in options.configs or default_configs(native_k)]
    device = None if options.device == "auto" else options.device
    model, tokenizer = bx.load_model(options.model, device=device, dtype=options.dtype)
    settings = bx.run_settings(model, options.model, str(model.device))
    try:
        results = bd.evaluate_downstream(
            model, tokenizer, configs, options.tasks, options.output_dir, settings, options.limit,
            options.batch_size, redo=options.redo,
        )  # fmt: skip
    except bd.DownstreamTaskError as error:
        print(f"run_downstream.py: {error}", file=sys.stderr)
        return 1
    paths = bd.write_downstream_outputs(results, options.output_dir)
    print(paths["markdown"].read_text())
    print("Written:", ", ".join(str(path) for path in paths.values()))
    failed = [
        f"{name} ({task})" for name, r in results.items() for task, t in r["tasks"].items() if t["status"] != "ok"
    ]
    if failed:
        print(f"run_downstream.py: failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
