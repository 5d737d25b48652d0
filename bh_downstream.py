"""Downstream accuracy: routing configurations on lm-evaluation-harness tasks (`make eval`,
scripts/run_downstream.py, and the notebook's optional section 8c). lm-eval is an optional dependency
(requirements-eval.txt), imported when a function here needs it.

    import bh_downstream as bd
    from bh_routing import RoutingConfig
    configs = [RoutingConfig.parse("topk:k=2"), RoutingConfig.parse("bh:alpha=0.05,max_k=8")]
    results = bd.evaluate_downstream(model, tokenizer, configs, "heldout_continuation", output_dir, limit=8)
    bd.write_downstream_outputs(results, output_dir)

1. Tasks: the offline tasks built from the held-out text (`OFFLINE_TASKS`, no download), names and limits
   checked against lm-eval's registry before any work (`check_task_names`, `check_lm_eval_tasks`).
2. Evaluation: one configuration on one task through the patcher (`evaluate_task`), padding left out of the
   routing statistics (`harness_padding_masked`); every (configuration, task) resumable (`evaluate_downstream`);
   paired bootstrap intervals against the native routing (`paired_difference`).
3. Outputs: `downstream_table`, `plot_downstream`, `downstream_markdown`, `write_downstream_outputs`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from bh_experiment import (
    HELDOUT_TEXT_PATH,
    ResultStore,
    atomic_write,
    atomic_write_text,
    environment_info,
    heldout_documents,
    note_failures,
    save_figure,
)
from bh_routing import MoERouterPatcher, RoutingConfig, routing_method

__all__ = [
    "OFFLINE_TASKS",
    "STANDARD_TASKS",
    "DownstreamTaskError",
    "check_task_names",
    "check_limit",
    "check_lm_eval_tasks",
    "evaluate_downstream",
    "write_downstream_outputs",
    "downstream_table",
    "paired_difference",
]


LM_EVAL_REQUIREMENTS = "requirements-eval.txt"  # lm-eval is optional: make eval and the tests install it


OFFLINE_TASKS = ("heldout_continuation", "heldout_perplexity")  # built from data/heldout.txt, no download


STANDARD_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "lambada_openai", "mmlu")  # need the hub


# The metric a task is plotted and summarised by: the first of these that it reports.
PRIMARY_METRICS = ("acc_norm", "acc", "word_perplexity", "exact_match")


CONTINUATION_SEED = 20261126


CONTINUATION_CHOICES = 4


CONTINUATION_WORDS = (10, 40)  # lines of this many words (inclusive) become items


CONTINUATION_MAX_ITEMS = 400


# ----------------------------------------------------------------------------------------------------
# 1. Tasks: the offline tasks built from the held-out text, names checked against lm-eval
# ----------------------------------------------------------------------------------------------------


class DownstreamTaskError(RuntimeError):
    """An lm-evaluation-harness task could not be loaded (e.g. its dataset is on the hub, unreachable offline)."""


def _require_lm_eval():
    """The lm_eval package, or ImportError saying how to install it."""
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            f"downstream evaluation needs lm-evaluation-harness: pip install -r {LM_EVAL_REQUIREMENTS}"
        ) from error
    return lm_eval


def _line_halves(line: str) -> tuple[str, str] | None:
    """(first half, second half) of a line of prose split at its middle word, or None for other lines."""
    words = line.split()
    letters = sum(character.isalpha() for character in line)
    if not CONTINUATION_WORDS[0] <= len(words) <= CONTINUATION_WORDS[1] or letters < 0.7 * len(line):
        return None
    middle = len(words) // 2
    return " ".join(words[:middle]), " ".join(words[middle:])


def continuation_items(documents: list[str], seed: int = CONTINUATION_SEED) -> list[dict]:
    """The multiple-choice items of the `heldout_continuation` task: the first half of a line of prose,
    and CONTINUATION_CHOICES candidate second halves: its own and those of other lines of the same document
    (same source, same topic, so that style alone does not give the answer away). At most
    CONTINUATION_MAX_ITEMS items, {"context", "choices", "label", "document"}, shuffled with `seed`."""
    rng = random.Random(seed)
    items = []
    for doc_index, doc in enumerate(documents):
        pairs = [pair for pair in map(_line_halves, doc.splitlines()) if pair is not None]
        for index, (context, continuation) in enumerate(pairs):
            others = {pairs[j][1] for j in range(len(pairs)) if j != index} - {continuation}
            if len(others) < CONTINUATION_CHOICES - 1:
                continue
            choices = [continuation, *rng.sample(sorted(others), CONTINUATION_CHOICES - 1)]
            rng.shuffle(choices)
            items.append(
                {"context": context, "choices": choices, "label": choices.index(continuation), "document": doc_index}
            )
    rng.shuffle(items)
    return items[:CONTINUATION_MAX_ITEMS]


def _test_split(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def offline_task_configs() -> dict[str, dict]:
    """The lm-eval task configurations of OFFLINE_TASKS, built from data/heldout.txt when loaded (never
    trained on: data/CORPUS.md): `heldout_continuation` (multiple choice, accuracy) and
    `heldout_perplexity` (every document scored whole, as lm-eval scores WikiText: word and byte
    perplexity, bits per byte)."""
    metric = {"aggregation": "mean", "higher_is_better": True}
    common = {"test_split": "test", "metadata": {"version": 1.0}}
    return {
        "heldout_continuation": common
        | {
            "task": "heldout_continuation",
            "custom_dataset": lambda **_: _test_split(continuation_items(heldout_documents())),
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc"} | metric, {"metric": "acc_norm"} | metric],
        },
        "heldout_perplexity": common
        | {
            "task": "heldout_perplexity",
            "custom_dataset": lambda **_: _test_split([{"text": doc} for doc in heldout_documents()]),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": name, "aggregation": aggregation, "higher_is_better": False}
                for name, aggregation in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        },
    }


def _task_names(tasks) -> list[str]:
    """Task names from a list or a comma-separated string (ValueError naming the argument otherwise)."""
    if isinstance(tasks, str):
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    if not isinstance(tasks, list | tuple) or not tasks or not all(isinstance(n, str) and n for n in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names (or 'a,b'), got {tasks!r}")
    return list(tasks)


def _task_spec(name: str):
    """A task as lm-eval takes it: an OFFLINE_TASKS name as its configuration, any other as the name."""
    return offline_task_configs().get(name, name)


def lm_eval_task_manager(names=()):
    """lm-eval's task manager for the task names it must know: with lm-eval's registry only where a name is
    not one of OFFLINE_TASKS (indexing its thousands of task files takes 5-10 s on a CPU; the offline tasks
    are given as configurations and need none of it), so without names, for the offline tasks alone."""
    return _task_manager(registry=any(name not in OFFLINE_TASKS for name in names))


@functools.cache
def _task_manager(registry: bool):
    """Built once per process and kind."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=registry)


