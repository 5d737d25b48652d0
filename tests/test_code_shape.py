"""The code's shape rules: no function or method over 60 lines (docstring excluded), in the module, the
notebook's code, the scripts and the benchmarks."""

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 60


def python_sources():
    for path in sorted(REPO.glob("*.py")):
        yield path.name, path.read_text()
    for folder in ("scripts", "benchmarks", "tests"):
        for path in sorted((REPO / folder).glob("*.py")):
            yield str(path.relative_to(REPO)), path.read_text()
    notebook = json.loads((REPO / "OLMoE_BH_Routing_Experiments.ipynb").read_text())
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    yield "OLMoE_BH_Routing_Experiments.ipynb", "\n\n".join(cells)


def body_lines(function: ast.FunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = function.body
    if (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:] or body
    return function.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("name, source", list(python_sources()), ids=lambda value: value if len(value) < 80 else "")
def test_no_function_is_longer_than_60_lines(name, source):
    functions = [
        node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    too_long = {f"{f.name} (line {f.lineno})": body_lines(f) for f in functions if body_lines(f) > MAX_LINES}
    assert not too_long, f"{name}: functions over {MAX_LINES} lines: {too_long}"


def test_the_checker_sees_a_long_function():
    source = "def f():\n    '''doc'''\n" + "    x = 1\n" * 61
    assert body_lines(ast.parse(source).body[0]) == 61
