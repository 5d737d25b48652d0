"""The report of a run: its findings computed as data from the run's tables, rendered as markdown through
the Jinja2 template `bh_report.md.j2`, tables by pandas (`DataFrame.to_markdown`): `render_report(run)`, `run`
the notebook's `report_inputs` (section 12).

The run is a dict of what the notebook measured: "metadata" (model, versions, hardware, date),
"design" (the run's parameters and the names of its groups of configurations), "summary" (the CSV),
"results" (the sweep by configuration), "saturation", "quality" and "quality_2" (by configuration),
"quality_settings", "tables" (frontier, frontier_2, best, best_2, null_rates, bulk, oracle, layer_table),
"token_analysis", "disagreement" and "downstream". Every number the report shows is read from it.

1. Formatting and the routings that were identical.
2. Facts of the sweep: what the routing did, the complexity groups, the design's p-value, timing, saturation.
3. Facts of quality: against the baselines at equal compute, the best method per budget, calibration, per
   layer, the oracle check, where BH and top-p disagree.
4. The report's tables, and rendering.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jinja2
import pandas as pd

import bh_experiment as bx

__all__ = [
    "render_report",
    "identical_routings",
    "sweep_outcome",
    "quality_outcome",
    "TEMPLATE_PATH",
]

TEMPLATE_PATH = Path(__file__).resolve().parent / "bh_report.md.j2"


# ----------------------------------------------------------------------------------------------------
# 1. Formatting and the routings that were identical
# ----------------------------------------------------------------------------------------------------


def with_interval(row, prefix: str) -> str:
    """A difference and its interval, "+1.23% [+0.45, +2.01]", from row[prefix + "_percent" / "_low" / "_high"]."""
    value, low, high = (row[f"{prefix}_{part}"] for part in ("percent", "low", "high"))
    if pd.isna(value):
        return "outside range"
    return f"{value:+.2f}%" + ("" if pd.isna(low) else f" [{low:+.2f}, {high:+.2f}]")


def markdown(frame: pd.DataFrame, floatfmt: str = ".2f", missing: str = "-") -> str:
    """A table as pandas writes markdown (tabulate's pipe format), without the index."""
    if not len(frame):
        return "None."
    shown = frame.astype(object).where(frame.notna(), None)  # tabulate writes `missing` for None, not for NaN
    return shown.to_markdown(index=False, floatfmt=floatfmt, missingval=missing)


def identical_routings(results_by_name: dict, outcome) -> dict:
    """{name: the first configuration with the same outcome}, for each ok configuration repeating an earlier one."""
    first, same = {}, {}
    for name, result in results_by_name.items():
        if result.get("status") == "ok":
            same[name] = first.setdefault(outcome(result), name)
    return {name: other for name, other in same.items() if other != name}


def sweep_outcome(result: dict):
    """What identical routings share in the sweep: every prompt's per-token counts and generated text."""
    return result["method"], json.dumps([(p["token_counts"], p["generated_text"]) for p in result["prompts"]])


def quality_outcome(result: dict):
    """What identical routings share in the quality sweep: the mean NLL and the per-layer experts."""
    return result["method"], result["mean_nll"], tuple(result["per_layer_avg_experts"])


# ----------------------------------------------------------------------------------------------------
# 2. Facts of the sweep
# ----------------------------------------------------------------------------------------------------


def _ok_rows(run: dict) -> pd.DataFrame:
    summary = run["summary"]
    return summary[summary["status"] == "ok"]


def _focus(run: dict) -> dict:
    """{alpha: result} of BH at max_k = the native k, for each alpha that ran."""
    design, results = run["design"], run["results"]
    return {a: results[n] for a, n in design["focus"].items() if results.get(n, {}).get("status") == "ok"}


def routing_facts(run: dict) -> dict:
    """The native routing's experts and speed; BH's experts per alpha at max_k = the native k."""
    design, ok_rows = run["design"], _ok_rows(run)
    native = run["results"].get(design["baseline"], {})
    grid = ok_rows[ok_rows["config"].isin(design["grid"])]
    rows = grid[grid["max_k"] == design["native_k"]].sort_values("alpha")
    bh = None
    if len(rows):
        bh = {
            "by_alpha": [(r.alpha, r.avg_experts) for r in rows.itertuples()],
            "reduction": (rows["reduction_vs_baseline"].min(), rows["reduction_vs_baseline"].max()),
            "counts": (rows["min_experts"].min(), rows["max_experts"].max()),
            "std_max": rows["std_experts"].max(),
        }
    return {"native": native["summary"] if native.get("status") == "ok" else None, "bh": bh}


def group_facts(run: dict) -> dict | None:
    """The complexity groups ranked by average experts per alpha, and whether the design's claim holds."""
    focus = _focus(run)
    if not focus:
        return None
    ranked = {
        alpha: sorted(((g, s["avg_experts"]) for g, s in r["groups"].items()), key=lambda item: item[1])
        for alpha, r in focus.items()
    }
    holds = all(
        2 <= r["groups"].get("simple", {}).get("avg_experts", -1) <= 4
        and 6 <= r["groups"].get("complex", {}).get("avg_experts", -1) <= 10
        for r in focus.values()
    )
    return {"ranked": ranked, "holds": holds}


def design_pvalue_facts(run: dict) -> dict | None:
    """What the design's own p-value kept, and whether every token kept exactly min_k."""
    ok_rows = _ok_rows(run)
    rows = ok_rows[ok_rows["config"].isin(run["design"]["design_pvalue"])].sort_values("alpha")
    if not len(rows):
        return None
    return {
        "by_alpha": [(r.alpha, r.avg_experts) for r in rows.itertuples()],
        "at_floor": bool((rows["floor_hit_rate"] == 100.0).all()),
    }


def timing_facts(run: dict, identical: dict) -> dict:
    """The routed configurations' generated tokens/s against the native routing's, in words: how many were
    slower and faster by their medians, how many of their ranges overlap native's (all routed, and the distinct
    routings), and how far apart identical routings measured (the timing noise)."""
    design, ok_rows = run["design"], _ok_rows(run)
    native = run["results"].get(design["baseline"], {})
    routed = ok_rows[ok_rows["config"] != design["baseline"]]
    facts = {"repeats": design["timing_repeats"], "native": None}
    if native.get("status") != "ok" or not len(routed):
        return facts
    summary = native["summary"]
    inside = (routed["tokens_per_second_min"] <= summary["tokens_per_second_max"]) & (
        routed["tokens_per_second_max"] >= summary["tokens_per_second_min"]
    )
    distinct = ~routed["config"].isin(identical)
    speeds = routed.set_index("config")["tokens_per_second"]
    twins = {}
    for name, first in identical.items():
        twins.setdefault(first, [first]).append(name)
    noise = max(twins.values(), key=lambda names: speeds[names].max() - speeds[names].min(), default=None)
    return facts | {
        "native": summary,
        "routed": len(routed),
        "slower": int((routed["tokens_per_second"] < summary["tokens_per_second"]).sum()),
        "overlapping": int(inside.sum()),
        "distinct": int(distinct.sum()),
        "distinct_overlapping": int((inside & distinct).sum()),
        "noise": None if noise is None else [(name, float(speeds[name])) for name in noise],
    }


def repetition_facts(run: dict) -> dict | None:
    """Degenerate generation: per configuration of the report's focus, the prompts whose generated tokens
    repeat the previous token in more than 40% of steps, against the native routing's."""
    design, results = run["design"], run["results"]
    names = [design["baseline"], *design["focus"].values()]
    shown = {}
    for name in names:
        prompts = results.get(name, {}).get("prompts") or []
        if results.get(name, {}).get("status") == "ok" and prompts and "generated_ids" in prompts[0]:
            degenerate = sum(bx.repetition(p["generated_ids"])["repeat_previous_share"] > 0.4 for p in prompts)
            shown[name] = (degenerate, len(prompts))
    return shown or None


def run_facts(run: dict, identical: dict) -> dict:
    """Identical routings, timing, the experts path and warm-up, saturation per alpha, failures."""
    ok_rows, design = _ok_rows(run), run["design"]
    groups = {}
    for name, first in identical.items():
        groups.setdefault(first, []).append(name)
    paths = sorted({r.get("experts_implementation") or "eager" for r in run["results"].values() if r["status"] == "ok"})
    saturation = run["saturation"]
    calibrated = saturation[saturation["pvalue_method"] == design["default_pvalue_method"]]
    failures = [n for n, r in run["results"].items() if r["status"] != "ok"]
    failures += [f"{n} (quality)" for n, r in run["quality"].items() if r["status"] != "ok"]
    return {
        "identical": groups,
        "timing": timing_facts(run, identical) if len(ok_rows) else None,
        "paths": paths,
        "warm_up": (ok_rows["warm_up_seconds"].min(), ok_rows["warm_up_seconds"].max()) if len(ok_rows) else None,
        "saturation": [(r.alpha, r.saturation_max_k) for r in calibrated.itertuples()],
        "failures": failures,
    }


# ----------------------------------------------------------------------------------------------------
# 3. Facts of quality
# ----------------------------------------------------------------------------------------------------


def _distinct(rows: pd.DataFrame, identical: dict) -> pd.DataFrame:
    """`rows` without the configurations that routed identically to an earlier one (each counted once)."""
    return rows[~rows["config"].isin(identical)] if len(rows) else rows


def versus_baseline(rows: pd.DataFrame, baseline: str, identical: dict) -> dict:
    """The distinct configurations of `rows` against one baseline (or the strongest) at equal experts: how many
    are better, how many with the whole interval below or above 0, how many of the better stay significant
    once corrected for the family of these comparisons (Holm, Benjamini-Hochberg), the median, best and worst."""
    prefix = f"delta_vs_{baseline}"
    inside = _distinct(rows.dropna(subset=[f"{prefix}_percent"]), identical) if len(rows) else rows
    if not len(inside):
        return {"distinct": 0}
    deltas = inside[f"{prefix}_percent"]
    best, worst = inside.loc[deltas.idxmin()], inside.loc[deltas.idxmax()]
    significant = bx.family_significance(inside[f"{prefix}_p"].to_numpy())
    better = (deltas < 0).to_numpy()
    return {
        "distinct": len(inside),
        "better": int(better.sum()),
        "below": int((inside[f"{prefix}_high"] < 0).sum()),
        "above": int((inside[f"{prefix}_low"] > 0).sum()),
        "holm": int((better & significant["holm"]).sum()),
        "bh": int((better & significant["bh"]).sum()),
        "median": deltas.median(),
        "best": best.reindex(
            ["config", "avg_experts", "perplexity", f"{baseline}_perplexity_at_equal_experts"]
        ).to_dict()
        | {"interval": with_interval(best, prefix)},
        "worst": {"config": worst["config"], "interval": with_interval(worst, prefix)},
    }


def _baselines(design: dict) -> dict:
    """{key of a delta column: its words}: every baseline curve, then the strongest of them."""
    return design["baselines"] | {bx.STRONGEST: "the strongest baseline"}


def slice_answer(frontier, best, layer_table, identical: dict, label: str) -> dict | None:
    """One slice's answer: the per-token rules (distinct) against the strongest baseline at equal average
    experts and against top-k at equal per-layer budgets, and the best at each budget."""
    if not len(frontier):
        return None
    per_token = frontier[frontier["per_token"].astype(bool)]
    per_layer = layer_table[layer_table["per_token"].astype(bool)] if len(layer_table) else layer_table
    budgets = []
    for budget, rows in best.groupby("budget") if len(best) else []:
        rules = rows[rows["per_token"].astype(bool)]
        budgets.append({"budget": budget, "winner": rows.iloc[0], "rule": rules.iloc[0] if len(rules) else None})
    return {
        "label": label,
        "strongest": versus_baseline(per_token, bx.STRONGEST, identical),
        "layer_matched": versus_baseline(per_layer, "layer_matched", identical),
        "budgets": budgets,
    }


def answer_facts(run: dict, identical: dict, identical_2: dict) -> list[dict]:
    """The answer the report leads with, per slice (`slice_answer`)."""
    tables, design = run["tables"], run["design"]
    label = f"evaluation slice ({design['eval_text']}, {run['quality_settings']['num_tokens']:,} tokens)"
    answers = [slice_answer(tables["frontier"], tables["best"], tables["layer_table"], identical, label)]
    if run["quality_2"]:
        label = f"second slice ({design['eval_text_2']}, {run['quality_settings_2']['num_tokens']:,} tokens)"
        answers.append(
            slice_answer(tables["frontier_2"], tables["best_2"], tables["layer_table_2"], identical_2, label)
        )
    return [answer for answer in answers if answer]


def quality_facts(run: dict, identical: dict) -> dict:
    """Calibrated BH against each baseline; the best design configuration and BH on a floor against native."""
    design, frontier = run["design"], run["tables"]["frontier"]
    calibrated = frontier[frontier["config"].isin(design["grid"] + design["floored"])] if len(frontier) else frontier
    versus = {words: versus_baseline(calibrated, key, identical) for key, words in _baselines(design).items()}
    facts = {"versus": versus if len(calibrated) else {}}
    native = run["quality"].get(design["baseline"], {})
    facts["native"] = native.get("perplexity") if native.get("status") == "ok" else None
    facts |= {"best_design": None, "floored": []}
    if facts["native"] is not None and len(calibrated):
        grid = calibrated[calibrated["config"].isin(design["grid"])]
        facts["best_design"] = grid.loc[grid["perplexity"].idxmin()].to_dict() if len(grid) else None
        floored = calibrated[calibrated["config"].isin(design["floored"])].sort_values("avg_experts")
        facts["floored"] = floored[["config", "avg_experts", "perplexity"]].to_dict("records")
    facts["token"] = run["token_analysis"]
    return facts


def calibration_facts(run: dict) -> dict | None:
    """The false discovery rate under the permuted null at the focus alpha per p-value method, and the bulk's shape."""
    rates, bulk, alpha = run["tables"]["null_rates"], run["tables"]["bulk"], run["design"]["focus_alpha"]
    if not len(rates):
        return None
    methods = []
    for method, rows in rates[rates["alpha"] == alpha].groupby("pvalue_method", sort=False):
        above = rows[rows["rejection_rate"] > alpha + 2 * rows["standard_error"]]
        below = rows[rows["rejection_rate"] < alpha - 2 * rows["standard_error"]]
        low, high = rows["rejection_rate"].min(), rows["rejection_rate"].max()
        counts = {"above": len(above), "below": len(below), "layers": len(rows)}
        methods.append({"method": method, "low": low, "high": high} | counts)
    shape = {"skew": (bulk["skew"].min(), bulk["skew"].max()), "gaussian_skew": bulk["gaussian_skew"].iloc[0]}
    shape |= {"kurtosis": (bulk["excess_kurtosis"].min(), bulk["excess_kurtosis"].max())}
    shape |= {"gaussian_kurtosis": bulk["gaussian_excess_kurtosis"].iloc[0]}
    return {"alpha": alpha, "methods": methods, "shape": shape}


def layer_facts(table: pd.DataFrame, identical: dict) -> dict | None:
    """Configurations with uneven layers (distinct) against top-k with the same average in every layer."""
    table = _distinct(table, identical)
    if not len(table):
        return None
    shift = (table["delta_vs_layer_matched_percent"] - table["delta_vs_topk_percent"]).median()
    below, above = table["delta_vs_layer_matched_high"] < 0, table["delta_vs_layer_matched_low"] > 0
    return {"count": len(table), "below": int(below.sum()), "above": int(above.sum()), "shift": shift}


def oracle_facts(oracle: pd.DataFrame) -> dict | None:
    """The router order's Spearman correlation with the drop's loss and its interval, and the median per method."""
    if not len(oracle):
        return None
    by_series = oracle.iloc[1:].groupby("series")["spearman_kept_vs_loss"].median().sort_values()
    reference = oracle.iloc[0]
    interval = (reference["spearman_low"], reference["spearman_high"])
    widths = (oracle["spearman_high"] - oracle["spearman_low"]).dropna()
    return {"reference": reference["spearman_kept_vs_loss"], "interval": interval, "by_series": list(by_series.items()),
            "width": (widths.min(), widths.max()) if len(widths) else None}  # fmt: skip


def method_facts(run: dict, identical: dict) -> dict:
    """The other methods' findings: calibration, per layer, oracle, disagreement."""
    return {
        "calibration": calibration_facts(run),
        "layers": layer_facts(run["tables"]["layer_table"], identical),
        "oracle": oracle_facts(run["tables"]["oracle"]),
        "disagreement": run["disagreement"],
    }


# ----------------------------------------------------------------------------------------------------
# 4. The report's tables, and rendering
# ----------------------------------------------------------------------------------------------------

TABLE_COLUMNS = """config alpha max_k avg_experts std_experts min_experts max_experts median_experts ceiling_hit_rate
    floor_hit_rate reduction_vs_baseline tokens_per_second avg_experts_prompt_tokens avg_experts_generated_tokens
    repeat_previous_share weight_entropy expert_utilization""".split()
LAYER_LABELS = {"delta_vs_layer_matched": "vs top-k at equal per-layer budget", "delta_vs_strongest": "vs strongest"}


def _labels(design: dict, suffix: str = "") -> dict:
    """{delta column prefix: its column's title} for the strongest baseline, then every baseline curve."""
    words = _baselines(design)
    keys = [bx.STRONGEST, *design["baselines"]]
    return {f"delta_vs_{key}": f"vs {words[key].removeprefix('the ')}{suffix}" for key in keys}


def intervals(table: pd.DataFrame, labels: dict) -> pd.DataFrame:
    """`table` with a column per label holding the difference and its interval (`with_interval`) of its prefix,
    and without the columns of any compared baseline (`delta_vs_*`, `*_at_equal_experts`)."""
    shown = table.copy()
    for prefix, label in labels.items():
        shown[label] = [with_interval(row, prefix) for _, row in table.iterrows()] if len(table) else []
    hidden = [c for c in shown.columns if c.startswith("delta_vs_") or c.endswith("_at_equal_experts")]
    return shown.drop(columns=hidden)


def calibration_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Rejection rate (standard error) per alpha and layer, one column per p-value method."""
    pairs = zip(rates["rejection_rate"], rates["standard_error"], strict=True)
    shown = rates.assign(shown=[f"{rate:.4f} ({error:.4f})" for rate, error in pairs])
    return shown.pivot(index=["alpha", "layer"], columns="pvalue_method", values="shown").reset_index()


def quality_tables(run: dict) -> dict:
    """The quality section's tables in markdown."""
    tables, quality, labels = run["tables"], run["quality"], _labels(run["design"])
    evaluated = pd.DataFrame([{"config": n, "method": r["method"], "avg_experts": r["avg_experts"],
                               "perplexity": r["perplexity"], "token_accuracy": r["token_accuracy"]}
                              for n, r in quality.items() if r["status"] == "ok"])  # fmt: skip
    columns = ["config", "series", "avg_experts", "perplexity", *labels.values()]
    shown = {
        "frontier": markdown(intervals(tables["frontier"], labels)[columns], ".3f") if len(tables["frontier"]) else ""
    }
    for key in ("best", "best_2"):
        table, best_labels = tables[key], _labels(run["design"], " at equal experts")
        columns = ["budget", "rank", "series", "config", "avg_experts", "perplexity", *best_labels.values()]
        shown[key] = markdown(intervals(table[table["rank"] <= 3], best_labels)[columns], ".3f") if len(table) else ""
    for key in ("layer_table", "layer_table_2"):
        table = tables[key]
        shown[key] = markdown(intervals(table, LAYER_LABELS).drop(columns=["per_token"], errors="ignore"), ".3f")
    oracle = tables["oracle"]
    return shown | {
        "evaluated": markdown(evaluated.sort_values("avg_experts"), ".3f") if len(evaluated) else "",
        "calibration": markdown(calibration_table(tables["null_rates"]), "g") if len(tables["null_rates"]) else "",
        "bulk": markdown(tables["bulk"], ".3f"),
        "oracle": markdown(oracle, ".3f") if len(oracle) else "Not run (oracle_positions = 0).",
    }


def sweep_tables(run: dict) -> dict:
    """The sweep's tables in markdown: every configuration, the groups of the focus configurations, saturation."""
    design, ok_rows = run["design"], _ok_rows(run)
    columns = TABLE_COLUMNS + (["perplexity", "token_accuracy"] if run["quality"] else [])
    groups, focus_names = run["groups"], [design["baseline"], *design["focus"].values()]
    saturation = run["saturation"]
    saturation = saturation.assign(growth_percent_by_step=saturation["growth_percent_by_step"].astype(str))
    return {
        "configurations": markdown(ok_rows[[c for c in columns if c in ok_rows.columns]]),
        "groups": markdown(groups[groups["config"].isin(focus_names)] if len(groups) else groups, missing="one prompt"),
        "saturation": markdown(saturation, missing="not reached"),
    }


def samples(run: dict) -> list[dict]:
    """The first prompt of each group with its text under the native routing and BH at the focus alpha with
    max_k = the native k and the smallest max_k."""
    design, results = run["design"], run["results"]
    names = [n for n in dict.fromkeys(design["sample_configs"]) if results.get(n, {}).get("status") == "ok"]
    prompts = [(group, prompt) for group, texts in run["metadata"]["prompts"].items() for prompt in texts]
    shown = []
    for index, (group, prompt) in enumerate(prompts):
        if names and index == [g for g, _ in prompts].index(group):  # the first prompt of each group
            texts = [results[n]["prompts"][index]["generated_text"].replace("\n", " ").strip() for n in names]
            shown.append({"prompt": prompt, "texts": list(zip(names, texts, strict=True))})
    return shown


def failures(run: dict) -> list[tuple[str, str]]:
    """(what, error) of every configuration, quality evaluation and downstream task that failed."""
    errors = [(name, r["error"]) for name, r in run["results"].items() if r["status"] != "ok"]
    errors += [(f"{name} (quality)", r["error"]) for name, r in run["quality"].items() if r["status"] != "ok"]
    downstream = run["downstream"]
    errors += [(f"{name} on {task} (downstream)", e["error"]) for name, r in downstream["results"].items()
               for task, e in r["tasks"].items() if e["status"] != "ok"]  # fmt: skip
    errors += [("layer allocations", run["allocation_error"])] if run.get("allocation_error") else []
    return errors + ([("downstream tasks", downstream["error"])] if downstream["error"] else [])


def render_report(run: dict, template_path: str | Path = TEMPLATE_PATH) -> str:
    """The report of `run` (see the module's docstring), rendered through the template."""
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters |= {
        "interval": with_interval,
        "repr": repr,
        "isnan": lambda value: value is None or math.isnan(value),
    }
    template = environment.from_string(Path(template_path).read_text())
    sweep_identical = identical_routings(run["results"], sweep_outcome)
    quality_identical = identical_routings(run["quality"], quality_outcome)
    identical_2 = identical_routings(run["quality_2"], quality_outcome)
    ok, measured = len(_ok_rows(run)), any(r["status"] == "ok" for r in run["quality"].values())
    return template.render(
        run=run,
        m=run["metadata"],
        d=run["design"],
        counts={
            "configs": len(run["results"]),
            "ok": ok,
            "failed": len(run["results"]) - ok,
            "distinct": ok - len(sweep_identical),
        },  # fmt: skip
        routing=routing_facts(run),
        groups=group_facts(run),
        design_pvalue=design_pvalue_facts(run),
        sweep=run_facts(run, sweep_identical),
        answers=answer_facts(run, quality_identical, identical_2) if measured else [],
        repetition=repetition_facts(run),
        quality=quality_facts(run, quality_identical) if run["quality"] else None,
        methods=method_facts(run, quality_identical) if run["quality"] else None,
        tables=sweep_tables(run) | (quality_tables(run) if run["quality"] else {}),
        samples=samples(run),
        failures=failures(run),
    )
