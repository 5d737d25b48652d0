"""Set this repository's GitHub address where it must be written before any clone exists: the README's
Colab badge, and the notebook's badge and REPO_URL (its Colab set-up cell clones from it).

    python scripts/set_repository.py OWNER/NAME
"""

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
NOTEBOOK = REPO / "OLMoE_BH_Routing_Experiments.ipynb"
BADGE = re.compile(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/")
CLONE = re.compile(r'REPO_URL = "https://github\.com/([^"\s]+/[^"\s]+)\.git"')
REPOSITORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+")


def addresses(readme: Path = README, notebook: Path = NOTEBOOK) -> dict[str, list[str]]:
    """OWNER/NAME as each place writes it: {"README badge": [...], "notebook badge": [...], "REPO_URL": [...]}."""
    cells = "\n".join("".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"])
    return {
        "README badge": BADGE.findall(readme.read_text()),
        "notebook badge": BADGE.findall(cells),
        "REPO_URL": CLONE.findall(cells),
    }


def set_repository(repository: str, readme: Path = README, notebook: Path = NOTEBOOK) -> None:
    if not REPOSITORY.fullmatch(repository):
        raise ValueError(f"repository must be OWNER/NAME as on GitHub, got {repository!r}")
    badge = f"colab.research.google.com/github/{repository}/blob/"
    readme.write_text(BADGE.sub(badge, readme.read_text()))
    document = json.loads(notebook.read_text())
    for cell in document["cells"]:
        source = BADGE.sub(badge, "".join(cell["source"]))
        source = CLONE.sub(f'REPO_URL = "https://github.com/{repository}.git"', source)
        lines = source.split("\n")
        cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    notebook.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    set_repository(sys.argv[1])
    print(addresses())
