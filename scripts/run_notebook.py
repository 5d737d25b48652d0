"""`make run`: execute the notebook headless with papermill, without ever replacing a good executed notebook
by a failed or different run's.

    python scripts/run_notebook.py [papermill arguments, e.g. -p max_new_tokens 10 -y "config_names: [a, b]"]

The default run (no arguments) writes results/ and results/OLMoE_BH_Routing_Experiments.executed.ipynb.
A run with other parameters and no output_dir of its own writes to results/runs/<hash of its arguments>/,
so that it neither mixes with nor replaces the committed default run's results (the same arguments resume
in the same directory). The executed notebook is written under a temporary name and renamed only when every
cell succeeded; a failed run leaves <output_dir>/OLMoE_BH_Routing_Experiments.failed.ipynb and exits 1. What
the notebook prints (its progress: each configuration done, of how many, in how long) streams to stdout.
"""

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "OLMoE_BH_Routing_Experiments.ipynb"
DEFAULT_OUTPUT_DIR = "results"


def given_output_dir(arguments: list[str]) -> str | None:
    """The output_dir the papermill arguments set, with papermill's precedence (base64 YAML -b, then a
    parameters file -f, then YAML -y, then -p, then -r, each overriding the ones before; the last of each
    kind wins)."""
    found = {}
    for index, argument in enumerate(arguments):
        value = arguments[index + 1] if index + 1 < len(arguments) else None
        if argument in ("-f", "--parameters_file"):
            found["f"] = (yaml.safe_load(Path(value).read_text()) or {}).get("output_dir", found.get("f"))
        elif argument in ("-y", "--parameters_yaml"):
            found["y"] = (yaml.safe_load(value) or {}).get("output_dir", found.get("y"))
        elif argument in ("-b", "--parameters_base64"):
            found["b"] = (yaml.safe_load(base64.b64decode(value)) or {}).get("output_dir", found.get("b"))
        elif argument in ("-p", "--parameters") and value == "output_dir":
            found["p"] = arguments[index + 2]
        elif argument in ("-r", "--parameters_raw") and value == "output_dir":
            found["r"] = arguments[index + 2]
    return next((found[kind] for kind in "rpyfb" if found.get(kind) is not None), None)


def plan(arguments: list[str]) -> tuple[Path, list[str]]:
    """(output directory, papermill arguments with it set) for the given papermill arguments."""
    output_dir = given_output_dir(arguments)
    if output_dir is None:
        digest = hashlib.sha256("\0".join(arguments).encode()).hexdigest()[:10]
        output_dir = DEFAULT_OUTPUT_DIR if not arguments else f"{DEFAULT_OUTPUT_DIR}/runs/{digest}"
        arguments = [*arguments, "-p", "output_dir", output_dir]
    return REPO / output_dir, arguments


def shown(path: Path) -> str:
    """`path` relative to the repository if it is inside it, else as given."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def main(arguments: list[str]) -> int:
    output_dir, arguments = plan(arguments)
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = output_dir / f"{NOTEBOOK.stem}.executed.ipynb"
    running = output_dir / f"{NOTEBOOK.stem}.running.ipynb"
    # Paths relative to the repository where they are inside it: papermill writes them into the notebook's
    # metadata, which should not carry this machine's directories.
    command = [sys.executable, "-m", "papermill", NOTEBOOK.name, shown(running), "-k", "python3"]
    print(f"output_dir: {output_dir}", flush=True)
    # The notebook's printed lines (each configuration done, of how many, in how long) as they come: "-" is
    # papermill's own stdout; its log stays at warnings.
    logged = ["--log-level", "WARNING", "--stdout-file", "-", "--no-progress-bar"]
    status = subprocess.run([*command, *logged, *arguments], cwd=REPO).returncode
    if status != 0:
        failed = running.with_name(f"{NOTEBOOK.stem}.failed.ipynb")
        if running.exists():
            running.replace(failed)
        print(f"the run failed: its notebook is {failed}; {executed.name} was left as it was", file=sys.stderr)
        return 1
    notebook = json.loads(running.read_text())
    notebook["metadata"].get("papermill", {})["output_path"] = shown(executed)  # its name once renamed
    running.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    running.replace(executed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