def check_task_names(tasks) -> list[str]:
    """The task names, checked against OFFLINE_TASKS and lm-eval's registry without loading any data:
    ValueError for an unknown name, or for a tag (a bare list of tasks with no aggregate of its own, e.g.
    ai2_arc: name its tasks, arc_easy and arc_challenge)."""
    names = _task_names(tasks)
    manager = lm_eval_task_manager(names)
    for name in names:
        if name in OFFLINE_TASKS:
            continue
        if name not in manager.all_tasks:
            raise ValueError(
                f"unknown lm-eval task {name!r}: give one of this repository's {OFFLINE_TASKS} or a task of "
                "lm-eval's registry (`lm-eval ls tasks` lists them; e.g. " + ", ".join(STANDARD_TASKS) + ")"
            )
        if name in manager.all_tags:
            raise ValueError(f"{name!r} is an lm-eval tag, a list of tasks without an aggregate: name its tasks")
    return names


def check_limit(limit) -> int | float | None:
    """lm-eval's `limit`: None (every sample), an integer >= 1 (samples per task) or a fraction in (0, 1)."""
    whole = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    fraction = isinstance(limit, float) and 0 < limit < 1
    if limit is not None and not (whole or fraction):
        raise ValueError(f"limit must be None, an integer >= 1 or a fraction in (0, 1), got {limit!r}")
    return limit


def check_lm_eval_tasks(tasks) -> list[str]:
    """`check_task_names`, then load every task once (downloading a standard task's dataset into the
    Hugging Face cache); DownstreamTaskError naming the task, and why, if one cannot be loaded."""
    names = check_task_names(tasks)
    for name in names:
        try:
            lm_eval_task_manager([name]).load([_task_spec(name)])
        except Exception as error:  # noqa: BLE001 - lm-eval and datasets raise many types; all are reported
            raise DownstreamTaskError(
                f"lm-eval task {name!r} could not be loaded ({type(error).__name__}: {error}). Standard tasks "
                f"(e.g. {', '.join(STANDARD_TASKS)}) download their data from the Hugging Face hub and need "
                f"internet; offline, use {', '.join(OFFLINE_TASKS)}"
            ) from error
    return names


