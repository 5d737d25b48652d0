"""The notebook runs headless (papermill) on the embedded model with a reduced parameter set."""

import json
from pathlib import Path

import pandas as pd

import bh_routing as br

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "OLMoE_BH_Routing_Experiments.ipynb"


def test_notebook_has_a_parameters_cell():
    notebook = json.loads(NOTEBOOK.read_text())
    tagged = [c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    source = "".join(tagged[0]["source"])
    for name in ("model_name_or_path", "device", "dtype", "config_names", "prompts_per_group", "max_new_tokens",
                 "output_dir", "seed"):  # fmt: skip
        assert f"{name} =" in source


def test_notebook_runs_headless_and_writes_the_four_outputs(tmp_path):
    import papermill

    configs = ["topk_8_baseline", "bh_k4_a020", "bh_k8_a005", "bh1mp_k8_a005"]  # in the design's order
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(REPO), kernel_name="python3", progress_bar=False,
        parameters=dict(config_names=configs, prompts_per_group=1, max_new_tokens=3, output_dir=str(tmp_path), device="cpu",
                        eval_max_tokens=600, eval_window=128),
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "bh_routing_summary.csv")
    assert list(table.columns) == br.SUMMARY_COLUMNS and list(table["config"]) == configs
    assert (table["status"] == "ok").all()
    full = json.loads((tmp_path / "bh_routing_full_results.json").read_text())
    assert full["metadata"]["model"] == "embedded" and full["metadata"]["model_source"] == "embedded"
    first_prompt = full["configs"]["bh_k8_a005"]["prompts"][0]
    assert {"group", "prompt", "generated_text", "token_counts", "time_s", "avg_experts"} <= set(first_prompt)
    for figure in ("bh_routing_analysis", "bh_routing_frontier", "bh_routing_layers"):
        assert (tmp_path / "visualizations" / f"{figure}.png").exists()
    frontier = pd.read_csv(tmp_path / "bh_routing_frontier.csv")
    floored = [c.name for c in br.floored_bh_configs()]
    assert list(frontier["config"]) == ["bh_k4_a020", "bh_k8_a005", "bh1mp_k8_a005"] + floored
    assert table["perplexity"].notna().all() and (table["perplexity"] < 8192).all()
    report = (tmp_path / "bh_routing_report.md").read_text()
    assert "`embedded`" in report
    for row in table.itertuples():  # the report's numbers are the CSV's
        assert f"| {row.config} |" in report and f"| {row.avg_experts:.2f} | {row.std_experts:.2f} |" in report


def test_notebook_with_the_hub_model_fails_offline_naming_the_embedded_model(tmp_path):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(REPO), kernel_name="python3", progress_bar=False,
            parameters=dict(model_name_or_path="allenai/OLMoE-1B-7B-0924", output_dir=str(tmp_path), device="cpu"),
        )  # fmt: skip
    except PapermillExecutionError as error:
        assert "embedded" in str(error) and "allenai/OLMoE-1B-7B-0924" in str(error)
    else:
        raise AssertionError("loading the hub model offline should fail")
