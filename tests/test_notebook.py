"""The notebook is the experiment: executed headless (papermill) on the embedded model with reduced
parameters, its outputs checked, including resume after an interrupted run."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import ErrorbarContainer

import bh_experiment as bx
import bh_routing as br

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "OLMoE_BH_Routing_Experiments.ipynb"
SUMMARY_COLUMNS = """config method pvalue_method alpha max_k min_k status quality_status error avg_experts std_experts
    min_experts max_experts median_experts ceiling_hit_rate floor_hit_rate reduction_vs_baseline inference_time
    tokens_per_second tokens_per_second_min tokens_per_second_max timing_repeats avg_time_per_prompt warm_up_seconds
    avg_experts_prompt_tokens avg_experts_generated_tokens repeated_ngram_share repeat_previous_share
    longest_repeat_run weight_entropy expert_utilization perplexity token_accuracy eval_avg_experts""".split()
QUICK = {
    "max_new_tokens": 3,
    "eval_max_tokens": 600,
    "eval_window": 128,
    "device": "cpu",
    "calibration_tokens": 1024,
    "allocation_tokens": 512,
    "eval_max_tokens_2": 300,
    "oracle_positions": 8,
    "bootstrap_resamples": 100,
}
QUALITY_TABLES = """bh_routing_frontier bh_routing_frontier_second_slice bh_routing_best_by_budget
    bh_routing_best_by_budget_second_slice bh_routing_calibration bh_routing_bulk_shape bh_routing_oracle
    bh_routing_layer_matched bh_routing_layer_matched_second_slice""".split()


def execute(tmp_path, **parameters):
    import papermill

    return papermill.execute_notebook(
        str(NOTEBOOK),
        str(tmp_path / "executed.ipynb"),
        cwd=str(REPO),
        kernel_name="python3",
        progress_bar=False,
        parameters={"output_dir": str(tmp_path), **parameters},
    )


def test_notebook_has_a_parameters_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    tagged = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    source = "".join(tagged[0]["source"])
    for name in (
        "model_name_or_path",
        "device",
        "dtype",
        "config_names",
        "prompts_per_group",
        "max_new_tokens",
        "output_dir",
        "seed",
    ):
        assert f"{name} =" in source


def test_every_code_cell_has_a_markdown_line_before_it():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    for previous, cell in zip(cells, cells[1:], strict=False):
        if cell["cell_type"] == "code" and "parameters" not in cell["metadata"].get("tags", []):
            assert previous["cell_type"] == "markdown", "".join(cell["source"])[:200]


QUICK_CONFIGS = ["topk_8_baseline", "bh_k4_a020", "bh_k8_a005", "bh1mp_k8_a005"]  # in the design's order
QUICK_DOWNSTREAM = {"run_downstream": True, "downstream_tasks": "heldout_continuation", "downstream_limit": 8}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One headless run of the notebook (papermill) with one prompt per group, every quality table and the
    offline downstream section: the tests that only read a run's outputs share it."""
    pytest.importorskip("lm_eval", reason="make test installs requirements-eval.txt")
    output = tmp_path_factory.mktemp("quick_run")
    execute(output, config_names=",".join(QUICK_CONFIGS), prompts_per_group=1, **QUICK_DOWNSTREAM, **QUICK)
    return output


def markdown_tables(text: str) -> list[pd.DataFrame]:
    """Every pipe table of a markdown text, its cells as stripped strings."""
    tables, lines = [], text.splitlines() + [""]
    block = []
    for line in lines:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if len(block) > 2:
            tables.append(pd.DataFrame(block[2:], columns=block[0]))
        block = []
    return tables


def table_with(report: str, *columns: str) -> pd.DataFrame:
    """The first table of the report that has these columns."""
    return next(table for table in markdown_tables(report) if set(columns) <= set(table.columns))


