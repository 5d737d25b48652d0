"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = next(b for b in blocks if "MoERouterPatcher" in b)
    namespace = {}
    exec(compile(usage, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert not namespace["patcher"].is_patched
    assert namespace["counts"].shape == (2, 10)


def test_readme_calibrated_methods_example_runs_after_the_usage_example():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = next(b for b in blocks if "MoERouterPatcher" in b)
    calibrated = next(b for b in blocks if "fit_routing_calibration" in b)
    namespace = {}
    exec(compile(usage, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    exec(compile(calibrated, "README.md", "exec"), namespace)  # noqa: S102
    stats = namespace["patcher"].get_stats()
    assert stats["params"]["pvalue_method"] == "empirical" and stats["avg_experts"] >= 1
    assert namespace["calibration"].num_layers == namespace["model"].config.num_hidden_layers


def test_readme_allocation_example_runs_after_the_calibrated_one():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = next(b for b in blocks if "MoERouterPatcher" in b)
    calibrated = next(b for b in blocks if "fit_routing_calibration" in b)
    allocated = next(b for b in blocks if "fit_allocations" in b)
    namespace = {}
    for block in (usage, calibrated, allocated):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    calibration, patcher = namespace["calibration"], namespace["patcher"]
    assert set(calibration.allocations) == {"schedule", "allocl", "lexi"} and not patcher.is_patched
    assert sum(calibration.allocation("schedule", 2.0)) == 2.0 * calibration.num_layers