# ----------------------------------------------------------------------------------------------------
# 2. Evaluation: a routing configuration on a task, through the patcher
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def harness_padding_masked(patcher: MoERouterPatcher):
    """While active, the patcher's statistics leave out the padding of lm-eval's log-likelihood batches.

    lm-eval's HFLM (0.4.x) right-pads a batch of (context + continuation) inputs with zeros and calls
    model(input_ids) with no attention mask (padding cannot change a causal model's real positions, so it
    needs none); the routing statistics would count the padding. Its `pad_and_concat` sees each sequence's
    length: wrapped here, it also hands the patcher the batch's mask (`set_attention_mask`). Generation
    batches carry their own attention mask, which the patcher reads anyway."""
    _require_lm_eval()
    from lm_eval.models import huggingface as harness_module

    original = harness_module.pad_and_concat

    def pad_and_mask(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right"):
        lengths = torch.tensor([tensor.shape[-1] for tensor in tensors])  # before pad_and_concat pads in place
        batch = original(max_length, tensors, padding_side=padding_side)
        positions = torch.arange(max_length)
        real = positions < lengths[:, None] if padding_side == "right" else positions >= (max_length - lengths)[:, None]
        patcher.set_attention_mask(real.to(batch.device))
        return batch

    harness_module.pad_and_concat = pad_and_mask
    try:
        yield patcher
    finally:
        harness_module.pad_and_concat = original
        patcher.set_attention_mask(None)


def harness_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval HFLM around an already loaded (and possibly patched) model: lm-eval then evaluates the
    routing the patcher sets."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def task_metrics(task_results: dict, higher_is_better: dict | None = None) -> dict[str, dict]:
    """{metric: {"value", "stderr", "higher_is_better"}} from one task's entry of lm-eval's results
    ("acc,none": 0.5, "acc_stderr,none": 0.02, ...). A metric of filter "none" is named as is, another
    filter's as "metric,filter" (e.g. "exact_match,strict-match"); stderr is None where lm-eval gives none
    (e.g. perplexities); higher_is_better comes from lm-eval's own table for the task (None if absent)."""
    metrics = {}
    for key, value in task_results.items():
        metric, comma, kind = key.partition(",")
        if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = task_results.get(f"{metric}_stderr,{kind}")
        metrics[metric if kind == "none" else key] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "higher_is_better": (higher_is_better or {}).get(metric),
        }
    return metrics


def primary_metric(metrics: dict) -> str | None:
    """The metric a task is summarised by: the first of PRIMARY_METRICS it reports, else its first metric."""
    return next((name for name in PRIMARY_METRICS if name in metrics), next(iter(metrics), None))


def _sample_values(output: dict, metric: str | None) -> dict[str, object]:
    """{"<task>/<doc_id>": value of `metric`} for every sample lm-eval logged under the metric's filter (a
    group's subtasks included): a number (accuracy) or [log-likelihood, words or bytes] (perplexities)."""
    name, _, kind = (metric or "").partition(",")
    values = {}
    for task, samples in (output.get("samples") or {}).items():
        for sample in samples:
            if name in sample and sample.get("filter", "none") == (kind or "none"):
                value = sample[name]
                values[f"{task}/{sample['doc_id']}"] = (
                    [float(v) for v in value] if isinstance(value, tuple | list) else float(value)
                )
    return values


# How lm-eval aggregates the per-sample values of a metric, for the paired bootstrap: the mean, unless named
# here (pairs are [log-likelihood, words or bytes]). A metric aggregated otherwise over the corpus (f1, bleu)
# gets no interval.
_AGGREGATIONS = {
    "word_perplexity": lambda v: math.exp(-v[:, 0].sum() / v[:, 1].sum()),
    "byte_perplexity": lambda v: math.exp(-v[:, 0].sum() / v[:, 1].sum()),
    "bits_per_byte": lambda v: -v[:, 0].sum() / v[:, 1].sum() / math.log(2),
    "perplexity": lambda v: math.exp(-v.mean()),
}


_MEAN_METRICS = ("acc", "acc_norm", "exact_match", "acc_mutual_info", "mc1", "mc2")


