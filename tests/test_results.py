"""Results on disk: atomic writes, resume, failure records, interrupts (the helper both notebook sweeps use)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import bh_experiment as bx
import bh_routing as br


def test_store_saves_resumes_and_reruns_when_settings_change(tmp_path):
    store = bx.ResultStore(tmp_path / "configs", {"model": "m", "prompts": {"simple": ("a", "b")}})
    calls = []

    def compute():
        calls.append(1)
        return {"method": "bh", "value": 1.5}

    first = store.run("bh_k8_a005", compute)
    assert first["status"] == "ok" and first["value"] == 1.5 and first["name"] == "bh_k8_a005"
    assert json.loads((tmp_path / "configs" / "bh_k8_a005.json").read_text()) == first
    assert first["settings"]["prompts"] == {"simple": ["a", "b"]}  # stored as it reads back from JSON
    assert store.run("bh_k8_a005", compute) == first and len(calls) == 1  # resumed, not rerun
    assert store.run("bh_k8_a005", compute, redo=True) == first and len(calls) == 2
    other = bx.ResultStore(tmp_path / "configs", {"model": "another"})
    assert other.load("bh_k8_a005") is None  # other settings: not resumed
    other.run("bh_k8_a005", compute)
    assert len(calls) == 3


def test_a_failure_is_recorded_and_retried(tmp_path):
    store = bx.ResultStore(tmp_path, {"seed": 0})

    def out_of_memory():
        raise RuntimeError("CUDA out of memory (simulated)")

    failed = store.run("bh_k2_a020", out_of_memory, describe={"method": "bh", "prompts": []})
    assert failed["status"] == "failed" and "out of memory" in failed["error"] and failed["method"] == "bh"
    assert json.loads(store.path("bh_k2_a020").read_text())["status"] == "failed"
    assert store.load("bh_k2_a020") is None  # a failed configuration is not resumed
    assert store.run("bh_k2_a020", lambda: {"method": "bh"})["status"] == "ok"


def test_an_interrupt_saves_nothing_and_leaves_no_temporary_file(tmp_path):
    store = bx.ResultStore(tmp_path, {})
    store.run("done", lambda: {"x": 1})

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run("in_flight", interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json"]

    def failing_writer(temporary):
        temporary.write_text("half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        bx.atomic_write(tmp_path / "done.json", failing_writer)
    assert json.loads((tmp_path / "done.json").read_text())["x"] == 1  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json"]


def test_tensors_round_trip(tmp_path):
    store = bx.ResultStore(tmp_path, {})
    tensors = {"nll": torch.rand(5), "expert_counts": torch.randint(0, 9, (5, 2), dtype=torch.int16)}
    assert store.save_tensors("topk_k2", tensors).name == "topk_k2.pt"
    loaded = store.load_tensors("topk_k2")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_a_result_saved_by_other_code_or_library_versions_is_recomputed(tmp_path, monkeypatch):
    store = bx.ResultStore(tmp_path, {"seed": 0})
    assert store.settings["code"] == bx.code_fingerprint()  # module hash and versions are in the resume key
    store.run("bh_k8_a005", lambda: {"value": 1})
    edited = {**bx.code_fingerprint(), "code_sha256": "0" * 16}  # as after a change to bh_routing.py
    monkeypatch.setattr(bx, "code_fingerprint", lambda: edited)
    after_change = bx.ResultStore(tmp_path, {"seed": 0})
    assert after_change.load("bh_k8_a005") is None
    assert after_change.run("bh_k8_a005", lambda: {"value": 2})["value"] == 2


@pytest.mark.parametrize("source", bx.FINGERPRINTED_SOURCES)
def test_the_fingerprint_follows_every_source_a_result_depends_on(tmp_path, monkeypatch, source):
    for name in bx.FINGERPRINTED_SOURCES:
        (tmp_path / name).write_text((bx.REPO_DIR / name).read_text())
    monkeypatch.setattr(bx, "REPO_DIR", tmp_path)
    before = bx.code_fingerprint()
    (tmp_path / source).write_text((tmp_path / source).read_text() + "\n# an edit\n")
    assert bx.code_fingerprint()["code_sha256"] != before["code_sha256"]


def function_from(body):
    namespace = {}
    exec(f"def measure(x):\n{body}\n", namespace)  # noqa: S102 - test code
    return bx.function_fingerprint(namespace["measure"])


def test_function_fingerprints_follow_the_code_not_its_layout():
    plain = function_from("    return x in {'a', 'b', 'c'} and x * 2")
    assert plain == function_from("    return x in {'a', 'b', 'c'} and x * 2")
    assert plain == function_from("\n    # a comment and a blank line\n    return x in {'a', 'b', 'c'} and x * 2")
    assert plain != function_from("    return x in {'a', 'b', 'c'} and x * 3")
    script = (
        "import sys; sys.path.insert(0, 'tests'); sys.path.insert(0, '.'); import test_results; "
        "print(test_results.function_from(\"    return x in {'a', 'b', 'c'}\"))"
    )
    repo = Path(br.__file__).parent
    seeds = [
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=repo,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        for seed in ("1", "2", "3")
    ]
    assert len(set(seeds)) == 1 and seeds[0].strip()  # set constants' order varies with string hashing


def measured(store, name):
    store.save_tensors(name, {"nll": torch.arange(4.0)})
    return {"perplexity": 2.0}


@pytest.mark.parametrize("damage", ["truncated json", "not an object", "truncated tensors", "missing tensors"])
def test_a_corrupted_saved_result_is_named_moved_aside_and_recomputed(tmp_path, damage):
    store = bx.ResultStore(tmp_path, {"seed": 0})
    first = store.run("topk_k2", lambda: measured(store, "topk_k2"))
    assert first["tensors"] is True
    json_path, tensor_path = store.path("topk_k2"), store.path("topk_k2", ".pt")
    if damage == "truncated json":
        json_path.write_text(json_path.read_text()[:25])
    elif damage == "not an object":
        json_path.write_text("[1, 2]")
    elif damage == "truncated tensors":
        tensor_path.write_bytes(tensor_path.read_bytes()[:40])
    else:
        tensor_path.unlink()
    calls = []
    with pytest.warns(UserWarning, match=r"topk_k2\.json: saved result unreadable") as warned:
        again = store.run("topk_k2", lambda: calls.append(1) or measured(store, "topk_k2"))
    assert "moved aside" in str(warned[0].message) and calls == [1]
    assert again["status"] == "ok" and store.load_tensors("topk_k2")["nll"].tolist() == [0, 1, 2, 3]
    assert (tmp_path / "topk_k2.corrupt.json").exists()
    assert store.run("topk_k2", lambda: calls.append(1) or measured(store, "topk_k2")) == again and calls == [1]


def test_unreadable_tensors_name_their_file(tmp_path):
    store = bx.ResultStore(tmp_path, {})
    store.path("x", ".pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"x\.pt: saved tensors unreadable"):
        store.load_tensors("x")


def test_throughput_is_the_median_of_repeats_with_its_range():
    timing = bx.throughput_summary(100, [2.0, 1.0, 4.0])
    assert timing == {"tokens_per_second": 50.0, "tokens_per_second_min": 25.0, "tokens_per_second_max": 100.0,
                      "timing_repeats": 3}  # fmt: skip
    with pytest.raises(ValueError, match="seconds_per_repeat"):
        bx.throughput_summary(100, [])


def test_saturation_analysis_on_known_numbers():
    rows = [
        {
            "config": f"bh_k{k}",
            "method": "bh",
            "pvalue_method": "robust_z",
            "alpha": 0.05,
            "max_k": k,
            "status": "ok",
            "avg_experts": avg,
        }
        for k, avg in [(2, 2.0), (4, 3.0), (8, 3.1), (16, 3.12)]
    ]
    result = bx.saturation_analysis(pd.DataFrame(rows))
    assert result.loc[0, "saturation_max_k"] == 4  # 2->4 grows 50%, 4->8 3.3%, 8->16 0.6%
    assert result.loc[0, "growth_percent_by_step"] == {"2->4": 50.0, "4->8": 3.33, "8->16": 0.65}
    rows[-1]["avg_experts"] = 4.0  # growth resumes at the last step: not saturated
    assert pd.isna(bx.saturation_analysis(pd.DataFrame(rows)).loc[0, "saturation_max_k"])
    rows[0]["status"] = "failed"  # failed rows are left out
    assert list(bx.saturation_analysis(pd.DataFrame(rows)).loc[0, "growth_percent_by_step"]) == ["4->8", "8->16"]


def test_a_store_reuses_another_runs_results_with_the_same_settings_and_leaves_them_as_they_are(tmp_path):
    default = bx.ResultStore(tmp_path / "results" / "quality", {"seed": 0})
    default.run(
        "bh_k8_a005", lambda: default.save_tensors("bh_k8_a005", {"nll": torch.ones(3)}) and {"v": 1}, key={"a": 1}
    )
    (default.directory / "broken.json").write_text("{not json")
    before = {path.name: path.read_bytes() for path in default.directory.iterdir()}
    own = bx.ResultStore(tmp_path / "runs" / "x" / "quality", {"seed": 0}, reuse=default.directory)
    computed = []
    reused = own.run("bh_k8_a005", lambda: computed.append(1) or {"v": 2}, key={"a": 1})
    assert computed == [] and reused["v"] == 1 and reused["reused_from"] == str(default.directory)
    assert torch.equal(own.load_tensors("bh_k8_a005")["nll"], torch.ones(3))
    assert own.run("bh_k8_a005", lambda: {"v": 3}, key={"a": 2})["v"] == 3  # another key: computed here
    assert own.run("broken", lambda: {"v": 4})["v"] == 4  # unreadable there: computed here
    other_settings = bx.ResultStore(tmp_path / "runs" / "y" / "quality", {"seed": 1}, reuse=default.directory)
    assert other_settings.run("bh_k8_a005", lambda: {"v": 5}, key={"a": 1})["v"] == 5
    assert {path.name: path.read_bytes() for path in default.directory.iterdir()} == before