def test_the_notebook_writes_every_output(quick_run):
    table = pd.read_csv(quick_run / "bh_routing_summary.csv")
    assert list(table.columns) == SUMMARY_COLUMNS and list(table["config"]) == QUICK_CONFIGS
    assert (table["status"] == "ok").all()
    full = json.loads((quick_run / "bh_routing_full_results.json").read_text())
    assert full["metadata"]["model"] == "embedded" and full["metadata"]["model_source"] == "embedded"
    first_prompt = full["configs"]["bh_k8_a005"]["prompts"][0]
    assert {"group", "prompt", "generated_text", "token_counts", "time_s", "avg_experts"} <= set(first_prompt)
    groups = [p["group"] for p in full["configs"]["bh_k8_a005"]["prompts"]]
    assert groups == ["simple", "medium", "complex", "technical"]
    figures = "analysis frontier frontier_intervals layers calibration".split()
    for figure in figures:
        assert (quick_run / "visualizations" / f"bh_routing_{figure}.png").stat().st_size > 10_000
    assert all((quick_run / f"{name}.csv").stat().st_size > 100 for name in QUALITY_TABLES)
    assert br.RoutingCalibration.load(quick_run / "routing_calibration.pt").num_layers == 4
    for store in ("configs", "quality"):  # what the resume key holds
        settings = json.loads(next((quick_run / store).glob("*.json")).read_text())["settings"]
        assert {"model", "dtype", "device", "hardware", "measuring_code", "code"} <= set(settings)
        assert settings["dtype"] == "float32" and settings["device"] == "cpu"
    assert (table["warm_up_seconds"] > 0).all()  # each configuration's warm-up, timed apart
    assert table["perplexity"].notna().all() and (table["perplexity"] < 8192).all()


def test_the_executed_notebook_ends_with_its_answer_and_shows_no_warning(quick_run):
    cells = json.loads((quick_run / "executed.ipynb").read_text())["cells"]
    last = "".join("".join(output.get("data", {}).get("text/markdown", "")) for output in cells[-1]["outputs"])
    assert "**The answer** (embedded, " in last and "Evaluation slice" in last
    streams = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"] if o.get("name") == "stderr"]
    assert not [o for o in streams if "Warning" in "".join(o["text"])]


def test_the_frontier_compares_every_method_with_both_baselines_on_both_slices(quick_run):
    frontier = pd.read_csv(quick_run / "bh_routing_frontier.csv")
    floored = [f"bh_k8_a020_min{k}" for k in (2, 3, 4, 6)]
    assert list(frontier["config"][:7]) == ["bh_k4_a020", "bh_k8_a005", "bh1mp_k8_a005"] + floored
    # every family of training-free rules, the allocations and the per-token rules at the schedule's layer budgets
    # (top-p here: with one p per layer, a rule rather than the top-p curve)
    assert {"bh", "hc", "skip", "entropy", "topp", "allocl", "lexi", "alloct"} == set(frontier["method"])
    matched = {f"{rule}_schedule_b2.00" for rule in ("bh", "topp", "skip", "entropy")} | {"alloct_schedule_b2.00"}
    assert matched <= set(frontier["config"]) and not frontier["delta_vs_strongest_percent"].isna().all()
    assert {"BH (empirical)", "BH (pooled)", "HC (pooled)", "dynamic skip (median beta)"} <= set(frontier["series"])
    inside = frontier.dropna(subset=["delta_vs_topk_percent"])
    assert (inside["delta_vs_topk_low"] <= inside["delta_vs_topk_percent"] + 1e-9).all()
    assert (inside["delta_vs_topk_percent"] <= inside["delta_vs_topk_high"] + 1e-9).all()
    second = pd.read_csv(quick_run / "bh_routing_frontier_second_slice.csv")  # without the design's redundant ones
    assert set(second["config"]) == set(frontier["config"]) - {"bh1mp_k8_a005"}
    oracle = pd.read_csv(quick_run / "bh_routing_oracle.csv")
    assert oracle["config"][0] == "router order" and set(frontier["config"]) <= set(oracle["config"])
    for name in ("bh_routing_layer_matched", "bh_routing_layer_matched_second_slice"):  # rules, not allocations
        layer = pd.read_csv(quick_run / f"{name}.csv")
        assert len(layer) and layer["per_token"].all() and (layer["layer_max"] > 1.2 * layer["layer_min"]).all()


