"""Run the notebook's code cells in order, in one namespace, without Jupyter (for a GPU machine that has
torch, transformers, pandas and matplotlib but no papermill, and for tests that run the notebook in their
own process): parameters as name=JSON after the parameters cell, as papermill injects them.

    python scripts/run_notebook_cells.py output_dir='"/tmp/out"' prompts_per_group=1
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "OLMoE_BH_Routing_Experiments.ipynb"


def run_cells(overrides: dict, log=print, until: str | None = None) -> dict:
    """Execute every code cell with `overrides` applied after the parameters cell; returns the namespace.
    Only the last cell's Markdown display may be skipped (when IPython is missing). until: stop after the
    first code cell whose source contains this text (None: run every cell)."""
    notebook = json.loads(NOTEBOOK.read_text())
    namespace = {"__name__": "__main__", "display": print}  # display: an IPython builtin
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        started = time.time()
        log(f"--- cell {index}")
        try:
            exec(compile("".join(cell["source"]), f"cell {index}", "exec"), namespace)  # noqa: S102 - our notebook
        except ModuleNotFoundError as error:
            if error.name != "IPython":
                raise
            log(f"(skipped the rest of cell {index}: no IPython)")
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            namespace.update(overrides)
        if "plt" in namespace:  # as Jupyter's inline backend does after each cell: no figure stays open
            namespace["plt"].close("all")
        log(f"--- cell {index} done in {time.time() - started:.1f} s")
        if until is not None and until in "".join(cell["source"]):
            break
    return namespace


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    arguments = dict(argument.partition("=")[::2] for argument in sys.argv[1:])
    run_cells({name: json.loads(value) for name, value in arguments.items()}, log=lambda line: print(line, flush=True))
