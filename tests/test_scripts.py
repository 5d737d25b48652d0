"""The scripts around the notebook: where `make run` writes, and the repository address in every place."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import run_notebook  # noqa: E402
import set_repository  # noqa: E402


def test_only_the_default_run_writes_to_results():
    assert run_notebook.plan([]) == (REPO / "results", ["-p", "output_dir", "results"])
    output_dir, arguments = run_notebook.plan(["-p", "max_new_tokens", "3"])
    assert output_dir.parent == REPO / "results" / "runs" and arguments[:3] == ["-p", "max_new_tokens", "3"]
    assert arguments[3:] == ["-p", "output_dir", f"results/runs/{output_dir.name}"]
    assert run_notebook.plan(["-p", "max_new_tokens", "3"])[0] == output_dir  # the same arguments resume there
    assert run_notebook.plan(["-p", "max_new_tokens", "4"])[0] != output_dir
    assert run_notebook.plan(["-y", "output_dir: /tmp/mine\nseed: 1"])[0] == Path("/tmp/mine")
    assert run_notebook.given_output_dir(["-p", "output_dir", "/tmp/p", "-y", "output_dir: /tmp/y"]) == "/tmp/p"
    assert run_notebook.given_output_dir(["-y", "output_dir: /tmp/y", "-b", "b3V0cHV0X2RpcjogL3RtcC9i"]) == "/tmp/y"
    assert run_notebook.given_output_dir(["-b", "b3V0cHV0X2RpcjogL3RtcC9i"]) == "/tmp/b"  # output_dir: /tmp/b
    assert run_notebook.plan(["-p", "output_dir", "/tmp/a", "-p", "seed", "1"]) == (
        Path("/tmp/a"),
        ["-p", "output_dir", "/tmp/a", "-p", "seed", "1"],
    )


def test_the_repository_address_is_written_alike_in_every_place(tmp_path):
    found = set_repository.addresses()
    assert set(found) == {"README badge", "notebook badge", "REPO_URL"}
    assert all(len(written) == 1 for written in found.values())
    assert len({written[0] for written in found.values()}) == 1  # the README and the notebook agree
    readme, notebook = tmp_path / "README.md", tmp_path / "notebook.ipynb"
    shutil.copy(set_repository.README, readme)
    shutil.copy(set_repository.NOTEBOOK, notebook)
    set_repository.set_repository("someone/bh-routing", readme, notebook)
    assert all(written == ["someone/bh-routing"] for written in set_repository.addresses(readme, notebook).values())
    with pytest.raises(ValueError, match="OWNER/NAME"):
        set_repository.set_repository("https://github.com/someone/bh-routing", readme, notebook)


@pytest.mark.parametrize("index", [None, "https://download.pytorch.org/whl/cpu"])
def test_the_makefile_installs_torch_from_the_index_given(index):
    """The README's way to the CPU build of torch on Linux (PyPI's is the CUDA one): make's own dry run."""
    extra = [f"TORCH_INDEX_URL={index}"] if index else []
    dry = subprocess.run(["make", "-n", "-B", ".venv/.installed", *extra], cwd=REPO, capture_output=True, text=True)
    [install] = [line for line in dry.stdout.splitlines() if "pip install" in line and "torch" in line]
    assert '"torch==2.13.0"' in install
    assert (f"--index-url {index}" in install) if index else ("--index-url" not in install)


def test_the_t4_estimate_scales_a_measured_run_by_its_stated_assumptions():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import t4_estimate

    config = json.loads(t4_estimate.REAL_SHAPE.read_text())
    active = t4_estimate.active_parameters(config)
    assert 1.2e9 < active < 1.4e9  # OLMoE-1B-7B: 1.3B active parameters (its paper)
    probe = {"path": "dynamic", "tokens_per_second": 30.0, "first_call_seconds": 4.0}
    work = {
        "configurations": 29,
        "generated_tokens": 15_000,
        "evaluated_tokens": 10**6,
        "evaluate_tokens_per_second": 1e4,
    }
    record = {"hardware": "NVIDIA H100 80GB HBM3", "estimated_work": work, "generation_probes": [probe]}
    minutes = t4_estimate.t4_minutes(record, config)
    arithmetic = 10**6 * 2 * active / 65e12  # the T4's seconds at its whole fp16 tensor peak
    low = max(100, arithmetic / t4_estimate.TENSOR_EFFICIENCY)
    high = 100 * t4_estimate.HOST_SLOWDOWN + arithmetic / t4_estimate.TENSOR_EFFICIENCY_LOW
    assert minutes["evaluation"] == pytest.approx((low / 60, high / 60))
    weights = active * 2 / 320e9  # the active weights read once from the T4's memory, float16
    sweep = (29 * 4.0 + 15_000 / 30.0, 29 * 4.0 + 15_000 * (2.0 / 30.0 + weights))  # 33 ms of host > 8 ms of weights
    assert minutes["sweep"] == pytest.approx(tuple(s / 60 for s in sweep))
    assert minutes["total"][0] < minutes["total"][1]
    finished = record | {"runtime_minutes": {"estimated_total": 10.0, "elapsed": 15.0}}  # took 1.5x its estimate
    assert t4_estimate.host_factor(finished) == 1.5 and t4_estimate.host_factor(record) == 1.0
    slower = t4_estimate.t4_minutes(finished, config)  # the measured host times 1.5x, the T4's own work not
    assert slower["evaluation"] == pytest.approx((max(150, low) / 60, (high + 50 * t4_estimate.HOST_SLOWDOWN) / 60))
    assert slower["sweep"][1] == pytest.approx((1.5 * 29 * 4.0 + 15_000 * (3.0 / 30.0 + weights)) / 60)
    assert t4_estimate.t4_minutes(finished, config, factor=1.0) == minutes
    with pytest.raises(ValueError, match=r"the measured card must be one of \['H100', 'H200', 'T4'\]"):
        t4_estimate.t4_minutes(record | {"hardware": "x86_64 CPU, 2 threads"}, config)


def test_the_t4_estimate_refuses_a_host_factor_from_a_run_that_did_not_finish(tmp_path):
    record = tmp_path / "gpu_estimate.json"
    record.write_text(json.dumps({"hardware": "NVIDIA H100 80GB HBM3", "estimate_minutes": {"total": 16.0}}))
    script = REPO / "benchmarks" / "t4_estimate.py"
    command = [sys.executable, str(script), str(record), "--host-factor-from", str(record)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--host-factor-from must be a finished run's gpu_run.json (runtime_minutes with elapsed)" in result.stderr


def test_the_notebook_cells_run_up_to_a_given_cell_and_no_further(tmp_path, monkeypatch):
    from run_notebook_cells import run_cells

    monkeypatch.chdir(REPO)
    parameters = {"output_dir": str(tmp_path), "device": "cpu", "run_quality": False, "prompts_per_group": 1,
                  "max_new_tokens": 2, "timing_repeats": 1}  # fmt: skip
    namespace = run_cells(parameters, log=lambda line: None, until="bx.estimate_runtime(")
    assert namespace["estimate"]["sweep"] > 0 and namespace["estimate"]["evaluation"] == 0.0  # nothing evaluated
    assert "results" not in namespace and not (tmp_path / "configs").exists()  # the sweep never started
