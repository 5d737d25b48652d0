"""Benjamini-Hochberg adaptive expert routing for OLMoE (and any transformers OLMoE-layout MoE).

The routing science and its integration with transformers, readable top to bottom. The experiment
(prompts, the 25 configurations, the sweep, tables, figures and the report) lives in the notebook
`OLMoE_BH_Routing_Experiments.ipynb`, which imports this module.

1. Argument checks shared by every routing method.
2. The Benjamini-Hochberg step-up procedure: `bh_reject` (the procedure as stated), and the sort-free
   fast count `fast_bh_count` used on the hot path (tested equal to it).
3. Per-expert p-values from router logits: the design's `one_minus_prob`, the default `robust_z` (a
   per-token Gaussian bulk null, calibrated by simulation of its pivotal statistic), and (3b) the nulls
   fitted to each layer on calibration text (`fit_routing_calibration`: "empirical", "pooled", with the
   tables of dynamic skipping and entropy-adaptive k).
4. Routing methods, one object per method in a registry (`ROUTING_METHODS`: BH, Higher Criticism, dynamic
   skipping, entropy-adaptive k, top-k, top-p, top-k at a per-layer budget and the model's own routing):
   parameters, how it routes, how a configuration of it is named (`RoutingConfig`); `route_logits`.
5. Routing functions with one return contract: `benjamini_hochberg_routing`, `topk_routing`,
   `topp_routing`, and the design's `run_bh_multi_k` / `compare_multi_k_statistics`.
6. Statistics: `summarize_expert_counts`, `RoutingStatistics` (the patcher's device accumulators),
   `saturation_analysis`, `frontier_table` and `best_at_budget` (quality at equal compute, with paired
   bootstrap intervals over windows), `layer_matched_table`, the calibration diagnostics
   (`null_rejection_rates`, `bulk_shape`, `null_pvalue_quantiles`), `token_level_analysis`.
7. Models: `load_model` (hub id, local path, or the embedded default), `build_random_olmoe`,
   `environment_info`.
8. Variable-k experts (`variable_k_experts_forward`, experts_implementation="variable_k"): only the
   kept (token, expert) pairs are computed, so fewer experts take less time on a GPU.
9. `MoERouterPatcher` (alias `OLMoERouterPatcher`): swaps the top-k router of any transformers MoE family
   (`find_moe_layers`, `RouterSpec`) for any registered method, so that the experts module computes only the
   selected pairs, and records routing statistics (routed and shared experts apart).
10. Evaluation: `load_heldout_text`, `sliding_windows`, `evaluate_language_model`, `collect_router_logits`,
    the oracle check (`oracle_drop_effects`, `oracle_table`), `generate_timed` on a generation path
    (`GENERATION_PATHS`, `fastest_generation_path`, `generation_settings`).
11. Results on disk: `atomic_write`, `ResultStore` (one file per configuration, resumable, failures recorded).
12. Downstream accuracy through lm-evaluation-harness (optional dependency, requirements-eval.txt):
    `evaluate_downstream` runs routing configurations on lm-eval tasks (the offline `OFFLINE_TASKS` built
    from the held-out text, or any named task), with routing statistics over real tokens only;
    `downstream_table`, `plot_downstream`, `downstream_markdown`, `paired_difference`.

Shapes use E for the number of experts (64 for OLMoE), K for a method's slot width (max_k, or k for top-k),
L for the number of MoE layers, and "..." for leading token dimensions ([tokens] inside the model,
[batch, seq_len] for users).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import inspect
import json
import math
import pickle
import random
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "PVALUE_METHODS",
    "DEFAULT_PVALUE_METHOD",
    "HUB_MODEL_ID",
    "EMBEDDED_MODEL_DIR",
    "bh_reject",
    "bh_num_rejections",
    "fast_bh_count",
    "fast_bh_count_robust_z_cpu",
    "compute_p_values",
    "robust_z_statistic",
    "robust_z_null_table",
    "robust_z_critical_statistics",
    "robust_z_first_passing_rank",
    "Routing",
    "route_bh",
    "route_bh_tensors",
    "route_topk",
    "route_topp",
    "RouterShape",
    "RoutingMethod",
    "ROUTING_METHODS",
    "register_routing_method",
    "routing_method",
    "RoutingConfig",
    "BenjaminiHochbergMethod",
    "TopKMethod",
    "TopPMethod",
    "NativeMethod",
    "benjamini_hochberg_routing",
    "topk_routing",
    "topp_routing",
    "run_bh_multi_k",
    "compare_multi_k_statistics",
    "summarize_expert_counts",
    "expert_load_balance",
    "RoutingStatistics",
    "static_zeros",
    "LayerAccumulators",
    "accumulate_routing",
    "accumulate_layers",
    "flat_counts",
    "ring_write",
    "summarize_count_histogram",
    "saturation_analysis",
    "frontier_table",
    "FRONTIER_RESAMPLES",
    "window_sums",
    "bootstrap_window_weights",
    "BUDGETS",
    "best_at_budget",
    "paired_perplexity_difference",
    "layer_matched_table",
    "LayerBudgetMethod",
    "route_layer_budget",
    "count_correlation",
    "CALIBRATION_ALPHAS",
    "null_rejection_rates",
    "bulk_shape",
    "null_pvalue_quantiles",
    "CALIBRATED_PVALUE_METHODS",
    "NullTable",
    "robust_z_null",
    "permute_experts",
    "RoutingCalibration",
    "fit_routing_calibration",
    "ENTROPY_QUANTILES",
    "higher_criticism",
    "route_hc",
    "route_skip",
    "route_entropy",
    "router_entropy",
    "route_logits",
    "HigherCriticismMethod",
    "DynamicSkipMethod",
    "EntropyMethod",
    "collect_router_logits",
    "oracle_drop_effects",
    "oracle_table",
    "HELDOUT_SOURCES",
    "EMBEDDED_TEXTS",
    "token_level_analysis",
    "load_model",
    "load_config",
    "model_source",
    "native_dtype",
    "memory_plan",
    "GIB",
    "weights_gib",
    "LOSS_CHUNK_ELEMENTS",
    "PATCHER_ATTRIBUTE",
    "build_random_olmoe",
    "environment_info",
    "run_settings",
    "VARIABLE_K_EXPERTS",
    "variable_k_experts_forward",
    "variable_k_plan",
    "VariableKPlan",
    "variable_k_experts_torch",
    "variable_k_experts_triton",
    "variable_k_experts_decode",
    "DECODE_PAIRS",
    "sort_pairs_by_expert",
    "grouped_mm_usable",
    "grouped_matmul",
    "register_variable_k_experts",
    "OLMoERouterPatcher",
    "MoERouterPatcher",
    "PATCH_ATTRIBUTE",
    "PatchedRouter",
    "patched_router_class",
    "MoELayer",
    "RouterSpec",
    "describe_router",
    "find_moe_layers",
    "moe_shape",
    "build_random_moe",
    "CudaGraphed",
    "capture_cuda_graph",
    "compile_once",
    "grouped_mm_masks_sentinels",
    "load_heldout_text",
    "sliding_windows",
    "evaluate_language_model",
    "generate_timed",
    "synchronize",
    "GENERATION_PATHS",
    "fastest_generation_path",
    "generation_settings",
    "atomic_write",
    "ResultStore",
    "code_fingerprint",
    "function_fingerprint",
    "throughput_summary",
    "atomic_write_text",
    "note_failures",
    "save_figure",
    "OFFLINE_TASKS",
    "STANDARD_TASKS",
    "PRIMARY_METRICS",
    "DownstreamTaskError",
    "heldout_documents",
    "continuation_items",
    "offline_task_configs",
    "lm_eval_task_manager",
    "check_task_names",
    "check_limit",
    "check_lm_eval_tasks",
    "harness_padding_masked",
    "harness_model",
    "task_metrics",
    "primary_metric",
    "paired_difference",
    "evaluate_task",
    "evaluate_downstream",
    "downstream_table",
    "plot_downstream",
    "downstream_markdown",
    "downstream_header",
    "write_downstream_outputs",
]

PVALUE_METHODS = ("robust_z", "one_minus_prob", "empirical", "pooled")
CALIBRATED_PVALUE_METHODS = ("empirical", "pooled")  # their null is fitted per layer (`fit_routing_calibration`)
DEFAULT_PVALUE_METHOD = "robust_z"
HUB_MODEL_ID = "allenai/OLMoE-1B-7B-0924"  # the model the project studies; needs the hub and a GPU
REPO_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL_DIR = REPO_DIR / "models" / "tiny-olmoe"
HELDOUT_TEXT_PATH = REPO_DIR / "data" / "heldout.txt"
NATIVE_TOP_K = 8  # OLMoE-1B-7B routes every token to 8 experts: the default k of `topk_routing`
TOKEN_COUNTS_CAPACITY = 1 << 16  # routed positions whose per-token counts a patcher keeps (a ring buffer)
MIN_TRANSFORMERS = "5.24"  # the first release whose experts paths skip the sentinel expert index
PATCHER_ATTRIBUTE = "_bh_routing_patcher"  # set on a model while a patcher holds it
LOSS_CHUNK_ELEMENTS = 2**26  # float32 logits per chunk of the loss (256 MiB): never a full [B, W, V] copy


# ----------------------------------------------------------------------------------------------------
# 1. Argument checks
# ----------------------------------------------------------------------------------------------------


def _check_logits(router_logits: torch.Tensor, check_values: bool = True) -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.dim() not in (2, 3):
        raise ValueError(
            "router_logits must have shape [tokens, num_experts] or [batch, seq_len, num_experts], "
            f"got rank {router_logits.dim()} with shape {tuple(router_logits.shape)}"
        )
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a floating-point tensor, got dtype {router_logits.dtype}")
    if router_logits.shape[-1] < 1:
        raise ValueError("router_logits must have at least one expert in its last dimension")
    # `.all()` syncs with the device; the patcher's hot path skips it (its logits come from the model).
    if check_values and not bool(torch.isfinite(router_logits).all()):
        raise ValueError("router_logits must be finite: found NaN or +/-inf values")


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")


def _check_temperature(temperature: float) -> None:
    bad_type = not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
    if bad_type or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_k_bounds(min_k: int, max_k: int, num_experts: int) -> None:
    for name, value in (("min_k", min_k), ("max_k", max_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if min_k < 0:
        raise ValueError(f"min_k must be >= 0, got {min_k}")
    if max_k < 1 or max_k > num_experts:
        raise ValueError(f"max_k must be in [1, num_experts={num_experts}], got {max_k}")
    if min_k > max_k:
        raise ValueError(f"min_k must be <= max_k, got min_k={min_k} > max_k={max_k}")


def _check_top_k(k: int, num_experts: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k <= num_experts):
        raise ValueError(f"k must be an integer in [1, num_experts={num_experts}], got {k!r}")


def _check_pvalue_method(pvalue_method: str) -> None:
    if pvalue_method not in PVALUE_METHODS:
        raise ValueError(f"pvalue_method must be one of {PVALUE_METHODS}, got {pvalue_method!r}")


def _check_top_p(p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
        raise ValueError(f"p must be a number in (0, 1], got {p!r}")


# ----------------------------------------------------------------------------------------------------
# 2. The Benjamini-Hochberg step-up procedure
# ----------------------------------------------------------------------------------------------------
#
# Benjamini & Hochberg (1995), "Controlling the false discovery rate", JRSS B 57(1), section 3: with the
# m p-values sorted, p_(1) <= ... <= p_(m), let k = max{j : p_(j) <= alpha * j / m} and reject the k
# hypotheses with the smallest p-values. If the p-values of the true nulls are independent and uniform
# (or PRDS, Benjamini & Yekutieli 2001), the expected share of false rejections is <= alpha * m0 / m.
# `bh_reject` states the procedure (with a sort); `fast_bh_count` is the sort-free count the routing hot
# path uses, tested equal to it (tests/test_bh.py).


def bh_num_rejections(p_values: torch.Tensor, alpha: float, presorted: bool = False) -> torch.Tensor:
    """BH's number of rejections, k = max{j : p_(j) <= alpha * j / m}, along the last dimension (0 when no
    j qualifies), by sorting: the reference for `fast_bh_count`.

    p_values: [..., m] (sorted ascending if presorted) -> [...] int64.
    """
    num_tests = p_values.shape[-1]
    sorted_p = p_values if presorted else torch.sort(p_values, dim=-1).values  # [..., m]
    ranks = torch.arange(1, num_tests + 1, device=p_values.device)  # [m]
    critical_values = alpha * ranks.to(p_values.dtype) / num_tests  # [m]: alpha*j/m
    passes = sorted_p <= critical_values  # [..., m]
    # The step-up rule takes the LARGEST passing rank, even if smaller ranks fail.
    return (passes * ranks).amax(dim=-1)


def _bh_critical_value(num_rejections: torch.Tensor, alpha: float, num_tests: int, dtype) -> torch.Tensor:
    """alpha * k / m for each test family, 0 where k = 0. [...] -> [...] of `dtype`."""
    return alpha * num_rejections.to(dtype) / num_tests


def bh_reject(p_values: torch.Tensor, alpha: float) -> torch.Tensor:
    """Benjamini-Hochberg (1995) step-up procedure along the last dimension.

    Each slice p_values[..., :] is one family of m tests. With p_(1) <= ... <= p_(m) sorted, let
    k = max{j : p_(j) <= alpha * j / m}; reject every hypothesis with p <= alpha * k / m (none if no j
    qualifies). This is exactly "reject where the BH-adjusted p-value is <= alpha"
    (statsmodels `multipletests(method="fdr_bh")`, scipy `false_discovery_control`), ties included:
    tied p-values are rejected together.

    Args:
        p_values: [..., m] floating tensor with values in [0, 1].
        alpha: FDR level in (0, 1].
    Returns:
        [..., m] bool mask of rejected hypotheses.
    """
    _check_alpha(alpha)
    if not isinstance(p_values, torch.Tensor) or not p_values.is_floating_point() or p_values.dim() < 1:
        got = (
            f"{p_values.dtype} tensor of shape {tuple(p_values.shape)}"
            if isinstance(p_values, torch.Tensor)
            else (type(p_values).__name__)
        )
        raise ValueError(f"p_values must be a floating-point torch.Tensor with at least one dimension, got {got}")
    num_tests = p_values.shape[-1]
    num_rejections = bh_num_rejections(p_values, alpha)  # [...]
    threshold = _bh_critical_value(num_rejections, alpha, num_tests, p_values.dtype)  # [...]
    # p <= alpha*k/m  <=>  rank <= k (every p with rank > k exceeds alpha*rank/m > alpha*k/m).
    return (p_values <= threshold.unsqueeze(-1)) & (num_rejections > 0).unsqueeze(-1)


def fast_bh_count(first_passing_rank: torch.Tensor) -> torch.Tensor:
    """Fast (sort-free) BH count, equal to `bh_num_rejections`: BH's k from, per hypothesis, its first
    passing rank, the smallest j with p_i <= alpha*j/m (m + 1 if none).

    N_j = #{i : p_i <= alpha*j/m} = #{i : first_passing_rank_i <= j}, and k = max{j : N_j >= j}
    (the step-up rule: p_(j) <= alpha*j/m  <=>  N_j >= j). [..., m] int in [1, m+1] -> [...] int64.
    """
    num_tests = first_passing_rank.shape[-1]
    first_passing_rank = first_passing_rank.to(torch.int32)  # int32 halves the memory traffic on CPU
    histogram = torch.zeros(
        *first_passing_rank.shape[:-1], num_tests + 2, device=first_passing_rank.device, dtype=torch.int32
    ).scatter_add_(-1, first_passing_rank.long(), torch.ones_like(first_passing_rank))
    num_passing = histogram.cumsum(dim=-1, dtype=torch.int32)[..., 1 : num_tests + 1]  # [..., m]: N_j, j = 1..m
    ranks = torch.arange(1, num_tests + 1, device=first_passing_rank.device, dtype=torch.int32)
    return torch.where(num_passing >= ranks, ranks, 0).amax(dim=-1).long()


# ----------------------------------------------------------------------------------------------------
# 3. P-values
# ----------------------------------------------------------------------------------------------------
#
# one_minus_prob (the design document): p_i = 1 - softmax(logits / T)_i. BH rejects k experts only if
#   p_(k) <= k*alpha/m, i.e. k experts each have prob >= 1 - k*alpha/m; their probabilities sum to at
#   most 1, so k*(1 - k*alpha/m) <= 1, i.e. alpha >= m*(k-1)/k^2. Over k = 2..m that bound is smallest at
#   k = m: (m-1)/m (0.984 for m = 64). So for alpha < (m-1)/m BH rejects at most one expert and the count
#   is max(min_k, <=1) whatever the logits; for alpha >= (m-1)/m it can reject all m (at alpha = 1 it
#   always does, since p_(m) <= 1). Kept so that the report can show what the design's formula does.
#
# robust_z (default): each token's E logits are E tests of "H0_i: expert i belongs to the token's bulk of
#   irrelevant experts", the bulk modelled as N(mu, sigma^2) with mu, sigma unknown per token. Relevant
#   experts sit in the upper tail, so mu and sigma are estimated from the token's logits without its
#   J = E/4 largest (an upper-trimmed mean and standard deviation; for OLMoE, the 48 smallest of 64), and
#   s_i = (z_i - mu_hat) / sigma_hat. This statistic is pivotal under H0 (its law does not depend on mu or
#   sigma), so its upper-tail probability is tabulated once by simulating E i.i.d. N(0, 1) logits per
#   token (131072 tokens): p_i = (1 + #{simulated s >= s_i}) / (1 + #simulated), read off a fine grid of s
#   with log-linear interpolation. Under H0 these p-values are uniform (tests/test_pvalues.py), so alpha
#   really controls how many irrelevant experts slip in; up to J relevant experts cannot inflate the
#   estimates. The statistic is scale-free, so temperature does not change these p-values (it still
#   changes the probabilities used as weights). Needs no calibration data and no full sort (a top-J).
#   The calibration rests on the Gaussian bulk: where a token's irrelevant logits have heavier tails or
#   are skewed to the right, small p-values are too frequent and BH's false discovery rate exceeds alpha.

_NULL_SIMULATED_TOKENS = 2**17  # 131072 simulated tokens x E experts: p resolves to ~1e-7 at E=64
_NULL_SEED = 20240902
_NULL_GRID = (-40.0, 80.0, 1.0 / 64)  # s grid (first, last, step) of the tabulated log survival function
_null_table_cache: dict[tuple[int, str], NullTable] = {}
_critical_statistics_cache: dict[tuple[float, int, str], torch.Tensor] = {}


MIN_ROBUST_Z_EXPERTS = 4  # J = E/4 >= 1 trimmed logits and a bulk of E - J >= 3 to estimate its spread


def _num_trimmed(num_experts: int) -> int:
    """J: how many of the largest logits the null estimate leaves out (E/4, 16 for OLMoE)."""
    if num_experts < MIN_ROBUST_Z_EXPERTS:  # a Python int: free inside a traced forward
        raise ValueError(
            f"the robust_z statistic (pvalue_method 'robust_z' or 'empirical') needs at least {MIN_ROBUST_Z_EXPERTS} "
            f"experts (it estimates each token's bulk from the logits without its E/4 largest); got "
            f"num_experts={num_experts}. Use pvalue_method='one_minus_prob' or 'pooled', or top-k / top-p routing."
        )
    return num_experts // 4


def _robust_location_scale(logits: torch.Tensor, top_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) of each token's logits without its J largest: [..., E], [..., >= J] -> [..., 1] each."""
    num_experts = logits.shape[-1]
    num_trimmed = _num_trimmed(num_experts)
    # Moments of all E logits, then remove the J largest, centred on the mean so that the sums of
    # squares do not cancel in float32.
    mean = logits.mean(dim=-1, keepdim=True)  # [..., 1]
    centered = logits - mean
    total_square = torch.linalg.vecdot(centered, centered).unsqueeze(-1)  # [..., 1]
    centered_top = top_logits[..., :num_trimmed] - mean  # [..., J]
    num_bulk = num_experts - num_trimmed
    bulk_mean = -centered_top.sum(-1, keepdim=True) / num_bulk  # the E centred logits sum to 0
    bulk_square = (total_square - centered_top.square().sum(-1, keepdim=True)) / num_bulk
    bulk_std = (bulk_square - bulk_mean.square()).clamp_min(0).sqrt()
    center = mean + bulk_mean
    # A token whose bulk logits are all equal has std 0: keep the statistic finite.
    return center, 1.0 / bulk_std.clamp_min(torch.finfo(logits.dtype).eps * (1.0 + center.abs()))


def robust_z_statistic(logits: torch.Tensor, top_logits: torch.Tensor | None = None) -> torch.Tensor:
    """s = (z - mean) / std of the token's logits without its J largest. [..., E] -> [..., E].

    top_logits: the token's largest logits ([..., >= J], from a topk already at hand), or None.
    """
    if top_logits is None:
        top_logits = torch.topk(logits, _num_trimmed(logits.shape[-1]), dim=-1).values
    center, inverse_std = _robust_location_scale(logits, top_logits)
    return torch.addcmul(-center * inverse_std, logits, inverse_std)  # (z - center) / std in one pass


@dataclass(frozen=True)
class NullTable:
    """The upper tail of a null distribution: log P(S >= s) at the knots first + i * step, i = 0..n-1.

    Between knots the log survival is interpolated linearly; below the first knot p = 1 is read off the
    first knot, above the last the smallest tabulated p (the sample's resolution) is used.
    """

    first: float
    step: float
    log_survival: torch.Tensor  # [n] float32, non-increasing

    def to(self, device) -> NullTable:
        return NullTable(self.first, self.step, self.log_survival.to(device))

    @classmethod
    def from_sample(cls, sample: torch.Tensor, num_knots: int = 4097, first=None, last=None) -> NullTable:
        """The empirical null of `sample` (any shape, flattened): P(S >= s) = (1 + #{sample >= s}) / (1 + N),
        the add-one estimate that keeps p-values valid (never 0). Knots span [first, last] (default: the
        sample's range)."""
        values = torch.sort(sample.detach().flatten().double().cpu()).values
        first = values[0].item() if first is None else first
        last = values[-1].item() if last is None else last
        step = max(last - first, 1e-6) / (num_knots - 1)
        knots = torch.arange(num_knots, dtype=torch.float64) * step + first
        num_at_least = values.numel() - torch.searchsorted(values, knots)
        survival = (num_at_least + 1).double() / (values.numel() + 1)
        return cls(float(first), float(step), survival.log().float())

    def p_values(self, statistics: torch.Tensor) -> torch.Tensor:
        """P(S >= s) for each statistic s: [...] -> [...], same dtype (float32 or better)."""
        log_survival = self.log_survival.to(statistics.device)  # [num_knots]
        position = ((statistics - self.first) / self.step).clamp(0, log_survival.numel() - 1)
        lower = position.floor().long().clamp_max(log_survival.numel() - 2)
        fraction = (position - lower).to(log_survival.dtype)
        return torch.lerp(log_survival[lower], log_survival[lower + 1], fraction).exp().to(statistics.dtype)

    def critical_statistics(self, alpha: float, num_tests: int) -> torch.Tensor:
        """c_j with p(s) <= alpha*j/m  <=>  s >= c_j, for j = 1..m: [m] float32 on the CPU, non-increasing
        (+inf: no statistic passes; -inf: every statistic does).

        Inverts the piecewise-linear log survival at the BH critical values, so that the routing hot path
        compares statistics with c_j instead of computing every p-value."""
        log_survival = self.log_survival.double().cpu()  # [num_knots], non-increasing
        log_critical = torch.log(alpha * torch.arange(1, num_tests + 1, dtype=torch.float64) / num_tests)
        index = torch.searchsorted(-log_survival, -log_critical)  # first knot with log S <= log(alpha*j/m)
        below_grid = index == 0  # every statistic on the grid passes
        beyond_grid = index == log_survival.numel()  # below the table's resolution: none passes
        index = index.clamp(1, log_survival.numel() - 1)
        left, right = log_survival[index - 1], log_survival[index]
        fraction = ((left - log_critical) / (left - right).clamp_min(1e-300)).clamp(0, 1)
        critical = self.first + (index - 1 + fraction) * self.step
        critical = torch.where(below_grid, torch.tensor(-math.inf, dtype=torch.float64), critical)
        return torch.where(beyond_grid, torch.tensor(math.inf, dtype=torch.float64), critical).float()


def robust_z_null(num_experts: int, device: torch.device | str = "cpu") -> NullTable:
    """The robust_z statistic's null (E i.i.d. N(0, 1) logits per token), simulated once per E with a fixed
    seed on the CPU generator (about a second), then cached per device (a forward pass copies nothing)."""
    key = (num_experts, str(device))
    if key not in _null_table_cache:
        if (num_experts, "cpu") not in _null_table_cache:
            generator = torch.Generator().manual_seed(_NULL_SEED)
            null_logits = torch.randn(_NULL_SIMULATED_TOKENS, num_experts, generator=generator)
            first, last, step = _NULL_GRID
            num_knots = round((last - first) / step) + 1
            table = NullTable.from_sample(robust_z_statistic(null_logits), num_knots, first, last)
            _null_table_cache[(num_experts, "cpu")] = table
        _null_table_cache[key] = _null_table_cache[(num_experts, "cpu")].to(device)
    return _null_table_cache[key]


