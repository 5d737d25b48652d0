"""The report of a run: its findings computed as data from the run's tables, rendered as markdown through
the Jinja2 template `bh_report.md.j2`, tables by pandas (`DataFrame.to_markdown`).

    report = bh_report.render_report(run)  # run: the notebook's `report_inputs` (section 12)

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

__all__ = [
    "render_report",
    "identical_routings",
    "sweep_outcome",
    "quality_outcome",
    "groups_table",
    "TEMPLATE_PATH",
]

TEMPLATE_PATH = Path(__file__).resolve().parent / "bh_report.md.j2"
BASELINE_SERIES = ("top-k", "top-p")  # the equal-compute references of the frontier tables


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


def groups_table(results: dict, groups: list[str]) -> pd.DataFrame:
    """Average experts per prompt group (columns), one row per ok configuration."""
    rows = [
        {"config": name, **{group: s["avg_experts"] for group, s in result["groups"].items()}}
        for name, result in results.items()
        if result["status"] == "ok"
    ]
    return pd.DataFrame(rows, columns=["config", *groups])


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
    """How many distinct routed configurations' tokens/s ranges overlap the native routing's."""
    design, ok_rows = run["design"], _ok_rows(run)
    native = run["results"].get(design["baseline"], {})
    routed = ok_rows[(ok_rows["config"] != design["baseline"]) & ~ok_rows["config"].isin(identical)]
    facts = {"repeats": design["timing_repeats"], "native": None}
    if native.get("status") != "ok" or not len(routed):
        return facts
    summary = native["summary"]
    inside = (routed["tokens_per_second_min"] <= summary["tokens_per_second_max"]) & (
        routed["tokens_per_second_max"] >= summary["tokens_per_second_min"]
    )
    return facts | {"native": summary, "routed": len(routed), "overlapping": int(inside.sum())}


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


def versus_baseline(rows: pd.DataFrame, baseline: str, identical: dict) -> dict:
    """The distinct configurations of `rows` against one baseline at equal experts: how many are better, how
    many with the whole interval below or above 0, the median, the best and the worst."""
    inside = rows.dropna(subset=[f"delta_vs_{baseline}_percent"])
    inside = inside[~inside["config"].isin(identical)]  # identical routings counted once
    if not len(inside):
        return {"distinct": 0}
    deltas = inside[f"delta_vs_{baseline}_percent"]
    best, worst = inside.loc[deltas.idxmin()], inside.loc[deltas.idxmax()]
    prefix = f"delta_vs_{baseline}"
    return {
        "distinct": len(inside),
        "better": int((deltas < 0).sum()),
        "below": int((inside[f"{prefix}_high"] < 0).sum()),
        "above": int((inside[f"{prefix}_low"] > 0).sum()),
        "median": deltas.median(),
        "best": {
            **best[["config", "avg_experts", "perplexity"]].to_dict(),
            "interval": with_interval(best, prefix),
            "at_equal": best[f"{baseline}_perplexity_at_equal_experts"],
        },  # fmt: skip
        "worst": {"config": worst["config"], "interval": with_interval(worst, prefix)},
    }


def quality_facts(run: dict, identical: dict) -> dict:
    """Calibrated BH against each baseline; the best design configuration and BH on a floor against native."""
    design, frontier = run["design"], run["tables"]["frontier"]
    calibrated = frontier[frontier["config"].isin(design["grid"] + design["floored"])] if len(frontier) else frontier
    baselines = {name: series for name, series in design["baselines"].items()}
    facts = {"versus": {series: versus_baseline(calibrated, name, identical) for name, series in baselines.items()}}
    facts["versus"] = facts["versus"] if len(calibrated) else {}
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
        methods.append(
            {"method": method, "low": low, "high": high, "above": len(above), "below": len(below), "layers": len(rows)}
        )
    shape = {"skew": (bulk["skew"].min(), bulk["skew"].max()), "gaussian_skew": bulk["gaussian_skew"].iloc[0]}
    shape |= {"kurtosis": (bulk["excess_kurtosis"].min(), bulk["excess_kurtosis"].max())}
    return {
        "alpha": alpha,
        "methods": methods,
        "shape": shape | {"gaussian_kurtosis": bulk["gaussian_excess_kurtosis"].iloc[0]},
    }


def budget_facts(table: pd.DataFrame) -> dict | None:
    """The best method within each budget, and the methods that beat both baselines with both intervals below 0."""
    if not len(table):
        return None
    best = [rows.iloc[0] for _, rows in table.groupby("budget")]
    methods = table[~table["series"].isin(BASELINE_SERIES)]
    beat = methods[(methods["delta_vs_topk_high"] < 0) & (methods["delta_vs_topp_high"] < 0)]
    return {"best": best, "beat": [(r.config, r.budget) for r in beat.itertuples()]}


def layer_facts(table: pd.DataFrame) -> dict | None:
    """Configurations with uneven layers against top-k with the same average in every layer."""
    if not len(table):
        return None
    shift = (table["delta_vs_layer_matched_percent"] - table["delta_vs_topk_percent"]).median()
    below, above = table["delta_vs_layer_matched_high"] < 0, table["delta_vs_layer_matched_low"] > 0
    return {"count": len(table), "below": int(below.sum()), "above": int(above.sum()), "shift": shift}


def oracle_facts(oracle: pd.DataFrame) -> dict | None:
    """The router order's Spearman correlation with the drop's loss, and the median per method."""
    if not len(oracle):
        return None
    by_series = oracle.iloc[1:].groupby("series")["spearman_kept_vs_loss"].median().sort_values()
    return {"reference": oracle.iloc[0]["spearman_kept_vs_loss"], "by_series": list(by_series.items())}


def method_facts(run: dict) -> dict:
    """The other methods' findings: calibration, best per budget on both slices, per layer, oracle, disagreement."""
    tables, design = run["tables"], run["design"]
    slices = [(f"evaluation slice, {design['eval_text']}", tables["best"])]
    slices += [(f"second slice, {design['eval_text_2']}", tables["best_2"])] if run["quality_2"] else []
    return {
        "calibration": calibration_facts(run),
        "budgets": [(label, budget_facts(table)) for label, table in slices if budget_facts(table)],
        "layers": layer_facts(tables["layer_table"]),
        "oracle": oracle_facts(tables["oracle"]),
        "disagreement": run["disagreement"],
    }


