"""The sweep: design configurations, per-config saving, resume, failures, determinism, outputs."""

import json

import pandas as pd
import pytest

import bh_routing as br

PROMPTS = {"simple": ["w5 w6 w7", "w9 w10"], "technical": ["w300 w301 w302 w303"]}


def test_design_configs_are_the_designs_25():
    configs = br.design_configs()
    names = [c.name for c in configs]
    assert len(configs) == 25 and names[0] == "topk_8_baseline"
    assert "bh_k8_a005" in names and "bh_k64_a020" in names and "bh_k2_a001" in names
    assert {c.kwargs["pvalue_method"] for c in configs[1:]} == {"robust_z"}
    assert [c.name for c in br.design_pvalue_configs()] == ["bh1mp_k8_a001", "bh1mp_k8_a005", "bh1mp_k8_a010", "bh1mp_k8_a020"]
    assert sum(len(v) for v in br.PROMPTS.values()) == 12 and list(br.PROMPTS) == ["simple", "medium", "complex", "technical"]


def run(model, tokenizer, configs, tmp_path, **kwargs):
    return br.run_sweep(model, tokenizer, configs, PROMPTS, max_new_tokens=3, output_dir=tmp_path, progress=False, **kwargs)


def test_sweep_saves_each_config_and_resumes(tiny_model, word_tokenizer, tmp_path, monkeypatch):
    configs = [c for c in br.design_configs() + br.design_pvalue_configs() if c.name in
               ("topk_8_baseline", "bh_k8_a005", "bh_k2_a020", "bh1mp_k8_a005")]  # fmt: skip
    results = run(tiny_model, word_tokenizer, configs, tmp_path)
    assert list(results) == [c.name for c in configs]
    for name, result in results.items():
        assert result["status"] == "ok" and (tmp_path / "configs" / f"{name}.json").exists()
        assert len(result["prompts"]) == 3 and set(result["groups"]) == set(PROMPTS)
        assert len(result["per_layer_avg_experts"]) == 2
    assert results["topk_8_baseline"]["summary"]["avg_experts"] == 8
    assert results["bh1mp_k8_a005"]["summary"]["floor_hit_rate"] == 100.0

    # A rerun with the same settings runs nothing: it reads the saved files.
    calls = []
    monkeypatch.setattr(br, "run_config", lambda *args, **kwargs: calls.append(args) or {})
    again = run(tiny_model, word_tokenizer, configs, tmp_path)
    assert calls == [] and again == results


def test_interrupted_sweep_keeps_finished_configs(tiny_model, word_tokenizer, tmp_path, monkeypatch):
    configs = br.design_configs()[:3]
    original = br.run_config

    def interrupt_on_third(model, tokenizer, patcher, config, *args, **kwargs):
        if config.name == configs[2].name:
            raise KeyboardInterrupt
        return original(model, tokenizer, patcher, config, *args, **kwargs)

    monkeypatch.setattr(br, "run_config", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, word_tokenizer, configs, tmp_path)
    assert sorted(p.stem for p in (tmp_path / "configs").glob("*.json")) == sorted(c.name for c in configs[:2])
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(br, "run_config", original)
    assert all(r["status"] == "ok" for r in run(tiny_model, word_tokenizer, configs, tmp_path).values())


def test_failed_config_is_recorded_and_the_sweep_goes_on(tiny_model, word_tokenizer, tmp_path, monkeypatch):
    configs = br.design_configs()[:3]
    original = br.run_config

    def fail_second(model, tokenizer, patcher, config, *args, **kwargs):
        if config.name == configs[1].name:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(model, tokenizer, patcher, config, *args, **kwargs)

    monkeypatch.setattr(br, "run_config", fail_second)
    results = run(tiny_model, word_tokenizer, configs, tmp_path)
    assert [r["status"] for r in results.values()] == ["ok", "failed", "ok"]
    assert "out of memory" in results[configs[1].name]["error"]
    assert not br.OLMoERouterPatcher(tiny_model).is_patched and all(not r._forward_hooks for r in br.OLMoERouterPatcher(tiny_model).routers)
    monkeypatch.setattr(br, "run_config", original)
    rerun = run(tiny_model, word_tokenizer, configs, tmp_path)  # failed configs are retried
    assert all(r["status"] == "ok" for r in rerun.values())