def test_the_reports_numbers_are_the_csvs(quick_run):
    report = (quick_run / "bh_routing_report.md").read_text()
    assert "`embedded`" in report and "Prompts: 4 in 4 complexity groups" in report
    assert f"Generation path: dynamic ({bx.GENERATION_PATHS['dynamic']})" in report  # the CPU's path
    runtime = json.loads((quick_run / "bh_routing_full_results.json").read_text())["metadata"]["runtime_minutes"]
    assert runtime["estimated_total"] == pytest.approx(runtime["estimated_sweep"] + runtime["estimated_evaluation"])
    assert min(runtime.values()) > 0
    assert f"Runtime: estimated {runtime['estimated_total']:.1f} min before the work" in report
    summary = pd.read_csv(quick_run / "bh_routing_summary.csv")
    shown = table_with(report, "config", "avg_experts", "std_experts").set_index("config")
    for row in summary.itertuples():
        assert shown.loc[row.config, "avg_experts"] == f"{row.avg_experts:.2f}"
        assert shown.loc[row.config, "std_experts"] == f"{row.std_experts:.2f}"
    best = pd.read_csv(quick_run / "bh_routing_best_by_budget.csv")
    shown = table_with(report, "budget", "rank", "vs top-k at equal experts")  # the evaluation slice's, first
    top = best[best["rank"] <= 3]
    assert len(shown) == len(top)
    for row, (_, line) in zip(top.itertuples(), shown.iterrows(), strict=True):
        assert (line.budget, line["rank"], line.series, line.config) == (
            str(row.budget),
            str(row.rank),
            row.series,
            row.config,
        )
        assert line.avg_experts == f"{row.avg_experts:.3f}"
        for baseline, words in (("topk", "top-k"), ("strongest", "strongest baseline")):
            percent, low = getattr(row, f"delta_vs_{baseline}_percent"), getattr(row, f"delta_vs_{baseline}_low")
            assert pd.isna(percent) or line[f"vs {words} at equal experts"].startswith(f"{percent:+.2f}% [{low:+.2f}, ")
    frontier = pd.read_csv(quick_run / "bh_routing_frontier.csv")
    shown = table_with(report, "config", "series", "vs top-k", "vs top-p").set_index("config")
    for row in frontier.dropna(subset=["delta_vs_topp_low"]).itertuples():
        interval = f"{row.delta_vs_topp_percent:+.2f}% [{row.delta_vs_topp_low:+.2f}, {row.delta_vs_topp_high:+.2f}]"
        assert (
            shown.loc[row.config, "perplexity"] == f"{row.perplexity:.3f}"
            and shown.loc[row.config, "vs top-p"] == interval
        )
    calibration = pd.read_csv(quick_run / "bh_routing_calibration.csv")
    for row in calibration.itertuples():
        assert f"{row.rejection_rate:.4f} ({row.standard_error:.4f})" in report


def holm_count(p_values, better) -> int:
    """How many of the better comparisons stay significant at 0.05 after Holm's step-down over the family."""
    p = np.asarray(p_values, dtype=float)
    order, passed = np.argsort(p), 0
    for rank, index in enumerate(order):
        if p[index] > 0.05 / (len(p) - rank):
            break
        passed += bool(better[index])
    return passed


def test_the_reports_answer_is_the_csvs(quick_run):
    """The answer the report leads with, recounted here from the frontier CSVs and the quality results."""
    report = (quick_run / "bh_routing_report.md").read_text()
    answer = report.split("## The answer")[1].split("## Run")[0]
    full = json.loads((quick_run / "bh_routing_full_results.json").read_text())
    for name, key in (("bh_routing_frontier.csv", "quality"), ("bh_routing_frontier_second_slice.csv", "quality_2")):
        frontier = pd.read_csv(quick_run / name)
        outcome = {n: (r["method"], r["mean_nll"], tuple(r["per_layer_avg_experts"])) for n, r in full[key].items()
                   if r["status"] == "ok"}  # fmt: skip
        first = {}
        distinct = [n for n, o in outcome.items() if first.setdefault(o, n) == n]
        rows = frontier[frontier["per_token"] & frontier["config"].isin(distinct)]
        rows = rows.dropna(subset=["delta_vs_strongest_percent"])
        below, above = (rows["delta_vs_strongest_high"] < 0).sum(), (rows["delta_vs_strongest_low"] > 0).sum()
        holm = holm_count(rows["delta_vs_strongest_p"], (rows["delta_vs_strongest_percent"] < 0).to_numpy())
        sentence = (f"Of {len(rows)} distinct per-token rules inside the baselines' range, {below} beat the strongest "
                    f"baseline")  # fmt: skip
        assert sentence in answer and f"and {above} lost with it above 0; {holm} of the better ones" in answer
        best = rows.loc[rows["delta_vs_strongest_percent"].idxmin()]
        shown = f"{best['delta_vs_strongest_percent']:+.2f}% [{best['delta_vs_strongest_low']:+.2f}, "
        assert f"best {best['config']} {shown}" in answer