def robust_z_null_table(num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """log P(S >= s) of the robust_z statistic under H0 on the grid _NULL_GRID: [num_knots] float32."""
    return robust_z_null(num_experts, device).log_survival


def robust_z_critical_statistics(alpha: float, num_experts: int, device) -> torch.Tensor:
    """c_j with p(s) <= alpha*j/E  <=>  s >= c_j, for j = 1..E: [E] float32, decreasing (+inf: never)."""
    key = (float(alpha), num_experts, str(device))
    if key not in _critical_statistics_cache:
        critical = robust_z_null(num_experts).critical_statistics(alpha, num_experts)
        _critical_statistics_cache[key] = critical.to(device)
    return _critical_statistics_cache[key]


def robust_z_first_passing_rank(statistics: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
    """Smallest rank j with s_i >= c_j (E + 1 if none): j = 1 + #{j : c_j > s_i}. [..., E] -> [..., E] int32."""
    num_experts = statistics.shape[-1]
    return (
        1
        + num_experts
        - torch.searchsorted(critical.flip(0), statistics.float().contiguous(), right=True, out_int32=True)
    )


def fast_bh_count_robust_z_cpu(logits: torch.Tensor, top_logits: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
    """BH's count for robust_z from the top J statistics alone, exact, for the CPU.

    BH's k exceeds J only if more than J experts have s >= c_j >= c_E. When at most J experts clear the
    loosest critical value c_E, k = max{j <= J : s_(j) >= c_j}, and s_(1..J) are the top-J logits already
    sorted. The other tokens (rare) go through the full histogram. [..., E] -> [...] int64.
    """
    num_experts = logits.shape[-1]
    num_top = _num_trimmed(num_experts)
    center, inverse_std = _robust_location_scale(logits, top_logits)
    top_statistics = (top_logits[..., :num_top] - center) * inverse_std  # [..., J], descending
    ranks = torch.arange(1, num_top + 1, device=logits.device)
    num_significant = torch.where(top_statistics >= critical[:num_top], ranks, 0).amax(dim=-1)
    # s >= c_E  <=>  z >= center + c_E * std
    num_candidates = (logits >= center + critical[-1] / inverse_std).sum(dim=-1)
    many = num_candidates > num_top
    if bool(many.any()):  # free on the CPU
        flat_many = many.reshape(-1)
        rows, row_top = (
            logits.reshape(-1, num_experts)[flat_many],
            top_logits.reshape(-1, top_logits.shape[-1])[flat_many],
        )
        full = fast_bh_count(robust_z_first_passing_rank(robust_z_statistic(rows, row_top), critical))
        num_significant = (
            num_significant.reshape(-1).index_put((flat_many.nonzero().squeeze(-1),), full).reshape(many.shape)
        )
    return num_significant


def _work_logits(router_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32 (float64 if given): p-values are never computed in bf16/fp16."""
    work_dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return router_logits.to(work_dtype) / temperature


def _standardised(pvalue_method: str) -> bool:
    """Whether the p-value reads the robust_z statistic s (robust_z, empirical) rather than the logit itself."""
    return pvalue_method in ("robust_z", "empirical")


def _null_of(pvalue_method: str, num_experts: int, null: NullTable | None, device) -> NullTable:
    """The null table a p-value method reads: robust_z's simulated one (on `device`), or the fitted one given."""
    if pvalue_method == "robust_z":
        return robust_z_null(num_experts, device)
    if null is None:
        raise ValueError(
            f"pvalue_method={pvalue_method!r} needs a fitted null table (null=, from a RoutingCalibration: "
            "fit_routing_calibration); robust_z and one_minus_prob need none"
        )
    return null


def compute_p_values(
    router_logits: torch.Tensor,
    pvalue_method: str = DEFAULT_PVALUE_METHOD,
    temperature: float = 1.0,
    null: NullTable | None = None,
) -> torch.Tensor:
    """Per-expert p-values for "expert i is not relevant to this token".

    Args:
        router_logits: [..., E] router logits (any float dtype; computed in float32, or float64 if given).
        pvalue_method: one of PVALUE_METHODS: "robust_z" (default), "one_minus_prob" (the design's formula),
            "empirical" (robust_z's statistic against the layer's fitted null), "pooled" (the raw logit
            against the layer's pooled logits); see the notes of section 3.
        temperature: softmax temperature; only "one_minus_prob" depends on it.
        null: the layer's fitted NullTable for "empirical" and "pooled" (`RoutingCalibration.null`).
    Returns:
        [..., E] p-values in (0, 1], float32 (float64 for float64 input), in expert order.
    """
    _check_pvalue_method(pvalue_method)
    _check_temperature(temperature)
    scaled_logits = _work_logits(router_logits, temperature)  # [..., E]
    if pvalue_method == "one_minus_prob":
        return 1.0 - torch.softmax(scaled_logits, dim=-1)
    table = _null_of(pvalue_method, router_logits.shape[-1], null, router_logits.device)
    if _standardised(pvalue_method):
        return table.p_values(robust_z_statistic(scaled_logits))
    return table.p_values(_work_logits(router_logits, 1.0))


# ----------------------------------------------------------------------------------------------------
# 3b. Tables fitted on the model's own routers (calibration text disjoint from evaluation)
# ----------------------------------------------------------------------------------------------------
#
# empirical: robust_z's statistic, but its null is the layer's own bulk shape rather than a Gaussian: the
#   statistic of calibration logits whose token-specific signal is removed (each expert's logit permuted
#   across tokens, `permute_experts`), pooled over experts. On text like the calibration text and with no
#   token-specific signal, p-values are uniform pooled over experts, whatever the shape of the layer's
#   logits; per expert they are not (an expert whose logits run high gets small p-values more often), which
#   BH's guarantee would need.
# pooled: the public attempt's p-value, P(Z >= z) with Z drawn from every raw logit of the layer on the
#   calibration text, all experts pooled (signal included; not standardised per token).
# skip_beta: each layer's median over calibration tokens of w2 / w1 (dynamic skipping, beta="median").
# entropy_knots: each layer's quantiles of the router entropy (entropy-adaptive k).


def permute_experts(router_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each expert's column permuted independently across tokens: [N, E] -> [N, E]. Keeps every expert's
    marginal distribution and removes what is specific to a token (the null of "no token-specific signal")."""
    order = torch.rand(router_logits.shape, generator=generator).argsort(dim=0).to(router_logits.device)
    return router_logits.gather(0, order)


ENTROPY_QUANTILES = 256  # the entropy-adaptive k's resolution: bands of 1/256 of the calibration tokens


@dataclass
class RoutingCalibration:
    """Per-layer tables fitted on calibration text (`fit_routing_calibration`) for the methods that read the
    model's own routers: BH and HC with pvalue_method "empirical" or "pooled", dynamic skipping with
    beta="median", entropy-adaptive k. Saved and loaded with `save` / `load` (a small torch file)."""

    empirical: list[NullTable]  # per layer: robust_z statistic of permuted calibration logits
    pooled: list[NullTable]  # per layer: raw calibration logits, all experts pooled
    skip_beta: list[float]  # per layer: median of w2 / w1
    entropy_knots: torch.Tensor  # [L, ENTROPY_QUANTILES + 1] router-entropy quantiles (nats)
    info: dict  # num_tokens, num_experts, seed and what the caller adds (text, model)

    @property
    def num_layers(self) -> int:
        return len(self.empirical)

    def null(self, pvalue_method: str, layer: int) -> NullTable:
        """The layer's fitted null of a calibrated p-value method ("empirical" or "pooled")."""
        if pvalue_method not in CALIBRATED_PVALUE_METHODS:
            raise ValueError(f"pvalue_method must be one of {CALIBRATED_PVALUE_METHODS}, got {pvalue_method!r}")
        return getattr(self, pvalue_method)[layer]

    def save(self, path: str | Path) -> Path:
        state = {
            name: [(t.first, t.step, t.log_survival) for t in getattr(self, name)] for name in ("empirical", "pooled")
        }
        state |= {"skip_beta": self.skip_beta, "entropy_knots": self.entropy_knots, "info": self.info}
        return atomic_write(path, lambda target: torch.save(state, target))

    @classmethod
    def load(cls, path: str | Path) -> RoutingCalibration:
        state = torch.load(path, weights_only=True)
        tables = {name: [NullTable(*table) for table in state[name]] for name in ("empirical", "pooled")}
        return cls(**tables, skip_beta=state["skip_beta"], entropy_knots=state["entropy_knots"], info=state["info"])


def fit_routing_calibration(router_logits: list[torch.Tensor], seed: int = 0, info: dict | None = None):
    """A RoutingCalibration from each layer's router logits on calibration text ([N, E] per layer; use
    `collect_router_logits`). Deterministic for a given seed (the permutation of the empirical null)."""
    if not router_logits or any(t.dim() != 2 or t.shape[0] < 2 for t in router_logits):
        raise ValueError("router_logits must be a non-empty list of [tokens >= 2, num_experts] tensors, one per layer")
    generator = torch.Generator().manual_seed(seed)
    empirical, pooled, skip_beta, knots = [], [], [], []
    levels = torch.linspace(0, 1, ENTROPY_QUANTILES + 1, dtype=torch.float64)
    for logits in router_logits:
        logits = logits.detach().float().cpu()
        empirical.append(NullTable.from_sample(robust_z_statistic(permute_experts(logits, generator))))
        pooled.append(NullTable.from_sample(logits))
        top = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1).values  # [N, 2]
        skip_beta.append(float((top[:, 1] / top[:, 0]).median()))
        entropy = router_entropy(torch.softmax(logits.double(), dim=-1))
        knots.append(torch.quantile(entropy, levels).float())
    num_tokens, num_experts = router_logits[0].shape
    info = {"num_tokens": int(num_tokens), "num_experts": int(num_experts), "seed": seed} | (info or {})
    return RoutingCalibration(empirical, pooled, skip_beta, torch.stack(knots), info)


# ----------------------------------------------------------------------------------------------------
# 4. Routing methods: one object per method, in a registry
# ----------------------------------------------------------------------------------------------------
#
# Every method decides `expert_counts` per token and keeps that many of the most probable experts, in
# `K` slots ordered most probable first. Unused slots hold the index E (= num_experts) and weight 0:
# transformers' OLMoE experts module skips that sentinel index, so the experts the method dropped are
# never computed. Weights are the softmax probabilities of the kept experts (as OLMoE, whose
# norm_topk_prob is false), or renormalised to sum to 1 with renormalize=True (the design's step 5).


@dataclass(frozen=True)
class Routing:
    """Result of a routing method on [..., E] logits (K = slot width)."""

    top_weights: torch.Tensor  # [..., K] float32, 0 in unused slots
    top_index: torch.Tensor  # [..., K] int64, E (sentinel) in unused slots
    expert_counts: torch.Tensor  # [...] int64, experts kept per token
    probabilities: torch.Tensor  # [..., E] float32 softmax(logits / T)
    extra_stats: dict  # method-specific statistics (BH: p_values, bh_threshold, significant_mask)


def _keep_top(
    top_probabilities: torch.Tensor,
    top_index: torch.Tensor,
    expert_counts: torch.Tensor,
    num_experts: int,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first `expert_counts` of the K most probable experts (sorted descending).

    top_probabilities, top_index: [..., K]; expert_counts: [...] -> (top_weights, top_index) [..., K],
    with weight 0 and the sentinel index E in the slots past each token's count.
    """
    slot = torch.arange(top_index.shape[-1], device=top_index.device)  # [K]
    kept = slot < expert_counts.unsqueeze(-1)  # [..., K]
    top_weights = torch.where(kept, top_probabilities, torch.zeros_like(top_probabilities))
    if renormalize:
        tiny = torch.finfo(top_weights.dtype).tiny
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return top_weights, torch.where(kept, top_index, torch.full_like(top_index, num_experts))


def _bh_count(logits, scaled_logits, top_logits, probabilities, alpha, pvalue_method, critical, with_stats):
    """BH's number of rejections per token, and (when the full path ran) each expert's first passing rank
    and the statistics.

    The p-values are never materialised: each expert's first passing rank j (smallest j with
    p <= alpha*j/E) is read off its statistic against the critical statistics, and `fast_bh_count` turns
    ranks into counts.
    """
    num_experts = scaled_logits.shape[-1]
    if pvalue_method == "one_minus_prob":
        # 1 - prob_i <= alpha*j/m  <=>  j >= m * (1 - prob_i) / alpha
        first_passing_rank = torch.ceil(num_experts * (1.0 - probabilities) / alpha).long().clamp(1, num_experts + 1)
        return fast_bh_count(first_passing_rank), first_passing_rank, None
    # The CPU shortcut branches on the data (free there): eager only, not in a compiled graph.
    eager_cpu = scaled_logits.device.type == "cpu" and not torch.compiler.is_compiling()
    if _standardised(pvalue_method) and eager_cpu and not with_stats:
        return fast_bh_count_robust_z_cpu(scaled_logits, top_logits, critical), None, None
    # No data-dependent branch here: no host synchronisation on a GPU, one graph under torch.compile.
    if _standardised(pvalue_method):
        statistics = robust_z_statistic(scaled_logits, top_logits)  # [..., E]
    else:
        statistics = logits.to(scaled_logits.dtype)  # the pooled null is a null of the raw logit
    first_passing_rank = robust_z_first_passing_rank(statistics, critical)
    return fast_bh_count(first_passing_rank), first_passing_rank, statistics


def route_bh(
    logits,
    alpha,
    temperature,
    min_k,
    max_k,
    pvalue_method,
    renormalize,
    with_stats=False,
    critical=None,
    null=None,
) -> Routing:
    """BH routing of [..., E] logits (arguments as `benjamini_hochberg_routing`, unchecked).

    critical: the critical statistics for (alpha, E) and this layer's null on this device, if already at
    hand (the patcher passes them so that a compiled call touches no cache); null: the layer's fitted
    NullTable for the calibrated p-values ("empirical", "pooled").
    """
    num_experts = logits.shape[-1]
    scaled_logits = _work_logits(logits, temperature)  # [..., E]
    probabilities = torch.softmax(scaled_logits, dim=-1)  # [..., E]
    # One top-k gives the experts to keep (most probable first) and the logits the null estimate trims.
    width = max(max_k, _num_trimmed(num_experts)) if _standardised(pvalue_method) else max_k
    top_logits, top_index = torch.topk(scaled_logits, width, dim=-1)  # [..., width]
    if critical is None and pvalue_method == "robust_z":
        critical = robust_z_critical_statistics(alpha, num_experts, logits.device)  # [E], cached
    elif critical is None and pvalue_method != "one_minus_prob":
        critical = _null_of(pvalue_method, num_experts, null, "cpu").critical_statistics(alpha, num_experts)
        critical = critical.to(logits.device)  # [E], non-increasing
    num_significant, first_passing_rank, statistics = _bh_count(
        logits, scaled_logits, top_logits, probabilities, alpha, pvalue_method, critical, with_stats
    )
    expert_counts = num_significant.clamp(min_k, max_k)
    top_probabilities = probabilities.gather(-1, top_index[..., :max_k])
    top_weights, kept_index = _keep_top(
        top_probabilities, top_index[..., :max_k], expert_counts, num_experts, renormalize
    )
    extra_stats = {}
    if with_stats:
        if statistics is None:
            p_values = 1.0 - probabilities
        else:
            p_values = _null_of(pvalue_method, num_experts, null, logits.device).p_values(statistics)
        extra_stats = {
            "p_values": p_values,
            "bh_threshold": _bh_critical_value(num_significant, alpha, num_experts, p_values.dtype),
            "significant_mask": first_passing_rank <= num_significant.unsqueeze(-1),
            "num_significant": num_significant,
        }
    return Routing(top_weights, kept_index, expert_counts, probabilities, extra_stats)


def route_bh_tensors(logits, critical, alpha, temperature, min_k, max_k, pvalue_method, renormalize):
    """(top_weights, top_index, expert_counts) of `route_bh`: the patcher's hot path, the function that
    torch.compile fuses on CUDA (tensors in, tensors out, no cache lookups)."""
    routing = route_bh(logits, alpha, temperature, min_k, max_k, pvalue_method, renormalize, critical=critical)
    return routing.top_weights, routing.top_index, routing.expert_counts


def _routing_of_counts(probabilities, expert_counts, width: int, renormalize: bool, extra_stats=None) -> Routing:
    """The Routing that keeps the first expert_counts [...] of each token's `width` most probable experts."""
    top_probabilities, top_index = torch.topk(probabilities, width, dim=-1)  # as OLMoE's router does
    num_experts = probabilities.shape[-1]
    top_weights, top_index = _keep_top(top_probabilities, top_index, expert_counts, num_experts, renormalize)
    return Routing(top_weights, top_index, expert_counts, probabilities, extra_stats or {})


def route_topk(logits, k, temperature, renormalize) -> Routing:
    """The k most probable experts of every token (OLMoE's own router at k = 8, T = 1)."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    expert_counts = torch.full(logits.shape[:-1], k, dtype=torch.int64, device=logits.device)
    return _routing_of_counts(probabilities, expert_counts, k, renormalize)


def route_topp(logits, p, temperature, min_k, max_k, renormalize) -> Routing:
    """The fewest most probable experts whose probabilities sum to >= p, clamped to [min_k, max_k]."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    sorted_probabilities, order = torch.sort(probabilities, dim=-1, descending=True)  # [..., E]
    mass_before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities  # of more probable experts
    # Fewest experts whose mass reaches p = number of experts whose predecessors hold < p.
    num_needed = (mass_before < p).sum(dim=-1)
    expert_counts = num_needed.clamp(min_k, max_k)
    top_weights, top_index = _keep_top(
        sorted_probabilities[..., :max_k], order[..., :max_k], expert_counts, logits.shape[-1], renormalize
    )
    return Routing(top_weights, top_index, expert_counts, probabilities, {"num_needed": num_needed})


def _top_p_values(logits, scaled_logits, top_logits, top_index, probabilities, pvalue_method, null) -> torch.Tensor:
    """p-values of the experts in `top_index` (most probable first, so ascending p): [..., W]."""
    if pvalue_method == "one_minus_prob":
        return 1.0 - probabilities.gather(-1, top_index)
    table = _null_of(pvalue_method, logits.shape[-1], null, logits.device)
    if _standardised(pvalue_method):
        center, inverse_std = _robust_location_scale(scaled_logits, top_logits)
        return table.p_values((top_logits - center) * inverse_std)
    return table.p_values(logits.to(scaled_logits.dtype).gather(-1, top_index))


def higher_criticism(sorted_p_values: torch.Tensor, num_tests: int) -> torch.Tensor:
    """HC_i = sqrt(m) * (i/m - p_(i)) / sqrt(p_(i) * (1 - p_(i))), i = 1..n, for p-values sorted ascending.

    Donoho & Jin (2004), "Higher criticism for detecting sparse heterogeneous mixtures", Ann. Statist.
    32(3), the HC objective over the smallest n = alpha0 * m p-values; p is clamped into (0, 1) so that the
    objective stays finite. [..., n] -> [..., n]."""
    num_searched = sorted_p_values.shape[-1]
    ranks = torch.arange(1, num_searched + 1, device=sorted_p_values.device, dtype=sorted_p_values.dtype)
    eps = torch.finfo(sorted_p_values.dtype).eps
    p = sorted_p_values.clamp(eps, 1.0 - eps)
    return math.sqrt(num_tests) * (ranks / num_tests - p) / torch.sqrt(p * (1.0 - p))


def _hc_searched(beta: float, num_experts: int) -> int:
    return max(1, math.floor(beta * num_experts + 1e-9))


def route_hc(logits, beta, temperature, min_k, max_k, pvalue_method, renormalize, null=None, with_stats=False):
    """Higher Criticism thresholding: keep the i most probable experts, i the argmax of HC over the
    smallest floor(beta * E) p-values (Donoho & Jin 2008, "Higher criticism thresholding", PNAS 105(39)),
    clamped to [min_k, max_k]."""
    num_experts = logits.shape[-1]
    searched = _hc_searched(beta, num_experts)
    scaled_logits = _work_logits(logits, temperature)  # [..., E]
    probabilities = torch.softmax(scaled_logits, dim=-1)
    width = max(max_k, searched, _num_trimmed(num_experts) if _standardised(pvalue_method) else 1)
    top_logits, top_index = torch.topk(scaled_logits, width, dim=-1)  # [..., width]
    sorted_p = _top_p_values(logits, scaled_logits, top_logits, top_index, probabilities, pvalue_method, null)
    objective = higher_criticism(sorted_p[..., :searched], num_experts)  # [..., searched]
    num_selected = objective.argmax(dim=-1) + 1  # the first maximum
    expert_counts = num_selected.clamp(min_k, max_k)
    top_probabilities = probabilities.gather(-1, top_index[..., :max_k])
    top_weights, kept_index = _keep_top(
        top_probabilities, top_index[..., :max_k], expert_counts, num_experts, renormalize
    )
    extra = {"higher_criticism": objective, "num_selected": num_selected} if with_stats else {}
    return Routing(top_weights, kept_index, expert_counts, probabilities, extra)


def route_skip(logits, beta, k, temperature, min_k, renormalize) -> Routing:
    """Dynamic skipping (Lu et al. 2024): of the k most probable experts, keep expert j while
    w_j >= beta * w_1 (w sorted descending), at least min_k."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    top_probabilities, top_index = torch.topk(probabilities, k, dim=-1)  # [..., k], descending
    expert_counts = (top_probabilities >= beta * top_probabilities[..., :1]).sum(dim=-1).clamp(min_k, k)
    top_weights, top_index = _keep_top(top_probabilities, top_index, expert_counts, logits.shape[-1], renormalize)
    return Routing(top_weights, top_index, expert_counts, probabilities, {})


def router_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution: [..., E] -> [...]."""
    return -torch.xlogy(probabilities, probabilities).sum(dim=-1)


def route_entropy(logits, knots, temperature, min_k, max_k, renormalize) -> Routing:
    """Entropy-adaptive k: a token whose router entropy lies at quantile q of the layer's calibration
    entropies (knots: [Q + 1] quantiles at 0, 1/Q, ..., 1) keeps min_k + floor(q * (max_k - min_k + 1))
    experts, clamped to max_k: the max_k - min_k + 1 counts split the calibration tokens evenly, the more
    uncertain router getting more experts."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    entropy = router_entropy(probabilities).contiguous()  # [...]
    below = torch.searchsorted(knots.to(entropy.dtype), entropy, right=True)  # knots <= entropy
    quantile = ((below - 1).clamp_min(0) / (knots.numel() - 1)).to(entropy.dtype)  # [...] in [0, 1]
    num_bands = max_k - min_k + 1
    expert_counts = (min_k + torch.floor(quantile * num_bands).long()).clamp(min_k, max_k)
    return _routing_of_counts(probabilities, expert_counts, max_k, renormalize, {"entropy": entropy})


_GOLDEN = 0.6180339887498949  # frac(r * golden ratio): an evenly spread, content-free sequence in [0, 1)


def route_layer_budget(logits, budget: float, temperature, renormalize) -> Routing:
    """A fixed budget of experts per token for one layer, unrelated to the token: floor(budget) experts, one
    more for a share frac(budget) of the tokens chosen by position (row r of the call gets it when
    frac(r * 0.618...) < frac(budget)), the most probable ones. The baseline at equal per-layer budget, for
    evaluation: in one-token decode steps every token is row 0 and gets the extra expert."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    rows = torch.arange(math.prod(logits.shape[:-1]), device=logits.device, dtype=torch.float64)
    extra = torch.remainder(rows * _GOLDEN, 1.0) < (budget - math.floor(budget))
    expert_counts = (math.floor(budget) + extra.long()).reshape(logits.shape[:-1]).clamp_min(0)
    return _routing_of_counts(probabilities, expert_counts, max(1, math.ceil(budget)), renormalize)


@dataclass(frozen=True)
class RouterShape:
    """What a routing method needs to know of the routers it replaces."""

    num_experts: int
    native_top_k: int = NATIVE_TOP_K
    norm_topk_prob: bool = False  # the model renormalises its kept weights (renormalize=None follows it)


def _renormalize(renormalize: bool | None, shape: RouterShape) -> bool:
    return shape.norm_topk_prob if renormalize is None else bool(renormalize)


def _percent_code(value: float) -> str:
    """0.05 -> '005': the design's way of writing alpha (and p) in configuration names; a value that is not
    a whole percentage keeps its digits (0.001 -> '0p001'), so that different values never share a name."""
    percent = round(value * 100)
    return f"{percent:03d}" if math.isclose(value * 100, percent, abs_tol=1e-9) else f"{value:g}".replace(".", "p")


class RoutingMethod:
    """A routing method: its name, its parameters, how it routes, and how its configurations are named.

    Subclass, then `register_routing_method(Subclass())`; the patcher (`MoERouterPatcher.patch(name,
    **params)`), `RoutingConfig.of(name, **params)` and `frontier_table` then know it.
    """

    name = ""
    changes_routing = True  # False: the model's own router runs unchanged (the native baseline)
    is_baseline = False  # a reference curve of the equal-compute comparison (`frontier_table`)

    def parameters(self, shape: RouterShape, **given) -> dict:
        """Check `given` (ValueError naming the argument) and complete it with the defaults. The result
        has at least min_k, max_k (the slot width K), temperature and renormalize."""
        raise NotImplementedError

    def route(
        self, logits: torch.Tensor, params: dict, with_stats: bool = False, tables: dict | None = None
    ) -> Routing:
        """Route [..., E] logits with checked parameters (from `parameters`) and, for a method fitted to the
        model, the layer's tables (from `layer_tables`)."""
        raise NotImplementedError

    def calibration_use(self, params: dict) -> str | None:
        """What this configuration reads from a RoutingCalibration (for the error when none is given), or
        None when it needs none."""
        return None

    def layer_tables(self, params: dict, calibration: RoutingCalibration | None, layer: int) -> dict:
        """The constants a configuration routes layer `layer` with, from the calibration ({} if none)."""
        use = self.calibration_use(params)
        if use is not None and calibration is None:
            raise ValueError(
                f"method {self.name!r} with {params} uses {use}: give a RoutingCalibration "
                "(calibration=fit_routing_calibration(...), e.g. MoERouterPatcher(model, calibration=...))"
            )
        if use is not None and not 0 <= layer < calibration.num_layers:
            raise ValueError(f"layer must be in [0, {calibration.num_layers}) for this calibration, got {layer!r}")
        return {}

    def layer_routes(self, params: dict, patcher: MoERouterPatcher, compiled: bool = False) -> list[Callable]:
        """One function per MoE layer of the patcher's model, built at patch time with the layer's tables on
        its router's device: (selection_logits [T, E'], native_weights [T, k], native_index [T, k]) ->
        (top_weights [T, K], top_index [T, K], expert_counts [T] or None when every token keeps K). Only a
        method `in_expert_space` reads the router's own weights and index (an eager call passes None else).

        Each must trace under torch.compile(fullgraph=True) and replay in a CUDA graph: tensor ops only,
        no host sync, no Python state changed. compiled: the function runs eagerly (not inside a compiled
        model) and may fuse itself with torch.compile."""
        tables = [
            _tables_to(self.layer_tables(params, patcher.calibration, layer), router.weight.device)
            for layer, router in enumerate(patcher.routers)
        ]
        # A route per layer reaching only objects of its own (the method through the registry, one global):
        # a compiled forward checks every object it reads at every decode step, and an object that several
        # layers share costs each layer an identity check evaluated in Python.
        return [functools.partial(_route_with_tables, self.name, dict(params), layer_tables) for layer_tables in tables]

    def in_expert_space(self, params: dict, patcher: MoERouterPatcher) -> bool:
        """Whether `layer_routes` returns experts of the router's own output (the patcher then applies no
        family selection or weighting) rather than slots of the selection logits."""
        return False

    def check_names(self, given: dict) -> None:
        """ValueError naming any parameter this method does not take, and the ones it takes."""
        allowed = [name for name in inspect.signature(self.parameters).parameters if name != "shape"]
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(f"method {self.name!r} takes the parameters {allowed}, got unknown {unknown}")

    def drops_slots(self, params: dict) -> bool:
        """Whether some tokens may keep fewer experts than the K slots (the sentinel index then appears)."""
        return params["min_k"] < params["max_k"]

    def config_name(self, **given) -> str:
        """A configuration's name from the parameters it sets."""
        raise NotImplementedError

    def series(self, params: dict) -> str:
        """The curve a configuration belongs to in tables and figures (e.g. 'BH (robust_z)')."""
        return self.name


def _route_with_tables(method: str, params: dict, tables: dict, logits, native_weights, native_index):
    """A layer route of `RoutingMethod.layer_routes`: the registered method's Routing of the logits, as tensors."""
    # A method that reads no tables may define route(logits, params, with_stats=False) without them.
    routing = ROUTING_METHODS[method].route(logits, params, **({"tables": tables} if tables else {}))
    return routing.top_weights, routing.top_index, routing.expert_counts


def _tables_to(tables: dict, device) -> dict:
    """A layer's tables with every tensor (and NullTable) copied to `device`: the layer's own, even where
    layers share a table (the pooled null), so that no two layers' routes read one object."""
    return {name: _owned_copy(value, device) for name, value in tables.items()}


def _owned_copy(value, device):
    if isinstance(value, NullTable):
        return NullTable(value.first, value.step, value.log_survival.to(device, copy=True))
    return value.to(device, copy=True) if isinstance(value, torch.Tensor) else value


ROUTING_METHODS: dict[str, RoutingMethod] = {}


def register_routing_method(method: RoutingMethod) -> RoutingMethod:
    """Make `method` known by its name (replacing a method of the same name)."""
    if not isinstance(method, RoutingMethod) or not method.name:
        raise ValueError(f"method must be a RoutingMethod with a name, got {method!r}")
    ROUTING_METHODS[method.name] = method
    return method


def routing_method(name: str) -> RoutingMethod:
    """The registered method called `name`."""
    if name not in ROUTING_METHODS:
        raise ValueError(f"method must be one of {sorted(ROUTING_METHODS)}, got {name!r}")
    return ROUTING_METHODS[name]


_PVALUE_CODES = {"robust_z": "", "one_minus_prob": "1mp", "empirical": "emp", "pooled": "pool"}  # in names


def _check_pvalue_params(pvalue_method: str, num_experts: int) -> None:
    _check_pvalue_method(pvalue_method)
    if _standardised(pvalue_method):
        _num_trimmed(num_experts)  # refuses too few experts before any forward pass


def _null_tables(params: dict, calibration: RoutingCalibration | None, layer: int) -> dict:
    """{"null": the layer's fitted NullTable} for a calibrated p-value, else {}."""
    if params["pvalue_method"] not in CALIBRATED_PVALUE_METHODS:
        return {}
    return {"null": calibration.null(params["pvalue_method"], layer)}


def _bh_layer_route(route, critical, constants, logits, native_weights, native_index):
    """A layer route of `BenjaminiHochbergMethod.layer_routes`: `route_bh_tensors` with the layer's critical
    statistics (built at patch time, so that no call looks up a cache)."""
    return route(logits, critical, *constants)


class BenjaminiHochbergMethod(RoutingMethod):
    """BH over the E tests "expert i is not relevant to this token" (`benjamini_hochberg_routing`)."""

    name = "bh"

    def parameters(
        self,
        shape,
        alpha=0.05,
        temperature=1.0,
        min_k=1,
        max_k=16,
        pvalue_method=DEFAULT_PVALUE_METHOD,
        renormalize=None,
    ) -> dict:
        _check_alpha(alpha)
        _check_temperature(temperature)
        _check_k_bounds(min_k, max_k, shape.num_experts)
        _check_pvalue_params(pvalue_method, shape.num_experts)
        params = dict(alpha=alpha, temperature=temperature, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method)
        return params | {"renormalize": _renormalize(renormalize, shape)}

    def calibration_use(self, params):
        calibrated = params["pvalue_method"] in CALIBRATED_PVALUE_METHODS
        return f"the layer's fitted {params['pvalue_method']!r} null" if calibrated else None

    def layer_tables(self, params, calibration, layer):
        return RoutingMethod.layer_tables(self, params, calibration, layer) | _null_tables(params, calibration, layer)

    def route(self, logits, params, with_stats=False, tables=None):
        return route_bh(logits, with_stats=with_stats, null=(tables or {}).get("null"), **params)

    def _critical(self, params, patcher, layer: int, device) -> torch.Tensor | None:
        """The layer's critical statistics on its router's device, built now rather than in a timed forward."""
        alpha, method = params["alpha"], params["pvalue_method"]
        if method == "one_minus_prob":
            return None
        if method == "robust_z":
            return robust_z_critical_statistics(alpha, patcher.shape.num_experts, device)
        null = self.layer_tables(params, patcher.calibration, layer)["null"]
        return null.critical_statistics(alpha, patcher.shape.num_experts).to(device)

    def layer_routes(self, params, patcher, compiled=False):
        route = compile_once(route_bh_tensors) if compiled else route_bh_tensors
        constants = tuple(
            params[name] for name in ("alpha", "temperature", "min_k", "max_k", "pvalue_method", "renormalize")
        )
        critical = [self._critical(params, patcher, i, r.weight.device) for i, r in enumerate(patcher.routers)]
        critical = [None if table is None else table.clone() for table in critical]  # see RoutingMethod.layer_routes
        return [functools.partial(_bh_layer_route, route, layer_critical, constants) for layer_critical in critical]

    def config_name(
        self, alpha=0.05, max_k=16, min_k=1, pvalue_method=DEFAULT_PVALUE_METHOD, temperature=1.0, renormalize=None
    ) -> str:
        """The design's bh_k{max_k}_a{alpha*100:03d}; 'bh1mp' for the design's own p-value, 'bhemp' and
        'bhpool' for the fitted nulls; a suffix for each other parameter that differs from its default
        (e.g. _min4 for min_k = 4)."""
        prefix = "bh" + _PVALUE_CODES.get(pvalue_method, str(pvalue_method))
        return f"{prefix}_k{max_k}_a{_percent_code(alpha)}" + _common_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return f"BH ({params['pvalue_method']})"


def _require_for_name(method: str, **needed) -> None:
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ValueError(f"a {method!r} configuration's name needs {missing} (e.g. the model's top-k), got none")


def _common_suffix(min_k: int, default_min_k: int, temperature: float, renormalize: bool | None) -> str:
    suffix = f"_min{min_k}" if min_k != default_min_k else ""
    suffix += f"_t{temperature:g}" if temperature != 1.0 else ""
    return suffix + ("" if renormalize is None else "_renorm" if renormalize else "_raw")


def _native_slots(k: int, logits, native_weights, native_index):
    """The router's own first k slots: top-k reusing the native routing (`TopKMethod.in_expert_space`)."""
    return native_weights[..., :k], native_index[..., :k], None


def _without_counts(route, logits, native_weights, native_index):
    """A layer route whose every token keeps its K slots: no counts (the statistics read K)."""
    return route(logits, native_weights, native_index)[:2] + (None,)


class TopKMethod(RoutingMethod):
    """The k most probable experts (`topk_routing`; the native router truncated to k)."""

    name = "topk"
    is_baseline = True

    def parameters(self, shape, k=None, temperature=1.0, renormalize=None) -> dict:
        k = shape.native_top_k if k is None else k
        _check_top_k(k, shape.num_experts)
        _check_temperature(temperature)
        renormalize = _renormalize(renormalize, shape)
        return dict(k=k, temperature=temperature, min_k=k, max_k=k, renormalize=renormalize)

    def route(self, logits, params, with_stats=False, tables=None):
        return route_topk(logits, params["k"], params["temperature"], params["renormalize"])

    def in_expert_space(self, params, patcher):
        # The router's own output is this routing at its own k (any family: same slots, same weights, bit for
        # bit), and its first k slots are at a smaller k for a plain softmax router, sorted, not renormalised.
        k, renormalize = params["k"], params["renormalize"]
        native = params["temperature"] == 1.0 and renormalize == patcher.shape.norm_topk_prob
        sliceable = native and not renormalize and patcher.spec.plain and patcher.spec.sorted_output
        return native and (k == patcher.native_top_k or (sliceable and k < patcher.native_top_k))

    def layer_routes(self, params, patcher, compiled=False):
        if self.in_expert_space(params, patcher):
            return [functools.partial(_native_slots, params["k"]) for _ in range(patcher.num_layers)]
        return [functools.partial(_without_counts, route) for route in super().layer_routes(params, patcher)]

    def config_name(self, k=None, temperature=1.0, renormalize=None) -> str:
        _require_for_name(self.name, k=k)
        return f"topk_k{k}" + _common_suffix(1, 1, temperature, renormalize)

    def series(self, params):
        return "top-k"


class TopPMethod(RoutingMethod):
    """The fewest most probable experts reaching probability mass p (`topp_routing`; Huang et al. 2024)."""

    name = "topp"
    is_baseline = True

    def parameters(self, shape, p=0.5, temperature=1.0, min_k=1, max_k=None, renormalize=None) -> dict:
        _check_top_p(p)
        _check_temperature(temperature)
        max_k = shape.num_experts if max_k is None else max_k
        _check_k_bounds(min_k, max_k, shape.num_experts)
        renormalize = _renormalize(renormalize, shape)
        return dict(p=p, temperature=temperature, min_k=min_k, max_k=max_k, renormalize=renormalize)

    def route(self, logits, params, with_stats=False, tables=None):
        return route_topp(logits, **params)

    def config_name(self, p=0.5, temperature=1.0, min_k=1, max_k=None, renormalize=None) -> str:
        name = f"topp_p{_percent_code(p)}" + ("" if max_k is None else f"_max{max_k}")
        return name + _common_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return "top-p"


class NativeMethod(TopKMethod):
    """The model's own routing, unchanged and observed (the sweep's baseline)."""

    name = "native"
    changes_routing = False
    is_baseline = False

    def parameters(self, shape, k=None) -> dict:
        if k is not None and k != shape.native_top_k:
            raise ValueError(f"k of the native routing must be the model's top-k ({shape.native_top_k}), got {k!r}")
        return super().parameters(shape)

    def config_name(self, k=None) -> str:
        _require_for_name(self.name, k=k)
        return f"topk_{k}_baseline"

    def series(self, params):
        return f"native top-{params['k']}"


def _check_fitted_temperature(temperature) -> None:
    """Tables fitted on the router's own probabilities (at temperature 1) do not hold at another temperature."""
    if temperature != 1.0:
        raise ValueError(
            f"temperature must be 1.0 with tables fitted at temperature 1 (median beta, entropy k), got {temperature!r}"
        )


def _check_fraction(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


class HigherCriticismMethod(RoutingMethod):
    """Higher Criticism thresholding of the experts' p-values (`route_hc`; the public attempt's rule)."""

    name = "hc"

    def parameters(
        self,
        shape,
        beta=0.3,
        min_k=1,
        max_k=None,
        pvalue_method=DEFAULT_PVALUE_METHOD,
        temperature=1.0,
        renormalize=None,
    ) -> dict:
        _check_fraction("beta", beta)
        max_k = shape.native_top_k if max_k is None else max_k
        _check_k_bounds(min_k, max_k, shape.num_experts)
        _check_pvalue_params(pvalue_method, shape.num_experts)
        _check_temperature(temperature)
        params = dict(beta=beta, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method, temperature=temperature)
        return params | {"renormalize": _renormalize(renormalize, shape)}

    calibration_use = BenjaminiHochbergMethod.calibration_use
    layer_tables = BenjaminiHochbergMethod.layer_tables

    def route(self, logits, params, with_stats=False, tables=None):
        return route_hc(logits, with_stats=with_stats, null=(tables or {}).get("null"), **params)

    def config_name(
        self, beta=0.3, max_k=None, min_k=1, pvalue_method=DEFAULT_PVALUE_METHOD, temperature=1.0, renormalize=None
    ) -> str:
        name = "hc" + _PVALUE_CODES.get(pvalue_method, str(pvalue_method)) + f"_b{_percent_code(beta)}"
        return name + ("" if max_k is None else f"_k{max_k}") + _common_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return f"HC ({params['pvalue_method']})"


class DynamicSkipMethod(RoutingMethod):
    """Dynamic skipping (`route_skip`): beta a number, or "median" for each layer's calibrated median of
    w2 / w1 (Lu et al. 2024, "Not All Experts are Equal", ACL 2024, section 4)."""

    name = "skip"

    def parameters(self, shape, beta=0.3, k=None, min_k=1, temperature=1.0, renormalize=None) -> dict:
        if beta != "median" and (not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 < beta <= 1):
            raise ValueError(
                f"beta must be a number in (0, 1] or 'median' (each layer's calibrated w2/w1), got {beta!r}"
            )
        if beta == "median":
            _check_fitted_temperature(temperature)
        k = shape.native_top_k if k is None else k
        _check_top_k(k, shape.num_experts)
        _check_k_bounds(min_k, k, shape.num_experts)
        _check_temperature(temperature)
        renormalize = _renormalize(renormalize, shape)
        return dict(beta=beta, k=k, min_k=min_k, max_k=k, temperature=temperature, renormalize=renormalize)

    def calibration_use(self, params):
        return "each layer's median w2 / w1 (beta='median')" if params["beta"] == "median" else None

    def layer_tables(self, params, calibration, layer):
        tables = super().layer_tables(params, calibration, layer)
        return tables | ({"beta": calibration.skip_beta[layer]} if params["beta"] == "median" else {})

    def route(self, logits, params, with_stats=False, tables=None):
        beta = (tables or {}).get("beta", params["beta"])
        if isinstance(beta, str):
            raise ValueError("beta='median' needs the layer's tables (layer_tables with a RoutingCalibration)")
        return route_skip(logits, beta, params["k"], params["temperature"], params["min_k"], params["renormalize"])

    def config_name(self, beta=0.3, k=None, min_k=1, temperature=1.0, renormalize=None) -> str:
        code = "med" if beta == "median" else _percent_code(beta)
        return f"skip_b{code}" + ("" if k is None else f"_k{k}") + _common_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return "dynamic skip (median beta)" if params["beta"] == "median" else "dynamic skip"


class EntropyMethod(RoutingMethod):
    """Entropy-adaptive k (`route_entropy`), with each layer's calibrated entropy quantiles."""

    name = "entropy"

    def parameters(self, shape, min_k=1, max_k=None, temperature=1.0, renormalize=None) -> dict:
        max_k = shape.native_top_k if max_k is None else max_k
        _check_k_bounds(min_k, max_k, shape.num_experts)
        _check_fitted_temperature(temperature)
        renormalize = _renormalize(renormalize, shape)
        return dict(min_k=min_k, max_k=max_k, temperature=temperature, renormalize=renormalize)

    def calibration_use(self, params):
        return "each layer's router-entropy quantiles"

    def layer_tables(self, params, calibration, layer):
        return super().layer_tables(params, calibration, layer) | {"knots": calibration.entropy_knots[layer]}

    def route(self, logits, params, with_stats=False, tables=None):
        if not tables or "knots" not in tables:
            raise ValueError("method 'entropy' needs the layer's tables (layer_tables with a RoutingCalibration)")
        return route_entropy(logits, tables["knots"], **params)

    def config_name(self, max_k=None, min_k=1, temperature=1.0, renormalize=None) -> str:
        return "entropy" + ("" if max_k is None else f"_k{max_k}") + _common_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return "entropy k"


class LayerBudgetMethod(RoutingMethod):
    """Top-k at a given average per layer (`route_layer_budget`): budgets[l] experts per token in layer l,
    e.g. another configuration's per-layer averages, to compare it at equal per-layer budget."""

    name = "layerk"
    is_baseline = False

    def parameters(self, shape, budgets=(), temperature=1.0, renormalize=None) -> dict:
        budgets = tuple(budgets) if isinstance(budgets, (list, tuple)) else budgets
        valid = (
            isinstance(budgets, tuple)
            and budgets
            and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= shape.num_experts for b in budgets
            )
        )
        if not valid:
            raise ValueError(
                f"budgets must be a non-empty tuple of numbers in [0, {shape.num_experts}] (one per layer), "
                f"got {budgets!r}"
            )
        _check_temperature(temperature)
        renormalize = _renormalize(renormalize, shape)
        min_k, max_k = math.floor(min(budgets)), max(1, math.ceil(max(budgets)))
        return dict(budgets=budgets, min_k=min_k, max_k=max_k, temperature=temperature, renormalize=renormalize)

    def layer_tables(self, params, calibration, layer):
        if not 0 <= layer < len(params["budgets"]):
            raise ValueError(f"layer {layer} has no budget: budgets has {len(params['budgets'])} layers")
        return {"budget": float(params["budgets"][layer])}

    def route(self, logits, params, with_stats=False, tables=None):
        if not tables or "budget" not in tables:
            raise ValueError("method 'layerk' routes one layer at a time: give the layer (route_logits(..., layer=))")
        return route_layer_budget(logits, tables["budget"], params["temperature"], params["renormalize"])

    def config_name(self, budgets=(), temperature=1.0, renormalize=None) -> str:
        return "layerk_" + "_".join(f"{b:.2f}" for b in budgets) + _common_suffix(1, 1, temperature, renormalize)

    def series(self, params):
        return "top-k at equal per-layer budget"


def route_logits(
    method: str,
    router_logits: torch.Tensor,
    layer: int = 0,
    calibration: RoutingCalibration | None = None,
    with_stats: bool = False,
    num_experts_per_tok: int = NATIVE_TOP_K,
    **params,
) -> Routing:
    """Route [..., E] logits of layer `layer` with any registered method, its parameters checked and its
    per-layer tables read from `calibration` where it needs them (e.g. route_logits("hc", logits, beta=0.3,
    pvalue_method="empirical", layer=2, calibration=calibration))."""
    _check_logits(router_logits)
    spec = routing_method(method)
    spec.check_names(params)
    params = spec.parameters(RouterShape(router_logits.shape[-1], num_experts_per_tok), **params)
    tables = _tables_to(spec.layer_tables(params, calibration, layer), router_logits.device)
    return spec.route(router_logits, params, with_stats, **({"tables": tables} if tables else {}))


_ALL_METHODS = (BenjaminiHochbergMethod(), TopKMethod(), TopPMethod(), NativeMethod())
_ALL_METHODS += (HigherCriticismMethod(), DynamicSkipMethod(), EntropyMethod(), LayerBudgetMethod())
for _method in _ALL_METHODS:
    register_routing_method(_method)


@dataclass(frozen=True)
class RoutingConfig:
    """One routing configuration: a name, a registered method and the parameters it sets."""

    name: str
    method: str
    params: tuple = ()  # (("alpha", 0.05), ("max_k", 8), ...): hashable, ordered

    @classmethod
    def of(cls, method: str, **params) -> RoutingConfig:
        """A configuration named by its method's naming rule, e.g. RoutingConfig.of("bh", alpha=0.05, max_k=8)."""
        spec = routing_method(method)
        spec.check_names(params)
        return cls(spec.config_name(**params), method, tuple(params.items()))

    @classmethod
    def parse(cls, spec: str) -> RoutingConfig:
        """A configuration from text, "method" or "method:name=value,...": e.g. "bh:alpha=0.05,max_k=8",
        "topk:k=2", "native:k=8". Values are read as Python literals (0.05, 8, True, None); other text stays
        a string ("pvalue_method=robust_z")."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"spec must be 'method' or 'method:name=value,...', got {spec!r}")
        method, _, given = spec.partition(":")
        params = {}
        for item in filter(None, (part.strip() for part in given.split(","))):
            name, equals, text = item.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"spec must be 'method' or 'method:name=value,...', got {spec!r} (at {item!r})")
            try:
                params[name.strip()] = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                params[name.strip()] = text.strip()
        return cls.of(method.strip(), **params)

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def apply(self, patcher: MoERouterPatcher) -> MoERouterPatcher:
        """Patch (or, for the native routing, observe) the patcher's model with this configuration."""
        return patcher.patch(self.method, **self.kwargs)


# ----------------------------------------------------------------------------------------------------
# 5. Routing functions: one contract for BH and the baselines
# ----------------------------------------------------------------------------------------------------


def _public_result(routing: Routing, return_stats: bool):
    """(routing_weights [..., E], selected_experts [..., K], expert_counts [...][, stats])."""
    num_experts = routing.probabilities.shape[-1]
    dense = torch.zeros(
        *routing.top_index.shape[:-1], num_experts + 1, dtype=routing.top_weights.dtype, device=routing.top_index.device
    )
    # Scatter into E+1 columns so the sentinel slots land in a column that is then dropped.
    routing_weights = dense.scatter(-1, routing.top_index, routing.top_weights)[..., :num_experts]
    result = (routing_weights, routing.top_index, routing.expert_counts)
    if not return_stats:
        return result
    stats = {"probabilities": routing.probabilities, "kept_mask": routing_weights > 0, **routing.extra_stats}
    return (*result, stats)


def _route_public(method: str, router_logits: torch.Tensor, return_stats: bool, **params):
    """Check the logits and the parameters, route with a registered method, return the public contract."""
    _check_logits(router_logits)
    spec = routing_method(method)
    params = spec.parameters(RouterShape(num_experts=router_logits.shape[-1]), **params)
    return _public_result(spec.route(router_logits, params, with_stats=return_stats), return_stats)


def benjamini_hochberg_routing(
    router_logits: torch.Tensor,
    alpha: float = 0.05,
    temperature: float = 1.0,
    min_k: int = 1,
    max_k: int = 16,
    return_stats: bool = False,
    pvalue_method: str = DEFAULT_PVALUE_METHOD,
    renormalize: bool = False,
):
    """Route each token to the experts that BH finds significant at FDR level alpha.

    The count per token is BH's number of rejections clamped to [min_k, max_k]; the experts kept are the
    `count` most probable ones (for both p-value methods the p-values fall as the logit rises, so the
    significant experts are the most probable ones).

    Args:
        router_logits: [batch, seq_len, E] or [tokens, E] router logits (computed on in float32 or better).
        alpha: FDR level in (0, 1].
        temperature: > 0; probabilities are softmax(router_logits / temperature).
        min_k, max_k: 0 <= min_k <= max_k <= E, max_k >= 1.
        return_stats: also return a dict of per-token statistics.
        pvalue_method: "robust_z" (calibrated, default) or "one_minus_prob" (the design's; selects
            max(min_k, <=1) experts for every alpha < (E-1)/E, see the notes of section 3).
        renormalize: rescale kept weights to sum to 1 (the design); default False keeps the softmax
            probabilities, as OLMoE (norm_topk_prob=false) does.
    Returns:
        routing_weights: [..., E] float32, the weight of each expert (0 if not kept).
        selected_experts: [..., max_k] int64, kept experts most probable first; unused slots hold E
            (the sentinel index the experts module skips).
        expert_counts: [...] int64, experts kept per token.
        stats (with return_stats=True): dict with p_values [..., E], bh_threshold [...] (alpha*k/m, 0 if
            BH rejects nothing), significant_mask [..., E], num_significant [...] (before clamping),
            probabilities [..., E], kept_mask [..., E].
    """
    params = dict(alpha=alpha, temperature=temperature, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method)
    return _route_public("bh", router_logits, return_stats, renormalize=bool(renormalize), **params)


def topk_routing(
    router_logits: torch.Tensor,
    k: int = NATIVE_TOP_K,
    temperature: float = 1.0,
    renormalize: bool = False,
    return_stats: bool = False,
):
    """Fixed top-k routing (OLMoE's own router when k=8, temperature=1, renormalize=False).

    Same return contract as `benjamini_hochberg_routing` with K = k.
    """
    return _route_public(
        "topk", router_logits, return_stats, k=k, temperature=temperature, renormalize=bool(renormalize)
    )


def topp_routing(
    router_logits: torch.Tensor,
    p: float = 0.5,
    temperature: float = 1.0,
    min_k: int = 1,
    max_k: int | None = None,
    renormalize: bool = False,
    return_stats: bool = False,
):
    """Top-p routing (Huang et al. 2024): the fewest most-probable experts whose probabilities sum to >= p.

    Counts are clamped to [min_k, max_k] (max_k defaults to E). Same return contract as
    `benjamini_hochberg_routing` with K = max_k.
    """
    params = dict(p=p, temperature=temperature, min_k=min_k, max_k=max_k)
    return _route_public("topp", router_logits, return_stats, renormalize=bool(renormalize), **params)


def run_bh_multi_k(
    router_logits: torch.Tensor, max_k_values=(4, 8, 16, 32), alpha: float = 0.05, **bh_kwargs
) -> dict[int, dict]:
    """Run `benjamini_hochberg_routing` once per max_k on the same logits.

    Returns {max_k: {"routing_weights", "selected_experts", "expert_counts", "stats", "params"}}.
    """
    if len(max_k_values) == 0:
        raise ValueError("max_k_values must name at least one max_k")
    results = {}
    for max_k in max_k_values:
        weights, experts, counts, stats = benjamini_hochberg_routing(
            router_logits, alpha=alpha, max_k=max_k, return_stats=True, **bh_kwargs
        )
        params = {"alpha": alpha, "max_k": max_k, "min_k": bh_kwargs.get("min_k", 1)}
        results[max_k] = {
            "routing_weights": weights,
            "selected_experts": experts,
            "expert_counts": counts,
            "stats": stats,
            "params": params,
        }
    return results


def compare_multi_k_statistics(results: dict[int, dict], baseline_k: int = NATIVE_TOP_K):
    """One row per max_k of `run_bh_multi_k` results: the metrics of `summarize_expert_counts`."""
    import pandas as pd

    rows = []
    for max_k, result in results.items():
        params = result["params"]
        summary = summarize_expert_counts(result["expert_counts"], params["min_k"], max_k, baseline_k)
        rows.append({"max_k": max_k, "alpha": params["alpha"], **summary})
    return pd.DataFrame(rows).set_index("max_k")


# ----------------------------------------------------------------------------------------------------
# 6. Statistics: counts, the patcher's accumulators, saturation, quality at equal compute, token level
# ----------------------------------------------------------------------------------------------------


def summarize_expert_counts(
    expert_counts: torch.Tensor, min_k: int, max_k: int, baseline_k: int = NATIVE_TOP_K
) -> dict[str, float]:
    """The design's expert-selection metrics over every entry of `expert_counts` (any shape, counts >= 0).

    Rates are percentages: ceiling_hit_rate = % of entries equal to max_k, floor_hit_rate = % equal to
    min_k, reduction_vs_baseline = 100 * (1 - avg_experts / baseline_k); median_experts interpolates
    between the two middle entries as torch.quantile does.
    """
    counts = expert_counts.detach().flatten().to("cpu", torch.int64)
    if counts.numel() == 0:
        raise ValueError("expert_counts is empty: no tokens were routed")
    if counts.min() < 0:
        raise ValueError(f"expert_counts must be >= 0, got a minimum of {int(counts.min())}")
    return summarize_count_histogram(torch.bincount(counts), min_k, max_k, baseline_k)


def expert_load_balance(selections: torch.Tensor) -> float:
    """Mean over layers of the normalised entropy of how often each expert was chosen: 1 when every
    expert is chosen equally often, 0 when one expert takes everything. selections: [L, E] counts."""
    selections = selections.double()
    load_shares = selections / selections.sum(dim=-1, keepdim=True).clamp_min(1)
    return (-torch.xlogy(load_shares, load_shares).sum(dim=-1) / math.log(selections.shape[-1])).mean().item()


def static_zeros(shape: tuple, dtype, device) -> torch.Tensor:
    """Zeros that a compiled forward may update in place, also under CUDA graphs (the statistics' counters)."""
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    # Updated in place inside compiled forwards: a static address lets CUDA-graph trees keep it.
    torch._dynamo.mark_static_address(tensor)
    return tensor


class LayerAccumulators:
    """One MoE layer's routing statistics, preallocated on its device and updated in place by
    `accumulate_routing` (so a compiled forward, or a CUDA graph replaying it, keeps them up to date):

        selections [E + 1]: how many kept rows chose each expert (the last bin: unused sentinel slots).
        histogram [E + 1]: how many kept rows kept 0, 1, ..., E experts.
        decisions [1]: kept rows (routing decisions) so far.
        entropy_sum [1]: sum over kept rows of the entropy (nats) of the kept weights, normalised.
        (the four are views of one float64 `counters` tensor [2E + 4], which one scatter-add updates per
        call: float64 counts are exact up to 2**53; inductor compiles a float64 scatter-add into atomic adds
        where an int64 one falls back to aten's sort-based kernel, several launches per call; and a compiled
        forward guards on every tensor it reads, one more guard evaluation per tensor and decode step. A
        patcher's layers on one device hold their `counters` as rows of one tensor: `accumulate_layers`.)
        token_counts [C] int16 or None: a ring buffer of every routed row's count (-1 for a row left out),
            written at positions written, written + 1, ... modulo C.
        written [1] int64 or None: rows written to the ring buffer so far.
    Scalars are [1], not 0-d: inductor (torch 2.13, CPU) drops in-place updates of 0-d static tensors.
    """

    def __init__(self, num_experts: int, device, token_capacity: int | None, counters: torch.Tensor | None = None):
        self.num_experts = num_experts
        # counters: given as a row of one tensor for several layers (`RoutingStatistics.allocate_layers`).
        self.counters = static_zeros((2 * num_experts + 4,), torch.float64, device) if counters is None else counters
        self.token_counts = None if token_capacity is None else static_zeros((token_capacity,), torch.int16, device)
        self.written = None if token_capacity is None else static_zeros((1,), torch.int64, device)

    @property
    def selections(self) -> torch.Tensor:
        return self.counters[: self.num_experts + 1]

    @property
    def histogram(self) -> torch.Tensor:
        return self.counters[self.num_experts + 1 : 2 * self.num_experts + 2]

    @property
    def decisions(self) -> torch.Tensor:
        return self.counters[-2:-1]

    @property
    def entropy_sum(self) -> torch.Tensor:
        return self.counters[-1:]

    def tensors(self) -> list[torch.Tensor]:
        named = [self.counters, self.token_counts, self.written]
        return [tensor for tensor in named if tensor is not None]


def accumulate_routing(accumulators: LayerAccumulators, top_weights, top_index, expert_counts=None, keep=None):
    """Fold one routing call into a layer's accumulators, in place, with device ops only (no host sync, no
    allocation kept, traceable by torch.compile): weights and index [..., K]; expert_counts [...] (None: all
    K kept); keep [N] bool over the flattened rows (None: all count), e.g. the positions that are not padding."""
    accumulate_sums(accumulators, top_weights, top_index, expert_counts, keep)
    if accumulators.token_counts is not None:
        write_token_counts(accumulators, top_index, expert_counts, keep)


def flat_counts(top_index: torch.Tensor, expert_counts) -> torch.Tensor:
    """[N] int64 experts kept per row of a routing call (top_index [..., K], expert_counts [...] or None): K
    for every row of a method without counts."""
    slots = top_index.shape[-1]
    if expert_counts is None:
        return top_index.new_full((top_index.numel() // slots,), slots)
    return expert_counts.reshape(-1).long()


def accumulate_sums(accumulators: LayerAccumulators, top_weights, top_index, expert_counts=None, keep=None):
    """The order-free part of `accumulate_routing`: selections, count histogram, decisions, entropy sum."""
    slots = top_index.shape[-1]
    counts = None if expert_counts is None else expert_counts.reshape(1, -1)
    weights, index = top_weights.reshape(1, -1, slots), top_index.reshape(1, -1, slots)
    accumulate_layers(accumulators.counters.unsqueeze(0), weights, index, counts, keep)


def accumulate_layers(counters, top_weights, top_index, expert_counts=None, keep=None):
    """`accumulate_sums` of one routing call of each of L layers, with one scatter-add: counters [L, 2E + 4]
    float64 (each a layer's `LayerAccumulators.counters`), top_weights and top_index [L, N, K], expert_counts
    [L, N] (None: all K kept), keep [N] bool (None: every row counts), the same rows for every layer."""
    num_layers, num_rows, slots = top_index.shape
    width = counters.shape[-1]
    bins = (width - 2) // 2  # E + 1: the selections' and the histogram's
    expert_counts = flat_counts(top_index, expert_counts).reshape(num_layers, num_rows)
    weights = top_weights.detach().float()  # statistics never join an autograd graph
    shares = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    entropy = -torch.xlogy(shares, shares).sum(dim=-1)  # [L, N]
    if keep is None:
        row_weight = torch.ones(num_rows, dtype=torch.float64, device=top_index.device)
    else:
        row_weight = keep.reshape(-1).double()
    row_weight = row_weight.expand(num_layers, num_rows)
    start = torch.arange(num_layers, device=top_index.device).unsqueeze(-1) * width  # [L, 1]: each layer's row
    # One scatter-add: each slot's expert into selections (sentinel slots land in the last bin, which
    # `selections` drops), each row's count into the histogram, each row into decisions, each row's
    # entropy into the entropy sum.
    positions = [
        (top_index + start.unsqueeze(-1)).reshape(-1),
        (expert_counts + bins + start).reshape(-1),
        (start + 2 * bins).expand(num_layers, num_rows).reshape(-1),
        (start + 2 * bins + 1).expand(num_layers, num_rows).reshape(-1),
    ]
    values = [
        row_weight.unsqueeze(-1).expand(num_layers, num_rows, slots).reshape(-1),
        row_weight.reshape(-1),
        row_weight.reshape(-1),
        (entropy.double() * row_weight).reshape(-1),
    ]
    counters.view(-1).index_add_(0, torch.cat(positions), torch.cat(values))


def ring_write(ring: torch.Tensor, written: torch.Tensor, values: torch.Tensor) -> None:
    """Write values [N, ...] into the ring buffer `ring` [C, ...] (its dtype) at positions written, written + 1,
    ... modulo C and add N to `written` [1] int64, in place with device ops only (traceable, no host sync)."""
    num_rows, capacity = values.shape[0], ring.shape[0]
    skipped = max(0, num_rows - capacity)  # a call longer than the ring writes its last rows only
    offsets = torch.arange(skipped, num_rows, device=values.device)
    ring.index_copy_(0, (written + offsets) % capacity, values[skipped:].to(ring.dtype))
    written.add_(num_rows)


def write_token_counts(accumulators: LayerAccumulators, top_index, expert_counts=None, keep=None):
    """The ordered part of `accumulate_routing`: each row's count (-1 where keep is False) into the ring."""
    counts = flat_counts(top_index, expert_counts)  # [N]
    values = counts if keep is None else counts.masked_fill(keep.reshape(-1) == 0, -1)
    ring_write(accumulators.token_counts, accumulators.written, values)


def _value_at_rank(cumulative: torch.Tensor, rank: int) -> int:
    """The value at 0-based `rank` of the sorted sample whose histogram has cumulative sums `cumulative`."""
    return int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype), right=True))


def summarize_count_histogram(histogram: torch.Tensor, min_k: int, max_k: int, baseline_k: int = NATIVE_TOP_K):
    """`summarize_expert_counts` of the counts whose histogram (over the values 0, 1, ...) is `histogram`,
    any leading shape (summed): the same numbers, from the histogram alone."""
    histogram = histogram.detach().to("cpu", torch.int64).reshape(-1, histogram.shape[-1]).sum(dim=0)
    total = int(histogram.sum())
    if total == 0:
        raise ValueError("expert_counts is empty: no tokens were routed")
    values = torch.arange(histogram.numel(), dtype=torch.float64)
    frequencies = histogram.double()
    avg_experts = float((values * frequencies).sum()) / total
    cumulative = histogram.cumsum(0)
    position = (total - 1) * 0.5  # torch.quantile's linear interpolation between the middle values
    low, high = _value_at_rank(cumulative, math.floor(position)), _value_at_rank(cumulative, math.ceil(position))
    present = torch.nonzero(histogram).flatten()

    def rate(value: int) -> float:
        return 100.0 * int(histogram[value]) / total if 0 <= value < histogram.numel() else 0.0

    return {
        "avg_experts": avg_experts,
        "std_experts": math.sqrt(float(((values - avg_experts) ** 2 * frequencies).sum()) / total),
        "min_experts": float(present[0]),
        "max_experts": float(present[-1]),
        "median_experts": low + (position - math.floor(position)) * (high - low),
        "ceiling_hit_rate": rate(max_k),
        "floor_hit_rate": rate(min_k),
        "reduction_vs_baseline": 100.0 * (1.0 - avg_experts / baseline_k),
    }


def _rows(tensor: torch.Tensor, *shape: int) -> torch.Tensor:
    """tensor.reshape(*shape), without the call (a dispatch per eager routing call) where it has as many dims."""
    return tensor if tensor.dim() == len(shape) else tensor.reshape(*shape)


STATISTICS_FOLD_LAYERS = 8  # layers folded in per scatter-add of a compiled step (`accumulate_step`)


def _stacked(routings: list[tuple]) -> tuple:
    """(weights [L, N, K] float32, index [L, N, K] int32, counts [L, N] int32 or None, keep [N] or None) of L
    layers' routings (weights, index, counts or None, keep or None) of the same N rows; the first layer's keep.

    Each layer's tensors are cast before they are stacked: inductor computes a concatenation of at most 8
    inputs (its max_pointwise_cat_inputs) inside the kernel that reads it, where each input is an op of its
    own, but copies every input of a longer one, or one that is already stored, with a kernel of its own
    (about 37 kernels per decode step for 16 layers, run 49 of benchmarks/gpu_notes.md)."""
    weights, index, counts, keep = zip(*routings, strict=True)
    slots = index[0].shape[-1]
    if all(layer_counts is None for layer_counts in counts):
        counts = None
    else:
        counts = torch.stack([flat_counts(i, c).int() for i, c in zip(index, counts, strict=True)])
    weights = torch.stack([w.reshape(-1, slots).float() for w in weights])
    return weights, torch.stack([i.reshape(-1, slots).int() for i in index]), counts, keep[0]


class RoutingStatistics:
    """Per-layer routing statistics of a patcher (`LayerAccumulators`), kept on each layer's device and read
    only by the methods below (which synchronise). A call may name the rows that count (`keep`, e.g. the
    positions an attention mask marks as real, not padding): the others are left out of every statistic.

    Compiled forwards (CUDA-graphed or not) update the accumulators in place (`accumulate_routing`); eager
    calls, the patcher's CUDA-graphed routes among them, go through `record`, which keeps references and folds
    them in batches of `max_pending` calls per layer, so that an eager forward pays a list append rather than
    a dozen small kernels per layer.

    record_token_counts: also keep every routed row's count per layer in a ring buffer of `token_capacity`
    rows (`token_counts`); off, the count histogram still gives every summary statistic.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        record_token_counts: bool = False,
        token_capacity: int = TOKEN_COUNTS_CAPACITY,
    ):
        if not isinstance(token_capacity, int) or token_capacity < 1:
            raise ValueError(f"token_capacity must be an integer >= 1, got {token_capacity!r}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.record_token_counts, self.token_capacity = bool(record_token_counts), token_capacity
        self.layers: list[LayerAccumulators | None] = [None] * num_layers
        self.groups: list[tuple[torch.Tensor, list[int]]] = []  # (counters [L_d, 2E + 4], its layers) per device
        self._pending: list[list[tuple]] = [[] for _ in range(num_layers)]

    def allocate(self, layer: int, device) -> LayerAccumulators:
        """Layer `layer`'s accumulators on `device` (allocated once; zeroed by `reset`, never reallocated there)."""
        current = self.layers[layer]
        if current is None or current.counters.device != torch.device(device):
            capacity = self.token_capacity if self.record_token_counts else None
            self.layers[layer] = LayerAccumulators(self.num_experts, device, capacity)
            self.groups = [group for group in self.groups if layer not in group[1]]
        return self.layers[layer]

    def allocate_layers(self, devices: list) -> None:
        """Every layer's accumulators, layer l's on devices[l], unless they are there already: the layers of a
        device keep their counters as rows of one tensor, so that a compiled forward folds in a step's
        routing of 8 of them with one scatter-add (`accumulate_step`) rather than one per layer."""
        devices = [torch.device(device) for device in devices]
        layers_and_devices = zip(self.layers, devices, strict=True)
        if all(layer is not None and layer.counters.device == device for layer, device in layers_and_devices):
            return
        capacity = self.token_capacity if self.record_token_counts else None
        self.groups = []
        for device in dict.fromkeys(devices):
            layers = [layer for layer, layer_device in enumerate(devices) if layer_device == device]
            counters = static_zeros((len(layers), 2 * self.num_experts + 4), torch.float64, device)
            for row, layer in enumerate(layers):
                self.layers[layer] = LayerAccumulators(self.num_experts, device, capacity, counters=counters[row])
            self.groups.append((counters, layers))

    def accumulate_step(self, routings: dict) -> None:
        """Fold one forward pass's routing of its layers into their sums, traceable (the patcher calls it at
        the end of a compiled forward): one `accumulate_layers` per `STATISTICS_FOLD_LAYERS` layers of a device
        whose layers all routed (`_stacked` says why not all at once), one `accumulate_sums` per other layer.
        routings: layer -> (weights [..., K], index [..., K], counts [...] or None, keep or None), every layer
        over the same rows."""
        folded = set()
        for counters, layers in self.groups:
            if all(layer in routings for layer in layers):
                for start in range(0, len(layers), STATISTICS_FOLD_LAYERS):
                    chunk = layers[start : start + STATISTICS_FOLD_LAYERS]
                    stacked = _stacked([routings[layer] for layer in chunk])
                    accumulate_layers(counters[start : start + len(chunk)], *stacked)
                folded.update(layers)
        for layer, (weights, index, counts, keep) in routings.items():
            if layer not in folded:
                accumulate_sums(self.layers[layer], weights, index, counts, keep)

    def reset(self) -> None:
        """Forget everything recorded so far (in place: compiled forwards and graphs keep the same tensors)."""
        self._pending = [[] for _ in range(self.num_layers)]
        for accumulators in self.layers:
            for tensor in accumulators.tensors() if accumulators is not None else []:
                tensor.zero_()

    max_pending = 256  # eager calls kept per layer before they are folded in

    def record(self, layer: int, top_weights, top_index, expert_counts=None, keep=None) -> None:
        """One eager routing call of `layer` (arguments as `accumulate_routing`): its token counts are written
        now (a compiled forward may write the next ones), its sums folded in later."""
        accumulators = self.allocate(layer, top_index.device)
        if accumulators.token_counts is not None:
            write_token_counts(accumulators, top_index, expert_counts, keep)
        weights = top_weights.detach() if top_weights.requires_grad else top_weights  # detach: an op per call
        self._pending[layer].append((weights, top_index, expert_counts, keep))
        if len(self._pending[layer]) >= self.max_pending:
            self._fold(layer)

    def _fold(self, layer: int) -> None:
        """Fold a layer's pending calls into its accumulators as one call (a patch keeps its slot width K)."""
        pending, self._pending[layer] = self._pending[layer], []
        if not pending:
            return
        slots, device = pending[0][1].shape[-1], pending[0][1].device
        weights = torch.cat([_rows(w, -1, slots) for w, _, _, _ in pending])
        index = torch.cat([_rows(i, -1, slots) for _, i, _, _ in pending])
        counts = keep = None
        if any(c is not None for _, _, c, _ in pending):
            full = [i.new_full(i.shape[:-1], slots) if c is None else c for _, i, c, _ in pending]
            counts = torch.cat([_rows(c, -1) for c in full])
        if any(k is not None for *_, k in pending):
            every = [i[..., 0].reshape(-1) >= 0 if k is None else k.reshape(-1).to(device) for _, i, _, k in pending]
            keep = torch.cat(every)  # a call without a mask keeps every row
        accumulate_sums(self.allocate(layer, device), weights, index, counts, keep)

    def _recorded(self) -> list[LayerAccumulators]:
        if self.num_tokens == 0 or any(layer is None for layer in self.layers):  # num_tokens folds first
            raise RuntimeError("no tokens were routed since the last patch or reset_stats(): run the model first")
        return self.layers

    @property
    def num_tokens(self) -> int:
        """Tokens routed so far (by the first layer), padding left out where a mask said so."""
        for layer in range(self.num_layers):
            self._fold(layer)
        return 0 if self.layers[0] is None else int(self.layers[0].decisions)

    def token_counts(self) -> torch.Tensor:
        """[N, L] int64 on the CPU: experts kept per routed token (in order) and layer; the last
        `token_capacity` routed rows if more were routed (with a warning)."""
        if not self.record_token_counts:
            raise RuntimeError("token counts were not recorded: create the patcher with record_token_counts=True")
        columns = []
        for accumulators in self._recorded():
            written, ring = int(accumulators.written), accumulators.token_counts.to("cpu", torch.int64)
            columns.append(ring[:written] if written <= ring.numel() else ring.roll(-(written % ring.numel())))
        if written > self.token_capacity:
            warnings.warn(
                f"{written} rows were routed but token counts keep the last {self.token_capacity}: raise "
                "token_capacity to keep them all",
                stacklevel=2,
            )
        counts = torch.stack(columns, dim=1)  # [rows, L]
        return counts[counts[:, 0] >= 0]  # rows left out (padding) hold -1 in every layer

    def histograms(self) -> torch.Tensor:
        """[L, E + 1] int64 on the CPU: how many routed tokens kept 0, 1, ..., E experts, per layer."""
        return torch.stack([layer.histogram.to("cpu", torch.int64) for layer in self._recorded()])

    def selections(self) -> torch.Tensor:
        """[L, E] float64 on the CPU: how many routed tokens kept each expert, per layer."""
        return torch.stack([layer.selections.to("cpu") for layer in self._recorded()])[:, : self.num_experts]

    def summary(self, min_k: int, max_k: int, baseline_k: int) -> dict:
        """The design's metrics over every (token, layer) decision (`summarize_count_histogram`), plus
        weight_entropy, expert_utilization, per_layer_avg_experts, expert_utilization_per_layer,
        token_counts (if recorded), num_tokens and num_layers (see `MoERouterPatcher.get_stats`)."""
        histograms, selections = self.histograms(), self.selections()  # [L, E + 1], [L, E]
        num_tokens, decisions = self.num_tokens, sum(int(layer.decisions) for layer in self.layers)
        values = torch.arange(histograms.shape[-1], dtype=torch.float64)
        stats = summarize_count_histogram(histograms, min_k, max_k, baseline_k) | {
            "per_layer_avg_experts": ((histograms.double() * values).sum(dim=-1) / num_tokens).tolist(),
            "weight_entropy": sum(float(layer.entropy_sum) for layer in self.layers) / decisions,
            "expert_utilization": expert_load_balance(selections),
            "expert_utilization_per_layer": (selections / num_tokens).tolist(),
            "num_tokens": num_tokens,
            "num_layers": self.num_layers,
        }
        return stats | ({"token_counts": self.token_counts()} if self.record_token_counts else {})


def saturation_analysis(table, group_by=("pvalue_method", "alpha"), threshold_percent: float = 5.0):
    """Per group (by default per p-value method and alpha): the smallest max_k beyond which raising
    max_k grows avg_experts by < threshold_percent.

    table: rows of one method's grid over max_k (columns: group_by, "max_k", "avg_experts", "status").
    Returns one row per group with the saturation max_k (NaN if avg_experts still grows at the largest
    step), the average at the largest max_k and the growth at each step.
    """
    import pandas as pd

    columns = [*group_by, "saturation_max_k", "avg_experts_at_largest_max_k", "growth_percent_by_step"]
    rows = []
    for key, group in table[table["status"] == "ok"].groupby(list(group_by)):
        group = group.sort_values("max_k")
        max_ks, averages = group["max_k"].tolist(), group["avg_experts"].tolist()
        growth = [100.0 * (averages[i + 1] / averages[i] - 1.0) for i in range(len(averages) - 1)]
        saturated = [i for i in range(len(growth)) if all(g < threshold_percent for g in growth[i:])]
        rows.append(
            {
                **dict(zip(group_by, key, strict=True)),
                "saturation_max_k": max_ks[saturated[0]] if saturated else float("nan"),
                "avg_experts_at_largest_max_k": averages[-1],
                "growth_percent_by_step": {f"{max_ks[i]}->{max_ks[i + 1]}": round(g, 2) for i, g in enumerate(growth)},
            }
        )
    return pd.DataFrame(rows, columns=columns)


FRONTIER_RESAMPLES = 1000  # paired bootstrap resamples of the evaluation windows
FRONTIER_LEVEL = 0.95


def window_sums(nll: torch.Tensor, window_ids: torch.Tensor, expert_counts: torch.Tensor | None) -> dict:
    """Per evaluation window, sums of what the frontier's bootstrap resamples: "window_nll" (surprisal),
    "window_tokens" and "window_experts" (experts per position, mean over layers). nll: [S]; window_ids:
    [S] the window that scored each position (any labels; windows ordered by label); expert_counts:
    [S, L] or None (then every window's experts sum is NaN)."""
    labels, inverse = torch.unique(window_ids, sorted=True, return_inverse=True)
    num_windows = labels.numel()
    tokens = torch.zeros(num_windows, dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(nll, dtype=torch.float64)
    )
    sums = torch.zeros(num_windows, dtype=torch.float64).index_add_(0, inverse, nll.double())
    if expert_counts is None:
        experts = torch.full((num_windows,), math.nan, dtype=torch.float64)
    else:
        per_position = expert_counts.double().mean(dim=-1)
        experts = torch.zeros(num_windows, dtype=torch.float64).index_add_(0, inverse, per_position)
    return {"window_nll": sums.tolist(), "window_tokens": tokens.tolist(), "window_experts": experts.tolist()}


def bootstrap_window_weights(num_windows: int, resamples: int = FRONTIER_RESAMPLES, seed: int = 0):
    """[1 + resamples, W] multiplicities of each window: row 0 all ones (the point estimate), then
    `resamples` draws of W windows with replacement (the paired bootstrap: every configuration is
    resampled with the same windows)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = rng.multinomial(num_windows, np.full(num_windows, 1.0 / num_windows), size=resamples)
    return np.vstack([np.ones((1, num_windows)), draws]).astype(np.float64)


def _resampled(results: list[dict], weights):
    """(mean NLL, average experts) of each result under each row of bootstrap weights: [R, C] each; None
    when some result lacks per-window sums or the results' windows differ."""
    import numpy as np

    if not results or any("window_nll" not in r for r in results):
        return None
    tokens = np.asarray(results[0]["window_tokens"])
    if weights.shape[1] != tokens.size or any(r["window_tokens"] != results[0]["window_tokens"] for r in results):
        return None
    scored = weights @ tokens  # [R]
    nll = weights @ np.asarray([r["window_nll"] for r in results]).T / scored[:, None]
    experts = weights @ np.asarray([r["window_experts"] for r in results]).T / scored[:, None]
    return nll, experts


def _interpolate_rows(x, xs, ys):
    """Row-wise linear interpolation, NaN outside each row's [min xs, max xs]: x [R, C], xs/ys [R, n]."""
    import numpy as np

    out = np.full(x.shape, np.nan)
    for row in range(x.shape[0]):
        order = np.argsort(xs[row], kind="stable")
        curve_x, curve_y = xs[row][order], ys[row][order]
        inside = (x[row] >= curve_x[0]) & (x[row] <= curve_x[-1])
        out[row] = np.where(inside, np.interp(x[row], curve_x, curve_y), np.nan)
    return out


def _percentile_interval(samples, level: float = FRONTIER_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap samples [R - 1, C] -> ([C], [C]); NaN where more than (1 - level) / 2
    of the resamples are NaN (a point that leaves the baseline's range in them: dropping those resamples
    would narrow the interval)."""
    import numpy as np

    low, high = np.full(samples.shape[1], np.nan), np.full(samples.shape[1], np.nan)
    enough = np.isfinite(samples).mean(axis=0) >= 1 - (1 - level) / 2
    if enough.any():
        tail = 100 * (1 - level) / 2
        low[enough], high[enough] = np.nanpercentile(samples[:, enough], [tail, 100 - tail], axis=0)
    return low, high


def _versus_baselines(ok: list[dict], resamples: int, seed: int) -> dict:
    """For every result and baseline: the delta to the baseline at equal average experts (percent of
    perplexity), as point estimate [C] and bootstrap samples [R, C] (None without per-window sums)."""
    import numpy as np

    baselines = [name for name, method in ROUTING_METHODS.items() if method.is_baseline]
    weights = (
        None
        if not ok or "window_tokens" not in ok[0]
        else bootstrap_window_weights(len(ok[0]["window_tokens"]), resamples, seed)
    )
    resampled = None if weights is None else _resampled(ok, weights)
    measured = np.log([r["perplexity"] for r in ok]), np.asarray([r["avg_experts"] for r in ok], dtype=float)
    nll, experts = (measured[0][None], measured[1][None]) if resampled is None else resampled
    nll[0], experts[0] = measured  # row 0 as measured (the resampled row 0 equals it up to rounding)
    found = {}
    for baseline in baselines:
        members = [i for i, r in enumerate(ok) if r["method"] == baseline]
        if len(members) < 2:
            found[baseline] = np.full(nll.shape, np.nan)
            continue
        at_equal = _interpolate_rows(experts, experts[:, members], nll[:, members])
        found[baseline] = 100.0 * np.expm1(nll - at_equal)  # [R, C]
    return {"deltas": found, "nll": nll, "experts": experts}


def frontier_table(quality: dict[str, dict], resamples: int = FRONTIER_RESAMPLES, seed: int = 0):
    """Quality at equal compute: for each configuration of a method that is not a baseline (one row with
    its name, method, series and parameters), its perplexity and that of each baseline (top-k, top-p:
    `RoutingMethod.is_baseline`) at the same average experts; NaN where its average lies outside the
    baseline's measured range. A negative `delta_vs_<baseline>_percent` means the configuration is better
    at equal compute; `..._low` / `..._high` bound its paired bootstrap 95% interval over evaluation
    windows (every configuration and baseline point resampled with the same windows, the baseline curve
    re-interpolated in each resample), when the results carry per-window sums (`window_sums`).

    Between two measured baseline points the log-perplexity (mean NLL) is interpolated linearly in
    average experts: that is the mean NLL of routing a matching fraction of tokens with each of the two,
    whereas interpolating perplexity itself would flatter the method (perplexity is convex in the
    experts kept).
    """
    import numpy as np
    import pandas as pd

    ok = [r for r in quality.values() if r["status"] == "ok"]
    compared = _versus_baselines(ok, resamples, seed) if ok else {"deltas": {}}
    rows = []
    for column, result in enumerate(ok):
        method = routing_method(result["method"])
        if method.is_baseline or not method.changes_routing:
            continue
        row = {
            "config": result["name"],
            "method": method.name,
            "series": method.series(result["params"]),
            **result["params"],
            "avg_experts": result["avg_experts"],
            "perplexity": result["perplexity"],
        }
        for baseline, deltas in compared["deltas"].items():
            delta = deltas[0, column]
            row[f"{baseline}_perplexity_at_equal_experts"] = result["perplexity"] / (1 + delta / 100)
            row[f"delta_vs_{baseline}_percent"] = delta
            low, high = _percentile_interval(deltas[1:, [column]]) if len(deltas) > 1 else ([np.nan], [np.nan])
            row[f"delta_vs_{baseline}_low"], row[f"delta_vs_{baseline}_high"] = float(low[0]), float(high[0])
        rows.append(row)
    baselines = [name for name, method in ROUTING_METHODS.items() if method.is_baseline]
    compared_columns = [
        f"{prefix}{name}{suffix}"
        for name in baselines
        for prefix, suffix in (
            ("", "_perplexity_at_equal_experts"),
            ("delta_vs_", "_percent"),
            ("delta_vs_", "_low"),
            ("delta_vs_", "_high"),
        )
    ]
    columns = ["config", "method", "series", "avg_experts", "perplexity"] + compared_columns
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)  # the same columns with no rows


def paired_perplexity_difference(result: dict, reference: dict, resamples: int = FRONTIER_RESAMPLES, seed: int = 0):
    """Perplexity of `result` against `reference`, both evaluated on the same windows (`window_sums`), in
    percent, with its paired bootstrap 95% interval: {"percent", "low", "high"}."""
    import numpy as np

    weights = bootstrap_window_weights(len(result["window_tokens"]), resamples, seed)
    resampled = _resampled([result, reference], weights)
    if resampled is None:
        raise ValueError("result and reference must carry per-window sums over the same windows (window_sums)")
    delta = 100.0 * np.expm1(resampled[0][:, 0] - resampled[0][:, 1])  # [R]
    low, high = _percentile_interval(delta[1:, None])
    return {"percent": float(delta[0]), "low": float(low[0]), "high": float(high[0])}


def layer_matched_table(quality: dict, matched: dict, frontier, resamples: int = FRONTIER_RESAMPLES, seed: int = 0):
    """Configurations at equal per-layer budget: for each name in `matched` (its `layerk` evaluation with the
    configuration's own per-layer averages), the range of its per-layer averages, its difference to top-k
    at equal average experts (from `frontier`) and to top-k at equal per-layer budget, each with its paired
    bootstrap 95% interval."""
    import pandas as pd

    by_config = frontier.set_index("config") if len(frontier) else None
    rows = []
    for name, reference in matched.items():
        result = quality.get(name, {})
        if reference.get("status") != "ok" or result.get("status") != "ok":
            continue
        layers = result["per_layer_avg_experts"]
        row = {"config": name, "series": routing_method(result["method"]).series(result["params"])}
        row |= {"avg_experts": result["avg_experts"], "layer_min": min(layers), "layer_max": max(layers)}
        for part in ("percent", "low", "high"):
            at_equal = by_config is not None and name in by_config.index
            row[f"delta_vs_topk_{part}"] = by_config.loc[name, f"delta_vs_topk_{part}"] if at_equal else math.nan
        paired = paired_perplexity_difference(result, reference, resamples, seed)
        rows.append(row | {f"delta_vs_layer_matched_{part}": value for part, value in paired.items()})
    return pd.DataFrame(rows)


BUDGETS = (1, 2, 3, 4, 6)  # experts per token at which the best method is named


def best_at_budget(
    quality: dict[str, dict],
    budgets=BUDGETS,
    tolerance: float = 0.01,
    resamples: int = FRONTIER_RESAMPLES,
    seed: int = 0,
):
    """For each compute budget b and each series (method and variant): its configuration with the lowest
    perplexity among those averaging at most b * (1 + tolerance) experts, ranked (rank 1: the best method
    at that budget); with its difference to top-k and to top-p at its own average experts, as in
    `frontier_table`, each with its paired bootstrap 95% interval over windows.

    The interval is that of the chosen configuration; choosing the best of many configurations on the same
    windows favours it (winner's curse), which the interval does not account for.
    """
    import numpy as np
    import pandas as pd

    ok = [r for r in quality.values() if r["status"] == "ok" and routing_method(r["method"]).changes_routing]
    if not ok:
        return pd.DataFrame()
    deltas = _versus_baselines(ok, resamples, seed)["deltas"]
    rows = []
    for budget in budgets:
        best = {}
        for i, result in enumerate(ok):
            series = routing_method(result["method"]).series(result["params"])
            within = result["avg_experts"] <= budget * (1 + tolerance)
            if within and (series not in best or result["perplexity"] < ok[best[series]]["perplexity"]):
                best[series] = i
        for rank, (series, i) in enumerate(sorted(best.items(), key=lambda item: ok[item[1]]["perplexity"]), 1):
            row = {"budget": budget, "rank": rank, "series": series, "config": ok[i]["name"]}
            row |= {"avg_experts": ok[i]["avg_experts"], "perplexity": ok[i]["perplexity"]}
            for baseline, delta in deltas.items():
                low, high = _percentile_interval(delta[1:, [i]]) if len(delta) > 1 else ([np.nan], [np.nan])
                row |= {
                    f"delta_vs_{baseline}_percent": delta[0, i],
                    f"delta_vs_{baseline}_low": low[0],
                    f"delta_vs_{baseline}_high": high[0],
                }
            rows.append(row)
    return pd.DataFrame(rows)


CALIBRATION_ALPHAS = (0.01, 0.05, 0.10, 0.20)


def null_rejection_rates(
    router_logits, alphas=CALIBRATION_ALPHAS, pvalue_methods=PVALUE_METHODS, calibration=None, seed=0
):
    """BH's observed false discovery rate under a global null with the token-specific signal removed.

    Each layer's logits ([N, E], one tensor per layer) get each expert's column permuted across tokens
    (`permute_experts`): no expert is relevant to any token, every rejection is false, and the FDR is the
    share of tokens with at least one rejection (there equal to the family-wise error rate). BH keeps the
    FDR <= alpha when the p-values of the irrelevant experts are uniform and independent (or PRDS); a rate
    above alpha shows that those conditions fail for this model's logits. A rate at alpha does not show
    that the FDR holds on real tokens, and for a fitted null it shows that the null carries over from the
    calibration text (`calibration`, which must come from other text than these logits) to this one.

    Returns a DataFrame: layer, pvalue_method, alpha, tokens, rejection_rate, standard_error (binomial),
    ratio_to_alpha, mean_rejections.
    """
    import pandas as pd

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for layer, logits in enumerate(router_logits):
        permuted = permute_experts(logits.float(), generator)
        num_tokens, num_experts = permuted.shape
        for method in pvalue_methods:
            for alpha in alphas:
                params = dict(alpha=alpha, min_k=0, max_k=num_experts, pvalue_method=method)
                counts = route_logits("bh", permuted, layer, calibration, **params).expert_counts.double()
                rate = (counts > 0).double().mean().item()
                rows.append(
                    {"layer": layer, "pvalue_method": method, "alpha": alpha, "tokens": num_tokens,
                     "rejection_rate": rate, "standard_error": math.sqrt(rate * (1 - rate) / num_tokens),
                     "ratio_to_alpha": rate / alpha, "mean_rejections": counts.mean().item()}
                )  # fmt: skip
    return pd.DataFrame(rows)


def _bulk_moments(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(skewness, excess kurtosis) of each token's bulk, its logits without the E/4 largest: [N, E] -> [N] each."""
    num_experts = logits.shape[-1]
    bulk = torch.sort(logits.double(), dim=-1).values[..., : num_experts - _num_trimmed(num_experts)]
    centered = bulk - bulk.mean(dim=-1, keepdim=True)
    variance = centered.square().mean(dim=-1).clamp_min(1e-300)
    skew = centered.pow(3).mean(dim=-1) / variance.pow(1.5)
    return skew, centered.pow(4).mean(dim=-1) / variance.square() - 3.0


def bulk_shape(router_logits, seed: int = 0):
    """Per layer: the mean over tokens of the skewness and excess kurtosis of each token's bulk (its logits
    without the E/4 largest, which robust_z's null estimate leaves out), next to the same for E i.i.d.
    Gaussian logits, the bulk robust_z assumes (not 0: the trimming and E's small size bias both).
    A DataFrame: layer, tokens, skew, excess_kurtosis, gaussian_skew, gaussian_excess_kurtosis."""
    import pandas as pd

    num_experts = router_logits[0].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    gaussian = _bulk_moments(torch.randn(_NULL_SIMULATED_TOKENS // 4, num_experts, generator=generator))
    rows = []
    for layer, logits in enumerate(router_logits):
        skew, kurtosis = _bulk_moments(logits)
        row = {"layer": layer, "tokens": logits.shape[0], "skew": skew.mean().item()}
        row |= {"excess_kurtosis": kurtosis.mean().item(), "gaussian_skew": gaussian[0].mean().item()}
        rows.append(row | {"gaussian_excess_kurtosis": gaussian[1].mean().item()})
    return pd.DataFrame(rows)


def null_pvalue_quantiles(router_logits, pvalue_methods=PVALUE_METHODS, calibration=None, seed=0, num_levels=60):
    """The p-values of permuted logits (as in `null_rejection_rates`, all experts) against the uniform they
    should follow: per layer and p-value method, observed quantiles at log-spaced levels from 1/(N E) to 1.
    A DataFrame: layer, pvalue_method, expected, observed (a QQ plot on log axes shows the tail BH uses)."""
    import numpy as np
    import pandas as pd

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for layer, logits in enumerate(router_logits):
        permuted = permute_experts(logits.float(), generator)
        levels = np.geomspace(1.0 / permuted.numel(), 1.0, num_levels)
        for method in pvalue_methods:
            null = calibration.null(method, layer) if method in CALIBRATED_PVALUE_METHODS and calibration else None
            p_values = compute_p_values(permuted, method, null=null).flatten().double()
            observed = torch.quantile(p_values[torch.randperm(p_values.numel(), generator=generator)[: 2**24]],
                                      torch.from_numpy(levels))  # fmt: skip
            rows += [{"layer": layer, "pvalue_method": method, "expected": e, "observed": o}
                     for e, o in zip(levels, observed.tolist(), strict=True)]  # fmt: skip
    return pd.DataFrame(rows)


def count_correlation(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Spearman correlation of two methods' experts per position (mean over layers) on the same positions:
    [S, L] each -> float (whether they spend their experts on the same tokens)."""
    from scipy.stats import spearmanr

    return float(spearmanr(counts_a.double().mean(-1).numpy(), counts_b.double().mean(-1).numpy()).statistic)


def token_level_analysis(
    expert_counts: torch.Tensor,
    inputs: torch.Tensor,
    baseline_nll: torch.Tensor,
    tokenizer,
    num_tokens: int = 15,
    min_occurrences: int = 5,
) -> dict:
    """Which tokens draw the most and fewest experts, and whether the count follows difficulty.

    expert_counts: [S, L] experts kept at each evaluated position and layer; inputs: [S] the token at
    each position; baseline_nll: [S] the baseline model's surprisal of the token each position predicts.
    Returns the Spearman correlation between a position's average experts (over layers) and that
    surprisal, and the tokens (seen at least min_occurrences times) with the fewest and most experts.
    """
    import pandas as pd
    from scipy.stats import spearmanr

    experts = expert_counts.double().mean(-1)  # [S]
    correlation = spearmanr(experts.numpy(), baseline_nll.numpy())
    tokens = [tokenizer.decode([int(t)]) for t in inputs.tolist()]
    per_token = pd.DataFrame({"token": tokens, "experts": experts.numpy()}).groupby("token")["experts"]
    per_token = per_token.agg(["mean", "count"])
    per_token = per_token[per_token["count"] >= min_occurrences].sort_values("mean")

    def listed(frame):
        return [(token, round(row["mean"], 3), int(row["count"])) for token, row in frame.iterrows()]

    return {
        "spearman_experts_vs_next_token_surprisal": float(correlation.statistic),
        "spearman_p_value": float(correlation.pvalue),
        "num_positions": int(experts.numel()),
        "fewest_experts": listed(per_token.head(num_tokens)),
        "most_experts": listed(per_token.tail(num_tokens)[::-1]),
    }


# ----------------------------------------------------------------------------------------------------
# 7. Models: the hub model, a local directory, or the embedded default
# ----------------------------------------------------------------------------------------------------


_TINY_MOE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    pad_token_id=1,
    eos_token_id=0,
    bos_token_id=None,
)
_DEEPSEEK_ATTENTION = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
_GROUPED = dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, first_k_dense_replace=0,
                n_group=4, topk_group=2, n_shared_experts=1)  # fmt: skip
_JAMBA = dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0, mamba_d_state=4,
              mamba_dt_rank=4, use_mamba_kernels=False)  # fmt: skip
# Small instances of each family (2 layers, hidden 64): its routing geometry at a size a CPU builds in seconds.
TINY_MOE_CONFIGS = {
    "olmoe": dict(num_experts=64, num_experts_per_tok=8, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=64
    ),
    "qwen3_moe": dict(
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16
    ),
    "deepseek_v2": _GROUPED
    | _DEEPSEEK_ATTENTION
    | dict(n_shared_experts=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": _GROUPED | _DEEPSEEK_ATTENTION | dict(routed_scaling_factor=2.5),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16, layer_types=["full_attention"] * 2),
    "jamba": dict(num_experts=8, num_experts_per_tok=2, **_JAMBA),
    "glm4_moe": _GROUPED | dict(head_dim=16),
    "dots1": _GROUPED | dict(head_dim=16),
}


def _moe_config(model_type: str, config, overrides: dict):
    """A transformers config of `model_type` from None (`TINY_MOE_CONFIGS`), a dict, a config.json path or
    a config object, with `overrides` applied."""
    from transformers import AutoConfig

    if config is None:
        if model_type not in TINY_MOE_CONFIGS:
            raise ValueError(
                f"model_type must be one of {sorted(TINY_MOE_CONFIGS)} without a config, got {model_type!r}"
            )
        config = _TINY_MOE | TINY_MOE_CONFIGS[model_type]
    elif isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    if isinstance(config, dict):
        fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype", "model_type")}
        return AutoConfig.for_model(config.get("model_type", model_type), **{**fields, **overrides})
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def build_random_moe(model_type: str = "olmoe", config=None, seed: int = 0, device: str = "cpu", dtype=torch.float32,
                     **config_overrides):  # fmt: skip
    """A randomly initialised causal LM (eval mode) of any transformers MoE family.

    Args:
        model_type: the family ("olmoe", "mixtral", "qwen2_moe", "deepseek_v3", ...; `TINY_MOE_CONFIGS`).
        config: None (the family's small instance in `TINY_MOE_CONFIGS`: 2 layers, hidden 64), a dict, a
            config object, or the path of a config.json (its model_type wins; e.g.
            benchmarks/qwen3-30b-a3b.config.json with num_hidden_layers=4 for the real shape, fewer layers).
        seed: torch seed for the initialisation.
        device, dtype: where and in which dtype the weights are created (a hub-sized shape: on a GPU in bf16).
        config_overrides: fields to override (e.g. num_hidden_layers=1).
    """
    from transformers import AutoModelForCausalLM

    config = _moe_config(model_type, config, config_overrides)
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.eval()


def build_random_olmoe(config=None, seed: int = 0, device: str = "cpu", dtype=torch.float32, **config_overrides):
    """A randomly initialised `OlmoeForCausalLM` (`build_random_moe("olmoe", ...)`): None gives a small
    model (2 layers, hidden 64, 64 experts, top-8); a config.json path such as
    benchmarks/olmoe-1b-7b-0924.config.json gives the real shape."""
    return build_random_moe("olmoe", config, seed, device, dtype, **config_overrides)


class MoEShape(NamedTuple):
    """A model's routing geometry from its config: experts per layer, native top-k, and the experts a token
    may choose from (fewer than E for group-limited routers)."""

    num_experts: int
    top_k: int
    selectable: int


def moe_shape(config) -> MoEShape:
    """`MoEShape` of a transformers MoE config, whichever names its family gives the fields."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    num_experts = next((getattr(config, n) for n in names if getattr(config, n, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise TypeError(f"{type(config).__name__} describes no mixture-of-experts model (no experts and top-k fields)")
    groups, allowed = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    limited = groups and allowed and allowed < groups and getattr(config, "topk_method", None) != "greedy"
    return MoEShape(num_experts, top_k, num_experts // groups * allowed if limited else num_experts)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_dtype(device) -> torch.dtype:
    """The dtype a device computes in natively: bfloat16 on GPUs of compute capability 8.0 or later (A100,
    L4, H100), float16 on older GPUs (T4, V100: no bfloat16 units; a model trained in bfloat16 may overflow
    in float16, in which case ask for float32), float32 on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def _resolve_dtype(dtype, device: str):
    if dtype in (None, "auto"):
        return native_dtype(device)
    if isinstance(dtype, str):
        allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)} or 'auto', got {dtype!r}")
        return allowed[dtype]
    return dtype


def model_source(model_name_or_path: str | Path) -> str:
    """Where `model_name_or_path` loads from: "embedded", "local" (an existing directory) or "hub" (an id
    such as "allenai/OLMoE-1B-7B-0924"). A name that can only be a path (absolute, relative with ./ or ../,
    ~, or more than one "/") and does not exist raises FileNotFoundError, rather than a hub error."""
    name = str(model_name_or_path)
    if name == "embedded":
        return "embedded"
    path = Path(name).expanduser()
    if path.is_dir():
        return "local"
    if path.exists():
        raise NotADirectoryError(f"model_name_or_path {name!r} is a file; give the model's directory")
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1 or not name:
        raise FileNotFoundError(
            f"model_name_or_path {name!r} is not an existing local directory (and cannot be a hub id, which has "
            "the form 'organisation/name'); check the path, or use 'embedded' or a hub id such as "
            f"{HUB_MODEL_ID!r}"
        )
    return "hub"


def _from_pretrained(model_name_or_path, read: Callable[[str], object]):
    """read(location) for the embedded model, a local directory or a hub id, with errors that say which."""
    source = model_source(model_name_or_path)
    location = str(EMBEDDED_MODEL_DIR if source == "embedded" else model_name_or_path)
    if source == "embedded" and not (EMBEDDED_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"The embedded model is missing from {EMBEDDED_MODEL_DIR}; this checkout is incomplete "
            "(it is committed in the repository; scripts/train_tiny_olmoe.py rebuilds it)."
        )
    try:
        return read(location)
    except OSError as error:
        if source != "hub":
            raise
        raise RuntimeError(
            f"Could not load {location!r} from the Hugging Face hub (no network, or not cached?). "
            f"Original error: {error}. Offline, use the embedded model instead: "
            f"load_model('embedded') (files in {EMBEDDED_MODEL_DIR})."
        ) from error


def load_config(model_name_or_path: str | Path = "embedded"):
    """The model's transformers config alone, without its weights (e.g. its experts and native top-k before
    anything is loaded). Same sources and errors as `load_model`."""
    from transformers import AutoConfig

    return _from_pretrained(model_name_or_path, AutoConfig.from_pretrained)


def load_model(
    model_name_or_path: str | Path = "embedded",
    device: str | None = None,
    dtype="auto",
    device_map: str | dict | None = None,
):
    """Load an OLMoE causal LM and its tokenizer with plain transformers (no trust_remote_code).

    Args:
        model_name_or_path: "embedded" (the model this repository ships, models/tiny-olmoe), a local
            directory, or a hub id such as "allenai/OLMoE-1B-7B-0924".
        device: "cuda", "cuda:1", "cpu", ... (default: cuda if available). Ignored when device_map is given.
            On a GPU the weights are loaded straight onto it, never as a full copy in host memory.
        dtype: "auto" (`native_dtype` of the device: bfloat16 on sm80+, float16 on older GPUs, float32 on a
            CPU), "float32", "bfloat16", "float16" or a torch dtype.
        device_map: passed to from_pretrained (e.g. "auto" to spread a model over several GPUs).
    Returns:
        (model in eval mode, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or _default_device()
    torch_dtype = _resolve_dtype(dtype, device if device_map is None else "cuda")
    if device_map is None and torch.device(device).type == "cuda":
        device_map = str(device)  # from_pretrained then places each weight on the GPU as it reads it

    def read(location: str):
        tokenizer = AutoTokenizer.from_pretrained(location)
        return AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, device_map=device_map), tokenizer

    model, tokenizer = _from_pretrained(model_name_or_path, read)
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


GIB = 2**30


def weights_gib(model) -> float:
    """The model's parameters in GiB, in the dtypes they are stored in."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / GIB


def memory_plan(model, eval_batch_size: int, eval_window: int, generate_tokens: int) -> dict:
    """Estimated device memory in GiB: the weights, the key/value cache of one generation of
    `generate_tokens` tokens, and the peak of a quality-evaluation forward pass (activations of the widest
    layer, the logits in the model's dtype and one float32 chunk of `evaluate_language_model`'s loss).
    Estimates from the config (within a few tens of percent), printed before a run so that a batch size
    that cannot fit is seen before it fails; `evaluate_language_model` still backs off on out-of-memory."""
    config = model.config
    element = next(model.parameters()).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token_kv = 2 * config.num_hidden_layers * kv_heads * head_dim * element
    tokens = eval_batch_size * eval_window
    expert_width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    widest = max(config.hidden_size * 4, 2 * expert_width * moe_shape(config).top_k)
    activations = tokens * widest * element * 2  # a layer's input, output and widest intermediate
    logits = tokens * config.vocab_size * element + min(LOSS_CHUNK_ELEMENTS, tokens * config.vocab_size) * 4 * 3
    weights = weights_gib(model)
    return {
        "weights_gib": weights,
        "kv_cache_gib": per_token_kv * generate_tokens / GIB,
        "evaluation_peak_gib": weights + (activations + logits) / GIB,
    }


def environment_info(model=None, device=None) -> dict:
    """Versions, hardware and date, for the report and the JSON."""
    import datetime
    import platform

    import transformers

    device = str(device or (next(model.parameters()).device if model is not None else "cpu"))
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "hardware": torch.cuda.get_device_name(torch.device(device))
        if device.startswith("cuda")
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    if model is not None:
        info["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        info["model_parameters"] = sum(p.numel() for p in model.parameters())
    return info


def run_settings(model, model_name_or_path, device: str) -> dict:
    """What every measurement of `model` depends on besides its own settings and this module (the key that
    `ResultStore` resumes by): the model's name or path, its dtype, the device as the caller placed it
    (e.g. "cpu", "cuda", "auto (spread over GPUs)") and the hardware."""
    info = environment_info(model)
    return {
        "model": str(model_name_or_path),
        "dtype": info["model_dtype"],
        "device": device,
        "hardware": info["hardware"],
    }


# ----------------------------------------------------------------------------------------------------
# 8. Variable-k expert execution: compute only the kept (token, expert) pairs
# ----------------------------------------------------------------------------------------------------
#
# transformers' experts paths take a fixed slot width K: "eager" loops over experts in Python with a
# host sync per layer, and "grouped_mm" runs its gather, activation and combine passes over all T x K
# slots (and, when sentinel slots may occur, extra masking passes), so fewer experts per token save
# little time. Here the kept pairs are sorted by expert (sentinels last), one grouped GEMM per projection
# runs over the kept rows only (grouped_mm skips rows past the last group's offset), and the three
# element-wise passes (gather, SiLU-and-multiply, weighted combine) read the number of kept pairs from
# the device and touch only those rows: Triton kernels on CUDA, plain torch elsewhere (the reference).
# No pass reads a count back to the host, so the path has no per-layer sync and can be CUDA-graphed.

VARIABLE_K_EXPERTS = "variable_k"  # the name registered in transformers' ExpertsInterface
EXPERTS_PATHS = (VARIABLE_K_EXPERTS, "model")  # MoERouterPatcher(experts_path=...)
# Up to this many (token, slot) pairs (decoding a few sequences) the fused path computes each kept pair with
# matrix-vector kernels on its expert's weights: there a sort and grouped GEMMs cost more launches and fixed
# time than the few experts' bytes (benchmarks/gpu_notes.md, run 37).
DECODE_PAIRS = 16

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch reference below.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def sort_pairs_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the T*K (token, slot) pairs by expert, sentinel slots (index E) last.

    Args:
        top_k_index: [T, K] expert ids, E in unused slots.
    Returns:
        pair_order [T*K] int64: flat pair ids (token * K + slot), sorted by expert id.
        offsets [E] int32: offsets[e] is one past the last row of expert e's group; offsets[E-1] is the
            number of kept pairs. Computed on the device (searchsorted), never read back.
    """
    # The narrowest key that holds the sentinel: a radix sort makes one pass per key byte.
    key_dtype = torch.uint8 if num_experts < 2**8 else torch.int16 if num_experts < 2**15 else torch.int32
    sorted_expert_ids, pair_order = torch.sort(top_k_index.reshape(-1).to(key_dtype))
    expert_ids = torch.arange(num_experts, device=top_k_index.device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_expert_ids, expert_ids, right=True, out_int32=True)
    return pair_order, offsets


@functools.cache  # called per layer: no version parsing on the hot path
def grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch has a grouped GEMM kernel here: on CPU from torch 2.9 (any float dtype); on CUDA in
    bf16, on sm80+ from torch 2.9 and on Hopper (sm90) before (not on a T4, sm75)."""
    from packaging.version import Version

    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    recent = Version(torch.__version__.split("+")[0]) >= Version("2.9")
    if device.type == "cpu":
        return recent
    if device.type == "cuda" and dtype == torch.bfloat16:
        capability = torch.cuda.get_device_capability(device)
        return capability >= (8, 0) if recent else capability[0] == 9
    return False


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor, grouped=None) -> torch.Tensor:
    """rows [S, in] sorted by group, weights [E, out, in] (nn.Linear layout), offsets [E] -> [S, out].

    Rows at and past offsets[-1] are not computed (their values are undefined). torch's grouped GEMM where
    it has one (grouped: True, or None to ask `grouped_mm_usable`); otherwise one matmul per expert, which
    reads the offsets back to the host once, or, inside a compiled graph, one batched product with each
    row's expert's weights gathered (no host read; memory S x out x in, for the small inputs compiled
    decoding sees)."""
    if grouped_mm_usable(rows.device, rows.dtype) if grouped is None else grouped:
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return grouped_mm(rows, weights.transpose(-2, -1), offs=offsets)
    if torch.compiler.is_compiling():
        row_ids = torch.arange(rows.shape[0], device=rows.device, dtype=offsets.dtype)
        expert_of_row = torch.searchsorted(offsets, row_ids, right=True).clamp_max(weights.shape[0] - 1)  # [S]
        return torch.bmm(weights[expert_of_row], rows.unsqueeze(-1)).squeeze(-1)
    output = torch.zeros(rows.shape[0], weights.shape[1], device=rows.device, dtype=rows.dtype)
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # fallback only: one sync, loop over experts
        if end > start:
            output[start:end] = rows[start:end] @ weights[expert].T
        start = end
    return output


def variable_k_unsupported(experts: torch.nn.Module) -> str | None:
    """Why the variable-k path cannot run this experts module (None: it can). It serves every layout of the
    experts interface (gate/up concatenated or interleaved through the module's own `_apply_gate`, weights
    transposed or not, biases, no gate) except a norm after each expert."""
    if getattr(experts, "has_post_expert_norm", False):
        return f"{type(experts).__name__} (a norm after each expert)"
    if not _is_contract_experts(experts):
        return f"{type(experts).__name__} (not an experts module of transformers' experts interface)"
    return None


@functools.cache
def _eager_skips_sentinels(experts_class: type) -> bool:
    forward = getattr(experts_class.forward, "__wrapped__", experts_class.forward)
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "num_experts + 1" in source  # its one-hot has a class for the sentinel, whose loop skips it


def eager_skips_sentinels(experts: torch.nn.Module) -> bool:
    """Whether the family's own (eager) experts forward skips the sentinel index E (OLMoE's, Mixtral's,
    DeepSeek's do; gpt-oss's one-hot has no class for it)."""
    return _eager_skips_sentinels(type(experts))


def _expert_linear(experts, name: str, rows, offsets, sorted_experts, grouped) -> torch.Tensor:
    """rows [S, in] sorted by expert through the experts' projection `name` (its layout and bias)."""
    weights = getattr(experts, name)
    weights = weights.transpose(-2, -1) if experts.is_transposed else weights  # [E, out, in], a view
    output = grouped_matmul(rows, weights, offsets, grouped)
    return output + getattr(experts, f"{name}_bias")[sorted_experts] if experts.has_bias else output


def variable_k_experts_torch(hidden_states, top_k_index, top_k_weights, experts, grouped=None):
    """The reference (and CPU) variable-k experts forward, for any layout `variable_k_unsupported` accepts.
    Shapes as in `variable_k_experts_forward`; grouped as in `grouped_matmul`."""
    num_tokens, slots = top_k_index.shape
    num_experts = experts.num_experts
    pair_order, offsets = sort_pairs_by_expert(top_k_index, num_experts)
    sorted_experts = top_k_index.reshape(-1)[pair_order].clamp_max(num_experts - 1)  # [S]: for the biases
    sorted_hidden = hidden_states[pair_order // slots]  # [S, H]
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    projected = _expert_linear(experts, first, sorted_hidden, offsets, sorted_experts, grouped)
    activated = experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)  # [S, I]
    expert_outputs = _expert_linear(experts, "down_proj", activated, offsets, sorted_experts, grouped)  # tail undefined
    sorted_rows = torch.arange(pair_order.numel(), device=pair_order.device)  # [S]
    # Rows past the kept pairs are undefined (may hold NaN): zero them before any weighted sum.
    expert_outputs = torch.where((sorted_rows < offsets[-1])[:, None], expert_outputs, 0.0)
    pair_rows = torch.empty_like(pair_order)
    pair_rows[pair_order] = sorted_rows  # pair -> sorted row
    slot_weights = top_k_weights.float().masked_fill(top_k_index >= num_experts, 0.0)  # [T, K]
    per_slot = expert_outputs[pair_rows].view(num_tokens, slots, -1).float()  # [T, K, H]
    return (per_slot * slot_weights[..., None]).sum(dim=1).to(hidden_states.dtype)


if triton is not None:

    @triton.jit
    def _gather_kept_pairs_kernel(
        hidden_ptr,
        pair_order_ptr,
        offsets_ptr,
        sorted_hidden_ptr,
        pair_rows_ptr,
        hidden_size,
        num_experts,
        SLOTS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """For each sorted row r < kept: sorted_hidden[r] = hidden[pair_order[r] // K], and records
        pair_rows[pair_order[r]] = r for the combine. The programs stride over the kept rows only, so rows
        past the kept count cost nothing."""
        num_kept = tl.load(offsets_ptr + num_experts - 1)
        for row in range(tl.program_id(0), num_kept, tl.num_programs(0)):
            row = tl.cast(row, tl.int64)  # 64-bit offsets: rows x hidden may pass 2**31
            pair = tl.load(pair_order_ptr + row)
            tl.store(pair_rows_ptr + pair, row)
            source = hidden_ptr + (pair // SLOTS) * hidden_size
            target = sorted_hidden_ptr + row * hidden_size
            columns = tl.arange(0, BLOCK)
            for start in range(0, hidden_size, BLOCK):
                mask = start + columns < hidden_size
                tl.store(target + start + columns, tl.load(source + start + columns, mask=mask), mask=mask)

    @triton.jit
    def _silu_and_mul_kept_kernel(
        gate_up_ptr, output_ptr, offsets_ptr, intermediate_size, num_experts, BLOCK: tl.constexpr
    ):
        """output[r] = silu(gate_up[r, :I]) * gate_up[r, I:] for kept rows r, in float32 then rounded once."""
        num_kept = tl.load(offsets_ptr + num_experts - 1)
        for row in range(tl.program_id(0), num_kept, tl.num_programs(0)):  # kept rows only, as above
            row = tl.cast(row, tl.int64)
            source = gate_up_ptr + row * 2 * intermediate_size
            target = output_ptr + row * intermediate_size
            columns = tl.arange(0, BLOCK)
            for start in range(0, intermediate_size, BLOCK):
                mask = start + columns < intermediate_size
                gate = tl.load(source + start + columns, mask=mask).to(tl.float32)
                up = tl.load(source + intermediate_size + start + columns, mask=mask).to(tl.float32)
                activated = gate * tl.sigmoid(gate) * up
                tl.store(target + start + columns, activated.to(output_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_kept_pairs_kernel(
        expert_outputs_ptr,
        pair_rows_ptr,
        top_k_index_ptr,
        top_k_weights_ptr,
        output_ptr,
        hidden_size,
        num_experts,
        SLOTS: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS_ARE_PAIRS: tl.constexpr = False,
    ):
        """output[t, block] = sum over kept slots k of weight[t, k] * expert_outputs[pair_rows[t*K + k], block],
        accumulated in float32; sentinel slots load nothing. ROWS_ARE_PAIRS: expert_outputs has one row per
        pair (row t*K + k; pair_rows is not read)."""
        token = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < hidden_size
        accumulator = tl.zeros([BLOCK], dtype=tl.float32)
        for slot in tl.static_range(SLOTS):
            pair = token * SLOTS + slot
            kept = tl.load(top_k_index_ptr + pair) < num_experts
            weight = tl.load(top_k_weights_ptr + pair).to(tl.float32)
            if ROWS_ARE_PAIRS:
                row = pair
            else:
                row = tl.load(pair_rows_ptr + pair, mask=kept, other=0)
            kept_columns = columns < tl.where(kept, hidden_size, 0)  # all False in a sentinel slot
            values = tl.load(expert_outputs_ptr + row * hidden_size + columns, mask=kept_columns, other=0.0)
            accumulator += tl.where(kept, weight, 0.0) * values.to(tl.float32)
        tl.store(output_ptr + token * hidden_size + columns, accumulator.to(output_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pair_gate_up_kernel(
        hidden_ptr,
        top_k_index_ptr,
        gate_up_ptr,
        activated_ptr,
        hidden_size,
        intermediate_size,
        num_experts,
        SLOTS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """activated[p, rows] = silu(gate) * up for a block of the I rows of pair p = t*K + k, where gate and up
        are expert e's gate and up rows times hidden[t] (matrix-vector products, float32 sums rounded to the
        weights' dtype as the grouped GEMM's output is); a sentinel pair writes nothing."""
        pair = tl.program_id(0).to(tl.int64)
        expert = tl.load(top_k_index_ptr + pair).to(tl.int64)
        if expert < num_experts:
            dtype = gate_up_ptr.dtype.element_ty
            rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            columns = tl.arange(0, BLOCK_K)
            source = hidden_ptr + (pair // SLOTS) * hidden_size
            gate_rows = gate_up_ptr + expert * 2 * intermediate_size * hidden_size + rows[:, None] * hidden_size
            up_rows = gate_rows + intermediate_size * hidden_size
            gate = tl.zeros([BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, hidden_size, BLOCK_K):
                column_mask = start + columns < hidden_size
                mask = (rows[:, None] < intermediate_size) & column_mask[None, :]
                vector = tl.load(source + start + columns, mask=column_mask, other=0.0).to(dtype).to(tl.float32)
                weights = tl.load(gate_rows + start + columns[None, :], mask=mask, other=0.0)
                gate += tl.sum(weights.to(tl.float32) * vector[None, :], axis=1)
                weights = tl.load(up_rows + start + columns[None, :], mask=mask, other=0.0)
                up += tl.sum(weights.to(tl.float32) * vector[None, :], axis=1)
            gate = gate.to(dtype).to(tl.float32)
            activated = gate * tl.sigmoid(gate) * up.to(dtype).to(tl.float32)
            target = activated_ptr + pair * intermediate_size + rows
            tl.store(target, activated.to(activated_ptr.dtype.element_ty), mask=rows < intermediate_size)

    @triton.jit
    def _pair_down_kernel(
        activated_ptr,
        top_k_index_ptr,
        down_ptr,
        expert_outputs_ptr,
        hidden_size,
        intermediate_size,
        num_experts,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """expert_outputs[p, rows] = expert e's down rows times activated[p] for a block of the H rows of pair p
        (a matrix-vector product, float32 sums rounded to the weights' dtype); a sentinel pair writes nothing."""
        pair = tl.program_id(0).to(tl.int64)
        expert = tl.load(top_k_index_ptr + pair).to(tl.int64)
        if expert < num_experts:
            rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
            columns = tl.arange(0, BLOCK_K)
            source = activated_ptr + pair * intermediate_size
            weight_rows = down_ptr + expert * hidden_size * intermediate_size + rows[:, None] * intermediate_size
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, intermediate_size, BLOCK_K):
                column_mask = start + columns < intermediate_size
                mask = (rows[:, None] < hidden_size) & column_mask[None, :]
                vector = tl.load(source + start + columns, mask=column_mask, other=0.0).to(tl.float32)
                weights = tl.load(weight_rows + start + columns[None, :], mask=mask, other=0.0)
                total += tl.sum(weights.to(tl.float32) * vector[None, :], axis=1)
            target = expert_outputs_ptr + pair * hidden_size + rows
            tl.store(target, total.to(expert_outputs_ptr.dtype.element_ty), mask=rows < hidden_size)


@functools.cache
def _num_row_programs(device: torch.device) -> int:
    """Programs for the row kernels: a few per streaming multiprocessor, each striding over the kept rows."""
    if device.type != "cuda":
        return 64
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def variable_k_experts_triton(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, row_programs=None):
    """The fused variable-k experts forward (SiLU-gated experts): sort, Triton gather, two grouped GEMMs
    with a Triton SiLU-and-multiply between them, Triton weighted combine; for at most `DECODE_PAIRS`
    (token, slot) pairs, `variable_k_experts_decode` instead. Shapes as in `variable_k_experts_forward`;
    row_programs: programs of the row kernels (None: a few per SM). Runs wherever Triton runs (CUDA; CPU
    under TRITON_INTERPRET=1)."""
    num_tokens, slots = top_k_index.shape
    num_experts, double_intermediate, hidden_size = gate_up_proj.shape
    num_pairs = num_tokens * slots
    hidden_states, top_k_index, top_k_weights = (t.contiguous() for t in (hidden_states, top_k_index, top_k_weights))
    if num_pairs == 0:
        return torch.empty_like(hidden_states)
    if num_pairs <= DECODE_PAIRS:
        return variable_k_experts_decode(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    pair_order, offsets = sort_pairs_by_expert(top_k_index, num_experts)
    sorted_hidden = torch.empty(num_pairs, hidden_size, device=hidden_states.device, dtype=gate_up_proj.dtype)
    pair_rows = torch.empty_like(pair_order)
    row_programs = _num_row_programs(hidden_states.device) if row_programs is None else row_programs
    row_programs = (min(num_pairs, row_programs),)
    _gather_kept_pairs_kernel[row_programs](
        hidden_states, pair_order, offsets, sorted_hidden, pair_rows, hidden_size, num_experts, SLOTS=slots, BLOCK=1024
    )
    gate_up = grouped_matmul(sorted_hidden, gate_up_proj, offsets, grouped=True)  # [S, 2I]
    activated = torch.empty(num_pairs, double_intermediate // 2, device=gate_up.device, dtype=gate_up.dtype)
    _silu_and_mul_kept_kernel[row_programs](
        gate_up, activated, offsets, double_intermediate // 2, num_experts, BLOCK=1024
    )
    expert_outputs = grouped_matmul(activated, down_proj, offsets, grouped=True)  # [S, H]
    return _combine_kept_pairs(expert_outputs, pair_rows, top_k_index, top_k_weights, hidden_states, num_experts)


def variable_k_experts_decode(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """The fused variable-k experts forward for a few (token, slot) pairs, as in decoding: each kept pair's
    gate/up and down projections as matrix-vector products that read its expert's weights directly, then
    the weighted combine. Three kernels, no sort, no grouped GEMM; every pair reads its expert's weights
    (pairs that share an expert read them twice, which is why larger inputs take the grouped path).
    Contiguous inputs, shapes as in `variable_k_experts_forward`."""
    num_tokens, slots = top_k_index.shape
    num_experts, double_intermediate, hidden_size = gate_up_proj.shape
    intermediate_size, num_pairs = double_intermediate // 2, num_tokens * slots
    activated = torch.empty(num_pairs, intermediate_size, device=hidden_states.device, dtype=gate_up_proj.dtype)
    expert_outputs = torch.empty(num_pairs, hidden_size, device=hidden_states.device, dtype=down_proj.dtype)
    sizes, rows = (hidden_size, intermediate_size, num_experts), 8  # output rows per program: I/8 programs a pair
    gate_up_block = min(512, triton.next_power_of_2(hidden_size))
    _pair_gate_up_kernel[(num_pairs, triton.cdiv(intermediate_size, rows))](
        hidden_states, top_k_index, gate_up_proj, activated, *sizes, SLOTS=slots, BLOCK_N=rows, BLOCK_K=gate_up_block
    )
    down_block = min(512, triton.next_power_of_2(intermediate_size))
    _pair_down_kernel[(num_pairs, triton.cdiv(hidden_size, 2 * rows))](
        activated, top_k_index, down_proj, expert_outputs, *sizes, BLOCK_N=2 * rows, BLOCK_K=down_block
    )
    return _combine_kept_pairs(expert_outputs, None, top_k_index, top_k_weights, hidden_states, num_experts)


def _combine_kept_pairs(expert_outputs, pair_rows, top_k_index, top_k_weights, hidden_states, num_experts: int):
    """[T, H] weighted sum of each token's kept pairs' expert outputs (rows given by pair_rows [T*K], or one
    row per pair when pair_rows is None); slots holding the sentinel num_experts are skipped."""
    (num_tokens, slots), hidden_size = top_k_index.shape, hidden_states.shape[-1]
    output = torch.empty_like(hidden_states)
    block = min(1024, triton.next_power_of_2(hidden_size))
    rows_are_pairs = pair_rows is None
    _combine_kept_pairs_kernel[(num_tokens, triton.cdiv(hidden_size, block))](
        expert_outputs,
        top_k_index if rows_are_pairs else pair_rows,  # not read when the rows are the pairs
        top_k_index,
        top_k_weights,
        output,
        hidden_size,
        num_experts,
        SLOTS=slots,
        BLOCK=block,
        ROWS_ARE_PAIRS=rows_are_pairs,
    )
    return output


def _olmoe_layout(experts: torch.nn.Module) -> bool:
    """Concatenated [E, 2I, H] gate/up with the default gate, [E, H, I] down, no bias, no post norm."""
    layout = tuple(
        getattr(experts, name, None) for name in ("has_gate", "has_bias", "is_transposed", "is_concatenated")
    )
    default_gate = getattr(type(experts), "_apply_gate", None)
    return (
        layout == (True, False, False, True)
        and not getattr(experts, "has_post_expert_norm", False)
        and getattr(default_gate, "__name__", "") == "_default_apply_gate"
    )


def _triton_path_supported(experts: torch.nn.Module, device: torch.device) -> bool:
    """The fused path: CUDA with Triton, the OLMoE layout in bf16, SiLU gating and a grouped GEMM kernel."""
    return (
        triton is not None
        and device.type == "cuda"
        and _olmoe_layout(experts)
        and getattr(experts.config, "hidden_act", None) == "silu"
        and grouped_mm_usable(device, experts.gate_up_proj.dtype)
    )


class VariableKPlan(NamedTuple):
    """How `variable_k_experts_forward` runs one experts module on one device and dtype: decided once,
    eagerly (`variable_k_plan`), so that a compiled forward reads it and traces no capability check."""

    device: torch.device
    dtype: torch.dtype
    fused: bool  # the Triton path (`_triton_path_supported`)
    grouped: bool  # torch's grouped GEMM (`grouped_mm_usable`), else one matmul per expert
    row_programs: int  # programs of the Triton row kernels


def variable_k_plan(experts: torch.nn.Module) -> VariableKPlan:
    """The plan of `experts` on its weights' device and dtype, made now and kept on the module
    (`experts._variable_k_plan`). NotImplementedError if the variable-k path cannot serve the module."""
    unsupported = variable_k_unsupported(experts)
    if unsupported is not None:
        raise NotImplementedError(f"experts_implementation={VARIABLE_K_EXPERTS!r} cannot serve {unsupported}")
    weight = experts.down_proj
    fused = _triton_path_supported(experts, weight.device)
    row_programs = _num_row_programs(weight.device) if fused else 0
    grouped = grouped_mm_usable(weight.device, weight.dtype)
    plan = VariableKPlan(weight.device, weight.dtype, fused, grouped, row_programs)
    experts._variable_k_plan = plan
    return plan


def _plan_of(experts: torch.nn.Module) -> VariableKPlan:
    plan = getattr(experts, "_variable_k_plan", None)
    if torch.compiler.is_compiling():
        if plan is None:
            raise RuntimeError(
                "the variable-k experts path was compiled before its plan was made: call "
                "bh_routing.variable_k_plan(experts) on every experts module (the patcher does) before compiling"
            )
        return plan
    weight = experts.down_proj  # a model moved or cast since the plan gets a new one
    stale = plan is None or plan.device != weight.device or plan.dtype != weight.dtype
    return variable_k_plan(experts) if stale else plan


def variable_k_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Experts forward that computes only the kept (token, expert) pairs; registered in transformers as
    experts_implementation="variable_k" (`model.set_experts_implementation("variable_k")`).

    Args:
        experts: an experts module of transformers' experts interface (`variable_k_unsupported` is None):
            e.g. `OlmoeExperts` (gate_up_proj [E, 2I, H], down_proj [E, H, I]) or `GptOssExperts`
            (transposed, interleaved gate/up, biases).
        hidden_states: [T, H].
        top_k_index: [T, K] expert ids; the sentinel E marks an unused slot (any number per token, 0..K).
        top_k_weights: [T, K] routing weights (ignored in sentinel slots).
    Returns:
        [T, H] in hidden_states' dtype: sum over kept slots of weight * expert(hidden_state).
    Where `_triton_path_supported` (CUDA, Triton, the OLMoE layout in bf16, SiLU, a grouped GEMM kernel) the
    Triton path runs; otherwise the torch reference (on a GPU without a grouped GEMM kernel, one matmul per
    expert). The choice is the module's `variable_k_plan`, made eagerly; a compiled forward only reads it.
    """
    plan = _plan_of(experts)
    if not plan.fused:
        # torch traces its grouped GEMM in bfloat16 only (its meta function refuses other dtypes).
        grouped = plan.grouped and (plan.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
        return variable_k_experts_torch(hidden_states, top_k_index, top_k_weights, experts, grouped)
    arguments = (hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, plan.row_programs)
    if torch.compiler.is_compiling() or hidden_states.device.index == torch.cuda.current_device():
        return variable_k_experts_triton(*arguments)
    with torch.cuda.device(hidden_states.device):  # Triton launches on the current device
        return variable_k_experts_triton(*arguments)


def register_variable_k_experts() -> None:
    """Make experts_implementation="variable_k" known to transformers (from_pretrained, set_experts_implementation)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(VARIABLE_K_EXPERTS, variable_k_experts_forward)


# ----------------------------------------------------------------------------------------------------
# 8b. MoE families: finding a model's MoE layers and how each family's router routes
# ----------------------------------------------------------------------------------------------------
# transformers' MoE families share one contract: a block holds an experts module decorated with
# `use_experts_implementation` (forward(hidden [T, H], top_k_index [T, K], top_k_weights [T, K]), the
# sentinel index E skipped by the eager and grouped_mm paths) and a router module whose forward returns
# (router_logits [T, E], top_k_weights [T, K], top_k_index [T, K]). The routers differ in how they score
# and weight experts; a `RouterSpec` says how, is read off the router's attributes and is checked against
# the router's own output before anything is patched.

ROUTER_SCORES = ("softmax", "softmax_kept", "sigmoid")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")  # block children always computed


class RouterSpec:
    """How one router turns its logits [T, E] into a top-k routing, so that a routing method can replace it.

    score:
        "softmax": top-k of softmax(logits) (OLMoE, Mixtral, Qwen2/3-MoE, Jamba, DeepSeek-V2);
        "softmax_kept": top-k of the logits, softmax over the kept logits (GraniteMoE, gpt-oss);
        "sigmoid": top-k of sigmoid(logits) + a score-correction bias, weights sigmoid(logits) of the kept
            experts (DeepSeek-V3, GLM4-MoE, Dots1).
    renormalize: the kept weights are divided by their sum (norm_topk_prob); scale: routed_scaling_factor;
    groups: None or (n_group, topk_group, group score "max" | "top2sum"): only experts in the topk_group best
        groups are selectable (DeepSeek-V2 group_limited_greedy, DeepSeek-V3).

    A routing method sees each token's `selection` logits [T, E'] over its E' selectable experts, whose
    softmax is the family's selection distribution (the logits themselves for the softmax families,
    log(sigmoid + bias) for the sigmoid ones), and picks slots; the kept weights then follow the family's own
    weighting (`weights`), so that top-k at the native k gives the native routing.
    """

    def __init__(self, router, score: str, renormalize: bool, scale: float = 1.0, groups: tuple | None = None):
        if score not in ROUTER_SCORES:
            raise ValueError(f"score must be one of {ROUTER_SCORES}, got {score!r}")
        self.router, self.score, self.renormalize, self.scale, self.groups = router, score, renormalize, scale, groups
        self.num_experts, self.top_k = int(router.weight.shape[0]), int(router.top_k)
        self.sorted_output = True  # set by `describe_router` from the router's own output

    @property
    def selectable(self) -> int:
        """Experts a token may choose from: E, or those of the topk_group allowed groups."""
        if self.groups is None:
            return self.num_experts
        num_groups, allowed_groups, _ = self.groups
        return self.num_experts // num_groups * allowed_groups

    @property
    def plain(self) -> bool:
        """A routing method's own weights (softmax probabilities of the kept experts) are the family's."""
        return self.score == "softmax" and self.scale == 1.0 and self.groups is None

    def describe(self) -> str:
        groups = "" if self.groups is None else f", top {self.groups[1]} of {self.groups[0]} groups ({self.groups[2]})"
        scale = "" if self.scale == 1.0 else f", weights x {self.scale:g}"
        norm = ", renormalised" if self.renormalize else ""
        return f"{self.score} top-{self.top_k} of {self.num_experts}{groups}{norm}{scale}"

    def _choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 scores the family ranks experts by."""
        if self.score == "sigmoid":
            bias = getattr(self.router, "e_score_correction_bias", None)
            scores = logits.float().sigmoid()
            return scores if bias is None else scores + bias.float()
        return torch.softmax(logits.float(), dim=-1)

    def _allowed(self, choice: torch.Tensor) -> torch.Tensor:
        """[T, E'] ascending ids of each token's selectable experts (its topk_group best groups)."""
        num_groups, allowed_groups, group_score = self.groups
        per_group = self.num_experts // num_groups
        grouped = choice.view(-1, num_groups, per_group)
        best = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        groups = best.topk(allowed_groups, dim=-1).indices.sort(dim=-1).values  # [T, G']
        members = torch.arange(per_group, device=choice.device)
        return (groups[..., None] * per_group + members).flatten(-2)  # [T, G' x per_group]

    def selection(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(selection logits [T, E'] a routing method routes, allowed [T, E'] expert ids or None for all)."""
        if self.score == "sigmoid":
            choice = self._choice_scores(logits)
            selection = choice.clamp_min(torch.finfo(torch.float32).tiny).log()
        else:
            choice, selection = (None, logits)
        if self.groups is None:
            return selection, None
        allowed = self._allowed(self._choice_scores(logits) if choice is None else choice)
        return selection.float().gather(-1, allowed), allowed

    def expand(self, index: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Slots over the selectable experts [T, K] -> expert ids [T, K] (sentinel E' -> E)."""
        if allowed is None:
            return index
        kept = index < allowed.shape[-1]
        experts = allowed.gather(-1, index.clamp_max(allowed.shape[-1] - 1))
        return torch.where(kept, experts, torch.full_like(experts, self.num_experts))

    def weights(self, logits: torch.Tensor, index: torch.Tensor, renormalize: bool) -> torch.Tensor:
        """The family's weights [T, K] of the kept experts `index` [T, K] (0 in sentinel slots)."""
        kept = index < self.num_experts
        safe = index.clamp_max(self.num_experts - 1)
        if self.score == "softmax_kept" and renormalize:  # as the router: softmax over the kept logits
            kept_logits = logits.gather(-1, safe).masked_fill(~kept, float("-inf"))
            weights = torch.softmax(kept_logits, dim=-1).nan_to_num(0.0)  # a token with no kept slot: zeros
        else:
            scores = logits.float().sigmoid() if self.score == "sigmoid" else torch.softmax(logits.float(), dim=-1)
            weights = torch.where(kept, scores.gather(-1, safe), torch.zeros((), device=scores.device))
        if renormalize and self.score == "sigmoid":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # as DeepSeek-V3's router
        elif renormalize and self.score == "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return weights * self.scale if self.scale != 1.0 else weights

    def relative_weights(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[T, K] float32, per token proportional to the family's weights of the kept experts `index` (0 in
        sentinel slots): all that their normalised entropy needs, read from K logits (scaling and
        renormalising change no share). Softmax families: exp of each kept logit less the first slot's (the
        largest where the router sorts its output; the exponent is clamped at 80 so that a router whose kept
        logits spread over more than that cannot overflow float32)."""
        kept = index < self.num_experts
        kept_logits = logits.gather(-1, index.clamp_max(self.num_experts - 1)).float()
        if self.score == "sigmoid":
            scores = kept_logits.sigmoid()  # the score-correction bias ranks experts, it does not weight them
        else:
            scores = (kept_logits - kept_logits[..., :1]).clamp_max(80.0).exp()
        return torch.where(kept, scores, torch.zeros((), device=scores.device))

    def native(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own top-k (weights [T, k], index [T, k]) from its logits: what `describe_router`
        checks against the router's output."""
        selection, allowed = self.selection(logits)
        index = self.expand(selection.float().topk(self.top_k, dim=-1).indices, allowed)
        return self.weights(logits, index, self.renormalize), index


def _router_candidates(router) -> list[RouterSpec]:
    """The specs a router's attributes allow, most specific first."""
    scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
    num_groups, allowed_groups = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3's router and its descendants
        groups = (num_groups, allowed_groups, "top2sum") if num_groups and allowed_groups < num_groups else None
        return [RouterSpec(router, "sigmoid", bool(getattr(router, "norm_topk_prob", True)), scale, groups)]
    if hasattr(router, "topk_method"):  # DeepSeek-V2: greedy or group-limited greedy, never renormalised
        limited = router.topk_method == "group_limited_greedy" and allowed_groups < num_groups
        return [RouterSpec(router, "softmax", False, scale, (num_groups, allowed_groups, "max") if limited else None)]
    norms = [bool(router.norm_topk_prob)] if hasattr(router, "norm_topk_prob") else [False, True]
    return [RouterSpec(router, "softmax", norm, scale) for norm in norms] + [RouterSpec(router, "softmax_kept", True)]


@torch.no_grad()
def _matches(spec: RouterSpec, logits, weights, index) -> str | None:
    """ "exact", "close" or None: how the spec's top-k reproduces the router's (weights, index) on rows whose
    k-th and (k+1)-th choices are not tied."""
    selection, _ = spec.selection(logits)
    decided = torch.ones(selection.shape[0], dtype=torch.bool, device=selection.device)
    if selection.shape[-1] > spec.top_k:
        ranked = selection.float().topk(spec.top_k + 1, dim=-1).values
        decided = ranked[:, spec.top_k] < ranked[:, spec.top_k - 1]
    if not bool(decided.any()):
        return None
    own_weights, own_index = spec.native(logits)
    order, own_order = index.argsort(-1), own_index.argsort(-1)
    same_index = torch.equal(index.gather(-1, order)[decided], own_index.gather(-1, own_order)[decided])
    ours = own_weights.to(weights.dtype).gather(-1, own_order)[decided]
    theirs = weights.gather(-1, order)[decided]
    if not same_index or not torch.allclose(ours.float(), theirs.float(), rtol=2e-2, atol=1e-4):
        return None
    return "exact" if torch.equal(ours, theirs) else "close"


def describe_router(router: torch.nn.Module) -> RouterSpec:
    """The `RouterSpec` of a router of the shared contract, checked against the router's own output on a
    probe batch: the exact reproduction if one exists, else one equal within rounding. TypeError naming the
    router if none reproduces it (e.g. PhiMoE's sparsemixer)."""
    weight = router.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(32, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    own_class = getattr(type(router), "unpatched_class", type(router))  # a patched router's own class
    with torch.no_grad():
        output = own_class.forward(router, probe)  # not __call__: a patch must not answer
    if not (isinstance(output, tuple) and len(output) >= 3):
        raise TypeError(f"{own_class.__name__} does not return (router_logits, top_k_weights, top_k_index)")
    logits, weights, index = output[:3]
    found = [(_matches(spec, logits, weights, index), spec) for spec in _router_candidates(router)]
    chosen = next((s for m, s in found if m == "exact"), None) or next((s for m, s in found if m == "close"), None)
    if chosen is None:
        raise TypeError(
            f"{own_class.__name__}'s routing is none of the supported families ({', '.join(ROUTER_SCORES)} "
            "top-k, optionally renormalised, scaled and group-limited): it cannot be patched"
        )
    chosen.sorted_output = bool((weights.float().diff(dim=-1) <= 0).all()) if chosen.plain else False
    return chosen


@dataclass
class MoELayer:
    """One MoE block of a model: its router, its experts module, how the router routes, and the shared
    experts it always computes besides the routed ones."""

    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    spec: RouterSpec
    shared_experts: int = 0


def _is_contract_experts(module) -> bool:
    """An experts module decorated with transformers' `use_experts_implementation`."""
    return all(hasattr(module, name) for name in ("has_gate", "is_transposed", "_is_expert_parallel", "num_experts"))


def _router_of(block, experts) -> torch.nn.Module | None:
    """The block's child that routes to `experts`: a module with a top_k and a [E, H] weight."""
    for child in block.children():
        weight = getattr(child, "weight", None)
        if child is not experts and hasattr(child, "top_k") and isinstance(weight, torch.Tensor):
            if weight.dim() == 2 and weight.shape[0] == experts.num_experts:
                return child
    return None


def _shared_experts(block, config) -> int:
    """How many shared experts the block always computes: n_shared_experts (DeepSeek) or 1 per module."""
    modules = [name for name in SHARED_EXPERT_NAMES if isinstance(getattr(block, name, None), torch.nn.Module)]
    if not modules:
        return 0
    return int(getattr(config, "n_shared_experts", None) or getattr(config, "num_shared_experts", None) or len(modules))


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """Every MoE block of `model` of the shared router/experts contract, in module order.

    TypeError when there is none, naming why: no MoE layer at all, or experts that transformers'
    experts interface does not dispatch (e.g. DBRX's, Llama4's)."""
    layers, other_experts = [], []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module) or block is experts:
            continue
        router = _router_of(block, experts) if _is_contract_experts(experts) else None
        if router is None:
            other_experts.append(f"{name} ({type(experts).__name__})")
            continue
        layers.append(MoELayer(block, router, experts, describe_router(router), _shared_experts(block, model.config)))
    if not layers:
        reason = (
            f"its experts modules {other_experts[:2]} are not dispatched by transformers' experts interface "
            "(@use_experts_implementation) with a top-k router beside them"
            if other_experts
            else "it has no mixture-of-experts layer"
        )
        raise TypeError(f"{type(model).__name__} cannot be patched: {reason}")
    return layers


# ----------------------------------------------------------------------------------------------------
# 9. The router patcher
# ----------------------------------------------------------------------------------------------------


class CudaGraphed:
    """Replay `function(*args)` as one CUDA graph per (shape, dtype, device) of its tensor arguments.

    Capturing needs a function without host synchronisation. The tensor arguments are copied into the
    graph's static buffers and the outputs (a tuple of tensors or None) are cloned out, because the next
    replay (the next layer) overwrites them; arguments that are not tensors (None) are part of the key. The
    function must leave every other tensor alone: the two warm-up runs before a capture run it too. At most
    `max_graphs` keys are kept (least recently used dropped); other devices than CUDA, and calls inside
    another capture or a compiled region, call the function directly."""

    def __init__(self, function, max_graphs: int = 16):
        self.function, self.max_graphs = function, max_graphs
        self.graphs: dict = {}

    def __call__(self, *args):
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        if device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return self.function(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        entry = self.graphs.pop(key, None)
        if entry is None:
            entry = self._capture(device, args)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = entry  # most recently used last
        graph, static_args, static_outputs = entry
        # Replay on the input's device: a graph launched on another device's current stream (layers spread
        # over GPUs with device_map="auto") would not be ordered after the copy into its input.
        with torch.cuda.device(device):
            for static, arg in zip(static_args, args, strict=True):
                if isinstance(arg, torch.Tensor):
                    static.copy_(arg)
            graph.replay()
            return tuple(None if output is None else output.clone() for output in static_outputs)

    def _capture(self, device, args):
        with torch.cuda.device(device):
            static_args = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
            graph, static_outputs = capture_cuda_graph(lambda: self.function(*static_args))
        return graph, static_args, static_outputs


def capture_cuda_graph(function: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture function() as a CUDA graph on the current device: (graph, the outputs graph.replay() refills).

    function is first run twice on a side stream, so that lazy initialisations (allocator pools, cuBLAS
    handles, autotuning) happen outside the capture; it must not synchronise with the host."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(2):
            function()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = function()
    return graph, outputs


def _raise_recompile_limit(limit: int = 128) -> None:
    """Configurations differ in Python constants (alpha, max_k, ...) and hooks, each a recompilation of a
    compiled function: a 30-configuration sweep must stay compiled (dynamo's default limit is 8)."""
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


_compiled_cache: dict = {}


def compile_once(function):
    """torch.compile(function) once per process, falling back to `function` (with a warning) if it fails.

    Configurations differ in Python constants (alpha, max_k, ...), each a recompilation: the dynamo
    recompile limit is raised so that a 30-configuration sweep stays compiled."""
    if function not in _compiled_cache:
        _raise_recompile_limit()
        compiled = torch.compile(function, dynamic=True)
        state = {"failed": False}

        def run(*args, **kwargs):
            if not state["failed"]:
                try:
                    return compiled(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - e.g. no working compiler on this machine
                    warnings.warn(
                        f"torch.compile of {function.__name__} failed ({type(error).__name__}: {error}); "
                        "running it uncompiled",
                        stacklevel=2,
                    )
                    state["failed"] = True
            return function(*args, **kwargs)

        _compiled_cache[function] = run
    return _compiled_cache[function]


def grouped_mm_masks_sentinels() -> bool:
    """True if this transformers' grouped_mm experts path masks sentinel indices when asked to.

    transformers 5.x sorts sentinel rows (index E) to the tail and skips them in grouped_mm only when the
    experts module is flagged `_is_expert_parallel`; older 5.x releases lack that branch.
    """
    try:
        from transformers.integrations import moe
    except ImportError:
        return False
    forward = getattr(moe, "grouped_mm_experts_forward", None)
    return forward is not None and "_is_expert_parallel" in inspect.getsource(forward)


def _require_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__.split("+")[0]) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"MoERouterPatcher needs transformers >= {MIN_TRANSFORMERS} (its experts module must skip the "
            f"sentinel expert index); found {transformers.__version__}. pip install -r requirements.txt"
        )


_PATCHED_ROUTER_CLASSES: dict[type, type] = {}
PATCH_ATTRIBUTE = "_moe_patch"  # a patched router's PatchedRouter


def patched_router_class(router_class: type) -> type:
    """The subclass of `router_class` that a patched router runs as (one per class, made once): its forward
    is the router's own (class attribute `unpatched_class`), whose output the router's `PatchedRouter`
    (attribute `_moe_patch`) then replaces.

    A compiled model checks every module's type at each call (dynamo's guards), so changing the class,
    rather than adding a forward hook, makes each patch compile its own graph and `unpatch` find the
    unpatched graph again, without turning on dynamo's guards on every module's hooks (which cost every
    compiled model of the process, patched or not, most of its guard time: benchmarks/gpu_notes.md)."""
    if router_class not in _PATCHED_ROUTER_CLASSES:

        def forward(self, *args, **kwargs):
            output = router_class.forward(self, *args, **kwargs)
            routed = getattr(self, PATCH_ATTRIBUTE)(output)
            return output if routed is None else routed

        namespace = {"forward": forward, "unpatched_class": router_class, "__module__": __name__}
        _PATCHED_ROUTER_CLASSES[router_class] = type(f"Patched{router_class.__name__}", (router_class,), namespace)
    return _PATCHED_ROUTER_CLASSES[router_class]


class PatchedRouter:
    """What one MoE layer's router does after its own forward while patched (`patched_router_class`): the
    method's route of the layer, the family's weighting of the kept experts, and the layer's statistics
    (`accumulate_routing`).

    Under torch.compile (a model compiled whole, e.g. by generate with a static cache) it is traced
    into the model's graph, with its plain route; run eagerly it calls its `eager` form: the route fused
    by torch.compile and replayed as one CUDA graph where the patcher uses them. The layer is
    held as this object, never as a Python int a compiled graph would specialise on.

    A compiled forward re-checks, at every call, each object the traced router reached (dynamo's guards):
    the traced path reads plain attributes of this object, decided at patch time. Apart from the patcher,
    it reaches no object that another layer also reaches: each shared object costs every layer an identity
    check evaluated in Python.
    """

    def __init__(self, patcher: MoERouterPatcher, index: int, routes: tuple, graphed: bool):
        layer, self.patcher, self.index = patcher.layers[index], patcher, index
        self.spec, self.renormalize = layer.spec, patcher.params.get("renormalize", False)
        self.family_weighting = not (layer.spec.plain or patcher.in_expert_space)
        self.route, eager_route = routes  # None, None: the native routing, observed
        self.own_weights = self.route is None or patcher.in_expert_space  # the router's weights kept as they are
        self.accumulators = None
        if patcher.record_statistics:
            self.accumulators = patcher.statistics.allocate(index, layer.router.weight.device)
        # A route in expert space slices the router's own output (no kernel worth a graph); any other reads
        # the logits alone, so that a graph replaying it copies no other input.
        self.reads_native = patcher.in_expert_space
        self.eager_route = None
        if eager_route is not None:
            outputs = functools.partial(self.eager_outputs, eager_route, self.accumulators is not None)
            self.eager_route = CudaGraphed(outputs) if graphed and not self.reads_native else outputs

    def accumulate(self, top_weights, top_index, expert_counts, keep) -> None:
        accumulate_routing(self.accumulators, top_weights, top_index, expert_counts, keep)

    def traced_record(self) -> Callable | None:
        """How a traced call records: not at all without statistics; inside a compiled forward of the decoder
        stack, at its end (`defer`); in a layer compiled on its own, at once (`accumulate`)."""
        if self.accumulators is None:
            return None
        return self.accumulate if self.patcher._step_routings is None else self.defer

    def defer(self, top_weights, top_index, expert_counts, keep) -> None:
        """`accumulate` inside a compiled forward of the decoder stack: the token counts now, the sums with
        every other layer's at the stack's end (`RoutingStatistics.accumulate_step`), where one
        scatter-add replaces one per layer and step."""
        if self.accumulators.token_counts is not None:
            write_token_counts(self.accumulators, top_index, expert_counts, keep)
        self.patcher._step_routings[self.index] = (top_weights, top_index, expert_counts, keep)

    def routed(self, route, router_logits, native_weights, native_index):
        """(weights [T, K], index [T, K], counts [T] or None) of the method, in expert space."""
        if not self.family_weighting:
            return route(router_logits, native_weights, native_index)
        selection, allowed = self.spec.selection(router_logits)
        _, top_index, expert_counts = route(selection, native_weights, native_index)
        top_index = self.spec.expand(top_index, allowed)
        return self.spec.weights(router_logits, top_index, self.renormalize), top_index, expert_counts

    def traced(self, router_logits, native_weights, native_index, keep) -> tuple:
        """The layer's patched (weights, index) in the router's dtypes, statistics recorded (`traced_record`),
        inside a compiled forward; () when observing."""
        if self.route is None:
            top_weights, top_index, expert_counts = native_weights, native_index, None
        else:
            top_weights, top_index, expert_counts = self.routed(self.route, router_logits, native_weights, native_index)
        record = self.traced_record()
        if record is not None:
            record(self.recorded_weights(router_logits, top_weights, top_index), top_index, expert_counts, keep)
        return () if self.route is None else (top_weights.to(native_weights.dtype), top_index)

    def eager_outputs(self, route, with_record, router_logits, dtype, native_weights, native_index) -> tuple:
        """The eager route's (weights in `dtype`, the router's, index) and, with_record, the weights and counts
        (None: every row keeps K) its statistics read: the function a CUDA graph replays, which leaves the
        statistics to `eager` so that the graph launches no statistics kernel (a list append outside it)."""
        top_weights, top_index, expert_counts = self.routed(route, router_logits, native_weights, native_index)
        outputs = (top_weights.to(dtype), top_index)
        return outputs + (top_weights, expert_counts) if with_record else outputs

    def eager(self, router_logits, native_weights, native_index, keep) -> tuple:
        """`traced` run eagerly: the route (fused by torch.compile, replayed as a CUDA graph where the patcher
        uses them), then its statistics recorded outside the graph (`RoutingStatistics.record`)."""
        if self.eager_route is None:  # observing: the router's own routing
            if self.accumulators is not None:
                self.patcher.statistics.record(self.index, native_weights, native_index, None, keep)
            return ()
        natives = (native_weights, native_index) if self.reads_native else (None, None)
        top_weights, top_index, *recorded = self.eager_route(router_logits, native_weights.dtype, *natives)
        if recorded:  # the route's own weights and counts
            self.patcher.statistics.record(self.index, recorded[0], top_index, recorded[1], keep)
        return top_weights, top_index

    def recorded_weights(self, router_logits, top_weights, top_index) -> torch.Tensor:
        """The kept weights the statistics read (their entropy, which scaling and renormalising leave alone).

        Where the router's own weights are kept (observing, top-k at its own k), they are the family's
        weights up to a factor per token, recomputed from the kept logits in float32
        (`RouterSpec.relative_weights`): a second reader of the router's weights would make inductor store
        them, rounded to their dtype, before the experts read them, where the unpatched graph computes them
        inside the experts' kernel; the model's outputs would then differ from native's in the last bits
        (bf16), and its greedy tokens where two logits nearly tie."""
        if self.own_weights:
            return self.spec.relative_weights(router_logits, top_index)
        return top_weights

    def __call__(self, output: tuple) -> tuple | None:
        """The router's output with the patch's weights and index; None to keep it (observing)."""
        router_logits, native_weights, native_index = output[:3]  # [T, E], [T, k], [T, k]
        keep = self.patcher._keep
        keep = keep if keep is not None and keep.numel() == router_logits.shape[0] else None
        if torch.compiler.is_compiling():
            routed = self.traced(router_logits, native_weights, native_index, keep)
        else:
            routed = self.eager(router_logits, native_weights, native_index, keep)
        return (router_logits, *routed) if routed else None


class MoERouterPatcher:
    """Replace the top-k router of every MoE layer with any registered routing method.

    Works on every model whose MoE blocks follow transformers' shared router/experts contract
    (`find_moe_layers`: OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, GraniteMoE, gpt-oss, Jamba, ...). Each
    router runs as a subclass of its own class (`patched_router_class`) whose forward replaces the router's
    output (router_logits, top_k_weights [T, k], top_k_index [T, k]) with the chosen method's
    (router_logits, weights [T, K], index [T, K]); unused slots carry the
    sentinel index E, so the experts module computes only the selected (token, expert) pairs. The method
    routes each token's selection logits and the kept weights follow the family's own weighting
    (`RouterSpec`). The router logits are left untouched, and `unpatch` restores the model exactly.
    Shared experts (Qwen2-MoE, DeepSeek) are always computed and counted apart (`get_stats`).

    While patched, the experts run this module's variable-k path (experts_path="variable_k", the default on
    CUDA), whose time follows the number of kept pairs; a routing that is the router's own at its own k
    (top-k at the native k) keeps the model's experts path, so that its outputs stay the unpatched model's.
    With experts_path="model" they keep the model's own
    implementation, which must skip sentinel indices: "eager" does; "grouped_mm" does when flagged as
    expert parallel, which the patcher sets while patched (if this transformers supports it); any other
    implementation is switched to "eager" while patched. `unpatch` restores all of it.

        patcher = MoERouterPatcher(model)
        patcher.patch_with_bh(alpha=0.05, max_k=8)      # or patcher.patch("bh", alpha=0.05, max_k=8)
        outputs = model.generate(...)
        stats = patcher.get_stats()
        patcher.unpatch()

    Also usable as a context manager (`with MoERouterPatcher(model) as patcher:`), which unpatches on
    exit. Patching again replaces the previous patch (and resets the statistics).

    Statistics count real tokens only: a forward pass's 2-D attention_mask (or one given with
    `set_attention_mask`) leaves padding positions out.

    A patched model may be compiled (e.g. `model.generate(..., cache_implementation="static")` on a GPU):
    the patched routers trace into the graph (`PatchedRouter`), the statistics are updated in place inside
    it, and the routers' changed class makes each patch compile its own graph and `unpatch` find the
    unpatched one again. The decoder stack gets two hooks (the padding mask of each forward pass); dynamo's
    settings are left as they are, apart from a higher recompile limit (one graph per configuration).

    One patcher per model at a time: patching a model that another patcher holds raises RuntimeError, so
    statistics always describe the routing that ran and `unpatch` restores what its own patch changed. A
    patched model is used from the thread that patched it; a forward pass from another thread raises
    RuntimeError (the patch and its statistics are not shared safely between threads).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        record_token_counts: bool = False,
        compile_routing: bool | None = None,
        cuda_graphs: bool | None = None,
        experts_path: str | None = None,
        calibration: RoutingCalibration | None = None,
        record_statistics: bool = True,
        token_capacity: int = TOKEN_COUNTS_CAPACITY,
    ):
        """record_token_counts: also keep every token's count per layer, in a device ring buffer of the last
            `token_capacity` routed tokens (get_stats()["token_counts"], `statistics.token_counts()`); off,
            get_stats still gives every summary statistic from per-layer count histograms.
        compile_routing: fuse the BH routing into a few kernels with torch.compile (None: on when the model
            is on CUDA and Triton is installed; the first call of each configuration compiles for a few
            seconds; falls back, with a warning, if compilation fails).
        cuda_graphs: replay the BH routing as a CUDA graph per input shape, so that its ~40 small kernels
            cost one launch (None: on when the model is on one GPU; a model spread over several GPUs does
            not use them). The forward pass on a GPU is mostly bound by kernel launches, which the eager
            routing would otherwise double.
        experts_path: "variable_k" (the experts compute only the kept pairs with `variable_k_experts_forward`)
            or "model" (the model's own experts implementation). None: "variable_k" where its fused path runs
            (CUDA, Triton, bfloat16, a GPU with a grouped GEMM kernel: sm80+, not a T4), else "model" (on a
            CPU, eager or grouped_mm are as fast as the torch reference).
        calibration: the model's RoutingCalibration (`fit_routing_calibration`), for the methods that read
            per-layer tables (BH / HC with a fitted null, dynamic skipping with beta="median", entropy k);
            may also be set later (patcher.calibration = ...), before `patch`.
        record_statistics: accumulate the routing statistics (on each layer's device, in place: a few small
            kernels per layer); False routes without them, and get_stats raises."""
        _require_transformers()
        _raise_recompile_limit()
        self.model = model
        self.layers = find_moe_layers(model)
        self.routers = [layer.router for layer in self.layers]
        self.experts = [layer.experts for layer in self.layers]
        self.num_layers = len(self.routers)
        spec = self.layers[0].spec
        if any(layer.spec.describe() != spec.describe() for layer in self.layers):
            raise TypeError(f"{type(model).__name__}'s MoE layers route differently; one patcher needs one routing")
        self.spec = spec
        # The methods choose among each token's selectable experts (all E unless the family limits groups).
        self.shape = RouterShape(spec.selectable, spec.top_k, spec.renormalize)
        self.num_experts, self.native_top_k = spec.num_experts, spec.top_k
        self.shared_experts = [layer.shared_experts for layer in self.layers]
        self.router_devices = sorted({router.weight.device for router in self.routers}, key=str)
        self.experts_path = self._choose_experts_path(experts_path)
        on_cuda = self.routers[0].weight.device.type == "cuda"
        if compile_routing is None:
            compile_routing = on_cuda and importlib.util.find_spec("triton") is not None
        self.compile_routing = bool(compile_routing)
        self.cuda_graphs = self._choose_cuda_graphs(cuda_graphs, on_cuda)
        self.statistics = RoutingStatistics(self.num_layers, self.num_experts, record_token_counts, token_capacity)
        self.record_statistics = bool(record_statistics)
        if calibration is not None and calibration.num_layers != self.num_layers:
            raise ValueError(
                f"calibration has {calibration.num_layers} layers, this model {self.num_layers} MoE layers"
            )
        self.calibration = calibration
        self._handles: list = []  # the decoder stack's hooks
        self._patched_routers: list = []  # (router, its own class) while patched
        self._thread: int | None = None
        self._keep: torch.Tensor | None = None  # this forward's real positions
        self._step_routings: dict | None = None  # layer -> routing, within a compiled forward (`defer`)
        self.attention_mask: torch.Tensor | None = None  # set_attention_mask
        self.in_expert_space = False  # the patched method routes in the router's own output (top-k's reuse)
        self.native_routing = True  # the patched routing is the router's own (observed, top-k at the native k)
        self._saved_experts_implementation: str | None = None
        self._saved_expert_parallel_flags: list[bool] | None = None
        self.method: str | None = None
        self.params: dict = {}
        self.experts_implementation: str | None = None

    def _choose_experts_path(self, experts_path: str | None) -> str:
        experts = self.experts[0]
        if experts_path is None:
            fused = _triton_path_supported(experts, next(experts.parameters()).device)
            experts_path = VARIABLE_K_EXPERTS if fused else "model"
        if experts_path not in EXPERTS_PATHS:
            raise ValueError(f"experts_path must be one of {EXPERTS_PATHS} or None, got {experts_path!r}")
        if experts_path == VARIABLE_K_EXPERTS and variable_k_unsupported(experts):
            raise ValueError(f"experts_path={VARIABLE_K_EXPERTS!r} cannot serve {variable_k_unsupported(experts)}")
        if experts_path == VARIABLE_K_EXPERTS:
            register_variable_k_experts()
        return experts_path

    def _choose_cuda_graphs(self, cuda_graphs: bool | None, on_cuda: bool) -> bool:
        # Graph replay is used only when every router is on one GPU: on a model spread over two GPUs it
        # gave wrong counts, cause not found (benchmarks/gpu_notes.md).
        spread = len(self.router_devices) > 1
        if cuda_graphs and spread:
            raise ValueError(
                "cuda_graphs=True needs every router on one GPU; this model's are on "
                f"{[str(device) for device in self.router_devices]}"
            )
        return (on_cuda and not spread) if cuda_graphs is None else bool(cuda_graphs)

    # --- patching ------------------------------------------------------------------------------------

    def patch(self, method: str, **params) -> MoERouterPatcher:
        """Route with the registered method `method` ("bh", "topk", "topp", "native", ...) and its
        parameters (see the method's routing function; renormalize=None follows the model)."""
        spec = routing_method(method)
        spec.check_names(params)
        params = spec.parameters(self.shape, **params)
        in_expert_space = spec.changes_routing and spec.in_expert_space(params, self)
        # The router's own routing at its own k (top-k at the native k) is observed, not recomputed.
        native = not spec.changes_routing or (in_expert_space and params["max_k"] == self.native_top_k)
        routes = [(None, None)] * self.num_layers
        if not native:
            traced = spec.layer_routes(params, self)
            routes = list(zip(traced, spec.layer_routes(params, self, compiled=self.compile_routing), strict=True))
        self.unpatch()
        self._claim_model()
        self.statistics.reset()
        self.method, self.params = spec.name, params
        self.in_expert_space, self.native_routing = in_expert_space, native
        self._prepare_experts(spec, params)
        self.experts_implementation = self._current_experts_implementation()
        # On the base model (the decoder stack), not the model itself: hooks on the module a compiled call
        # starts from split that call into two dynamo frames, two guard evaluations per decode step.
        stack = getattr(self.model, "base_model", self.model)
        self._handles.append(stack.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(stack.register_forward_hook(self._after_forward))
        if self.record_statistics:
            self.statistics.allocate_layers([router.weight.device for router in self.routers])
        patches = [PatchedRouter(self, index, route, self.cuda_graphs) for index, route in enumerate(routes)]
        for router, patch in zip(self.routers, patches, strict=True):
            setattr(router, PATCH_ATTRIBUTE, patch)
            self._patched_routers.append((router, type(router)))
            router.__class__ = patched_router_class(type(router))
        return self

    def patch_with_bh(
        self, alpha=0.05, temperature=1.0, min_k=1, max_k=16, pvalue_method=DEFAULT_PVALUE_METHOD, renormalize=None
    ) -> MoERouterPatcher:
        """Route with `benjamini_hochberg_routing` (same arguments; renormalize=None follows the model)."""
        params = dict(alpha=alpha, temperature=temperature, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method)
        return self.patch("bh", renormalize=renormalize, **params)

    def patch_with_topk(self, k: int = NATIVE_TOP_K, temperature=1.0, renormalize=None) -> MoERouterPatcher:
        """Route each token to its k most probable experts (k=8 reproduces OLMoE's router)."""
        return self.patch("topk", k=k, temperature=temperature, renormalize=renormalize)

    def patch_with_topp(self, p=0.5, temperature=1.0, min_k=1, max_k=None, renormalize=None) -> MoERouterPatcher:
        """Route each token to the fewest most probable experts whose probabilities sum to >= p."""
        return self.patch("topp", p=p, temperature=temperature, min_k=min_k, max_k=max_k, renormalize=renormalize)

    def observe(self) -> MoERouterPatcher:
        """Record statistics of the model's own routing without changing anything it computes."""
        return self.patch("native")

    def unpatch(self) -> MoERouterPatcher:
        """Restore the routers' classes, remove the hooks and restore the experts implementation and every flag
        the patch changed. Safe to call any number of times; the statistics of the last patch stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for router, router_class in self._patched_routers:
            router.__class__ = router_class
            delattr(router, PATCH_ATTRIBUTE)
        self._patched_routers = []
        if getattr(self.model, PATCHER_ATTRIBUTE, None) is self:
            delattr(self.model, PATCHER_ATTRIBUTE)
        if self._saved_expert_parallel_flags is not None:
            for experts, flag in zip(self.experts, self._saved_expert_parallel_flags, strict=True):
                experts._is_expert_parallel = flag
            self._saved_expert_parallel_flags = None
        if self._saved_experts_implementation is not None:
            self.model.set_experts_implementation(self._saved_experts_implementation)
            self._saved_experts_implementation = None
        self.method = None
        return self

    @property
    def is_patched(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> MoERouterPatcher:
        return self

    def __exit__(self, *exc_info) -> bool:
        self.unpatch()
        return False

    # --- one patcher per model, one thread per patch -----------------------------------------------------

    def _claim_model(self) -> None:
        """Mark the model as patched by this patcher; refuse if another patcher holds it (two patchers would
        each record, and restore, the other's routing)."""
        owner = getattr(self.model, PATCHER_ATTRIBUTE, None)
        if owner is not None and owner is not self:
            raise RuntimeError(
                f"this model is already patched by another {type(self).__name__} (method {owner.method!r}): "
                f"call that patcher's unpatch() first (it is model.{PATCHER_ATTRIBUTE}); one patcher per model "
                "at a time"
            )
        setattr(self.model, PATCHER_ATTRIBUTE, self)
        self._thread = threading.get_ident()

    def _before_forward(self, module, args, kwargs) -> None:
        """Before each forward pass of the patched model: refuse another thread (the patch and statistics
        are not shared safely between threads), and read which positions are real tokens. A compiled
        forward checks no thread (the check is Python state a graph cannot hold)."""
        if not torch.compiler.is_compiling() and threading.get_ident() != self._thread:
            raise RuntimeError(
                f"this model was patched (method {self.method!r}) in another thread; a patched model is not "
                "thread-safe: patch, run and unpatch it in one thread, or give each thread its own model"
            )
        self._keep = self._real_positions(args, kwargs)
        self._step_routings = {} if torch.compiler.is_compiling() and self.record_statistics else None

    def _after_forward(self, module, args, output) -> None:
        routings, self._step_routings = self._step_routings, None
        if routings:
            self.statistics.accumulate_step(routings)
        self._keep = None  # a submodule called on its own later gets no stale mask

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Count only the positions this [batch, length] mask marks with 1, in forward passes that get no
        attention_mask of their own (e.g. a harness that right-pads a batch and calls model(input_ids));
        None: count every position. A forward pass's own 2-D attention_mask takes precedence."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be [batch, length], got shape {tuple(attention_mask.shape)}")
        self.attention_mask = attention_mask

    def _real_positions(self, args, kwargs) -> torch.Tensor | None:
        """This forward's positions [batch x length] that are not padding, or None for all. Only the mask's
        last `length` columns belong to this pass (a cache holds the earlier ones)."""
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else self.attention_mask
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        if mask is None or inputs is None:
            return None
        return mask[:, -inputs.shape[1] :].reshape(-1).bool()

    # --- the experts path ----------------------------------------------------------------------------

    def _prepare_experts(self, spec: RoutingMethod, params: dict) -> None:
        """Make the experts module skip the sentinel index when the method may emit it. A routing that is
        the router's own at its own k (top-k at the native k) keeps the model's experts path: its outputs
        stay bit-identical to the unpatched model's."""
        if self.native_routing:
            return
        if self.experts_path == VARIABLE_K_EXPERTS:
            self._switch_experts_implementation(VARIABLE_K_EXPERTS)
            for experts in self.experts:  # decided now, so that a compiled forward only reads the plan
                variable_k_plan(experts)
        # A method that always fills its K slots (top-k, min_k == max_k) emits no sentinel, and the experts
        # path then needs no sentinel handling, which costs grouped_mm passes over its [T x K, H] buffers.
        elif spec.drops_slots(params):
            self._make_experts_skip_sentinels()

    def _current_experts_implementation(self) -> str:
        return getattr(self.model.config, "_experts_implementation", None) or "eager"

    def _make_experts_skip_sentinels(self) -> None:
        """Keep an implementation that skips the sentinel; else switch to eager if the family's eager path
        skips it (OLMoE's, Mixtral's, ...), else to grouped_mm flagged as expert parallel (gpt-oss)."""
        implementation = self._current_experts_implementation()
        eager_skips = eager_skips_sentinels(self.experts[0])
        if implementation == VARIABLE_K_EXPERTS or (implementation == "eager" and eager_skips):
            return
        if implementation != "grouped_mm" and eager_skips:
            self._switch_experts_implementation("eager")
            return
        if not grouped_mm_masks_sentinels():
            raise RuntimeError(
                f"{type(self.experts[0]).__name__}: neither its eager path nor this transformers' grouped_mm "
                f"skips the sentinel expert index; use experts_path={VARIABLE_K_EXPERTS!r} or transformers >= "
                f"{MIN_TRANSFORMERS}"
            )
        self._switch_experts_implementation("grouped_mm")
        self._saved_expert_parallel_flags = [getattr(e, "_is_expert_parallel", False) for e in self.experts]
        for experts in self.experts:
            experts._is_expert_parallel = True

    def _switch_experts_implementation(self, implementation: str) -> None:
        current = self._current_experts_implementation()
        if current != implementation:
            self._saved_experts_implementation = current
            self.model.set_experts_implementation(implementation)

    # --- statistics ----------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Forget the routing statistics recorded so far."""
        self.statistics.reset()

    def get_stats(self) -> dict:
        """Routing statistics since the last patch or reset_stats().

        Returns a dict with the design's metrics over every (token, layer) routing decision
        (avg/std/min/max/median_experts, ceiling_hit_rate and floor_hit_rate in % of decisions at max_k and
        min_k, reduction_vs_baseline in % against the model's native top-k), plus:
            weight_entropy: mean entropy (nats) of the kept weights, normalised to sum to 1, per decision.
            expert_utilization: mean over layers of the normalised entropy of the expert load (1 = every
                expert chosen equally often, 0 = one expert takes everything).
            per_layer_avg_experts: [L] list.
            expert_utilization_per_layer: [L][E] list, fraction of tokens that chose each expert.
            token_counts: [N, L] int64 tensor, experts kept per routed token and layer (N = tokens
                routed, in order; only with record_token_counts=True).
            shared_experts_per_layer: [L] shared experts every token also runs (always computed, never
                routed); avg_shared_experts their mean; avg_active_experts = avg_experts + avg_shared_experts.
            num_tokens, num_layers, method, params, weights_renormalized, experts_implementation, routing
                (how the model's routers route: `RouterSpec.describe`).
        Every count but the shared ones, and reduction_vs_baseline, are of routed experts.
        """
        if not self.record_statistics:
            raise RuntimeError("statistics were not recorded: create the patcher with record_statistics=True")
        stats = self.statistics.summary(self.params.get("min_k"), self.params.get("max_k"), self.native_top_k)
        shared = sum(self.shared_experts) / self.num_layers
        return stats | {
            "shared_experts_per_layer": list(self.shared_experts),
            "avg_shared_experts": shared,
            "avg_active_experts": stats["avg_experts"] + shared,
            "routing": self.spec.describe(),
            "method": self.method,
            "params": dict(self.params),
            "weights_renormalized": bool(self.params.get("renormalize", False)),
            "experts_implementation": self.experts_implementation,
        }


OLMoERouterPatcher = MoERouterPatcher  # the name before other families were supported


# ----------------------------------------------------------------------------------------------------
# 10. Evaluation: held-out text, sliding-window perplexity, timed generation
# ----------------------------------------------------------------------------------------------------


HELDOUT_SOURCES = (("wordnet", 47), ("kjv", 19), ("pydoc", 13), ("devil", 1))  # documents per source, in file order
EMBEDDED_TEXTS = ("embedded", *(f"embedded:{name}" for name, _ in HELDOUT_SOURCES))


def _heldout_source_text(source: str) -> str:
    """The held-out documents of one source of data/heldout.txt (data/CORPUS.md: sources in this order)."""
    documents = heldout_documents("embedded")
    if len(documents) != sum(count for _, count in HELDOUT_SOURCES):
        raise RuntimeError(f"{HELDOUT_TEXT_PATH} has {len(documents)} documents; HELDOUT_SOURCES expects another split")
    begin = 0
    for name, count in HELDOUT_SOURCES:
        if name == source:
            return "\n<|endoftext|>\n".join(documents[begin : begin + count]) + "\n"
        begin += count
    raise ValueError(f"source must be one of {list(EMBEDDED_TEXTS)}, 'wikitext2' or a file, got 'embedded:{source}'")


def load_heldout_text(source: str | Path = "embedded") -> str:
    """Evaluation text: "embedded" (data/heldout.txt, never trained on), "embedded:<source>" (its documents
    of one source, e.g. "embedded:pydoc": HELDOUT_SOURCES), "wikitext2" (WikiText-2 raw test split through
    `datasets`, needs internet), or a path to a text file."""
    if str(source) == "embedded":
        return HELDOUT_TEXT_PATH.read_text()
    if str(source).startswith("embedded:"):
        return _heldout_source_text(str(source).partition(":")[2])
    if str(source) == "wikitext2":
        try:
            from datasets import load_dataset

            return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        except Exception as error:  # offline, or datasets missing
            raise RuntimeError(
                f"Could not load WikiText-2 through `datasets` ({type(error).__name__}: {error}). Offline, "
                f"use load_heldout_text('embedded') ({HELDOUT_TEXT_PATH})."
            ) from error
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source must be 'embedded', 'wikitext2' or an existing text file, got {source!r}")
    return path.read_text()


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (begin, end, num_scored): each window scores its last num_scored tokens, which no
    earlier window scored; the tokens before them are context only (the Hugging Face perplexity recipe)."""
    _check_windows(window, stride)
    windows, previous_end = [], 0
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + window, num_tokens)
        num_scored = end - max(previous_end, begin + 1)  # position begin has no context: never scored
        if num_scored > 0:
            windows.append((begin, end, num_scored))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def _check_windows(window: int, stride: int, batch_size: int = 1) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not (1 <= stride <= window):
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")


def _score_windows(model, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position surprisal of the next token and whether the argmax predicted it: [B, length - 1] each.

    The logits stay in the model's dtype; the loss is computed in float32 over chunks of positions of at
    most LOSS_CHUNK_ELEMENTS logits, as logsumexp minus the target's logit (= -log_softmax[target])."""
    logits = model(inputs, use_cache=False).logits  # [B, length, V]
    targets = inputs[:, 1:]  # position t predicts token t + 1
    batch, length, vocab = logits.shape
    step = max(1, LOSS_CHUNK_ELEMENTS // (batch * vocab))
    nll, correct = [], []
    for begin in range(0, length - 1, step):
        chunk = logits[:, begin : min(begin + step, length - 1)].float()  # [B, c, V]
        target = targets[:, begin : begin + chunk.shape[1]]
        nll.append(torch.logsumexp(chunk, dim=-1) - chunk.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        correct.append(chunk.argmax(-1) == target)
    return torch.cat(nll, dim=1), torch.cat(correct, dim=1)


def _empty_parts() -> dict[str, list]:
    return {"nll": [], "targets": [], "inputs": [], "correct": [], "expert_counts": [], "window_ids": []}


def _score_batch(model, token_ids, batch, device, patcher) -> dict[str, list]:
    """The scored positions of a batch of windows (equal lengths share a forward pass): lists per field."""
    parts = _empty_parts()
    for length in sorted({end - begin for begin, end, _ in batch}, reverse=True):
        group = [w for w in batch if w[1] - w[0] == length]
        inputs = torch.stack([token_ids[begin:end] for begin, end, _ in group]).to(device)  # [B, length]
        if patcher is not None:
            patcher.reset_stats()
        nll, correct = _score_windows(model, inputs)
        counts = patcher.statistics.token_counts().view(len(group), length, -1) if patcher else None
        for row, (begin, _, num_scored) in enumerate(group):
            predicting = slice(length - 1 - num_scored, length - 1)  # the positions that made the predictions
            parts["window_ids"].append(torch.full((num_scored,), begin, dtype=torch.int64))
            parts["nll"].append(nll[row, -num_scored:].cpu())
            parts["targets"].append(inputs[row, 1:][-num_scored:].cpu())
            parts["inputs"].append(inputs[row, predicting].cpu())
            parts["correct"].append(correct[row, -num_scored:].cpu())
            if counts is not None:
                parts["expert_counts"].append(counts[row, predicting])
    return parts


def _score_all(model, token_ids, windows, batch_size, patcher) -> tuple[dict[str, list], int]:
    """Every window scored, `batch_size` windows per forward pass; on out-of-memory the batch is halved and
    retried (its partial results are dropped). Returns the parts and the batch size that ran last."""
    device = next(model.parameters()).device
    parts = _empty_parts()
    position = 0
    while position < len(windows):
        batch = windows[position : position + batch_size]
        try:
            scored = _score_batch(model, token_ids, batch, device, patcher)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            scored = None
        if scored is None:  # outside the except block, where the failed batch's tensors are already released
            batch_size //= 2
            torch.cuda.empty_cache()
            warnings.warn(f"out of memory: evaluating with batch_size={batch_size}", stacklevel=3)
            continue
        for name, values in scored.items():
            parts[name] += values
        position += len(batch)
    return parts, batch_size


@torch.no_grad()
def evaluate_language_model(
    model,
    token_ids: torch.Tensor,
    window: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    patcher: MoERouterPatcher | None = None,
) -> dict:
    """Perplexity and next-token accuracy on `token_ids` ([N] int64) with sliding windows.

    Windows of `window` tokens advance by `stride` (default: window, i.e. disjoint windows; a smaller
    stride gives every scored token more context). Each token is scored once. Up to `batch_size` windows
    share a forward pass; on out-of-memory the batch size is halved (down to 1) and the run goes on. With a
    patched `patcher`, the routing decisions of the scored tokens' positions are returned too.

    Returns {"perplexity", "token_accuracy", "num_scored", "mean_nll", "batch_size" (the one that ran last),
    "nll" [S], "targets" [S], "inputs" [S], "expert_counts" [S, L] or None, "window_ids" [S]}: nll[i] is
    the surprisal (nats) of targets[i] given its context; inputs[i] is the token at the position that
    predicts it, expert_counts[i] the experts kept there in each layer, and window_ids[i] the first token
    of the window that scored it (`window_sums` folds them per window, for bootstrap intervals).
    """
    stride = window if stride is None else stride
    if patcher is not None and not patcher.statistics.record_token_counts:
        raise ValueError("patcher must record token counts: MoERouterPatcher(model, record_token_counts=True)")
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise ValueError(f"token_ids must be a 1-D tensor of at least 2 tokens, got shape {tuple(token_ids.shape)}")
    _check_windows(window, stride, batch_size)
    windows = sliding_windows(token_ids.numel(), window, stride)
    parts, batch_size = _score_all(model, token_ids, windows, batch_size, patcher)
    nll = torch.cat(parts["nll"]).double()
    return {
        "perplexity": math.exp(nll.mean().item()),
        "token_accuracy": torch.cat(parts["correct"]).double().mean().item(),
        "num_scored": nll.numel(),
        "mean_nll": nll.mean().item(),
        "batch_size": batch_size,
        "nll": nll,
        "targets": torch.cat(parts["targets"]),
        "inputs": torch.cat(parts["inputs"]),
        "expert_counts": torch.cat(parts["expert_counts"]) if parts["expert_counts"] else None,
        "window_ids": torch.cat(parts["window_ids"]),
    }


@torch.no_grad()
def collect_router_logits(model, token_ids: torch.Tensor, window: int = 256, batch_size: int = 8) -> list[torch.Tensor]:
    """Every MoE layer's router logits on `token_ids` ([N] int64, disjoint windows of `window` tokens, up to
    `batch_size` windows per forward pass), under the routing the model runs (its own, or a patcher's: the
    logits each patched router received): a list of L float32 tensors [positions, E'] on the CPU. These are
    the logits the routing methods route (`RouterSpec.selection`): the router's own logits, except for the
    sigmoid and group-limited families, whose E' selectable experts vary by token."""
    _check_windows(window, window, batch_size)
    layers = find_moe_layers(model)
    collected: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(layer):
        spec = layers[layer].spec
        return lambda module, args, output: collected[layer].append(
            (output[0] if spec.plain else spec.selection(output[0])[0]).detach().float().cpu()
        )

    handles = [moe.router.register_forward_hook(keep(layer)) for layer, moe in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        spans = [(begin, end) for begin, end, _ in sliding_windows(token_ids.numel(), window, window)]
        full = [token_ids[begin:end] for begin, end in spans if end - begin == window]
        batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
        batches += [token_ids[begin:end].unsqueeze(0) for begin, end in spans if end - begin != window]  # the tail
        for inputs in batches:
            model(inputs.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in collected]


def _drop_last_position_slots(num_slots: int, length: int, captured: list, spec: RouterSpec):
    """A router hook for `oracle_drop_effects`: rows come in groups of num_slots + 1 copies of one prefix;
    copy 0 keeps the routing (its last position's logits are captured), copy v zeroes the weight of slot
    v - 1 at the last position only. A zero weight removes the expert's contribution exactly."""

    def hook(module, args, output):
        router_logits, weights, index = output[:3]
        weights = weights.reshape(-1, length, weights.shape[-1]).clone()  # [R, length, k]
        variant = torch.arange(weights.shape[0], device=weights.device) % (num_slots + 1)
        rows = (variant > 0).nonzero().squeeze(-1)
        weights[rows, -1, variant[rows] - 1] = 0
        selection = router_logits if spec.plain else spec.selection(router_logits)[0]
        captured.append(selection.reshape(weights.shape[0], length, -1)[variant == 0, -1].float().cpu())
        return router_logits, weights.reshape(-1, weights.shape[-1]), index

    return hook


@torch.no_grad()
def oracle_drop_effects(
    model, token_ids: torch.Tensor, layer: int, positions, context: int = 64, batch_positions: int = 16
):
    """The loss each native top-k expert of one layer is worth, one routing decision at a time.

    For each position t (context - 1 <= t < N - 1): the increase in the surprisal of token t + 1 when the
    expert in slot s (s = 0..k-1, most probable first) of layer `layer` is dropped at position t alone, with
    the previous `context` tokens as context. Only the last position of each prefix is changed, so the
    effect is that decision's alone. Returns {"layer", "positions" [P], "router_logits" [P, E] (the
    layer's logits at t under the model's own routing), "loss_increase" [P, k]}.
    """
    moe_layers = find_moe_layers(model)
    if not 0 <= layer < len(moe_layers):
        raise ValueError(f"layer must be in [0, {len(moe_layers)}), got {layer!r}")
    positions = [int(t) for t in positions]
    if any(not context - 1 <= t < token_ids.numel() - 1 for t in positions):
        raise ValueError(f"positions must lie in [context - 1, {token_ids.numel() - 1}) = [{context - 1}, ...)")
    spec, device = moe_layers[layer].spec, next(model.parameters()).device
    num_slots, captured, increases = spec.top_k, [], []
    hook = _drop_last_position_slots(num_slots, context, captured, spec)
    handle = moe_layers[layer].router.register_forward_hook(hook)
    try:
        for start in range(0, len(positions), batch_positions):
            chunk = positions[start : start + batch_positions]
            prefixes = torch.stack([token_ids[t - context + 1 : t + 1] for t in chunk])  # [P, context]
            inputs = prefixes.repeat_interleave(num_slots + 1, dim=0).to(device)  # [P (k + 1), context]
            logits = model(inputs, use_cache=False).logits[:, -1].float()  # [P (k + 1), V]
            targets = token_ids[torch.tensor(chunk) + 1].repeat_interleave(num_slots + 1).to(device)
            nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)
            nll = nll.view(len(chunk), num_slots + 1).cpu()
            increases.append(nll[:, 1:] - nll[:, :1])
    finally:
        handle.remove()
    return {
        "layer": layer,
        "positions": torch.tensor(positions),
        "router_logits": torch.cat(captured),
        "loss_increase": torch.cat(increases).double(),
    }


def oracle_table(effects: list[dict], configs, calibration=None, num_experts_per_tok: int = NATIVE_TOP_K):
    """Whether each configuration keeps the experts that matter (`oracle_drop_effects` per layer): over every
    (position, native slot) pair, the Spearman correlation between "the method keeps it" and the loss its
    drop costs, the share kept, and the mean loss increase of the experts it drops (what its choices would
    cost if the drops added up). The first row ranks by the router's own order (slot k - s) for reference.
    """
    import pandas as pd
    from scipy.stats import spearmanr

    increase = torch.cat([e["loss_increase"] for e in effects]).flatten().numpy()  # [P k]
    slots = torch.arange(num_experts_per_tok).expand(len(increase) // num_experts_per_tok, -1)
    rank = spearmanr(-slots.flatten().numpy(), increase).statistic
    rows = [{"config": "router order", "series": "reference", "spearman_kept_vs_loss": rank, "kept_share": math.nan,
             "avg_kept": math.nan, "mean_loss_of_dropped": math.nan}]  # fmt: skip
    for config in configs:
        method = routing_method(config.method)
        if not method.changes_routing:
            continue
        route = functools.partial(route_logits, config.method, calibration=calibration, **config.kwargs)
        counts = torch.cat(
            [
                route(e["router_logits"], e["layer"], num_experts_per_tok=num_experts_per_tok).expert_counts
                for e in effects
            ]
        )
        kept = (slots < counts.clamp_max(num_experts_per_tok)[:, None]).flatten().numpy()
        varies = 0 < kept.mean() < 1
        shape = RouterShape(effects[0]["router_logits"].shape[-1], num_experts_per_tok)
        series = method.series(method.parameters(shape, **config.kwargs))
        row = {"config": config.name, "series": series, "kept_share": float(kept.mean())}
        row["spearman_kept_vs_loss"] = spearmanr(kept, increase).statistic if varies else math.nan
        row["avg_kept"] = counts.double().mean().item()
        rows.append(row | {"mean_loss_of_dropped": float(increase[~kept].mean()) if (~kept).any() else 0.0})
    return pd.DataFrame(rows)


def synchronize(device) -> None:
    """Wait for every GPU (a model spread with device_map="auto" runs on several) when `device` is CUDA."""
    if torch.device(device).type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


GENERATION_PATHS = {
    "dynamic": "dynamic cache, eager forward",
    "static": "static cache, eager forward",
    "static_compiled": "static cache, decode forward compiled by torch.compile (inductor; CUDA graphs on a GPU, as "
    "transformers' generate compiles it for a static cache)",
}


def fastest_generation_path(device) -> str:
    """The generation path to time on `device`: "static_compiled" on a GPU (5x the dynamic path's decode
    speed for OLMoE-1B-7B on an H100, benchmarks/README.md); "dynamic" on a CPU, where the three paths are
    measured in benchmarks/README.md and compiling costs seconds per configuration."""
    return "static_compiled" if torch.device(device).type == "cuda" else "dynamic"


def generation_settings(path: str, max_cache_len: int | None = None, device=None) -> dict:
    """generate's keyword arguments for a path of `GENERATION_PATHS`. max_cache_len: the static cache's
    length, the longest prompt plus new tokens of a run, so that every call reuses one cache and one
    compiled graph (None: each call's own length, a recompilation for every new length). device: where the
    model runs; generate compiles on GPUs only unless told, so "static_compiled" tells it elsewhere."""
    if path not in GENERATION_PATHS:
        raise ValueError(f"path must be one of {sorted(GENERATION_PATHS)}, got {path!r}")
    if path == "dynamic":
        return {}
    settings = {"cache_implementation": "static"} | ({"max_cache_len": max_cache_len} if max_cache_len else {})
    if path == "static":
        return settings | {"disable_compile": True}
    if device is not None and torch.device(device).type != "cuda":
        from transformers import CompileConfig

        config = CompileConfig(mode="default")  # no CUDA graphs off a GPU
        config._compile_all_devices = True  # transformers' own switch for compiling off a GPU
        settings["compile_config"] = config
    return settings


def generate_timed(model, tokenizer, prompt: str, max_new_tokens: int, exact: bool = False, settings=None):
    """Greedy generation of `prompt` (a string), timed: (input_ids [1, P], output_ids [1, P + n], seconds).

    The seconds are the wall-clock time of `generate`, with the GPUs synchronised before and after.

    exact: generate exactly max_new_tokens (no stop at the end-of-text token), as a warm-up wants.
    settings: more keyword arguments of generate (`generation_settings`: the cache and compilation).
    """
    device = next(model.parameters()).device
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    minimum = {"min_new_tokens": max_new_tokens} if exact else {}
    synchronize(device)
    start = time.perf_counter()
    output_ids = model.generate(
        input_ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **minimum,
        **(settings or {}),
    )
    synchronize(device)
    return input_ids, output_ids, time.perf_counter() - start


def throughput_summary(new_tokens: int, seconds_per_repeat: list[float]) -> dict:
    """Generated tokens per second over repeated timed runs of the same work (`new_tokens` each time): the
    median and the range (min, max) across repeats, which is the noise a difference must exceed."""
    if not seconds_per_repeat or min(seconds_per_repeat) <= 0:
        raise ValueError(f"seconds_per_repeat must be a non-empty list of positive times, got {seconds_per_repeat}")
    rates = sorted(new_tokens / seconds for seconds in seconds_per_repeat)
    return {
        "tokens_per_second": median(rates),
        "tokens_per_second_min": rates[0],
        "tokens_per_second_max": rates[-1],
        "timing_repeats": len(rates),
    }


# ----------------------------------------------------------------------------------------------------
# 11. Results on disk: atomic writes, one file per configuration, resume, failures recorded
# ----------------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary) on a temporary file beside `path`, then rename it to `path`: readers (and a
    run that is killed) never see a half-written file. The temporary keeps the suffix (name.tmp.png), so
    writers that pick a format from it (matplotlib) work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        write(temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a string."""
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def note_failures(figure, names: list[str]) -> None:
    """Name the configurations a figure does not show because they failed, in a strip along its bottom."""
    if names:
        figure.text(0.01, 0.005, "Failed (not shown): " + ", ".join(names), fontsize=8, color="tab:red", wrap=True)


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    """Lay a figure out (keeping `note_failures`' bottom strip clear) and save it to `path` atomically."""
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    return atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=dpi))


def _as_json(value):
    """`value` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def code_fingerprint() -> dict:
    """What a saved result depends on besides its settings: a hash of this module's source and the versions
    of Python, torch and transformers. A result saved under another fingerprint is recomputed."""
    import hashlib
    import platform

    import transformers

    return {
        "bh_routing_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def function_fingerprint(*functions: Callable) -> str:
    """A hash of functions' compiled code (bytecode, names, constants, nested functions): it changes when
    their code does, whether they are defined in a file, a notebook cell or exec'd text (line numbers and
    comments do not count). The notebook adds its measuring functions' fingerprint to its resume key."""
    import hashlib

    digest = hashlib.sha256()

    def feed(code) -> None:
        digest.update(code.co_code)
        digest.update(repr(code.co_names).encode())
        for constant in code.co_consts:
            if hasattr(constant, "co_code"):
                feed(constant)
            elif isinstance(constant, frozenset):  # its order follows string hashing, which varies by process
                digest.update(repr(sorted(map(repr, constant))).encode())
            else:
                digest.update(repr(constant).encode())

    for function in functions:
        feed(function.__code__)
    return digest.hexdigest()[:16]


class ResultStore:
    """Results of a sweep, one JSON file per configuration in `directory`, written as each finishes.

    A configuration is resumed (read back instead of rerun) when its file holds status "ok", the same
    `settings` (the JSON of everything that changes its result, e.g. the model and the prompts) and the same
    `code_fingerprint()`. A configuration that raises is recorded with status "failed" and its error, and
    is retried next time. A saved file that cannot be read (truncated, corrupted) is named in a warning,
    moved aside (name.corrupt.json) and recomputed; so is a configuration whose tensors (name.pt) cannot be.

        store = ResultStore("results/configs", settings={"model": "embedded", ...})
        result = store.run(config.name, lambda: measure(config), describe={"method": config.method})
    """

    def __init__(self, directory: str | Path, settings: dict):
        self.directory = Path(directory)
        self.settings = _as_json({**settings, "code": code_fingerprint()})
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, suffix: str = ".json") -> Path:
        return self.directory / f"{name}{suffix}"

    def _move_aside(self, name: str, error: Exception) -> None:
        """Warn, naming the unreadable file, and move the configuration's files aside (*.corrupt*)."""
        for suffix in (".json", ".pt"):
            path = self.path(name, suffix)
            if path.exists():
                path.replace(path.with_name(f"{name}.corrupt{suffix}"))
        warnings.warn(
            f"{self.path(name)}: saved result unreadable ({type(error).__name__}: {error}); moved aside as "
            f"{name}.corrupt.* and recomputed",
            stacklevel=3,
        )

    def load(self, name: str) -> dict | None:
        """The saved result of `name` if it can be resumed (status ok, same settings and code, its tensors
        readable), else None."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, found {type(saved).__name__}")
            resumable = saved.get("status") == "ok" and saved.get("settings") == self.settings
            if resumable and saved.get("tensors"):
                self.load_tensors(name)
        except (ValueError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            self._move_aside(name, error)
            return None
        return saved if resumable else None

    def save(self, name: str, result: dict) -> dict:
        """Write `result` with the store's settings; returns it as it reads back."""
        result = _as_json({**result, "name": name, "settings": self.settings})
        atomic_write_text(self.path(name), json.dumps(result))
        return result

    def run(self, name: str, compute: Callable[[], dict], describe: dict | None = None, redo: bool = False) -> dict:
        """The result of `name`: resumed from disk (unless redo), else compute() saved as status "ok", or, if
        compute raises an Exception, a "failed" record with the error (`describe` adds fields to it, e.g.
        the method and parameters). KeyboardInterrupt and other BaseExceptions propagate, saving nothing."""
        saved = None if redo else self.load(name)
        if saved is not None:
            return saved
        self.path(name, ".pt").unlink(missing_ok=True)  # an older run's tensors must not pass for this one's
        try:
            result = {**compute(), "status": "ok"}
        except Exception as error:  # noqa: BLE001 - a failed configuration is recorded; the sweep goes on
            result = {**(describe or {}), "status": "failed", "error": f"{type(error).__name__}: {error}"}
        if result["status"] == "failed" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # e.g. after an out-of-memory error, once its tensors are released
        return self.save(name, {**result, "tensors": self.path(name, ".pt").exists()})

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Per-token arrays of `name` beside its JSON (name.pt), written atomically."""
        return atomic_write(self.path(name, ".pt"), lambda temporary: torch.save(tensors, temporary))

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The per-token arrays saved by `save_tensors` (RuntimeError naming the file if it is unreadable)."""
        path = self.path(name, ".pt")
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise RuntimeError(f"{path}: saved tensors unreadable ({type(error).__name__}: {error})") from error


# ----------------------------------------------------------------------------------------------------
# 12. Downstream accuracy: routing configurations on lm-evaluation-harness tasks
# ----------------------------------------------------------------------------------------------------

LM_EVAL_REQUIREMENTS = "requirements-eval.txt"  # lm-eval is optional: make eval and the tests install it
OFFLINE_TASKS = ("heldout_continuation", "heldout_perplexity")  # built from data/heldout.txt, no download
STANDARD_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "lambada_openai", "mmlu")  # need the hub
# The metric a task is plotted and summarised by: the first of these that it reports.
PRIMARY_METRICS = ("acc_norm", "acc", "word_perplexity", "exact_match")
CONTINUATION_SEED = 20261126
CONTINUATION_CHOICES = 4
CONTINUATION_WORDS = (10, 40)  # lines of this many words (inclusive) become items
CONTINUATION_MAX_ITEMS = 400


class DownstreamTaskError(RuntimeError):
    """An lm-evaluation-harness task could not be loaded (e.g. its dataset is on the hub, unreachable offline)."""


def _require_lm_eval():
    """The lm_eval package, or ImportError saying how to install it."""
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            f"downstream evaluation needs lm-evaluation-harness: pip install -r {LM_EVAL_REQUIREMENTS}"
        ) from error
    return lm_eval


def heldout_documents(source: str | Path = "embedded") -> list[str]:
    """The documents of a held-out text (`load_heldout_text`), split at lines holding only <|endoftext|>."""
    documents = load_heldout_text(source).split("\n<|endoftext|>\n")
    return [doc.strip() for doc in documents if doc.strip() and doc.strip() != "<|endoftext|>"]


def _line_halves(line: str) -> tuple[str, str] | None:
    """(first half, second half) of a line of prose split at its middle word, or None for other lines."""
    words = line.split()
    letters = sum(character.isalpha() for character in line)
    if not CONTINUATION_WORDS[0] <= len(words) <= CONTINUATION_WORDS[1] or letters < 0.7 * len(line):
        return None
    middle = len(words) // 2
    return " ".join(words[:middle]), " ".join(words[middle:])


def continuation_items(documents: list[str], seed: int = CONTINUATION_SEED) -> list[dict]:
    """The multiple-choice items of the `heldout_continuation` task: the first half of a line of prose,
    and CONTINUATION_CHOICES candidate second halves: its own and those of other lines of the same document
    (same source, same topic, so that style alone does not give the answer away). At most
    CONTINUATION_MAX_ITEMS items, {"context", "choices", "label", "document"}, shuffled with `seed`."""
    rng = random.Random(seed)
    items = []
    for doc_index, doc in enumerate(documents):
        pairs = [pair for pair in map(_line_halves, doc.splitlines()) if pair is not None]
        for index, (context, continuation) in enumerate(pairs):
            others = {pairs[j][1] for j in range(len(pairs)) if j != index} - {continuation}
            if len(others) < CONTINUATION_CHOICES - 1:
                continue
            choices = [continuation, *rng.sample(sorted(others), CONTINUATION_CHOICES - 1)]
            rng.shuffle(choices)
            items.append(
                {"context": context, "choices": choices, "label": choices.index(continuation), "document": doc_index}
            )
    rng.shuffle(items)
    return items[:CONTINUATION_MAX_ITEMS]


def _test_split(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def offline_task_configs() -> dict[str, dict]:
    """The lm-eval task configurations of OFFLINE_TASKS, built from data/heldout.txt when loaded (never
    trained on: data/CORPUS.md): `heldout_continuation` (multiple choice, accuracy) and
    `heldout_perplexity` (every document scored whole, as lm-eval scores WikiText: word and byte
    perplexity, bits per byte)."""
    metric = {"aggregation": "mean", "higher_is_better": True}
    common = {"test_split": "test", "metadata": {"version": 1.0}}
    return {
        "heldout_continuation": common
        | {
            "task": "heldout_continuation",
            "custom_dataset": lambda **_: _test_split(continuation_items(heldout_documents())),
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc"} | metric, {"metric": "acc_norm"} | metric],
        },
        "heldout_perplexity": common
        | {
            "task": "heldout_perplexity",
            "custom_dataset": lambda **_: _test_split([{"text": doc} for doc in heldout_documents()]),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": name, "aggregation": aggregation, "higher_is_better": False}
                for name, aggregation in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        },
    }


def _task_names(tasks) -> list[str]:
    """Task names from a list or a comma-separated string (ValueError naming the argument otherwise)."""
    if isinstance(tasks, str):
        tasks = [name.strip() for name in tasks.split(",") if name.strip()]
    if not isinstance(tasks, list | tuple) or not tasks or not all(isinstance(n, str) and n for n in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names (or 'a,b'), got {tasks!r}")
    return list(tasks)


def _task_spec(name: str):
    """A task as lm-eval takes it: an OFFLINE_TASKS name as its configuration, any other as the name."""
    return offline_task_configs().get(name, name)


@functools.cache
def lm_eval_task_manager():
    """lm-eval's task index (built once per process: indexing its thousands of task files takes seconds)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_task_names(tasks) -> list[str]:
    """The task names, checked against OFFLINE_TASKS and lm-eval's registry without loading any data:
    ValueError for an unknown name, or for a tag (a bare list of tasks with no aggregate of its own, e.g.
    ai2_arc: name its tasks, arc_easy and arc_challenge)."""
    names = _task_names(tasks)
    manager = lm_eval_task_manager()
    for name in names:
        if name in OFFLINE_TASKS:
            continue
        if name not in manager.all_tasks:
            raise ValueError(
                f"unknown lm-eval task {name!r}: give one of this repository's {OFFLINE_TASKS} or a task of "
                "lm-eval's registry (`lm-eval ls tasks` lists them; e.g. " + ", ".join(STANDARD_TASKS) + ")"
            )
        if name in manager.all_tags:
            raise ValueError(f"{name!r} is an lm-eval tag, a list of tasks without an aggregate: name its tasks")
    return names


def check_limit(limit) -> int | float | None:
    """lm-eval's `limit`: None (every sample), an integer >= 1 (samples per task) or a fraction in (0, 1)."""
    whole = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    fraction = isinstance(limit, float) and 0 < limit < 1
    if limit is not None and not (whole or fraction):
        raise ValueError(f"limit must be None, an integer >= 1 or a fraction in (0, 1), got {limit!r}")
    return limit


def check_lm_eval_tasks(tasks) -> list[str]:
    """`check_task_names`, then load every task once (downloading a standard task's dataset into the
    Hugging Face cache); DownstreamTaskError naming the task, and why, if one cannot be loaded."""
    names = check_task_names(tasks)
    for name in names:
        try:
            lm_eval_task_manager().load([_task_spec(name)])
        except Exception as error:  # noqa: BLE001 - lm-eval and datasets raise many types; all are reported
            raise DownstreamTaskError(
                f"lm-eval task {name!r} could not be loaded ({type(error).__name__}: {error}). Standard tasks "
                f"(e.g. {', '.join(STANDARD_TASKS)}) download their data from the Hugging Face hub and need "
                f"internet; offline, use {', '.join(OFFLINE_TASKS)}"
            ) from error
    return names


@contextlib.contextmanager
def harness_padding_masked(patcher: MoERouterPatcher):
    """While active, the patcher's statistics leave out the padding of lm-eval's log-likelihood batches.

    lm-eval's HFLM (0.4.x) right-pads a batch of (context + continuation) inputs with zeros and calls
    model(input_ids) with no attention mask (padding cannot change a causal model's real positions, so it
    needs none); the routing statistics would count the padding. Its `pad_and_concat` sees each sequence's
    length: wrapped here, it also hands the patcher the batch's mask (`set_attention_mask`). Generation
    batches carry their own attention mask, which the patcher reads anyway."""
    _require_lm_eval()
    from lm_eval.models import huggingface as harness_module

    original = harness_module.pad_and_concat

    def pad_and_mask(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right"):
        lengths = torch.tensor([tensor.shape[-1] for tensor in tensors])  # before pad_and_concat pads in place
        batch = original(max_length, tensors, padding_side=padding_side)
        positions = torch.arange(max_length)
        real = positions < lengths[:, None] if padding_side == "right" else positions >= (max_length - lengths)[:, None]
        patcher.set_attention_mask(real.to(batch.device))
        return batch

    harness_module.pad_and_concat = pad_and_mask
    try:
        yield patcher
    finally:
        harness_module.pad_and_concat = original
        patcher.set_attention_mask(None)


def harness_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval HFLM around an already loaded (and possibly patched) model: lm-eval then evaluates the
    routing the patcher sets."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def task_metrics(task_results: dict, higher_is_better: dict | None = None) -> dict[str, dict]:
    """{metric: {"value", "stderr", "higher_is_better"}} from one task's entry of lm-eval's results
    ("acc,none": 0.5, "acc_stderr,none": 0.02, ...). A metric of filter "none" is named as is, another
    filter's as "metric,filter" (e.g. "exact_match,strict-match"); stderr is None where lm-eval gives none
    (e.g. perplexities); higher_is_better comes from lm-eval's own table for the task (None if absent)."""
    metrics = {}
    for key, value in task_results.items():
        metric, comma, kind = key.partition(",")
        if not comma or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = task_results.get(f"{metric}_stderr,{kind}")
        metrics[metric if kind == "none" else key] = {
            "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            "higher_is_better": (higher_is_better or {}).get(metric),
        }
    return metrics


def primary_metric(metrics: dict) -> str | None:
    """The metric a task is summarised by: the first of PRIMARY_METRICS it reports, else its first metric."""
    return next((name for name in PRIMARY_METRICS if name in metrics), next(iter(metrics), None))


def _sample_values(output: dict, metric: str | None) -> dict[str, object]:
    """{"<task>/<doc_id>": value of `metric`} for every sample lm-eval logged under the metric's filter (a
    group's subtasks included): a number (accuracy) or [log-likelihood, words or bytes] (perplexities)."""
    name, _, kind = (metric or "").partition(",")
    values = {}
    for task, samples in (output.get("samples") or {}).items():
        for sample in samples:
            if name in sample and sample.get("filter", "none") == (kind or "none"):
                value = sample[name]
                values[f"{task}/{sample['doc_id']}"] = (
                    [float(v) for v in value] if isinstance(value, tuple | list) else float(value)
                )
    return values


# How lm-eval aggregates the per-sample values of a metric, for the paired bootstrap: the mean, unless named
# here (pairs are [log-likelihood, words or bytes]). A metric aggregated otherwise over the corpus (f1, bleu)
# gets no interval.
_AGGREGATIONS = {
    "word_perplexity": lambda v: math.exp(-v[:, 0].sum() / v[:, 1].sum()),
    "byte_perplexity": lambda v: math.exp(-v[:, 0].sum() / v[:, 1].sum()),
    "bits_per_byte": lambda v: -v[:, 0].sum() / v[:, 1].sum() / math.log(2),
    "perplexity": lambda v: math.exp(-v.mean()),
}
_MEAN_METRICS = ("acc", "acc_norm", "exact_match", "acc_mutual_info", "mc1", "mc2")


def paired_difference(samples: dict, reference: dict, metric: str = "acc", resamples: int = 2000, seed: int = 0):
    """The difference of a task's metric between two configurations evaluated on the same samples
    ({sample id: value}, as `evaluate_task` saves them), with a paired bootstrap 95% interval: the shared
    samples are resampled with replacement, the same draw for both, and the metric re-aggregated as lm-eval
    aggregates it (the mean; weighted perplexity and bits per byte from [log-likelihood, count] pairs;
    exp(-mean) for "perplexity"). The interval assumes the samples are independent draws from the task's
    population (Efron & Tibshirani 1993, ch. 13, percentile interval). Returns {"difference", "low", "high",
    "num_samples"}; NaN where fewer than 2 samples are shared or the metric is not aggregated as above."""
    import numpy as np

    base = metric.partition(",")[0]
    aggregate = _AGGREGATIONS.get(base, (lambda v: float(v.mean())) if base in _MEAN_METRICS else None)
    shared = sorted(set(samples) & set(reference))
    if aggregate is None or len(shared) < 2:
        return {"difference": math.nan, "low": math.nan, "high": math.nan, "num_samples": len(shared)}
    ours = np.asarray([samples[key] for key in shared], dtype=np.float64)
    theirs = np.asarray([reference[key] for key in shared], dtype=np.float64)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):  # one draw at a time: [resamples, n] indices would not fit for MMLU's 14k
        draw = rng.integers(0, len(shared), size=len(shared))
        boot.append(aggregate(ours[draw]) - aggregate(theirs[draw]))
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "difference": float(aggregate(ours) - aggregate(theirs)),
        "low": float(low),
        "high": float(high),
        "num_samples": len(shared),
    }


def evaluate_task(harness, patcher: MoERouterPatcher, config: RoutingConfig, task, limit=None, bootstrap_iters=1000):
    """One routing configuration on one lm-eval task: patch, `simple_evaluate`, unpatch.

    Returns {"metrics": {metric: {"value", "stderr", "higher_is_better"}}, "primary_metric", "samples" (each
    sample's value of the primary metric, for `paired_difference`), "num_samples", "seconds", "date", and
    the routing statistics of the evaluation's forward passes over real tokens only (padding left out):
    "avg_experts", "per_layer_avg_experts", "num_tokens"}. lm-eval's stderr of a mean is its standard
    error under independent samples; bootstrap_iters sets the resamples for metrics it bootstraps."""
    from lm_eval import simple_evaluate

    check_limit(limit)
    config.apply(patcher)
    try:
        with harness_padding_masked(patcher):
            start = time.perf_counter()
            output = simple_evaluate(
                model=harness,
                tasks=[_task_spec(task)],
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,
                task_manager=lm_eval_task_manager(),
            )
            seconds = time.perf_counter() - start
        stats = patcher.get_stats()
    finally:
        patcher.unpatch()
    metrics = task_metrics(output["results"][task], output.get("higher_is_better", {}).get(task))
    primary = primary_metric(metrics)
    samples = _sample_values(output, primary)
    return {
        "metrics": metrics,
        "primary_metric": primary,
        "samples": samples,
        "num_samples": len(samples),
        "seconds": seconds,
        "date": environment_info()["date"],
        "avg_experts": stats["avg_experts"],
        "per_layer_avg_experts": stats["per_layer_avg_experts"],
        "num_tokens": stats["num_tokens"],
    }


def _downstream_settings(model, settings: dict | None, tasks: list[str], limit, batch_size: int, bootstrap_iters):
    """What a saved (configuration, task) result depends on besides this module's code: the model's dtype and
    hardware, the caller's settings (e.g. the model's name), the task list, limit, batch size, resamples,
    lm-eval's version and the held-out text the offline tasks are built from."""
    import hashlib

    lm_eval = _require_lm_eval()
    info = environment_info(model)
    return (
        {"dtype": info["model_dtype"], "hardware": info["hardware"]}
        | (settings or {})
        | {
            "tasks": tasks,
            "limit": limit,
            "batch_size": batch_size,
            "bootstrap_iters": bootstrap_iters,
            "lm_eval": lm_eval.__version__,
            "heldout_sha256": hashlib.sha256(HELDOUT_TEXT_PATH.read_bytes()).hexdigest()[:16],
        }
    )


def evaluate_downstream(
    model,
    tokenizer,
    configs: list[RoutingConfig],
    tasks,
    output_dir: str | Path,
    settings: dict | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    patcher: MoERouterPatcher | None = None,
    redo: bool = False,
) -> dict[str, dict]:
    """Every routing configuration on every lm-eval task, one result file per (configuration, task).

    configs: `RoutingConfig`s (e.g. `RoutingConfig.parse("bh:alpha=0.05,max_k=8")`); tasks: lm-eval task
    names (OFFLINE_TASKS need no download); limit: `check_limit`. Each task's result (`evaluate_task`) is
    saved to output_dir/configs/<config>.<task>.json as it finishes, resumed on a rerun with the same
    settings (`_downstream_settings`) and code, and recorded as "failed" with its error if it raises
    (`ResultStore`), while the other tasks and configurations go on. Every task is loaded once first, so
    that an unreachable one fails (DownstreamTaskError) before any work. patcher: the model's patcher
    (None: a new one); redo: recompute saved results.
    Returns {config name: {"method", "params", "tasks": {task: result with its "status"}}}."""
    if not configs or not all(isinstance(config, RoutingConfig) for config in configs):
        raise ValueError(f"configs must be a non-empty list of RoutingConfig, got {configs!r}")
    if not isinstance(bootstrap_iters, int) or isinstance(bootstrap_iters, bool) or bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters must be an integer >= 0, got {bootstrap_iters!r}")
    names = check_lm_eval_tasks(tasks)
    harness = harness_model(model, tokenizer, batch_size)
    settings = _downstream_settings(model, settings, names, check_limit(limit), batch_size, bootstrap_iters)
    store = ResultStore(Path(output_dir) / "configs", settings)
    patcher = patcher or MoERouterPatcher(model)
    # Every configuration's parameters checked (and completed) before any work.
    results = {
        c.name: {
            "method": c.method,
            "params": routing_method(c.method).parameters(patcher.shape, **c.kwargs),
            "tasks": {},
        }
        for c in configs
    }
    for config in configs:
        for task in names:
            compute = functools.partial(evaluate_task, harness, patcher, config, task, limit, bootstrap_iters)
            saved = store.run(f"{config.name}.{task}", compute, describe={"task": task}, redo=redo)
            results[config.name]["tasks"][task] = saved
    return results


def _task_row(evaluation: dict, native: dict | None) -> dict:
    """The columns of one ok (configuration, task) row of `downstream_table`."""
    metric = evaluation["primary_metric"]
    value = evaluation["metrics"].get(metric, {})
    row = {
        "metric": metric,
        "higher_is_better": value.get("higher_is_better"),
        "value": value.get("value"),
        "stderr": value.get("stderr"),
        "avg_experts": evaluation["avg_experts"],
        "num_tokens": evaluation["num_tokens"],
        "num_samples": evaluation["num_samples"],
        "date": evaluation.get("date"),
    }
    if native is not None and metric is not None:
        difference = paired_difference(evaluation["samples"], native["samples"], metric)
        row |= {f"{key}_vs_native": difference[key] for key in ("difference", "low", "high")}
    return row


def downstream_table(results: dict[str, dict]):
    """One row per (configuration, task): config, method, series, its parameters, task, status, error,
    primary metric, whether higher is better, its value and lm-eval's stderr, average experts per real
    token, tokens, samples, the evaluation's date, and the difference to the native configuration with its
    paired bootstrap 95% interval (`paired_difference`; absent without an ok native result for the task)."""
    import pandas as pd

    native = next((r for r in results.values() if r["method"] == "native"), None)
    rows = []
    for name, result in results.items():
        method = routing_method(result["method"])
        head = {"config": name, "method": method.name, "series": method.series(result["params"]), **result["params"]}
        for task, evaluation in result["tasks"].items():
            row = head | {"task": task, "status": evaluation["status"], "error": evaluation.get("error", "")}
            reference = native["tasks"].get(task, {}) if native is not None and native is not result else {}
            if evaluation["status"] == "ok":
                row |= _task_row(evaluation, reference if reference.get("status") == "ok" else None)
            rows.append(row)
    return pd.DataFrame(rows)


def plot_downstream(table, path: str | Path | None = None):
    """Each task's primary metric against average experts per token, one panel per task and one line per
    method series, with +-1 stderr bars where lm-eval gives one. Saved to `path` (atomically) if given."""
    import matplotlib.pyplot as plt

    ok = table[table["status"] == "ok"] if len(table) else table
    tasks = list(dict.fromkeys(ok["task"])) if len(ok) else []
    figure, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        rows = ok[ok["task"] == task].sort_values("avg_experts")
        for series, points in rows.groupby("series", sort=False):
            stderr = points["stderr"].astype(float)
            yerr = None if stderr.isna().all() else stderr
            ax.errorbar(points["avg_experts"], points["value"], yerr=yerr, marker="o", capsize=3, label=series)
        metric = rows["metric"].iloc[0]
        ax.set(xlabel="average experts per token", ylabel=metric, title=task)
        ax.set_yscale("log" if "perplexity" in str(metric) else "linear")
        ax.legend(fontsize=8)
    if not tasks:
        axes[0][0].text(0.5, 0.5, "no configuration evaluated", ha="center", va="center")
    note_failures(figure, sorted({f"{r.config} ({r.task})" for r in table.itertuples() if r.status != "ok"}))
    if path is not None:
        save_figure(figure, path, dpi=120)
    return figure


def _interval(row) -> str:
    difference = getattr(row, "difference_vs_native", math.nan)
    if difference is None or math.isnan(difference):
        return ""
    return f"{difference:+.4g} [{row.low_vs_native:+.4g}, {row.high_vs_native:+.4g}]"


def _task_lines(task: str, rows) -> list[str]:
    """One task's table of `downstream_markdown`."""
    metric, better = rows["metric"].iloc[0], rows["higher_is_better"].iloc[0]
    direction = {True: "higher is better", False: "lower is better"}.get(better, "direction not given by lm-eval")
    lines = [f"### {task}: {metric} ({direction}; {int(rows['num_samples'].iloc[0])} samples)", ""]
    lines += [f"| config | avg experts | {metric} | difference to native [95% interval] |", "| --- | --- | --- | --- |"]
    for row in rows.sort_values("avg_experts").itertuples():
        stderr = "" if row.stderr is None or math.isnan(row.stderr) else f" +- {row.stderr:.4f}"
        lines.append(f"| {row.config} | {row.avg_experts:.2f} | {row.value:.4f}{stderr} | {_interval(row)} |")
    return [*lines, ""]


def downstream_markdown(table, header: str = "", title: str = "## Downstream accuracy (lm-evaluation-harness)") -> str:
    """The report's section from `downstream_table`: `header` (what ran), then per task each configuration's
    primary metric (with lm-eval's stderr), average experts per real token and the difference to the native
    configuration with its paired bootstrap 95% interval; then the failed (configuration, task) pairs."""
    ok = table[table["status"] == "ok"] if len(table) else table
    lines = [title, "", *([header, ""] if header else [])]
    for task, rows in ok.groupby("task", sort=False) if len(ok) else []:
        lines += _task_lines(task, rows)
    failed = table[table["status"] != "ok"] if len(table) else table
    lines += [f"- {row.config} on {row.task} failed: {row.error}" for row in failed.itertuples()]
    return "\n".join(lines).rstrip() + "\n"


def downstream_header(results: dict[str, dict]) -> str:
    """What ran, from the settings saved with the results: model, dtype, hardware, lm-eval version, limit,
    batch size, and the dates of the first and last evaluation."""
    saved = [evaluation for result in results.values() for evaluation in result["tasks"].values()]
    settings = saved[0]["settings"] if saved else {}
    dates = sorted(evaluation["date"] for evaluation in saved if evaluation.get("date"))
    when = f"; evaluated {dates[0]} to {dates[-1]}" if dates else ""
    return (
        f"Model `{settings.get('model')}` ({settings.get('dtype')}, {settings.get('hardware')}), lm-eval "
        f"{settings.get('lm_eval')}, limit {settings.get('limit')}, batch size {settings.get('batch_size')}{when}. "
        "Intervals: paired bootstrap over the task's samples, assuming they are independent; not adjusted for "
        "the several comparisons per task."
    )


def write_downstream_outputs(results: dict[str, dict], output_dir: str | Path) -> dict[str, Path]:
    """The table (downstream.csv), the figure (downstream.png) and the markdown section (downstream.md) of
    `evaluate_downstream`'s results, written atomically to output_dir. Returns their paths."""
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    table = downstream_table(results)
    paths = {
        "csv": atomic_write(output_dir / "downstream.csv", lambda temporary: table.to_csv(temporary, index=False)),
        "markdown": atomic_write_text(
            output_dir / "downstream.md", downstream_markdown(table, downstream_header(results))
        ),
    }
    figure = plot_downstream(table, output_dir / "downstream.png")
    plt.close(figure)
    return paths | {"figure": output_dir / "downstream.png"}