def paired_difference(samples: dict, reference: dict, metric: str = "acc", resamples: int = 2000, seed: int = 0):
    """The difference of a task's metric between two configurations evaluated on the same samples
    ({sample id: value}, as `evaluate_task` saves them), with a paired bootstrap 95% interval: the shared
    samples are resampled with replacement, the same draw for both, and the metric re-aggregated as lm-eval
    aggregates it (the mean; weighted perplexity and bits per byte from [log-likelihood, count] pairs;
    exp(-mean) for "perplexity"). The interval assumes the samples are independent draws from the task's
    population (Efron & Tibshirani 1993, ch. 13, percentile interval). Returns {"difference", "low", "high",
    "num_samples"}; NaN where fewer than 2 samples are shared or the metric is not aggregated as above."""

    base = metric.partition(",")[0]
    aggregate = _AGGREGATIONS.get(base, (lambda v: float(v.mean())) if base in _MEAN_METRICS else None)
    shared = sorted(set(samples) & set(reference))
    if aggregate is None or len(shared) < 2:
        return {"difference": math.nan, "low": math.nan, "high": math.nan, "num_samples": len(shared)}
    ours = np.asarray([samples[key] for key in shared], dtype=np.float64)
    theirs = np.asarray([reference[key] for key in shared], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):  # one draw at a time: [resamples, n] indices would not fit for MMLU's 14k
        draw = rng.integers(0, len(shared), size=len(shared))
        boot.append(aggregate(ours[draw]) - aggregate(theirs[draw]))
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "difference": float(aggregate(ours) - aggregate(theirs)),
        "low": float(low),
        "high": float(high),
        "num_samples": len(shared),
    }


def evaluate_task(harness, patcher: MoERouterPatcher, config: RoutingConfig, task, limit=None, bootstrap_iters=1000):
    """One routing configuration on one lm-eval task: patch, `simple_evaluate`, unpatch.

    Returns {"metrics": {metric: {"value", "stderr", "higher_is_better"}}, "primary_metric", "samples" (each
    sample's value of the primary metric, for `paired_difference`), "num_samples", "seconds", "date", and
    the routing statistics of the evaluation's forward passes over real tokens only (padding left out):
    "avg_experts", "per_layer_avg_experts", "num_tokens"}. lm-eval's stderr of a mean is its standard
    error under independent samples; bootstrap_iters sets the resamples for metrics it bootstraps."""
    from lm_eval import simple_evaluate

    check_limit(limit)
    config.apply(patcher)
    try:
        with harness_padding_masked(patcher):
            start = time.perf_counter()
            output = simple_evaluate(
                model=harness,
                tasks=[_task_spec(task)],
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,
                task_manager=lm_eval_task_manager([task]),
            )
            seconds = time.perf_counter() - start
        stats = patcher.get_stats()
    finally:
        patcher.unpatch()
    metrics = task_metrics(output["results"][task], output.get("higher_is_better", {}).get(task))
    primary = primary_metric(metrics)
    samples = _sample_values(output, primary)
    return {
        "metrics": metrics,
        "primary_metric": primary,
        "samples": samples,
        "num_samples": len(samples),
        "seconds": seconds,
        "date": environment_info()["date"],
        "avg_experts": stats["avg_experts"],
        "per_layer_avg_experts": stats["per_layer_avg_experts"],
        "num_tokens": stats["num_tokens"],
    }


def _downstream_settings(model, settings: dict | None, tasks: list[str], limit, batch_size: int, bootstrap_iters):
    """What a saved (configuration, task) result depends on besides this module's code: the model's dtype and
    hardware, the caller's settings (e.g. the model's name), the task list, limit, batch size, resamples,
    lm-eval's version and the held-out text the offline tasks are built from."""

    lm_eval = _require_lm_eval()
    info = environment_info(model)
    return (
        {"dtype": info["model_dtype"], "hardware": info["hardware"]}
        | (settings or {})
        | {
            "tasks": tasks,
            "limit": limit,
            "batch_size": batch_size,
            "bootstrap_iters": bootstrap_iters,
            "lm_eval": lm_eval.__version__,
            "heldout_sha256": hashlib.sha256(HELDOUT_TEXT_PATH.read_bytes()).hexdigest()[:16],
        }
    )