def test_the_report_shows_each_groups_first_prompt_with_its_texts(quick_run):
    report = (quick_run / "bh_routing_report.md").read_text()
    full = json.loads((quick_run / "bh_routing_full_results.json").read_text())
    samples = report.split("## Sample generations")[1]
    for prompt in full["configs"]["bh_k8_a005"]["prompts"]:  # every group's first prompt, with its texts
        assert f"**{prompt['prompt']}**" in samples and prompt["generated_text"].strip() in samples


def test_the_downstream_section_runs_offline_tasks_and_reports_them(quick_run):
    table = pd.read_csv(quick_run / "downstream" / "downstream.csv")
    assert (table["status"] == "ok").all() and set(table["task"]) == {"heldout_continuation"}
    assert list(table["method"][:2]) == ["native", "bh"] and set(table["method"][2:]) == {"topk", "topp"}
    report = (quick_run / "bh_routing_report.md").read_text()
    section = report.split("## Downstream accuracy (lm-evaluation-harness)")[1]
    assert (quick_run / "downstream" / "downstream.md").read_text().split("\n", 2)[2].strip() in section
    assert "![Downstream accuracy](downstream/downstream.png)" in section
    assert (quick_run / "downstream" / "downstream.png").exists()


def saved_configs(output_dir):
    return {path.stem: path.read_text() for path in (output_dir / "configs").glob("*.json")}


