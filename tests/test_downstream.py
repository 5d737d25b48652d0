"""Downstream accuracy through lm-evaluation-harness: the offline tasks on the embedded model, routing
statistics over real tokens only, paired intervals, results on disk, make eval's script."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bh_downstream as bd
import bh_experiment as bx
import bh_routing as br

pytest.importorskip("lm_eval", reason="make test installs requirements-eval.txt")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ["native:k=8", "topk:k=2", "bh:alpha=0.2,max_k=8,min_k=2"]


@pytest.fixture(scope="module")
def embedded():
    return bx.load_model("embedded", device="cpu")


@pytest.fixture(scope="module")
def evaluated(embedded, tmp_path_factory):
    """Three configurations on both offline tasks (the first 16 samples of each), as make eval runs them."""
    output_dir = tmp_path_factory.mktemp("downstream")
    configs = [br.RoutingConfig.parse(spec) for spec in CONFIGS]
    results = bd.evaluate_downstream(*embedded, configs, bd.OFFLINE_TASKS, output_dir, {"model": "embedded"}, 16)
    return output_dir, configs, results


def test_three_configurations_on_the_offline_tasks_give_result_files(evaluated):
    output_dir, configs, results = evaluated
    assert list(results) == [config.name for config in configs] == ["topk_8_baseline", "topk_k2", "bh_k8_a020_min2"]
    for config in configs:
        assert results[config.name]["method"] == config.method
        assert list(results[config.name]["tasks"]) == list(bd.OFFLINE_TASKS)
        saved = [
            json.loads((output_dir / "configs" / f"{config.name}.{task}.json").read_text()) for task in bd.OFFLINE_TASKS
        ]
        continuation, perplexity = saved
        assert continuation["status"] == perplexity["status"] == "ok"
        assert continuation["primary_metric"] == "acc_norm" and 0 <= continuation["metrics"]["acc"]["value"] <= 1
        assert continuation["metrics"]["acc"]["stderr"] > 0 and continuation["num_samples"] == 16
        assert perplexity["primary_metric"] == "word_perplexity"
        assert perplexity["metrics"]["word_perplexity"]["value"] > 1
        assert perplexity["metrics"]["word_perplexity"]["higher_is_better"] is False
    experts = {name: r["tasks"]["heldout_continuation"]["avg_experts"] for name, r in results.items()}
    assert experts["topk_8_baseline"] == 8.0 and experts["topk_k2"] == 2.0 and 2.0 < experts["bh_k8_a020_min2"] < 8.0
    native, fewer = (results[n]["tasks"]["heldout_perplexity"]["metrics"]["word_perplexity"]["value"] for n in experts
                     if n != "bh_k8_a020_min2")  # fmt: skip
    assert fewer > native  # two experts instead of eight cost perplexity on this model


def test_outputs_table_figure_and_report_section_match_the_results(evaluated):
    output_dir, configs, results = evaluated
    paths = bd.write_downstream_outputs(results, output_dir)
    table = pd.read_csv(paths["csv"])
    assert len(table) == len(configs) * len(bd.OFFLINE_TASKS) and (table["status"] == "ok").all()
    row = table[(table["config"] == "topk_k2") & (table["task"] == "heldout_continuation")].iloc[0]
    evaluation = results["topk_k2"]["tasks"]["heldout_continuation"]
    assert row["value"] == pytest.approx(evaluation["metrics"]["acc_norm"]["value"])
    assert row["avg_experts"] == pytest.approx(2.0) and row["low_vs_native"] <= row["difference_vs_native"]
    assert row["difference_vs_native"] <= row["high_vs_native"]
    markdown = paths["markdown"].read_text()
    assert f"| topk_k2 | 2.00 | {row['value']:.4f} +- {row['stderr']:.4f} |" in markdown
    assert "Model `embedded` (float32, x86_64 CPU" in markdown and "limit 16, batch size 8; evaluated 2026" in markdown
    assert "### heldout_perplexity: word_perplexity (lower is better; 16 samples)" in markdown
    assert paths["figure"].stat().st_size > 10_000


def test_a_rerun_resumes_every_finished_configuration(evaluated, embedded, monkeypatch):
    output_dir, configs, results = evaluated
    monkeypatch.setattr(bd, "evaluate_task", lambda *a, **k: pytest.fail("a finished configuration was recomputed"))
    again = bd.evaluate_downstream(*embedded, configs, bd.OFFLINE_TASKS, output_dir, {"model": "embedded"}, 16)
    assert again == results


def test_a_failing_configuration_is_recorded_and_the_others_still_run(embedded, tmp_path, monkeypatch):
    evaluate = bd.evaluate_task

    def fail_for_bh(harness, patcher, config, *args):
        if config.method == "bh":
            raise RuntimeError("simulated failure")
        return evaluate(harness, patcher, config, *args)

    monkeypatch.setattr(bd, "evaluate_task", fail_for_bh)
    configs = [br.RoutingConfig.parse(spec) for spec in ("native:k=8", "bh:alpha=0.05,max_k=8")]
    results = bd.evaluate_downstream(*embedded, configs, ["heldout_continuation"], tmp_path, limit=1)
    assert results["topk_8_baseline"]["tasks"]["heldout_continuation"]["status"] == "ok"
    assert results["bh_k8_a005"]["tasks"]["heldout_continuation"]["status"] == "failed"
    paths = bd.write_downstream_outputs(results, tmp_path)  # one sample: no interval, but every output
    table = pd.read_csv(paths["csv"])
    assert table.loc[table["config"] == "bh_k8_a005", "error"].item() == "RuntimeError: simulated failure"
    markdown = paths["markdown"].read_text()
    assert "- bh_k8_a005 on heldout_continuation failed: RuntimeError: simulated failure" in markdown
    assert paths["figure"].exists()


def test_native_top8_is_above_chance_on_the_multiple_choice_task(embedded):
    """The task is learnable by the embedded model: every one of its 400 items, 4 choices (chance 0.25)."""
    harness = bd.harness_model(*embedded, batch_size=16)
    patcher = br.OLMoERouterPatcher(embedded[0])
    native = br.RoutingConfig.parse("native:k=8")
    result = bd.evaluate_task(harness, patcher, native, "heldout_continuation")
    assert result["num_samples"] == bd.CONTINUATION_MAX_ITEMS
    for metric in ("acc", "acc_norm"):
        value, stderr = result["metrics"][metric]["value"], result["metrics"][metric]["stderr"]
        assert value - 0.25 > 4 * stderr, (metric, value, stderr)


def run_bh(embedded, batch_size, masked=True):
    """BH's routing statistics while lm-eval scores 24 continuation items in batches of batch_size."""
    from lm_eval import simple_evaluate

    harness = bd.harness_model(*embedded, batch_size=batch_size)
    patcher = br.OLMoERouterPatcher(embedded[0])
    config = br.RoutingConfig.parse("bh:alpha=0.2,max_k=8")
    if masked:
        result = bd.evaluate_task(harness, patcher, config, "heldout_continuation", limit=24)
        return result["avg_experts"], result["num_tokens"]
    config.apply(patcher)
    try:
        task = "heldout_continuation"
        spec, manager = bd.offline_task_configs()[task], bd.lm_eval_task_manager([task])
        simple_evaluate(model=harness, tasks=[spec], limit=24, log_samples=False, task_manager=manager)
        stats = patcher.get_stats()
    finally:
        patcher.unpatch()
    return stats["avg_experts"], stats["num_tokens"]