def evaluate_downstream(
    model,
    tokenizer,
    configs: list[RoutingConfig],
    tasks,
    output_dir: str | Path,
    settings: dict | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    patcher: MoERouterPatcher | None = None,
    redo: bool = False,
) -> dict[str, dict]:
    """Every routing configuration on every lm-eval task, one result file per (configuration, task).

    configs: `RoutingConfig`s (e.g. `RoutingConfig.parse("bh:alpha=0.05,max_k=8")`); tasks: lm-eval task
    names (OFFLINE_TASKS need no download); limit: `check_limit`. Each task's result (`evaluate_task`) is
    saved to output_dir/configs/<config>.<task>.json as it finishes, resumed on a rerun with the same
    settings (`_downstream_settings`) and code, and recorded as "failed" with its error if it raises
    (`ResultStore`), while the other tasks and configurations go on. Every task is loaded once first, so
    that an unreachable one fails (DownstreamTaskError) before any work. patcher: the model's patcher
    (None: a new one); redo: recompute saved results.
    Returns {config name: {"method", "params", "tasks": {task: result with its "status"}}}."""
    if not configs or not all(isinstance(config, RoutingConfig) for config in configs):
        raise ValueError(f"configs must be a non-empty list of RoutingConfig, got {configs!r}")
    if not isinstance(bootstrap_iters, int) or isinstance(bootstrap_iters, bool) or bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters must be an integer >= 0, got {bootstrap_iters!r}")
    names = check_lm_eval_tasks(tasks)
    harness = harness_model(model, tokenizer, batch_size)
    settings = _downstream_settings(model, settings, names, check_limit(limit), batch_size, bootstrap_iters)
    store = ResultStore(Path(output_dir) / "configs", settings)
    patcher = patcher or MoERouterPatcher(model)
    # Every configuration's parameters checked (and completed) before any work.
    results = {
        c.name: {
            "method": c.method,
            "params": routing_method(c.method).parameters(patcher.shape, **c.kwargs),
            "tasks": {},
        }
        for c in configs
    }
    for config in configs:
        for task in names:
            compute = functools.partial(evaluate_task, harness, patcher, config, task, limit, bootstrap_iters)
            saved = store.run(f"{config.name}.{task}", compute, describe={"task": task}, redo=redo)
            results[config.name]["tasks"][task] = saved
    return results


# ----------------------------------------------------------------------------------------------------
# 3. Outputs: the table, the figure, the report section
# ----------------------------------------------------------------------------------------------------


def _task_row(evaluation: dict, native: dict | None) -> dict:
    """The columns of one ok (configuration, task) row of `downstream_table`."""
    metric = evaluation["primary_metric"]
    value = evaluation["metrics"].get(metric, {})
    row = {
        "metric": metric,
        "higher_is_better": value.get("higher_is_better"),
        "value": value.get("value"),
        "stderr": value.get("stderr"),
        "avg_experts": evaluation["avg_experts"],
        "num_tokens": evaluation["num_tokens"],
        "num_samples": evaluation["num_samples"],
        "date": evaluation.get("date"),
    }
    if native is not None and metric is not None:
        difference = paired_difference(evaluation["samples"], native["samples"], metric)
        row |= {f"{key}_vs_native": difference[key] for key in ("difference", "low", "high")}
    return row


def downstream_table(results: dict[str, dict]):
    """One row per (configuration, task): config, method, series, its parameters, task, status, error,
    primary metric, whether higher is better, its value and lm-eval's stderr, average experts per real
    token, tokens, samples, the evaluation's date, and the difference to the native configuration with its
    paired bootstrap 95% interval (`paired_difference`; absent without an ok native result for the task)."""
    import pandas as pd

    native = next((r for r in results.values() if r["method"] == "native"), None)
    rows = []
    for name, result in results.items():
        method = routing_method(result["method"])
        head = {"config": name, "method": method.name, "series": method.series(result["params"]), **result["params"]}
        for task, evaluation in result["tasks"].items():
            row = head | {"task": task, "status": evaluation["status"], "error": evaluation.get("error", "")}
            reference = native["tasks"].get(task, {}) if native is not None and native is not result else {}
            if evaluation["status"] == "ok":
                row |= _task_row(evaluation, reference if reference.get("status") == "ok" else None)
            rows.append(row)
    return pd.DataFrame(rows)


