"""The house's layout: one reader per flat file, arrows pointing down only, a narrow public surface, and no
benchmark history in the code (it belongs to benchmarks/gpu_notes.md)."""

import ast
import json
import re
from pathlib import Path

import pytest

import bh_allocation
import bh_downstream
import bh_experiment
import bh_report
import bh_routing
import fused_bh_route
import moe_families
import routing_statistics
import variable_k_experts

REPO = Path(__file__).resolve().parent.parent
MODULES = {
    module.__name__: module
    for module in (
        variable_k_experts,
        fused_bh_route,
        moe_families,
        routing_statistics,
        bh_routing,
        bh_experiment,
        bh_allocation,
        bh_downstream,
        bh_report,
    )  # fmt: skip
}
# What each module may import of the project: every arrow points down, none back up, no circle.
ALLOWED = {
    "variable_k_experts": set(),
    "fused_bh_route": set(),
    "moe_families": {"variable_k_experts"},
    "routing_statistics": set(),
    "bh_routing": {"moe_families", "variable_k_experts", "fused_bh_route", "routing_statistics"},
    "bh_experiment": {"bh_routing", "moe_families", "variable_k_experts"},
    "bh_allocation": {"bh_experiment", "bh_routing"},
    "bh_downstream": {"bh_experiment", "bh_routing"},
    "bh_report": {"bh_experiment"},
}
MAX_LINES = {"bh_routing": 3000, "fused_bh_route": 1000, "moe_families": 1000, "variable_k_experts": 2000,
             "routing_statistics": 1000,
             "bh_experiment": 2000, "bh_allocation": 2000, "bh_downstream": 2000, "bh_report": 2000}  # fmt: skip


def imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of its code (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_imports_only_the_modules_below_it(name):
    project = imported(REPO / f"{name}.py") & set(MODULES)
    assert project <= ALLOWED[name], f"{name} imports {project - ALLOWED[name]}"


def test_the_routing_module_needs_no_experiment_library():
    assert not imported(REPO / "moe_families.py") & {"pandas", "matplotlib", "scipy", "numpy"}
    assert not imported(REPO / "bh_routing.py") & {"pandas", "matplotlib", "seaborn", "lm_eval", "scipy", "numpy"}
    assert not imported(REPO / "variable_k_experts.py") & (set(MODULES) | {"pandas", "matplotlib"})


def test_every_module_a_result_is_computed_with_is_fingerprinted():
    """The harness, the allocations it fits, and every project module they import, however deep (a kernel
    change changes a GPU run's results as a routing change does): what a saved result's code hash covers."""
    computed_with, unread = set(), ["bh_experiment", "bh_allocation"]
    while unread:
        module = unread.pop()
        computed_with.add(module)
        unread += sorted(imported(REPO / f"{module}.py") & set(MODULES) - computed_with)
    assert {"routing_statistics", "fused_bh_route", "variable_k_experts"} <= computed_with
    assert {f"{module}.py" for module in computed_with} <= set(bh_experiment.FINGERPRINTED_SOURCES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_stays_under_its_size(name):
    lines = (REPO / f"{name}.py").read_text().count("\n")
    assert lines < MAX_LINES[name], f"{name}.py has {lines} lines"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_opens_with_a_map_of_what_it_holds(name):
    doc = MODULES[name].__doc__
    assert doc and re.search(r"^1\. ", doc, re.M) and re.search(r"^2\. ", doc, re.M), f"{name} has no numbered map"


def code_sources():
    """(name, source) of every Python file of the repository and of the notebook's code."""
    for folder in (REPO, REPO / "scripts", REPO / "benchmarks", REPO / "tests"):
        for path in sorted(folder.glob("*.py")):
            yield str(path.relative_to(REPO)), path.read_text()
    notebook = json.loads((REPO / "OLMoE_BH_Routing_Experiments.ipynb").read_text())
    yield "notebook", "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")


def module_aliases(tree) -> dict[str, str]:
    """{local name: project module} for `import module [as alias]` of the project's modules."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    aliases[alias.asname or alias.name] = alias.name
    return aliases


def project_uses(source: str) -> set[tuple[str, str]]:
    """(module, name) of every project name `source` reads: module.name attributes and `from module import name`."""
    tree = ast.parse(source)
    aliases, uses = module_aliases(tree), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            uses.add((aliases[node.value.id], node.attr))
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
            uses |= {(node.module, alias.name) for alias in node.names}
    return uses


@pytest.mark.parametrize("name, source", list(code_sources()), ids=lambda value: value if len(value) < 60 else "")
def test_nothing_private_crosses_files(name, source):
    own = Path(name).stem
    private = {(m, n) for m, n in project_uses(source) if n.startswith("_") and not n.startswith("__") and m != own}
    assert not private, f"{name} reads private names of other files: {sorted(private)}"


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_what_readers_use_is_in_each_modules_all():
    """The README's examples, the notebook and the scripts use only what a module lists in `__all__`."""
    sources = readme_blocks() + [
        source for name, source in code_sources() if name == "notebook" or name.startswith("scripts")
    ]
    missing = set()
    for source in sources:
        missing |= {(m, n) for m, n in project_uses(source) if n not in MODULES[m].__all__}
    assert not missing, f"used by readers but not in __all__: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_name_in_all_exists(name):
    module = MODULES[name]
    assert all(hasattr(module, item) for item in module.__all__)
    assert len(module.__all__) == len(set(module.__all__))


# "run 49", "on an H100", "(torch 2.13, ...)": a measurement or an observation tied to a run or a version.
HISTORY = re.compile(r"\bruns? \d+\b|\bon an? H[12]00\b|\(torch \d+\.\d+")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_benchmark_history_in_the_code(name):
    """Measurements and the versions they were taken with go to benchmarks/gpu_notes.md, not into docstrings
    and comments that would go stale."""
    lines = (REPO / f"{name}.py").read_text().splitlines()
    found = [f"{number}: {line.strip()}" for number, line in enumerate(lines, 1) if HISTORY.search(line)]
    assert not found, "\n".join(found)