def test_padding_positions_are_left_out_of_the_average_experts(embedded):
    alone_experts, alone_tokens = run_bh(embedded, batch_size=1)  # one sequence per forward pass: no padding
    masked_experts, masked_tokens = run_bh(embedded, batch_size=8)
    padded_experts, padded_tokens = run_bh(embedded, batch_size=8, masked=False)
    assert masked_tokens == alone_tokens and masked_experts == pytest.approx(alone_experts, rel=1e-9)
    assert padded_tokens > alone_tokens and padded_experts != pytest.approx(alone_experts, rel=1e-3)


def test_paired_difference_recovers_a_known_difference():
    """Accuracy: 40 of 400 correct answers made wrong is a difference of exactly -0.1; perplexity: every
    document's log-likelihood lowered by 0.1 nats per word multiplies the perplexity by exp(0.1)."""
    rng = np.random.default_rng(1)
    reference = {f"t/{i}": float(v) for i, v in enumerate(rng.random(400) < 0.6)}
    flipped = [key for key, value in reference.items() if value == 1.0][:40]
    worse = reference | dict.fromkeys(flipped, 0.0)
    interval = bd.paired_difference(worse, reference)
    assert interval["high"] - interval["low"] < 0.08  # paired: an unpaired interval would be about 0.14 wide
    assert interval["difference"] == pytest.approx(-0.1) and interval["low"] < -0.1 < interval["high"] < 0
    words = rng.integers(50, 500, size=80)
    documents = {f"t/{i}": [float(-3.0 * n + rng.normal(0, 20)), float(n)] for i, n in enumerate(words)}
    shifted = {key: [ll - 0.1 * n, n] for key, (ll, n) in documents.items()}
    ppl = np.exp(3.0 * words.sum() / words.sum())
    difference = bd.paired_difference(shifted, documents, "word_perplexity")
    assert difference["difference"] == pytest.approx(ppl * (np.exp(0.1) - 1), rel=0.05)
    assert difference["low"] <= difference["difference"] <= difference["high"]