def test_an_interrupted_run_resumes_without_redoing_finished_configurations(tmp_path):
    configs = "topk_8_baseline,bh_k2_a001,bh_k8_a010,bh_k32_a001,bh1mp_k8_a005"
    arguments = [
        "-p",
        "config_names",
        configs,
        "-p",
        "output_dir",
        str(tmp_path),
        "-p",
        "run_quality",
        "False",
        "-p",
        "max_new_tokens",
        "4",
        "-p",
        "prompts_per_group",
        "1",
        "-p",
        "device",
        "cpu",
    ]
    command = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(tmp_path / "first.ipynb"), "-k", "python3"]
    process = subprocess.Popen(
        command + arguments, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not ((tmp_path / "configs").exists() and saved_configs(tmp_path)):
        assert process.poll() is None and time.time() < deadline, "the run ended before saving a configuration"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the kernel too: nothing may finish after this
    process.wait()
    finished = saved_configs(tmp_path)
    assert 1 <= len(finished) < 5 and not list(tmp_path.rglob("*.tmp*"))
    assert not (tmp_path / "bh_routing_summary.csv").exists()
    execute(tmp_path, config_names=configs, run_quality=False, max_new_tokens=4, prompts_per_group=1, device="cpu")
    resumed = saved_configs(tmp_path)
    assert len(resumed) == 5 and all(resumed[name] == text for name, text in finished.items())  # read back, not rerun
    table = pd.read_csv(tmp_path / "bh_routing_summary.csv")
    assert list(table["config"]) == configs.split(",") and (table["status"] == "ok").all()


def test_unknown_configuration_names_list_the_designs_configurations(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as error:
        execute(tmp_path, config_names=["bh_k8_a005", "bh_k128_a005"], device="cpu")
    message = error.value.evalue  # the ValueError's own message
    allowed = ast.literal_eval(message.split("allowed: ")[1])
    assert "unknown names ['bh_k128_a005']" in message and len(allowed) == 25 + 4
    assert allowed[0] == "topk_8_baseline" and {"bh_k2_a001", "bh_k64_a020", "bh1mp_k8_a020"} <= set(allowed)


def test_a_run_of_the_baseline_alone_through_make_runs_script_writes_every_output(tmp_path):
    parameters = {"output_dir": tmp_path, "config_names": "topk_8_baseline", "prompts_per_group": 1,
                  "run_quality": False, "max_new_tokens": 3, "device": "cpu"}  # fmt: skip
    arguments = [item for name, value in parameters.items() for item in ("-p", name, str(value))]
    command = [sys.executable, "scripts/run_notebook.py", *arguments]
    finished = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    assert "configuration 1/1: topk_8_baseline (" in finished.stdout  # the log shows the sweep's progress
    report = (tmp_path / "bh_routing_report.md").read_text()
    assert list(table_with(report, "config", "avg_experts")["config"]) == ["topk_8_baseline"]
    assert "Not measured in this run" in report
    assert (tmp_path / "visualizations" / "bh_routing_analysis.png").exists()
    text = (tmp_path / "OLMoE_BH_Routing_Experiments.executed.ipynb").read_text()
    executed = json.loads(text)
    assert executed["metadata"]["papermill"]["exception"] is None
    assert executed["metadata"]["papermill"]["input_path"] == "OLMoE_BH_Routing_Experiments.ipynb"
    assert str(REPO) not in text and "site-packages" not in text and "Warning" not in text  # no machine paths
    assert not list(tmp_path.glob("*.running.ipynb")) and not list(tmp_path.glob("*.failed.ipynb"))


def test_a_failed_run_leaves_the_executed_notebook_as_it_was(tmp_path):
    executed = tmp_path / "OLMoE_BH_Routing_Experiments.executed.ipynb"
    executed.write_text("the previous good run")
    arguments = ["-p", "output_dir", str(tmp_path), "-p", "prompts_per_group", "0"]
    finished = subprocess.run([sys.executable, "scripts/run_notebook.py", *arguments], cwd=REPO, capture_output=True)
    assert finished.returncode == 1 and b"the run failed" in finished.stderr
    assert executed.read_text() == "the previous good run"
    assert (tmp_path / "OLMoE_BH_Routing_Experiments.failed.ipynb").exists()


def test_own_configurations_run_beside_the_design_reusing_another_runs_results(tmp_path, monkeypatch):
    base = {"config_names": "topk_8_baseline", "prompts_per_group": 1, "run_quality": False, "max_new_tokens": 3,
            "device": "cpu", "timing_repeats": 1}  # fmt: skip
    run_in_process(tmp_path / "default", monkeypatch, **base)
    own = run_in_process(tmp_path / "own", monkeypatch, **base, extra_configs=["topk:k=2", "bh:alpha=0.1,max_k=4"],
                         reuse_results=str(tmp_path / "default"))  # fmt: skip
    assert [c.name for c in own["configs"]] == ["topk_8_baseline", "topk_k2", "bh_k4_a010"]
    saved = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "own" / "configs").glob("*.json")}
    assert saved["topk_8_baseline"]["reused_from"] == str(tmp_path / "default" / "configs")
    assert "reused_from" not in saved["topk_k2"] and saved["bh_k4_a010"]["status"] == "ok"
    report = (tmp_path / "own" / "bh_routing_report.md").read_text()
    first = saved["topk_8_baseline"]["saved_at"]  # the reused result's own time, from the default run
    assert first < saved["topk_k2"]["saved_at"] or first == saved["topk_k2"]["saved_at"]
    assert f"- Measured: {first} to {max(r['saved_at'] for r in saved.values())} (UTC" in report
    assert list(table_with(report, "config", "avg_experts")["config"]) == ["topk_8_baseline", "topk_k2", "bh_k4_a010"]
    with pytest.raises(Exception, match="alpha must be a number in"):
        run_in_process(tmp_path / "bad", monkeypatch, **base, extra_configs=["bh:alpha=2"])


def test_the_quick_profile_runs_the_design_against_the_baselines_only(tmp_path, monkeypatch):
    run = run_in_process(tmp_path, monkeypatch, config_names=",".join(QUICK_CONFIGS), prompts_per_group=1,
                         profile="quick", **QUICK)  # fmt: skip
    methods = {result["method"] for result in run["quality"].values()}
    assert methods == {"native", "bh", "topk", "topp", "schedule"}, methods
    assert run["quality_2"] == {} and run["eval_text_2"] is None and run["oracle_positions"] == 0
    assert (run["timing_repeats"], run["allocation_tokens"]) == (2, QUICK["allocation_tokens"])  # None: the profile's
    assert len(run["quality"]) < 40 and "- Profile: quick (" in (tmp_path / "bh_routing_report.md").read_text()


