"""The statistics behind the report's comparisons: the block bootstrap over adjacent windows, the strongest
baseline, corrections for a family of comparisons, intervals for prompt groups, and the repetition of text."""

import math

import numpy as np
import pytest

import bh_allocation  # noqa: F401 - registers the static schedule, the frontier's third baseline
import bh_experiment as bx


def ar1_windows(phi: float, windows: int, rng) -> np.ndarray:
    """Per-window differences 1 + e_w, e an AR(1) process of coefficient phi and unit innovations."""
    noise = np.zeros(windows)
    noise[0] = rng.normal() / math.sqrt(1 - phi**2)
    for w in range(1, windows):
        noise[w] = phi * noise[w - 1] + rng.normal()
    return 1.0 + noise


def coverage(phi: float, choose_block, windows: int = 64, simulations: int = 300) -> float:
    """How often the bootstrap interval of the mean difference (`bx.bootstrap_interval`) covers the true value 1."""
    rng, covered = np.random.default_rng(7), 0
    for seed in range(simulations):
        differences = ar1_windows(phi, windows, rng)
        block = choose_block(differences)
        means = bx.bootstrap_window_weights(windows, 400, seed, block) @ differences / windows
        interval = bx.bootstrap_interval(means[:1], means[1:, None], math.ceil(windows / block))
        covered += interval["low"][0] <= 1.0 <= interval["high"][0]
    return covered / simulations


def test_the_block_bootstrap_covers_where_the_window_bootstrap_falls_short():
    """Adjacent windows alike (AR(1), 0.5 at lag 1, 64 windows as the evaluation slice has): resampling single
    windows under-covers a known difference (about 0.73), Politis & White's block length alone too (about
    0.87); the block length the intervals use comes near the nominal 95% (about 0.93 in 300 simulations, standard
    error 0.015). Independent windows: near nominal either way."""
    windows_alone = coverage(0.5, lambda d: 1)
    in_blocks = coverage(0.5, bx.block_length)
    assert windows_alone < 0.80 and coverage(0.5, bx.politis_white_block) < 0.90 and in_blocks >= 0.90
    assert coverage(0.0, bx.block_length) >= 0.92 and coverage(0.0, lambda d: 1) >= 0.92


def test_the_block_length_grows_with_the_dependence_of_adjacent_windows():
    rng = np.random.default_rng(3)
    rule = {
        phi: np.median([bx.politis_white_block(ar1_windows(phi, 64, rng)) for _ in range(40)]) for phi in (0, 0.4, 0.8)
    }
    assert rule[0] <= 2 and rule[0] < rule[0.4] < rule[0.8] <= 16
    assert bx.block_length(np.ones(64)) == 1 and bx.politis_white_block(np.ones(64)) == 1  # nothing to keep together
    assert bx.block_length(ar1_windows(0.0, 64, np.random.default_rng(1))) == 1  # independent: single windows
    dependent = ar1_windows(0.8, 64, np.random.default_rng(1))
    assert bx.block_length(dependent) == max(8, bx.politis_white_block(dependent)) and bx.block_length(dependent) <= 16


def test_circular_blocks_draw_every_window_equally_often():
    weights = bx.bootstrap_window_weights(10, 4000, seed=1, block=3)
    assert (weights[0] == 1).all() and (weights.sum(1) == 10).all()
    assert np.allclose(weights[1:].mean(0), 1.0, atol=0.06)  # the ends too: the runs wrap around
    runs = bx.bootstrap_window_weights(10, 1, seed=2, block=5)[1]
    assert set(np.flatnonzero(runs)) <= set(range(10)) and runs.max() >= 1


def test_holm_and_benjamini_hochberg_count_what_survives_a_family():
    p = [0.001, 0.011, 0.02, 0.04, 0.2, math.nan]
    found = bx.family_significance(p)
    # Holm: 0.001 <= 0.05/5, 0.011 <= 0.05/4, 0.02 > 0.05/3 stops. BH: largest i with p_(i) <= 0.05 i/5 is 4.
    assert found == {"comparisons": 5, "holm": [True, True, False, False, False, False],
                     "bh": [True, True, True, True, False, False]}  # fmt: skip


def curve(name, method, experts, nll, params):
    tokens = [100.0] * 8
    return {"name": name, "method": method, "status": "ok", "params": params, "avg_experts": experts,
            "perplexity": math.exp(nll), "window_nll": [nll * 100] * 8, "window_tokens": tokens,
            "window_experts": [experts * 100] * 8}  # fmt: skip


def test_the_strongest_baseline_is_the_lowest_curve_at_each_average():
    quality = {f"topk_k{k}": curve(f"topk_k{k}", "topk", k, 4.0 - 0.5 * k, {"k": k}) for k in (1, 2, 3)}
    quality |= {f"topp_{e}": curve(f"topp_{e}", "topp", e, 3.6 - 0.5 * e, {"p": e / 4}) for e in (1, 3)}
    quality |= {f"schedule_{e}": curve(f"schedule_{e}", "schedule", e, 3.2 - 0.3 * e, {"budget": e}) for e in (1, 3)}
    quality["bh"] = curve("bh", "bh", 2.0, 2.5, {"alpha": 0.05, "pvalue_method": "robust_z"})
    row = bx.frontier_table(quality, resamples=50).set_index("config").loc["bh"]
    at_two = {"topk": 3.0, "topp": 2.6, "schedule": 2.6}  # each curve's log-perplexity at 2 experts
    for key, nll in at_two.items():
        assert row[f"delta_vs_{key}_percent"] == pytest.approx(100 * math.expm1(2.5 - nll))
    assert row["delta_vs_strongest_percent"] == pytest.approx(100 * math.expm1(2.5 - 2.6))
    assert row["strongest_perplexity_at_equal_experts"] == pytest.approx(math.exp(2.6))


def test_prompt_groups_get_an_interval_from_their_prompts():
    def prompt(group, counts):
        return {"group": group, "token_counts": [[c, c] for c in counts]}

    results = {"bh": {"status": "ok", "prompts": [prompt("simple", [1, 1]), prompt("simple", [3, 3]),
                                                  prompt("simple", [2, 2]), prompt("medium", [5])]}}  # fmt: skip
    table = bx.group_intervals(results, resamples=500).set_index("group")
    assert table.loc["simple", "avg_experts"] == pytest.approx(2.0) and table.loc["simple", "prompts"] == 3
    low, high = table.loc["simple", "low"], table.loc["simple", "high"]
    assert low < 1.0 and high > 3.0 and low + high == pytest.approx(4.0)  # three prompts: wider than their range
    assert math.isnan(table.loc["medium", "low"])  # one prompt: no interval


def test_repetition_measures_find_degenerate_text():
    assert bx.repetition([5, 5, 5, 5, 7]) == {"repeated_ngram_share": 1 / 3, "repeat_previous_share": 0.75,
                                              "longest_repeat_run": 4}  # fmt: skip
    assert bx.repetition([1, 2, 3, 4]) == {"repeated_ngram_share": 0.0, "repeat_previous_share": 0.0,
                                           "longest_repeat_run": 1}  # fmt: skip
    measures = bx.generation_measures([{"token_counts": [[2, 2], [4, 4], [1, 1]], "prompt_tokens": 2,
                                        "generated_ids": [9, 9, 9]}])  # fmt: skip
    assert measures["avg_experts_prompt_tokens"] == 3.0 and measures["avg_experts_generated_tokens"] == 1.0
    assert measures["repeat_previous_share"] == 1.0