def plot_downstream(table, path: str | Path | None = None):
    """Each task's primary metric against average experts per token, one panel per task and one line per
    method series, with +-1 stderr bars where lm-eval gives one. Saved to `path` (atomically) if given."""
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"] if len(table) else table
    tasks = list(dict.fromkeys(ok["task"])) if len(ok) else []
    figure, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        rows = ok[ok["task"] == task].sort_values("avg_experts")
        for series, points in rows.groupby("series", sort=False):
            stderr = points["stderr"].astype(float)
            yerr = None if stderr.isna().all() else stderr
            ax.errorbar(points["avg_experts"], points["value"], yerr=yerr, marker="o", capsize=3, label=series)
        metric = rows["metric"].iloc[0]
        ax.set(xlabel="average experts per token", ylabel=metric, title=task)
        ax.set_yscale("log" if "perplexity" in str(metric) else "linear")
        ax.legend(fontsize=8)
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no configuration evaluated", ha="center", va="center")
    note_failures(figure, sorted({f"{r.config} ({r.task})" for r in table.itertuples() if r.status != "ok"}))
    if path is not None:
        save_figure(figure, path, dpi=120)
    return figure


def _interval(row) -> str:
    difference = getattr(row, "difference_vs_native", math.nan)
    if difference is None or math.isnan(difference):
        return ""
    return f"{difference:+.4g} [{row.low_vs_native:+.4g}, {row.high_vs_native:+.4g}]"


def _task_lines(task: str, rows) -> list[str]:
    """One task's table of `downstream_markdown`."""
    metric, better = rows["metric"].iloc[0], rows["higher_is_better"].iloc[0]
    direction = {True: "higher is better", False: "lower is better"}.get(better, "direction not given by lm-eval")
    lines = [f"### {task}: {metric} ({direction}; {int(rows['num_samples'].iloc[0])} samples)", ""]
    lines += [f"| config | avg experts | {metric} | difference to native [95% interval] |", "| --- | --- | --- | --- |"]
    for row in rows.sort_values("avg_experts").itertuples():
        stderr = "" if row.stderr is None or math.isnan(row.stderr) else f" +- {row.stderr:.4f}"
        lines.append(f"| {row.config} | {row.avg_experts:.2f} | {row.value:.4f}{stderr} | {_interval(row)} |")
    return [*lines, ""]


def downstream_markdown(table, header: str = "", title: str = "## Downstream accuracy (lm-evaluation-harness)") -> str:
    """The report's section from `downstream_table`: `header` (what ran), then per task each configuration's
    primary metric (with lm-eval's stderr), average experts per real token and the difference to the native
    configuration with its paired bootstrap 95% interval; then the failed (configuration, task) pairs."""
    ok = table[table["status"] == "ok"] if len(table) else table
    lines = [title, "", *([header, ""] if header else [])]
    for task, rows in ok.groupby("task", sort=False) if len(ok) else []:
        lines += _task_lines(task, rows)
    failed = table[table["status"] != "ok"] if len(table) else table
    lines += [f"- {row.config} on {row.task} failed: {row.error}" for row in failed.itertuples()]
    return "\n".join(lines).rstrip() + "\n"


def downstream_header(results: dict[str, dict]) -> str:
    """What ran, from the settings saved with the results: model, dtype, hardware, lm-eval version, limit,
    batch size, and the dates of the first and last evaluation."""
    saved = [evaluation for result in results.values() for evaluation in result["tasks"].values()]
    settings = saved[0]["settings"] if saved else {}
    dates = sorted(evaluation["date"] for evaluation in saved if evaluation.get("date"))
    when = f"; evaluated {dates[0]} to {dates[-1]}" if dates else ""
    return (
        f"Model `{settings.get('model')}` ({settings.get('dtype')}, {settings.get('hardware')}), lm-eval "
        f"{settings.get('lm_eval')}, limit {settings.get('limit')}, batch size {settings.get('batch_size')}{when}. "
        "Intervals: paired bootstrap over the task's samples, assuming they are independent; not adjusted for "
        "the several comparisons per task."
    )


def write_downstream_outputs(results: dict[str, dict], output_dir: str | Path) -> dict[str, Path]:
    """The table (downstream.csv), the figure (downstream.png) and the markdown section (downstream.md) of
    `evaluate_downstream`'s results, written atomically to output_dir. Returns their paths."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    table = downstream_table(results)
    paths = {
        "csv": atomic_write(output_dir / "downstream.csv", lambda temporary: table.to_csv(temporary, index=False)),
        "markdown": atomic_write_text(
            output_dir / "downstream.md", downstream_markdown(table, downstream_header(results))
        ),
    }
    figure = plot_downstream(table, output_dir / "downstream.png")
    plt.close(figure)
    return paths | {"figure": output_dir / "downstream.png"}