def test_paired_bootstrap_intervals_cover_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    for _ in range(100):
        base = rng.random(300)
        ours = {f"t/{i}": float(u < 0.65) for i, u in enumerate(base)}  # true accuracies 0.65 and 0.60, paired
        theirs = {f"t/{i}": float(u < 0.60) for i, u in enumerate(base)}
        interval = bd.paired_difference(ours, theirs, resamples=400, seed=int(rng.integers(1 << 30)))
        covered += interval["low"] <= 0.05 <= interval["high"]
    assert 88 <= covered <= 99


def test_paired_difference_has_no_interval_without_shared_samples_or_a_known_aggregation():
    unshared = bd.paired_difference({"a/0": 1.0, "a/1": 0.0}, {"b/0": 1.0, "b/1": 1.0})
    corpus_level = bd.paired_difference({"a/0": 1.0, "a/1": 0.0}, {"a/0": 1.0, "a/1": 1.0}, "f1")
    for interval in (unshared, corpus_level):
        assert all(np.isnan(interval[key]) for key in ("difference", "low", "high"))
    assert unshared["num_samples"] == 0 and corpus_level["num_samples"] == 2


def test_task_metrics_reads_values_and_standard_errors():
    entry = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.02, "word_perplexity,none": 12.0,
             "word_perplexity_stderr,none": "N/A", "exact_match,strict-match": 0.25, "sample_len": 3}  # fmt: skip
    assert bd.task_metrics(entry, {"acc": True, "word_perplexity": False}) == {
        "acc": {"value": 0.5, "stderr": 0.02, "higher_is_better": True},
        "word_perplexity": {"value": 12.0, "stderr": None, "higher_is_better": False},
        "exact_match,strict-match": {"value": 0.25, "stderr": None, "higher_is_better": None},
    }
    assert bd.primary_metric(bd.task_metrics(entry)) == "acc" and bd.primary_metric({}) is None
    assert bd.primary_metric({"f1": {}, "em": {}}) == "f1"  # none of PRIMARY_METRICS: the first reported


