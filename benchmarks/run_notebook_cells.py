"""Run the notebook's code cells in order, in one namespace, without Jupyter (for a GPU machine that has
torch, transformers, pandas and matplotlib but no papermill): parameters as name=JSON after the
parameters cell, as papermill injects them.

    python benchmarks/run_notebook_cells.py output_dir='"/tmp/out"' prompts_per_group=1
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    overrides = {}
    for argument in sys.argv[1:]:
        name, _, value = argument.partition("=")
        overrides[name] = json.loads(value)
    notebook = json.loads((REPO / "OLMoE_BH_Routing_Experiments.ipynb").read_text())
    namespace = {"__name__": "__main__", "display": print}  # display: an IPython builtin
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        started = time.time()
        print(f"--- cell {index}", flush=True)
        try:
            exec(compile(source, f"cell {index}", "exec"), namespace)  # noqa: S102 - the repository's own notebook
        except ModuleNotFoundError as error:
            if error.name != "IPython":  # only the last cell's Markdown display needs IPython
                raise
            print(f"(skipped the rest of cell {index}: no IPython)")
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            namespace.update(overrides)
        print(f"--- cell {index} done in {time.time() - started:.1f} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
