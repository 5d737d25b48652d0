"""Every code example of the README and of the modules' docstrings runs as written (issue 30).

README blocks run in order in one namespace, as a reader copies them. A docstring example (an indented block
of a module's, class's or function's docstring that starts with code) runs alone after a prelude that gives
it what its prose assumes a reader has: `model` and `tokenizer` (the embedded model), `ids` (a prompt's
ids), `calibration_ids` and `calibration` (held-out text after the evaluated slice, and the calibration
fitted on it), and `output_dir` (a fresh directory)."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Every flat module but fused_bh_route.py, whose example states a call's signature: its kernel runs on CUDA, or on
# the CPU only under Triton's interpreter (tests/test_fused_route.py runs it there).
MODULES = ["bh_routing.py", "routing_statistics.py", "moe_families.py", "variable_k_experts.py", "bh_experiment.py",
           "bh_allocation.py", "bh_downstream.py", "bh_report.py"]  # fmt: skip
CODE = re.compile(r"^(from |import |\w+(\.\w+)* \|?= |\w+(\.\w+)*\(|print\(|with |for )")

PRELUDE = """
import bh_experiment as bx
from bh_routing import fit_routing_calibration
model, tokenizer = bx.load_model("embedded")
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
text_ids = tokenizer(bx.load_heldout_text("embedded"), return_tensors="pt").input_ids[0]
calibration_ids = text_ids[16384:17408]
calibration = fit_routing_calibration(bx.collect_router_logits(model, calibration_ids))
"""


def docstring_examples() -> list[tuple[str, str]]:
    """(where, code) of every example in the modules' docstrings."""
    examples = []
    for module in MODULES:
        tree = ast.parse((REPO / module).read_text())
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for node in nodes:
            for block in re.findall(r"\n\n((?:    .*\n?)+)", ast.get_docstring(node, clean=True) or ""):
                code = "\n".join(line[4:] for line in block.rstrip().splitlines())
                if CODE.match(code):
                    examples.append((f"{module}:{getattr(node, 'name', 'module')}", code))
    return examples


def test_the_modules_have_examples_to_run():
    assert len(docstring_examples()) >= 7


@pytest.mark.parametrize(("where", "code"), docstring_examples(), ids=[w for w, _ in docstring_examples()])
def test_every_docstring_example_runs_as_written(tmp_path, monkeypatch, where, code):
    if "bh_downstream" in where:
        pytest.importorskip("lm_eval", reason="make test installs requirements-eval.txt")
    monkeypatch.chdir(REPO)
    namespace = {"output_dir": str(tmp_path)}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)  # noqa: S102 - our own documentation
    exec(compile(code, where, "exec"), namespace)  # noqa: S102


def _usage_ran(namespace) -> bool:
    return namespace["counts"].shape == (2, 10) and not namespace["patcher"].is_patched


def _calibrated_ran(namespace) -> bool:
    stats, calibration = namespace["patcher"].get_stats(), namespace["calibration"]
    return (stats["params"]["pvalue_method"] == "empirical" and stats["avg_experts"] >= 1
            and calibration.num_layers == namespace["model"].config.num_hidden_layers)  # fmt: skip


def _allocated_ran(namespace) -> bool:
    calibration = namespace["calibration"]
    return (set(calibration.allocations) == {"schedule", "allocl", "lexi"} and not namespace["patcher"].is_patched
            and sum(calibration.allocation("schedule", 2.0)) == 2.0 * calibration.num_layers)  # fmt: skip


# What the README's examples leave behind, checked after the block that holds each marker.
README_CHECKS = {"MoERouterPatcher(model)": _usage_ran, "fit_routing_calibration(": _calibrated_ran,
                 "fit_allocations(": _allocated_ran}  # fmt: skip


@pytest.mark.parametrize("document", ["README.md", "docs/usage.md"])
def test_every_block_of_the_readme_and_the_usage_guide_runs_in_order(monkeypatch, document):
    monkeypatch.chdir(REPO)
    namespace, checked = {}, set()
    blocks = re.findall(r"```python\n(.*?)```", (REPO / document).read_text(), flags=re.S)
    for number, block in enumerate(blocks):
        exec(compile(block, f"{document} block {number}", "exec"), namespace)  # noqa: S102
        for marker, ran in README_CHECKS.items() if document == "README.md" else ():
            if marker in block:
                assert ran(namespace), f"{document} block {number} ({marker}) did not leave what it says"
                checked.add(marker)
    assert blocks and checked == (set(README_CHECKS) if document == "README.md" else set())