# ----------------------------------------------------------------------------------------------------
# 4. The report's tables, and rendering
# ----------------------------------------------------------------------------------------------------

TABLE_COLUMNS = """config alpha max_k avg_experts std_experts min_experts max_experts median_experts ceiling_hit_rate
    floor_hit_rate reduction_vs_baseline tokens_per_second weight_entropy expert_utilization""".split()
FRONTIER_LABELS = {"delta_vs_topk": "vs top-k", "delta_vs_topp": "vs top-p"}
BEST_LABELS = {"delta_vs_topk": "vs top-k at equal experts", "delta_vs_topp": "vs top-p at equal experts"}
LAYER_LABELS = {"delta_vs_topk": "vs top-k", "delta_vs_layer_matched": "vs top-k at equal per-layer budget"}


def intervals(table: pd.DataFrame, labels: dict) -> pd.DataFrame:
    """`table` with a column per label holding the difference and its interval (`with_interval`) of its prefix,
    and without the prefix's own columns."""
    shown = table.copy()
    for prefix, label in labels.items():
        shown[label] = [with_interval(row, prefix) for _, row in table.iterrows()]
    return shown.drop(columns=[c for c in shown.columns if c.startswith(tuple(labels))])


def calibration_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Rejection rate (standard error) per alpha and layer, one column per p-value method."""
    shown = rates.assign(
        shown=[f"{r:.4f} ({e:.4f})" for r, e in zip(rates["rejection_rate"], rates["standard_error"], strict=True)]
    )
    return shown.pivot(index=["alpha", "layer"], columns="pvalue_method", values="shown").reset_index()


def quality_tables(run: dict) -> dict:
    """The quality section's tables in markdown."""
    tables, quality = run["tables"], run["quality"]
    evaluated = pd.DataFrame([{"config": n, "method": r["method"], "avg_experts": r["avg_experts"],
                               "perplexity": r["perplexity"], "token_accuracy": r["token_accuracy"]}
                              for n, r in quality.items() if r["status"] == "ok"])  # fmt: skip
    frontier = tables["frontier"]
    shown = intervals(frontier, FRONTIER_LABELS)[
        ["config", "series", "avg_experts", "perplexity", *FRONTIER_LABELS.values()]
    ]
    best = {}
    for key, table in (("best", tables["best"]), ("best_2", tables["best_2"])):
        columns = ["budget", "rank", "series", "config", "avg_experts", "perplexity", *BEST_LABELS.values()]
        best[key] = markdown(intervals(table[table["rank"] <= 3], BEST_LABELS)[columns], ".3f") if len(table) else ""
    return {
        "evaluated": markdown(evaluated.sort_values("avg_experts"), ".3f") if len(evaluated) else "",
        "frontier": markdown(shown, ".3f"),
        "calibration": markdown(calibration_table(tables["null_rates"]), "g") if len(tables["null_rates"]) else "",
        "bulk": markdown(tables["bulk"], ".3f"),
        "oracle": markdown(tables["oracle"], ".3f") if len(tables["oracle"]) else "Not run (oracle_positions = 0).",
        "layers": markdown(intervals(tables["layer_table"], LAYER_LABELS), ".3f")
        if len(tables["layer_table"])
        else "None.",
        **best,
    }


def sweep_tables(run: dict) -> dict:
    """The sweep's tables in markdown: every configuration, the groups of the focus configurations, saturation."""
    design, ok_rows = run["design"], _ok_rows(run)
    columns = TABLE_COLUMNS + (["perplexity", "token_accuracy"] if run["quality"] else [])
    groups = groups_table(run["results"], design["groups"])
    focus_names = [design["baseline"], *design["focus"].values()]
    saturation = run["saturation"].assign(
        growth_percent_by_step=run["saturation"]["growth_percent_by_step"].astype(str)
    )
    return {
        "configurations": markdown(ok_rows[columns]),
        "groups": markdown(groups[groups["config"].isin(focus_names)]),
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
    ok = len(_ok_rows(run))
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
        quality=quality_facts(run, quality_identical) if run["quality"] else None,
        methods=method_facts(run) if run["quality"] else None,
        tables=sweep_tables(run) | (quality_tables(run) if run["quality"] else {}),
        samples=samples(run),
        failures=failures(run),
    )