def test_same_seed_same_counts_and_texts(tiny_model, word_tokenizer, tmp_path):
    configs = [br.design_configs()[9]]  # bh_k8_a005
    first = run(tiny_model, word_tokenizer, configs, tmp_path / "a")
    second = run(tiny_model, word_tokenizer, configs, tmp_path / "b")
    for a, b in zip(first[configs[0].name]["prompts"], second[configs[0].name]["prompts"]):
        assert a["token_counts"] == b["token_counts"] and a["generated_text"] == b["generated_text"]


def test_outputs(tiny_model, word_tokenizer, tmp_path):
    configs = br.design_configs() + br.design_pvalue_configs()[:1]
    results = run(tiny_model, word_tokenizer, configs, tmp_path)
    metadata = {"model": "tiny random OLMoE", **br.environment_info(tiny_model), "prompts": PROMPTS,
                "max_new_tokens": 3, "seed": 0}  # fmt: skip
    paths = br.write_results(results, tmp_path, metadata)
    table = pd.read_csv(paths["csv"])
    assert list(table.columns) == br.SUMMARY_COLUMNS and len(table) == 26
    full = json.loads(paths["json"].read_text())
    assert set(full) == {"metadata", "summary", "saturation", "configs"} and len(full["configs"]) == 26
    saturation = br.saturation_analysis(br.summary_table(results))
    assert len(saturation) == 5  # 4 alphas of robust_z, 1 of one_minus_prob
    br.plot_analysis(results, tmp_path / "visualizations" / "bh_routing_analysis.png")
    assert (tmp_path / "visualizations" / "bh_routing_analysis.png").stat().st_size > 50_000
    report = br.write_report(results, tmp_path / "bh_routing_report.md", metadata)
    assert "tiny random OLMoE" in report and metadata["torch"] in report
    row = table.set_index("config").loc["bh_k8_a005"]
    assert f"| bh_k8_a005 | 0.05 | 8 | {row['avg_experts']:.2f} | {row['std_experts']:.2f} |" in report


def test_report_names_the_experts_path_of_its_timings(tiny_model, word_tokenizer, tmp_path):
    configs = [c for c in br.design_configs() if c.name in ("topk_8_baseline", "bh_k8_a005")]
    results = run(tiny_model, word_tokenizer, configs, tmp_path)
    metadata = {"model": "tiny", **br.environment_info(tiny_model), "prompts": PROMPTS, "max_new_tokens": 3, "seed": 0}
    own_path = results["bh_k8_a005"]["experts_implementation"]  # the model's own on a CPU
    report = br.write_report(results, tmp_path / "a.md", metadata)
    assert f"with the experts path {own_path};" in report and "variable-k experts path (the patcher's default" in report
    results["bh_k8_a005"]["experts_implementation"] = "variable_k"  # as the patcher records it on a GPU
    report = br.write_report(results, tmp_path / "b.md", metadata)
    assert f"with the experts path {own_path}, variable_k;" in report and "ran the variable-k experts path" in report


def test_saturation_analysis_on_known_numbers():
    rows = [{"config": f"bh_k{k}", "method": "bh", "pvalue_method": "robust_z", "alpha": 0.05, "max_k": k,
             "status": "ok", "avg_experts": avg} for k, avg in [(2, 2.0), (4, 3.0), (8, 3.1), (16, 3.12)]]  # fmt: skip
    result = br.saturation_analysis(pd.DataFrame(rows))
    assert result.loc[0, "saturation_max_k"] == 4  # 2->4 grows 50%, 4->8 3.3%, 8->16 0.6%
    rows[-1]["avg_experts"] = 4.0  # growth resumes at the last step: not saturated
    assert pd.isna(br.saturation_analysis(pd.DataFrame(rows)).loc[0, "saturation_max_k"])


def test_bad_sweep_arguments(tiny_model, word_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="configs"):
        run(tiny_model, word_tokenizer, [], tmp_path)
    config = br.design_configs()[0]
    with pytest.raises(ValueError, match="distinct"):
        run(tiny_model, word_tokenizer, [config, config], tmp_path)
    with pytest.raises(ValueError, match="method"):
        br.RoutingConfig("x", "magic").apply(br.OLMoERouterPatcher(tiny_model))