def figure_facts(figure, dpi) -> dict:
    """Pixels, the most tick labels on one axis, and {label: colour} of the lines and error bars drawn."""
    colours, labels = {}, 0
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = max(labels, sum(bool(tick.get_text()) for tick in axis.get_ticklabels()))
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                colours.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
        for container in ax.containers:
            if isinstance(container, ErrorbarContainer) and not container.get_label().startswith("_"):
                colour = matplotlib.colors.to_hex(container.lines[0].get_color())
                colours.setdefault(container.get_label(), set()).add(colour)
    return {"pixels": [int(v * dpi) for v in figure.get_size_inches()], "labels": labels, "colours": colours}


def test_every_figure_is_readable_at_its_size_and_colours_a_series_alike_everywhere(tmp_path, monkeypatch, quick_run):
    saved, save = {}, bx.save_figure

    def recording(figure, path, dpi=110):
        saved[Path(path).name] = figure_facts(figure, dpi)
        return save(figure, path, dpi)

    monkeypatch.setattr(bx, "save_figure", recording)
    run_in_process(tmp_path, monkeypatch, config_names=",".join(QUICK_CONFIGS), prompts_per_group=1,
                   reuse_results=str(quick_run), **QUICK)  # its results reused, the figures drawn anew  # fmt: skip
    assert {"bh_routing_analysis.png", "bh_routing_frontier.png", "bh_routing_layers.png"} <= set(saved)
    for name, facts in saved.items():
        assert max(facts["pixels"]) <= 4000 and facts["labels"] <= 16, (name, facts["pixels"], facts["labels"])
        assert (tmp_path / "visualizations" / name).stat().st_size < 2_000_000, name
    colours = {}
    for name in ("bh_routing_frontier.png", "bh_routing_frontier_intervals.png"):
        for label, used in saved[name]["colours"].items():
            colours.setdefault(label, set()).update(used)
    assert len(colours) >= 5 and all(len(used) == 1 for used in colours.values()), colours


def run_in_process(tmp_path, monkeypatch, **parameters):
    """The notebook's cells in this process (so that a test can replace a function of bh_routing)."""
    monkeypatch.chdir(REPO)
    sys.path.insert(0, str(REPO / "scripts"))
    from run_notebook_cells import run_cells

    return run_cells({"output_dir": str(tmp_path), **parameters}, log=lambda line: None)


@pytest.mark.parametrize("failing", ["bh", "every"])
def test_failed_quality_configurations_still_give_every_output(tmp_path, monkeypatch, failing):
    evaluate = bx.evaluate_language_model

    def out_of_memory_for_some(model, token_ids, window, stride, batch_size, patcher=None):
        if failing == "every" or getattr(patcher, "method", None) == failing:  # "every": the allocations' fit too
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return evaluate(model, token_ids, window, stride, batch_size, patcher)

    monkeypatch.setattr(bx, "evaluate_language_model", out_of_memory_for_some)
    configs = ["topk_8_baseline", "bh_k8_a005", "bh_k16_a005"]  # the quick profile: fewer quality configurations
    run_in_process(tmp_path, monkeypatch, config_names=configs, prompts_per_group=1, profile="quick", **QUICK)
    table = pd.read_csv(tmp_path / "bh_routing_summary.csv")
    failed = table["method"] == "bh" if failing == "bh" else table["method"].notna()
    assert (table["status"] == "ok").all() and (table.loc[failed, "quality_status"] == "failed").all()
    assert table.loc[failed, "error"].str.contains("OutOfMemoryError").all()
    assert table.loc[failed, "perplexity"].isna().all()
    assert (table.loc[~failed, "quality_status"] == "ok").all()
    report = (tmp_path / "bh_routing_report.md").read_text()
    assert "## Failures" in report and "- `bh_k8_a005 (quality)`: OutOfMemoryError" in report
    for figure in ("bh_routing_analysis", "bh_routing_frontier"):
        assert (tmp_path / "visualizations" / f"{figure}.png").exists()
    assert (tmp_path / "bh_routing_frontier.csv").exists() and (tmp_path / "bh_routing_full_results.json").exists()
    if failing == "every":
        assert "No configuration's quality was measured: all failed" in report
        assert "- `layer allocations`: the layer allocations could not be fitted: OutOfMemoryError" in report
    else:
        assert (tmp_path / "allocations" / "allocations.json").exists() and "layer allocations" not in report