def test_continuation_items_hold_the_true_continuation_among_distinct_choices_of_the_same_document():
    documents = bx.heldout_documents()
    items = bd.continuation_items(documents)
    assert len(items) == bd.CONTINUATION_MAX_ITEMS and items == bd.continuation_items(documents)
    assert len({item["label"] for item in items}) == bd.CONTINUATION_CHOICES  # the answer's position varies
    for item in items[:50]:
        lines = documents[item["document"]].splitlines()
        choices = item["choices"]
        assert len(set(choices)) == bd.CONTINUATION_CHOICES
        assert any(" ".join(line.split()) == f"{item['context']} {choices[item['label']]}" for line in lines)
        for choice in choices:  # every candidate ends a line of the same document
            assert any(" ".join(line.split()).endswith(choice) for line in lines)


def test_bad_tasks_limits_and_a_missing_harness_get_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task': give one of"):
        bd.check_task_names("heldout_continuation,no_such_task")
    with pytest.raises(ValueError, match="'ai2_arc' is an lm-eval tag, a list of tasks without an aggregate"):
        bd.check_task_names(["ai2_arc"])
    assert bd.check_task_names("arc_easy, mmlu") == ["arc_easy", "mmlu"]
    # lm-eval's registry is indexed (seconds) only where a name needs it; the offline tasks are configurations
    assert "arc_easy" not in bd.lm_eval_task_manager(bd.OFFLINE_TASKS).all_tasks
    assert "arc_easy" in bd.lm_eval_task_manager(["heldout_continuation", "arc_easy"]).all_tasks
    with pytest.raises(ValueError, match="tasks must be a non-empty list of lm-eval task names"):
        bd.check_lm_eval_tasks([])
    for bad in (0, 1.5, True, "10"):
        with pytest.raises(ValueError, match="limit must be None, an integer >= 1 or a fraction in"):
            bd.check_limit(bad)
    assert [bd.check_limit(good) for good in (None, 1, 0.25)] == [None, 1, 0.25]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install -r requirements-eval.txt"):
        bd.harness_model(None, None)


def test_routing_configurations_parse_from_text():
    assert br.RoutingConfig.parse("bh:alpha=0.05,max_k=8") == br.RoutingConfig.of("bh", alpha=0.05, max_k=8)
    assert br.RoutingConfig.parse(" topp : p=0.5, max_k=8 ,").name == "topp_p050_max8"  # spaces, a trailing comma
    assert (
        br.RoutingConfig.parse("bh:pvalue_method=one_minus_prob,alpha=0.1").kwargs["pvalue_method"] == "one_minus_prob"
    )
    with pytest.raises(ValueError, match="method must be one of"):
        br.RoutingConfig.parse("bhh:alpha=0.05")
    with pytest.raises(ValueError, match="takes the parameters"):
        br.RoutingConfig.parse("topk:kk=2")
    with pytest.raises(ValueError, match="spec must be 'method' or 'method:name=value,...'"):
        br.RoutingConfig.parse("topk:2")


def test_make_evals_script_writes_every_output_and_reports_a_bad_task(tmp_path):
    arguments = ["--tasks", "heldout_continuation", "--limit", "4", "--configs", "native:k=8", "topk:k=1"]
    script = [sys.executable, "scripts/run_downstream.py", "--output-dir", str(tmp_path)]
    finished = subprocess.run([*script, *arguments], cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "### heldout_continuation: acc_norm" in finished.stdout
    for name in ("downstream.csv", "downstream.png", "downstream.md", "configs/topk_k1.heldout_continuation.json"):
        assert (tmp_path / name).exists()
    finished = subprocess.run([*script, "--tasks", "no_such_task"], cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 1 and "unknown lm-eval task 'no_such_task'" in finished.stderr
    finished = subprocess.run([*script, "--limit", "0"], cwd=REPO, capture_output=True, text=True)
    assert finished.returncode == 2 and "--limit must be None, an integer >= 1" in finished.stderr


def test_a_bad_configuration_is_refused_before_any_evaluation(embedded, tmp_path):
    configs = [br.RoutingConfig.parse("native:k=8"), br.RoutingConfig.parse("topk:k=99")]
    with pytest.raises(ValueError, match="k must be"):
        bd.evaluate_downstream(*embedded, configs, ["heldout_continuation"], tmp_path, limit=2)
    assert not list((tmp_path / "configs").glob("*.json"))