@pytest.mark.parametrize("failing", ["bh", "every"])
def test_failed_generation_configurations_still_give_every_output(tmp_path, monkeypatch, failing):
    generate = bx.generate_timed

    def out_of_memory_when_patched(model, *args, **kwargs):
        patcher = getattr(model, br.PATCHER_ATTRIBUTE, None)
        if patcher is not None and failing in (patcher.method, "every"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(model, *args, **kwargs)

    monkeypatch.setattr(bx, "generate_timed", out_of_memory_when_patched)
    configs = ["topk_8_baseline", "bh_k8_a005", "bh1mp_k8_a005"]
    run_in_process(tmp_path, monkeypatch, config_names=configs, prompts_per_group=1, run_quality=False, **QUICK)
    table = pd.read_csv(tmp_path / "bh_routing_summary.csv")
    failed = table["method"] == "bh" if failing == "bh" else table["method"].notna()
    assert (table.loc[failed, "status"] == "failed").all() and (table.loc[~failed, "status"] == "ok").all()
    assert table.loc[failed, "error"].str.contains("OutOfMemory").all()
    report = (tmp_path / "bh_routing_report.md").read_text()
    assert f"Configurations: 3 ({(~failed).sum()} ok, {failed.sum()} failed" in report
    assert "- `bh1mp_k8_a005`: OutOfMemoryError" in report
    assert ("Timings are end-to-end" in report) == (failing == "bh")  # nothing said of timings that never ran
    assert (tmp_path / "visualizations" / "bh_routing_analysis.png").exists()


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"eval_text": "/nonexistent.txt"}, r"eval_text must be one of \('embedded', 'embedded:wordnet'"),
        ({"eval_text_2": "embedded:nosuch"}, r"eval_text_2 must be one of .* or an existing text file \(or None\)"),
        ({"bootstrap_resamples": 5}, "bootstrap_resamples must be an integer >= 10, got 5"),
        ({"oracle_positions": -1}, "oracle_positions must be an integer >= 0, got -1"),
        ({"model_name_or_path": "./no/such/model"}, "'./no/such/model' is not an existing local directory"),
        ({"config_names": 5}, "config_names must be None, a list of names or a comma-separated string"),
        ({"config_names": "bh_k8_a005,bh-k8"}, r"config_names has unknown names \['bh-k8'\]; allowed: \['topk_8"),
        ({"timing_repeats": 0}, "timing_repeats must be an integer >= 1, got 0"),
        ({"profile": "fast"}, r"profile must be one of \('full', 'quick'\), got 'fast'"),
        ({"profile": "quick", "allocation_tokens": 1}, "allocation_tokens must be an integer >= 2, got 1"),
        ({"eval_batch_size": 300, "eval_window": 256}, "eval_batch_size x eval_window must be <= 65536, got 300 x 256"),
        ({"eval_max_tokens": 1}, "eval_max_tokens must be None or an integer >= 2, got 1"),
        ({"config_names": ","}, "config_names names no configuration"),
        ({"dtype": "fp8"}, "dtype must be one of"),
        ({"run_quality": "yes"}, "run_quality must be True or False"),
        ({"device": "tpu"}, "device must be"),
        ({"downstream_limit": 0}, "downstream_limit must be None or an integer >= 1, got 0"),
        ({"run_downstream": "yes"}, "run_downstream must be True or False"),
        ({"run_downstream": True, "downstream_tasks": "arc_easy,nosuch"}, "unknown lm-eval task 'nosuch'"),
    ],
)
def test_every_parameter_is_checked_before_any_work(tmp_path, monkeypatch, parameters, message):
    monkeypatch.setattr(bx, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the checks"))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_in_process(tmp_path, monkeypatch, **parameters)
    assert not (tmp_path / "configs").exists()


def test_in_colab_the_placeholder_address_stops_with_what_to_set(tmp_path, monkeypatch):
    cells = {cell["id"]: "".join(cell["source"]) for cell in json.loads(NOTEBOOK.read_text())["cells"]}
    monkeypatch.chdir(tmp_path)  # a fresh Colab runtime: no repository here
    namespace = {"IN_COLAB": True, "os": os, "subprocess": subprocess, "sys": sys}
    with pytest.raises(RuntimeError, match="REPO_URL in this cell is still the placeholder: set it to"):
        exec(cells["cell-04"], namespace)  # noqa: S102 - the repository's own notebook
    assert not (tmp_path / "repo").exists()


def test_bad_parameters_are_refused_before_any_work(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as error:
        execute(tmp_path, prompts_per_group=0, device="cpu")
    assert "prompts_per_group must be None or an integer >= 1, got 0" in error.value.evalue
    assert not (tmp_path / "configs").exists()


def test_notebook_with_the_hub_model_fails_offline_naming_the_embedded_model(tmp_path):
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as error:
        execute(tmp_path, model_name_or_path=bx.HUB_MODEL_ID, device="cpu")
    assert "embedded" in str(error.value) and bx.HUB_MODEL_ID in str(error.value)


def test_the_downstream_section_fails_offline_with_its_message_after_writing_everything(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="make test installs requirements-eval.txt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as without internet, minus the retries
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    parameters = {"run_downstream": True, "downstream_tasks": "hellaswag", "run_quality": False}
    # In this process, whose lm-eval task index other tests have built already (it takes seconds).
    with pytest.raises(RuntimeError) as error:
        run_in_process(
            tmp_path, monkeypatch, config_names="topk_8_baseline", prompts_per_group=1, **parameters, **QUICK
        )
    assert "run_downstream: lm-eval task 'hellaswag' could not be loaded" in str(error.value)
    assert "need internet" in str(error.value)
    report = (tmp_path / "bh_routing_report.md").read_text()
    assert "Not measured: lm-eval task 'hellaswag' could not be loaded" in report
    assert "- `downstream tasks`: lm-eval task 'hellaswag'" in report
    assert (pd.read_csv(tmp_path / "bh_routing_summary.csv")["status"] == "ok").all()
    assert (tmp_path / "visualizations" / "bh_routing_analysis.png").exists()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "granitemoe"])
def test_the_notebook_runs_on_other_moe_families(tmp_path, monkeypatch, family):
    """A tiny random instance of a non-OLMoE family (softmax with a shared expert, sigmoid with groups and a
    shared expert, softmax over the kept logits), saved as a local directory: every output, configurations
    scaled to the family's experts and native k."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bx.EMBEDDED_MODEL_DIR)
    model = bx.build_random_moe(family, vocab_size=len(tokenizer), num_hidden_layers=2)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    shape = br.moe_shape(model.config)
    k = shape.top_k
    configs = [f"topk_{k}_baseline", f"bh_k{k}_a005", f"bh_k{shape.selectable}_a020", f"bh1mp_k{k}_a005"]
    output = tmp_path / "out"
    run_in_process(output, monkeypatch, model_name_or_path=str(tmp_path / "model"), config_names=configs,
                   prompts_per_group=1, **QUICK)  # fmt: skip
    table = pd.read_csv(output / "bh_routing_summary.csv")
    assert list(table["config"]) == configs and (table["status"] == "ok").all()
    assert (table["quality_status"] == "ok").all() and table["perplexity"].notna().all()
    assert (table["max_experts"] <= shape.selectable).all() and table["avg_experts"].iloc[0] == k
    for figure in "analysis frontier frontier_intervals layers calibration".split():
        assert (output / "visualizations" / f"bh_routing_{figure}.png").stat().st_size > 10_000
    assert all((output / f"{name}.csv").stat().st_size > 100 for name in QUALITY_TABLES)
    full = json.loads((output / "bh_routing_full_results.json").read_text())
    shared = {"qwen2_moe": 1, "deepseek_v3": 1, "granitemoe": 0}[family]
    assert full["metadata"]["shared_experts"] == shared
    report = (output / "bh_routing_report.md").read_text()
    assert f"Routing: {full['metadata']['routing']}; {shared} shared experts per MoE layer" in report
