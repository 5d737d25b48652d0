"""Benjamini-Hochberg adaptive expert routing for OLMoE (and any transformers OLMoE-layout MoE).

One flat module, readable top to bottom:

1. Argument checks shared by every routing method.
2. The Benjamini-Hochberg step-up procedure (`bh_reject`), stated once and vectorised.
3. Per-expert p-values from router logits: the design's `one_minus_prob` and the calibrated default
   `robust_z` (a per-token robust Gaussian null, calibrated by simulation of its pivotal statistic).
4. Routing functions with one return contract: `benjamini_hochberg_routing`, `topk_routing`,
   `topp_routing`.
5. Summaries: `summarize_expert_counts`, `run_bh_multi_k`, `compare_multi_k_statistics`.
6. Models: `load_model` (hub id, local path, or the embedded default) and `build_random_olmoe`.
7. Variable-k expert execution (`variable_k_experts_forward`, experts_implementation="variable_k"): sorts
   the kept (token, expert) pairs by expert and runs one grouped GEMM per projection over them only, with
   Triton kernels on CUDA and a plain-torch reference elsewhere, so fewer experts take less time.
8. `OLMoERouterPatcher`: swaps a model's top-8 router for any method above, so that the experts module
   computes only the selected (token, expert) pairs, and records routing statistics.
9. The experiment: the design's 12 prompts and 25 configurations, `run_sweep` (resumable, per-config saving).
10. Outputs: `summary_table`, `saturation_analysis`, `write_results`, `plot_analysis`, `write_report`.
11. Quality: `evaluate_language_model` (sliding-window perplexity), `run_quality_sweep`, the top-k/top-p
   baselines, `frontier_table`, `plot_frontier`, `token_level_analysis`.

Shapes use E for the number of experts (64 for OLMoE), K for a method's slot width (max_k, or k for top-k),
and "..." for any leading token dimensions ([tokens] inside the model, [batch, seq_len] for users).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "PVALUE_METHODS",
    "bh_reject",
    "compute_p_values",
    "benjamini_hochberg_routing",
    "topk_routing",
    "topp_routing",
    "summarize_expert_counts",
    "run_bh_multi_k",
    "compare_multi_k_statistics",
    "load_model",
    "build_random_olmoe",
    "VARIABLE_K_EXPERTS",
    "variable_k_experts_forward",
    "register_variable_k_experts",
    "OLMoERouterPatcher",
    "PROMPTS",
    "RoutingConfig",
    "design_configs",
    "design_pvalue_configs",
    "baseline_configs",
    "floored_bh_configs",
    "run_config",
    "run_sweep",
    "summary_table",
    "saturation_analysis",
    "environment_info",
    "write_results",
    "plot_analysis",
    "plot_frontier",
    "plot_layer_heatmap",
    "write_report",
    "load_heldout_text",
    "evaluate_language_model",
    "run_quality_sweep",
    "frontier_table",
    "token_level_analysis",
]

PVALUE_METHODS = ("robust_z", "one_minus_prob")
DEFAULT_PVALUE_METHOD = "robust_z"
HUB_MODEL_ID = "allenai/OLMoE-1B-7B-0924"
REPO_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL_DIR = REPO_DIR / "models" / "tiny-olmoe"
NATIVE_TOP_K = 8  # OLMoE-1B-7B routes every token to 8 experts; "reduction vs baseline" is relative to it
MIN_TRANSFORMERS = "5.24"  # first release checked to skip the sentinel expert index (benchmarks/gpu_notes.md)


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
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
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


# ----------------------------------------------------------------------------------------------------
# 2. The Benjamini-Hochberg step-up procedure
# ----------------------------------------------------------------------------------------------------


def _bh_num_rejections(p_values: torch.Tensor, alpha: float, presorted: bool = False) -> torch.Tensor:
    """k = max{j : p_(j) <= alpha * j / m} along the last dimension (0 when no j qualifies).

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
        raise ValueError("p_values must be a floating-point torch.Tensor with at least one dimension")
    num_tests = p_values.shape[-1]
    num_rejections = _bh_num_rejections(p_values, alpha)  # [...]
    threshold = _bh_critical_value(num_rejections, alpha, num_tests, p_values.dtype)  # [...]
    # p <= alpha*k/m  <=>  rank <= k (every p with rank > k exceeds alpha*rank/m > alpha*k/m).
    return (p_values <= threshold.unsqueeze(-1)) & (num_rejections > 0).unsqueeze(-1)


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

_NULL_SIMULATED_TOKENS = 2**17  # 131072 simulated tokens x E experts: p resolves to ~1e-7 at E=64
_NULL_SEED = 20240902
_NULL_GRID = (-40.0, 80.0, 1.0 / 64)  # s grid (first, last, step) of the tabulated log survival function
_null_table_cache: dict[tuple[int, str], torch.Tensor] = {}
_critical_statistics_cache: dict[tuple[float, int, str], torch.Tensor] = {}


def _num_trimmed(num_experts: int) -> int:
    """J: how many of the largest logits the null estimate leaves out (E/4, 16 for OLMoE)."""
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


def _robust_z_statistic(logits: torch.Tensor, top_logits: torch.Tensor | None = None) -> torch.Tensor:
    """s = (z - mean) / std of the token's logits without its J largest. [..., E] -> [..., E].

    top_logits: the token's largest logits ([..., >= J], from a topk already at hand), or None.
    """
    if top_logits is None:
        top_logits = torch.topk(logits, _num_trimmed(logits.shape[-1]), dim=-1).values
    center, inverse_std = _robust_location_scale(logits, top_logits)
    return torch.addcmul(-center * inverse_std, logits, inverse_std)  # (z - center) / std in one pass


def robust_z_null_table(num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """log P(S >= s) of the robust_z statistic under H0 on the grid _NULL_GRID: [num_knots] float32.

    Deterministic (fixed seed, CPU generator), built once per (E, device) in about a second, then cached.
    """
    key = (num_experts, str(device))
    if key not in _null_table_cache:
        cpu_key = (num_experts, "cpu")
        if cpu_key not in _null_table_cache:
            generator = torch.Generator().manual_seed(_NULL_SEED)
            null_logits = torch.randn(_NULL_SIMULATED_TOKENS, num_experts, generator=generator)
            null_sorted = torch.sort(_robust_z_statistic(null_logits).flatten()).values.double()
            first, last, step = _NULL_GRID
            knots = torch.arange(round((last - first) / step) + 1, dtype=torch.float64) * step + first
            num_at_least = null_sorted.numel() - torch.searchsorted(null_sorted, knots)
            survival = (num_at_least + 1).double() / (null_sorted.numel() + 1)
            _null_table_cache[cpu_key] = survival.log().float()
        _null_table_cache[key] = _null_table_cache[cpu_key].to(device)
    return _null_table_cache[key]


def _robust_z_p_values(statistics: torch.Tensor) -> torch.Tensor:
    """p-values of robust_z statistics from the tabulated null. [..., E] -> [..., E], same dtype."""
    log_survival = robust_z_null_table(statistics.shape[-1], statistics.device)  # [num_knots]
    first, _, step = _NULL_GRID
    position = ((statistics - first) / step).clamp(0, log_survival.numel() - 1)
    lower = position.floor().long().clamp_max(log_survival.numel() - 2)
    fraction = (position - lower).to(log_survival.dtype)
    return torch.lerp(log_survival[lower], log_survival[lower + 1], fraction).exp().to(statistics.dtype)


def _robust_z_critical_statistics(alpha: float, num_experts: int, device) -> torch.Tensor:
    """c_j with p(s) <= alpha*j/E  <=>  s >= c_j, for j = 1..E: [E] float32, decreasing (+inf: never).

    Inverts the tabulated log survival function (piecewise linear in s) at the BH critical values, so the
    routing hot path compares statistics with c_j instead of computing every p-value.
    """
    key = (float(alpha), num_experts, str(device))
    if key not in _critical_statistics_cache:
        log_survival = robust_z_null_table(num_experts, "cpu").double()  # [num_knots], non-increasing
        first, _, step = _NULL_GRID
        log_critical = torch.log(alpha * torch.arange(1, num_experts + 1, dtype=torch.float64) / num_experts)
        index = torch.searchsorted(-log_survival, -log_critical)  # first knot with log S <= log(alpha*j/E)
        below_grid = index == 0  # every statistic on the grid passes
        beyond_grid = index == log_survival.numel()  # below the simulation's resolution: none passes
        index = index.clamp(1, log_survival.numel() - 1)
        left, right = log_survival[index - 1], log_survival[index]
        fraction = ((left - log_critical) / (left - right).clamp_min(1e-300)).clamp(0, 1)
        critical = first + (index - 1 + fraction) * step
        critical = torch.where(below_grid, torch.tensor(-math.inf, dtype=torch.float64), critical)
        critical = torch.where(beyond_grid, torch.tensor(math.inf, dtype=torch.float64), critical)
        _critical_statistics_cache[key] = critical.float().to(device)
    return _critical_statistics_cache[key]


def _bh_count_from_first_passing_rank(first_passing_rank: torch.Tensor) -> torch.Tensor:
    """BH's k from, per hypothesis, the smallest j with p_i <= alpha*j/m (m + 1 if none). No sort needed.

    N_j = #{i : p_i <= alpha*j/m} = #{i : first_passing_rank_i <= j}, and k = max{j : N_j >= j}
    (the step-up rule: p_(j) <= alpha*j/m  <=>  N_j >= j). [..., m] int in [1, m+1] -> [...] int64.
    """
    num_tests = first_passing_rank.shape[-1]
    first_passing_rank = first_passing_rank.to(torch.int32)  # int32 halves the memory traffic on CPU
    histogram = torch.zeros(*first_passing_rank.shape[:-1], num_tests + 2, device=first_passing_rank.device,
                            dtype=torch.int32).scatter_add_(-1, first_passing_rank.long(), torch.ones_like(first_passing_rank))  # fmt: skip
    num_passing = histogram.cumsum(dim=-1, dtype=torch.int32)[..., 1 : num_tests + 1]  # [..., m]: N_j, j = 1..m
    ranks = torch.arange(1, num_tests + 1, device=first_passing_rank.device, dtype=torch.int32)
    return torch.where(num_passing >= ranks, ranks, 0).amax(dim=-1).long()


def _robust_z_first_passing_rank(statistics: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
    """Smallest rank j with s_i >= c_j (E + 1 if none): j = 1 + #{j : c_j > s_i}. [..., E] -> [..., E] int32."""
    num_experts = statistics.shape[-1]
    return 1 + num_experts - torch.searchsorted(critical.flip(0), statistics.float().contiguous(), right=True, out_int32=True)


def _bh_count_robust_z_cpu(logits: torch.Tensor, top_logits: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
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
        rows, row_top = logits.reshape(-1, num_experts)[flat_many], top_logits.reshape(-1, top_logits.shape[-1])[flat_many]
        full = _bh_count_from_first_passing_rank(_robust_z_first_passing_rank(_robust_z_statistic(rows, row_top), critical))
        num_significant = num_significant.reshape(-1).index_put((flat_many.nonzero().squeeze(-1),), full).reshape(many.shape)
    return num_significant


def _work_logits(router_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32 (float64 if given): p-values are never computed in bf16/fp16."""
    work_dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return router_logits.to(work_dtype) / temperature


def compute_p_values(
    router_logits: torch.Tensor, pvalue_method: str = DEFAULT_PVALUE_METHOD, temperature: float = 1.0
) -> torch.Tensor:
    """Per-expert p-values for "expert i is not relevant to this token".

    Args:
        router_logits: [..., E] router logits (any float dtype; computed in float32, or float64 if given).
        pvalue_method: "robust_z" (calibrated, default) or "one_minus_prob" (the design's formula).
        temperature: softmax temperature; only "one_minus_prob" depends on it.
    Returns:
        [..., E] p-values in (0, 1], float32 (float64 for float64 input), in expert order.
    """
    _check_pvalue_method(pvalue_method)
    _check_temperature(temperature)
    scaled_logits = _work_logits(router_logits, temperature)  # [..., E]
    if pvalue_method == "one_minus_prob":
        return 1.0 - torch.softmax(scaled_logits, dim=-1)
    return _robust_z_p_values(_robust_z_statistic(scaled_logits))


# ----------------------------------------------------------------------------------------------------
# 4. Routing functions: one contract for BH and the baselines
# ----------------------------------------------------------------------------------------------------
#
# Every method decides `expert_counts` per token and keeps that many of the most probable experts, in
# `K` slots ordered most probable first. Unused slots hold the index E (= num_experts) and weight 0:
# transformers' OLMoE experts module skips that sentinel index, so the experts the method dropped are
# never computed. Weights are the softmax probabilities of the kept experts (as OLMoE, whose
# norm_topk_prob is false), or renormalised to sum to 1 with renormalize=True (the design's step 5).


@dataclass(frozen=True)
class _Routing:
    """Result of a routing method on [..., E] logits (K = slot width)."""

    top_weights: torch.Tensor  # [..., K] float32, 0 in unused slots
    top_index: torch.Tensor  # [..., K] int64, E (sentinel) in unused slots
    expert_counts: torch.Tensor  # [...] int64, experts kept per token
    probabilities: torch.Tensor  # [..., E] float32 softmax(logits / T)
    extra_stats: dict  # method-specific statistics (BH: p_values, bh_threshold, significant_mask)


def _keep_top(
    top_probabilities: torch.Tensor, top_index: torch.Tensor, expert_counts: torch.Tensor, num_experts: int,
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
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_weights.dtype).tiny)
    return top_weights, torch.where(kept, top_index, torch.full_like(top_index, num_experts))


def _route_bh(
    logits, alpha, temperature, min_k, max_k, pvalue_method, renormalize, with_stats=False, critical=None
) -> _Routing:
    """BH routing of [..., E] logits. critical: the robust_z critical statistics for (alpha, E) on this
    device, if already at hand (the patcher passes them so that a compiled call touches no cache)."""
    num_experts = logits.shape[-1]
    scaled_logits = _work_logits(logits, temperature)  # [..., E]
    probabilities = torch.softmax(scaled_logits, dim=-1)  # [..., E]
    # One top-k gives the experts to keep (most probable first) and the logits the null estimate trims.
    width = max(max_k, _num_trimmed(num_experts)) if pvalue_method == "robust_z" else max_k
    top_logits, top_index = torch.topk(scaled_logits, width, dim=-1)  # [..., width]
    first_passing_rank = None
    if pvalue_method == "robust_z":
        if critical is None:
            critical = _robust_z_critical_statistics(alpha, num_experts, logits.device)  # [E], decreasing
        if scaled_logits.device.type == "cpu" and not with_stats:
            num_significant = _bh_count_robust_z_cpu(scaled_logits, top_logits, critical)
        else:  # no data-dependent branch: no host synchronisation on the GPU
            statistics = _robust_z_statistic(scaled_logits, top_logits)  # [..., E]
            first_passing_rank = _robust_z_first_passing_rank(statistics, critical)
            num_significant = _bh_count_from_first_passing_rank(first_passing_rank)  # [...]
    else:
        # 1 - prob_i <= alpha*j/m  <=>  j >= m * (1 - prob_i) / alpha
        first_passing_rank = torch.ceil(num_experts * (1.0 - probabilities) / alpha).long().clamp(1, num_experts + 1)
        num_significant = _bh_count_from_first_passing_rank(first_passing_rank)  # [...]
    expert_counts = num_significant.clamp(min_k, max_k)
    top_probabilities = probabilities.gather(-1, top_index[..., :max_k])
    top_weights, kept_index = _keep_top(top_probabilities, top_index[..., :max_k], expert_counts, num_experts, renormalize)
    extra_stats = {}
    if with_stats:
        if pvalue_method == "one_minus_prob":
            p_values = 1.0 - probabilities
        else:  # with_stats took the full path above, so `statistics` is at hand
            p_values = _robust_z_p_values(statistics)
        extra_stats = {
            "p_values": p_values,
            "bh_threshold": _bh_critical_value(num_significant, alpha, num_experts, p_values.dtype),
            "significant_mask": first_passing_rank <= num_significant.unsqueeze(-1),
            "num_significant": num_significant,
        }
    return _Routing(top_weights, kept_index, expert_counts, probabilities, extra_stats)


def _route_bh_tensors(logits, critical, alpha, temperature, min_k, max_k, pvalue_method, renormalize):
    """(top_weights, top_index, expert_counts) of `_route_bh`: the patcher's hot path, the function that
    torch.compile fuses on CUDA (tensors in, tensors out, no cache lookups)."""
    routing = _route_bh(logits, alpha, temperature, min_k, max_k, pvalue_method, renormalize, critical=critical)
    return routing.top_weights, routing.top_index, routing.expert_counts


def _route_topk(logits, k, temperature, renormalize) -> _Routing:
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    top_probabilities, top_index = torch.topk(probabilities, k, dim=-1)  # as OLMoE's router does
    expert_counts = torch.full(logits.shape[:-1], k, dtype=torch.int64, device=logits.device)
    top_weights, top_index = _keep_top(top_probabilities, top_index, expert_counts, logits.shape[-1], renormalize)
    return _Routing(top_weights, top_index, expert_counts, probabilities, {})


def _route_topp(logits, p, temperature, min_k, max_k, renormalize) -> _Routing:
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    sorted_probabilities, order = torch.sort(probabilities, dim=-1, descending=True)  # [..., E]
    mass_before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities  # mass of more probable experts
    # Fewest experts whose mass reaches p = number of experts whose predecessors hold < p.
    num_needed = (mass_before < p).sum(dim=-1)
    expert_counts = num_needed.clamp(min_k, max_k)
    top_weights, top_index = _keep_top(
        sorted_probabilities[..., :max_k], order[..., :max_k], expert_counts, logits.shape[-1], renormalize
    )
    return _Routing(top_weights, top_index, expert_counts, probabilities, {"num_needed": num_needed})


def _public_result(routing: _Routing, return_stats: bool):
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
            max(min_k, <=1) experts for every alpha <= 1, see the module notes).
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
    _check_logits(router_logits)
    _check_alpha(alpha)
    _check_temperature(temperature)
    _check_k_bounds(min_k, max_k, router_logits.shape[-1])
    _check_pvalue_method(pvalue_method)
    routing = _route_bh(router_logits, alpha, temperature, min_k, max_k, pvalue_method, bool(renormalize), return_stats)
    return _public_result(routing, return_stats)


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
    _check_logits(router_logits)
    _check_temperature(temperature)
    _check_top_k(k, router_logits.shape[-1])
    return _public_result(_route_topk(router_logits, k, temperature, bool(renormalize)), return_stats)


def _check_top_p(p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
        raise ValueError(f"p must be a number in (0, 1], got {p!r}")


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
    _check_logits(router_logits)
    _check_top_p(p)
    _check_temperature(temperature)
    max_k = router_logits.shape[-1] if max_k is None else max_k
    _check_k_bounds(min_k, max_k, router_logits.shape[-1])
    return _public_result(_route_topp(router_logits, p, temperature, min_k, max_k, bool(renormalize)), return_stats)


# ----------------------------------------------------------------------------------------------------
# 5. Summaries of expert counts
# ----------------------------------------------------------------------------------------------------


def summarize_expert_counts(
    expert_counts: torch.Tensor, min_k: int, max_k: int, baseline_k: int = NATIVE_TOP_K
) -> dict[str, float]:
    """The design's expert-selection metrics over every entry of `expert_counts` (any shape).

    Rates are percentages: ceiling_hit_rate = % of entries equal to max_k, floor_hit_rate = % equal to
    min_k, reduction_vs_baseline = 100 * (1 - avg_experts / baseline_k).
    """
    counts = expert_counts.detach().flatten().to("cpu", torch.float64)
    if counts.numel() == 0:
        raise ValueError("expert_counts is empty: no tokens were routed")
    avg_experts = counts.mean().item()
    return {
        "avg_experts": avg_experts,
        "std_experts": counts.std(unbiased=False).item(),
        "min_experts": counts.min().item(),
        "max_experts": counts.max().item(),
        "median_experts": counts.quantile(0.5).item() if counts.numel() <= 16_000_000 else counts.median().item(),
        "ceiling_hit_rate": 100.0 * (counts == max_k).double().mean().item(),
        "floor_hit_rate": 100.0 * (counts == min_k).double().mean().item(),
        "reduction_vs_baseline": 100.0 * (1.0 - avg_experts / baseline_k),
    }


def expert_load_balance(selections: torch.Tensor) -> float:
    """Mean over layers of the normalised entropy of how often each expert was chosen: 1 when every
    expert is chosen equally often, 0 when one expert takes everything. selections: [L, E] counts."""
    selections = selections.double()
    load_shares = selections / selections.sum(dim=-1, keepdim=True).clamp_min(1)
    return (-torch.xlogy(load_shares, load_shares).sum(dim=-1) / math.log(selections.shape[-1])).mean().item()


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
# 6. Models: the hub model, a local directory, or the embedded default
# ----------------------------------------------------------------------------------------------------


def build_random_olmoe(config=None, seed: int = 0, device: str = "cpu", dtype=torch.float32, **config_overrides):
    """A randomly initialised `OlmoeForCausalLM` (eval mode) with OLMoE's routing geometry.

    Args:
        config: None (a small model: 2 layers, hidden 64, 64 experts, top-8), an `OlmoeConfig`, a dict,
            or the path of a config.json (e.g. ../shared/olmoe-1b-7b-0924.config.json for the real shape).
        seed: torch seed for the initialisation.
        device, dtype: where and in which dtype the weights are created (initialising the 7B shape on a
            GPU in bf16 takes seconds; on a CPU in float32 it needs 28 GB).
        config_overrides: fields to override (e.g. num_hidden_layers=1).
    """
    import json

    from transformers import OlmoeConfig, OlmoeForCausalLM

    small = dict(
        vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        max_position_embeddings=512, pad_token_id=1, eos_token_id=0, bos_token_id=None,
    )  # fmt: skip
    if config is None:
        config = OlmoeConfig(**{**small, **config_overrides})
    elif isinstance(config, (str, Path)):
        fields = json.loads(Path(config).read_text())
        fields.pop("architectures", None), fields.pop("torch_dtype", None), fields.pop("model_type", None)
        config = OlmoeConfig(**{**fields, **config_overrides})
    elif isinstance(config, dict):
        config = OlmoeConfig(**{**config, **config_overrides})
    else:
        for name, value in config_overrides.items():
            setattr(config, name, value)
    torch.manual_seed(seed)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OlmoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model.eval()


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype, device: str):
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)} or 'auto', got {dtype!r}")
        return allowed[dtype]
    return dtype


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
        device: "cuda", "cpu", ... (default: cuda if available). Ignored when device_map is given.
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16" or a torch dtype.
        device_map: passed to from_pretrained (e.g. "auto" to spread a model over several GPUs).
    Returns:
        (model in eval mode, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(model_name_or_path) == "embedded":
        model_name_or_path = EMBEDDED_MODEL_DIR
        if not (EMBEDDED_MODEL_DIR / "config.json").exists():
            raise FileNotFoundError(
                f"The embedded model is missing from {EMBEDDED_MODEL_DIR}; this checkout is incomplete "
                "(it is committed in the repository; scripts/train_tiny_olmoe.py rebuilds it)."
            )
    device = device or _default_device()
    torch_dtype = _resolve_dtype(dtype, device if device_map is None else "cuda")
    is_local = Path(model_name_or_path).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path))
        model = AutoModelForCausalLM.from_pretrained(str(model_name_or_path), dtype=torch_dtype, device_map=device_map)
    except OSError as error:
        if is_local:
            raise
        raise RuntimeError(
            f"Could not load {model_name_or_path!r} from the Hugging Face hub (no network, or not cached?). "
            f"Original error: {error}. Offline, use the embedded model instead: "
            f"load_model('embedded') (files in {EMBEDDED_MODEL_DIR})."
        ) from error
    if device_map is None:
        model = model.to(device)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------------
# 7. Variable-k expert execution: compute only the kept (token, expert) pairs
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
EXPERTS_PATHS = (VARIABLE_K_EXPERTS, "model")  # OLMoERouterPatcher(experts_path=...)

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch reference below.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _sort_pairs_by_expert(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the T*K (token, slot) pairs by expert, sentinel slots (index E) last.

    Args:
        top_k_index: [T, K] expert ids, E in unused slots.
    Returns:
        pair_order [T*K] int64: flat pair ids (token * K + slot), sorted by expert id.
        offsets [E] int32: offsets[e] is one past the last row of expert e's group; offsets[E-1] is the
            number of kept pairs. Computed on the device (searchsorted), never read back.
    """
    # The narrowest key that holds the sentinel: a radix sort makes one pass per key byte (for 32768 pairs
    # on an H200, uint8 keys took 7 us of sort kernel against 46 us for int64; benchmarks/gpu_notes.md).
    key_dtype = torch.uint8 if num_experts < 2**8 else torch.int16 if num_experts < 2**15 else torch.int32
    sorted_expert_ids, pair_order = torch.sort(top_k_index.reshape(-1).to(key_dtype))
    expert_ids = torch.arange(num_experts, device=top_k_index.device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_expert_ids, expert_ids, right=True, out_int32=True)
    return pair_order, offsets


@functools.lru_cache(maxsize=None)  # called per layer: no version parsing on the hot path
def _grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
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


def _grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """rows [S, in] sorted by group, weights [E, out, in] (nn.Linear layout), offsets [E] -> [S, out].

    Rows at and past offsets[-1] are not computed (their values are undefined). torch's grouped GEMM where
    it has one (`_grouped_mm_usable`); otherwise one matmul per expert, which reads the offsets back to
    the host once."""
    if _grouped_mm_usable(rows.device, rows.dtype):
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return grouped_mm(rows, weights.transpose(-2, -1), offs=offsets)
    output = torch.zeros(rows.shape[0], weights.shape[1], device=rows.device, dtype=rows.dtype)
    start = 0
    for expert, end in enumerate(offsets.tolist()):  # fallback only: one sync, loop over experts
        if end > start:
            output[start:end] = rows[start:end] @ weights[expert].T
        start = end
    return output


def _variable_k_experts_torch(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
    """The reference (and CPU) variable-k experts forward. Shapes as in `variable_k_experts_forward`."""
    num_tokens, slots = top_k_index.shape
    num_experts = gate_up_proj.shape[0]
    pair_order, offsets = _sort_pairs_by_expert(top_k_index, num_experts)
    sorted_hidden = hidden_states[pair_order // slots]  # [S, H]
    gate, up = _grouped_matmul(sorted_hidden, gate_up_proj, offsets).chunk(2, dim=-1)  # [S, I] each
    expert_outputs = _grouped_matmul(act_fn(gate) * up, down_proj, offsets)  # [S, H]; tail rows undefined
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
    def _gather_kept_pairs_kernel(hidden_ptr, pair_order_ptr, offsets_ptr, sorted_hidden_ptr, pair_rows_ptr,
                                  hidden_size, num_experts, SLOTS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
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
    def _silu_and_mul_kept_kernel(gate_up_ptr, output_ptr, offsets_ptr, intermediate_size, num_experts,
                                  BLOCK: tl.constexpr):  # fmt: skip
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
    def _combine_kept_pairs_kernel(expert_outputs_ptr, pair_rows_ptr, top_k_index_ptr, top_k_weights_ptr,
                                   output_ptr, hidden_size, num_experts, SLOTS: tl.constexpr,
                                   BLOCK: tl.constexpr):  # fmt: skip
        """output[t, block] = sum over kept slots k of weight[t, k] * expert_outputs[pair_rows[t*K + k], block],
        accumulated in float32; sentinel slots load nothing."""
        token = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < hidden_size
        accumulator = tl.zeros([BLOCK], dtype=tl.float32)
        for slot in tl.static_range(SLOTS):
            pair = token * SLOTS + slot
            kept = tl.load(top_k_index_ptr + pair) < num_experts
            weight = tl.load(top_k_weights_ptr + pair).to(tl.float32)
            row = tl.load(pair_rows_ptr + pair, mask=kept, other=0)
            kept_columns = columns < tl.where(kept, hidden_size, 0)  # all False in a sentinel slot
            values = tl.load(expert_outputs_ptr + row * hidden_size + columns, mask=kept_columns, other=0.0)
            accumulator += tl.where(kept, weight, 0.0) * values.to(tl.float32)
        tl.store(output_ptr + token * hidden_size + columns, accumulator.to(output_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_row_programs(device: torch.device) -> int:
    """Programs for the row kernels: a few per streaming multiprocessor, each striding over the kept rows."""
    if device.type != "cuda":
        return 64
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _variable_k_experts_triton(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
    """The fused variable-k experts forward (SiLU-gated experts): sort, Triton gather, two grouped GEMMs
    with a Triton SiLU-and-multiply between them, Triton weighted combine. Shapes as in
    `variable_k_experts_forward`. Runs wherever Triton runs (CUDA; CPU under TRITON_INTERPRET=1)."""
    num_tokens, slots = top_k_index.shape
    num_experts, double_intermediate, hidden_size = gate_up_proj.shape
    num_pairs = num_tokens * slots
    hidden_states, top_k_index, top_k_weights = (t.contiguous() for t in (hidden_states, top_k_index, top_k_weights))
    pair_order, offsets = _sort_pairs_by_expert(top_k_index, num_experts)
    sorted_hidden = torch.empty(num_pairs, hidden_size, device=hidden_states.device, dtype=gate_up_proj.dtype)
    pair_rows = torch.empty_like(pair_order)
    output = torch.empty_like(hidden_states)
    if num_pairs == 0:
        return output
    row_programs = (min(num_pairs, _num_row_programs(hidden_states.device)),)
    _gather_kept_pairs_kernel[row_programs](hidden_states, pair_order, offsets, sorted_hidden, pair_rows,
                                            hidden_size, num_experts, SLOTS=slots, BLOCK=1024)  # fmt: skip
    gate_up = _grouped_matmul(sorted_hidden, gate_up_proj, offsets)  # [S, 2I]
    activated = torch.empty(num_pairs, double_intermediate // 2, device=gate_up.device, dtype=gate_up.dtype)
    _silu_and_mul_kept_kernel[row_programs](gate_up, activated, offsets, double_intermediate // 2, num_experts,
                                            BLOCK=1024)  # fmt: skip
    expert_outputs = _grouped_matmul(activated, down_proj, offsets)  # [S, H]
    block = min(1024, triton.next_power_of_2(hidden_size))
    _combine_kept_pairs_kernel[(num_tokens, triton.cdiv(hidden_size, block))](
        expert_outputs, pair_rows, top_k_index, top_k_weights, output, hidden_size, num_experts,
        SLOTS=slots, BLOCK=block,
    )  # fmt: skip
    return output


def _triton_path_supported(experts: torch.nn.Module, device: torch.device) -> bool:
    """The fused path: CUDA with Triton, bf16 weights, SiLU gating and a grouped GEMM kernel."""
    return (
        triton is not None and device.type == "cuda" and getattr(experts.config, "hidden_act", None) == "silu"
        and _grouped_mm_usable(device, experts.gate_up_proj.dtype)
    )  # fmt: skip


def variable_k_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Experts forward that computes only the kept (token, expert) pairs; registered in transformers as
    experts_implementation="variable_k" (`model.set_experts_implementation("variable_k")`).

    Args:
        experts: an OLMoE-layout experts module (`OlmoeExperts`: gate_up_proj [E, 2I, H], down_proj [E, H, I],
            gated activation `act_fn`, no biases).
        hidden_states: [T, H].
        top_k_index: [T, K] expert ids; the sentinel E marks an unused slot (any number per token, 0..K).
        top_k_weights: [T, K] routing weights (ignored in sentinel slots).
    Returns:
        [T, H] in hidden_states' dtype: sum over kept slots of weight * expert(hidden_state).
    Where `_triton_path_supported` (CUDA, Triton, bf16, SiLU, a grouped GEMM kernel) the Triton path runs;
    otherwise the torch reference (on a GPU without a grouped GEMM kernel, one matmul per expert).
    """
    layout = (getattr(experts, "has_gate", True), getattr(experts, "has_bias", False),
              getattr(experts, "is_transposed", False), getattr(experts, "is_concatenated", True),
              getattr(experts, "has_post_expert_norm", False))  # fmt: skip
    if layout != (True, False, False, True, False):
        raise NotImplementedError(
            f"experts_implementation={VARIABLE_K_EXPERTS!r} supports OLMoE-layout experts (concatenated gate/up "
            f"projections, no bias, no post-expert norm); {type(experts).__name__} has (has_gate, has_bias, "
            f"is_transposed, is_concatenated, has_post_expert_norm) = {layout}"
        )
    if _triton_path_supported(experts, hidden_states.device):
        arguments = (hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj)
        if hidden_states.device.index == torch.cuda.current_device():
            return _variable_k_experts_triton(*arguments)
        with torch.cuda.device(hidden_states.device):  # Triton launches on the current device
            return _variable_k_experts_triton(*arguments)
    return _variable_k_experts_torch(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj,
                                     experts.down_proj, experts.act_fn)  # fmt: skip


def register_variable_k_experts() -> None:
    """Make experts_implementation="variable_k" known to transformers (from_pretrained, set_experts_implementation)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(VARIABLE_K_EXPERTS, variable_k_experts_forward)


# ----------------------------------------------------------------------------------------------------
# 8. The router patcher
# ----------------------------------------------------------------------------------------------------


class _CudaGraphed:
    """Replay `function(tensor, *constants)` as one CUDA graph per (shape, dtype, device) of its input.

    Capturing needs a function without host synchronisation (the BH hot path has none on CUDA). The input
    is copied into the graph's static buffer and the outputs are cloned out, because the next replay (the
    next layer) overwrites them. At most `max_graphs` shapes are kept (least recently used dropped); other
    devices than CUDA call the function directly."""

    def __init__(self, function, max_graphs: int = 16):
        self.function, self.max_graphs = function, max_graphs
        self.graphs: dict = {}

    def __call__(self, tensor: torch.Tensor, *constants):
        if tensor.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return self.function(tensor, *constants)
        key = (tuple(tensor.shape), tensor.dtype, tensor.device)
        entry = self.graphs.pop(key, None)
        if entry is None:
            entry = self._capture(tensor, constants)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = entry  # most recently used last
        graph, static_input, static_outputs = entry
        # Replay on the input's device: a graph launched on another device's current stream (layers spread
        # over GPUs with device_map="auto") would not be ordered after the copy into its input.
        with torch.cuda.device(tensor.device):
            static_input.copy_(tensor)
            graph.replay()
            return tuple(output.clone() for output in static_outputs)

    def _capture(self, tensor, constants):
        with torch.cuda.device(tensor.device):
            static_input = tensor.clone()
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):  # warm-up outside the capture (lazy initialisations)
                for _ in range(2):
                    self.function(static_input, *constants)
            torch.cuda.current_stream().wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_outputs = self.function(static_input, *constants)
        return graph, static_input, static_outputs


_compiled_cache: dict = {}


def _compiled(function):
    """torch.compile(function) once per process, falling back to `function` (with a warning) if it fails.

    Configurations differ in Python constants (alpha, max_k, ...), each a recompilation: the dynamo
    recompile limit is raised so that a 30-configuration sweep stays compiled."""
    if function not in _compiled_cache:
        import torch._dynamo

        limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 128))
        compiled = torch.compile(function, dynamic=True)
        state = {"failed": False}

        def run(*args, **kwargs):
            if not state["failed"]:
                try:
                    return compiled(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - e.g. no working compiler on this machine
                    import warnings

                    warnings.warn(f"torch.compile of {function.__name__} failed ({type(error).__name__}: {error}); "
                                  "running it uncompiled", stacklevel=2)  # fmt: skip
                    state["failed"] = True
            return function(*args, **kwargs)

        _compiled_cache[function] = run
    return _compiled_cache[function]


def _grouped_mm_masks_sentinels() -> bool:
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


class OLMoERouterPatcher:
    """Replace the top-k router of every OLMoE MoE layer with BH, top-k or top-p routing.

    A forward hook on each `OlmoeTopKRouter` (model.model.layers[i].mlp.gate) replaces its output
    (router_logits, top_k_weights [T, 8], top_k_index [T, 8]) with the chosen method's
    (router_logits, weights [T, K], index [T, K]); unused slots carry the sentinel index E, so the experts
    module computes only the selected (token, expert) pairs. The router logits are left untouched, and
    removing the hooks restores the model exactly.

    While patched, the experts run this module's variable-k path (experts_path="variable_k", the default on
    CUDA), whose time follows the number of kept pairs. With experts_path="model" they keep the model's own
    implementation, which must skip sentinel indices: "eager" does; "grouped_mm" does when flagged as
    expert parallel, which the patcher sets while patched (if this transformers supports it); any other
    implementation is switched to "eager" while patched. `unpatch` restores all of it.

        patcher = OLMoERouterPatcher(model)
        patcher.patch_with_bh(alpha=0.05, max_k=8)
        outputs = model.generate(...)
        stats = patcher.get_stats()
        patcher.unpatch()

    Also usable as a context manager (`with OLMoERouterPatcher(model) as patcher:`), which unpatches on
    exit. Patching again replaces the previous patch (and resets the statistics).
    """

    def __init__(
        self, model: torch.nn.Module, record_token_counts: bool = True, compile_routing: bool | None = None,
        cuda_graphs: bool | None = None, experts_path: str | None = None,
    ):  # fmt: skip
        """record_token_counts: keep every token's count per layer (get_stats()["token_counts"]).
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
            CPU, eager or grouped_mm are as fast as the torch reference)."""
        import transformers
        from packaging.version import Version
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        if Version(transformers.__version__.split("+")[0]) < Version(MIN_TRANSFORMERS):
            raise RuntimeError(
                f"OLMoERouterPatcher needs transformers >= {MIN_TRANSFORMERS} (its experts module must skip the "
                f"sentinel expert index); found {transformers.__version__}. pip install -r requirements.txt"
            )
        self.model = model
        self.record_token_counts = record_token_counts
        self.routers: list[torch.nn.Module] = []
        self.experts: list[torch.nn.Module] = []
        for _, module in model.named_modules():
            gate = getattr(module, "gate", None)
            if isinstance(gate, OlmoeTopKRouter) and hasattr(module, "experts"):
                self.routers.append(gate)
                self.experts.append(module.experts)
        if not self.routers:
            raise TypeError(
                "model has no OLMoE MoE layers (OlmoeSparseMoeBlock with an OlmoeTopKRouter `gate`); "
                f"got {type(model).__name__}. Load it with transformers' OlmoeForCausalLM (transformers >= 5)."
            )
        self.num_experts = self.routers[0].num_experts
        self.native_top_k = self.routers[0].top_k
        self.norm_topk_prob = bool(self.routers[0].norm_topk_prob)
        self.num_layers = len(self.routers)
        device_type = self.routers[0].weight.device.type
        if experts_path is None:
            fused = _triton_path_supported(self.experts[0], self.experts[0].gate_up_proj.device)
            experts_path = VARIABLE_K_EXPERTS if fused else "model"
        if experts_path not in EXPERTS_PATHS:
            raise ValueError(f"experts_path must be one of {EXPERTS_PATHS} or None, got {experts_path!r}")
        if experts_path == VARIABLE_K_EXPERTS:
            register_variable_k_experts()
        self.experts_path = experts_path
        if compile_routing is None:
            compile_routing = device_type == "cuda" and importlib.util.find_spec("triton") is not None
        self.compile_routing = bool(compile_routing)
        router_devices = {router.weight.device for router in self.routers}
        # CUDA-graph replay gave wrong counts on a model spread over two GPUs (benchmarks/gpu_notes.md, run
        # 6), so it is used only when every router is on one GPU.
        if cuda_graphs and len(router_devices) > 1:
            raise ValueError(f"cuda_graphs=True needs every router on one GPU; this model's are on {sorted(map(str, router_devices))}")
        self.cuda_graphs = (device_type == "cuda" and len(router_devices) == 1) if cuda_graphs is None else bool(cuda_graphs)
        self._handles: list = []
        self._route: Callable[[torch.Tensor, tuple], tuple] | None = None  # (logits, native output) -> (weights, index, counts)
        self._saved_experts_implementation: str | None = None
        self._saved_expert_parallel_flags: list[bool] | None = None
        self.method: str | None = None
        self.params: dict = {}
        self.experts_implementation: str | None = None
        self.reset_stats()

    # --- patching ------------------------------------------------------------------------------------

    def patch_with_bh(
        self,
        alpha: float = 0.05,
        temperature: float = 1.0,
        min_k: int = 1,
        max_k: int = 16,
        pvalue_method: str = DEFAULT_PVALUE_METHOD,
        renormalize: bool | None = None,
    ) -> "OLMoERouterPatcher":
        """Route with `benjamini_hochberg_routing` (same arguments; renormalize=None follows the model)."""
        _check_alpha(alpha)
        _check_temperature(temperature)
        _check_k_bounds(min_k, max_k, self.num_experts)
        _check_pvalue_method(pvalue_method)
        renormalize = self.norm_topk_prob if renormalize is None else bool(renormalize)
        params = dict(alpha=alpha, temperature=temperature, min_k=min_k, max_k=max_k,
                      pvalue_method=pvalue_method, renormalize=renormalize)  # fmt: skip
        # Critical values per router device, built now rather than inside a timed forward.
        critical = {
            router.weight.device: _robust_z_critical_statistics(alpha, self.num_experts, router.weight.device)
            if pvalue_method == "robust_z" else None
            for router in self.routers
        }  # fmt: skip
        route_bh = _compiled(_route_bh_tensors) if self.compile_routing else _route_bh_tensors
        if self.cuda_graphs:
            route_bh = _CudaGraphed(route_bh)

        def route(router_logits, native_output):
            return route_bh(router_logits, critical[router_logits.device], alpha, temperature, min_k, max_k,
                            pvalue_method, renormalize)  # fmt: skip

        return self._install("bh", params, route)

    def patch_with_topk(self, k: int = NATIVE_TOP_K, temperature: float = 1.0, renormalize: bool | None = None):
        """Route each token to its k most probable experts (k=8 reproduces OLMoE's router)."""
        _check_top_k(k, self.num_experts)
        _check_temperature(temperature)
        renormalize = self.norm_topk_prob if renormalize is None else bool(renormalize)
        params = dict(k=k, temperature=temperature, min_k=k, max_k=k, renormalize=renormalize)

        def route(router_logits, native_output):
            if temperature == 1.0 and not renormalize and k <= native_output[2].shape[-1] and not self.norm_topk_prob:
                # The router's own top-8 is sorted and holds the same float32 softmax values: reuse it.
                return native_output[1][..., :k], native_output[2][..., :k], None
            routing = _route_topk(router_logits, k, temperature, renormalize)
            return routing.top_weights, routing.top_index, None

        return self._install("topk", params, route)

    def patch_with_topp(
        self, p: float = 0.5, temperature: float = 1.0, min_k: int = 1, max_k: int | None = None,
        renormalize: bool | None = None,
    ):  # fmt: skip
        """Route each token to the fewest most probable experts whose probabilities sum to >= p."""
        _check_top_p(p)
        _check_temperature(temperature)
        max_k = self.num_experts if max_k is None else max_k
        _check_k_bounds(min_k, max_k, self.num_experts)
        renormalize = self.norm_topk_prob if renormalize is None else bool(renormalize)
        params = dict(p=p, temperature=temperature, min_k=min_k, max_k=max_k, renormalize=renormalize)
        def route(router_logits, native_output):
            routing = _route_topp(router_logits, p, temperature, min_k, max_k, renormalize)
            return routing.top_weights, routing.top_index, routing.expert_counts

        return self._install("topp", params, route)

    def observe(self) -> "OLMoERouterPatcher":
        """Record statistics of the model's own routing without changing anything it computes."""
        k = self.native_top_k
        params = dict(k=k, temperature=1.0, min_k=k, max_k=k, renormalize=self.norm_topk_prob)
        return self._install("native", params, None)

    def unpatch(self) -> "OLMoERouterPatcher":
        """Remove the hooks and restore the experts implementation. Safe to call any number of times."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._saved_expert_parallel_flags is not None:
            for experts, flag in zip(self.experts, self._saved_expert_parallel_flags):
                experts._is_expert_parallel = flag
            self._saved_expert_parallel_flags = None
        if self._saved_experts_implementation is not None:
            self.model.set_experts_implementation(self._saved_experts_implementation)
            self._saved_experts_implementation = None
        self._route = None
        self.method = None
        return self

    @property
    def is_patched(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "OLMoERouterPatcher":
        return self

    def __exit__(self, *exc_info) -> bool:
        self.unpatch()
        return False

    def _install(self, method: str, params: dict, route) -> "OLMoERouterPatcher":
        self.unpatch()
        self.reset_stats()
        self.method, self.params, self._route = method, params, route
        if method != "native" and self.experts_path == VARIABLE_K_EXPERTS:
            self._switch_experts_implementation(VARIABLE_K_EXPERTS)
        # Only a method that can keep fewer experts than its slots emits the sentinel index; top-k (and
        # min_k == max_k) never does, and then the experts path needs no sentinel handling, which costs
        # grouped_mm a few passes over its [tokens x slots, hidden] buffers.
        elif method not in ("native", "topk") and params["min_k"] < params["max_k"]:
            self._make_experts_skip_sentinels()
        self.experts_implementation = self._current_experts_implementation()
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._make_hook(layer)))
        return self

    def _current_experts_implementation(self) -> str:
        return getattr(self.model.config, "_experts_implementation", None) or "eager"

    def _make_experts_skip_sentinels(self) -> None:
        implementation = self._current_experts_implementation()
        if implementation in ("eager", VARIABLE_K_EXPERTS):
            return
        if implementation == "grouped_mm" and _grouped_mm_masks_sentinels():
            self._saved_expert_parallel_flags = [getattr(e, "_is_expert_parallel", False) for e in self.experts]
            for experts in self.experts:
                experts._is_expert_parallel = True
            return
        self._switch_experts_implementation("eager")

    def _switch_experts_implementation(self, implementation: str) -> None:
        current = self._current_experts_implementation()
        if current != implementation:
            self._saved_experts_implementation = current
            self.model.set_experts_implementation(implementation)

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            router_logits = output[0]  # [T, E] in the model's dtype
            if self._route is None:  # observe(): the native top-k, unchanged
                self._record(layer, None, output[1], output[2])
                return None
            top_weights, top_index, expert_counts = self._route(router_logits, output)
            self._record(layer, expert_counts, top_weights, top_index)
            return router_logits, top_weights.to(router_logits.dtype), top_index

        return hook

    # --- statistics ----------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Forget the routing statistics recorded so far."""
        self._pending: list[list[tuple]] = [[] for _ in range(self.num_layers)]
        self._token_counts: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._selections: list[torch.Tensor | None] = [None] * self.num_layers  # [E+1] per layer
        self._entropy_sums: list[torch.Tensor | None] = [None] * self.num_layers
        self._num_routed: list[int] = [0] * self.num_layers

    _MAX_PENDING = 256  # routing calls kept per layer before their statistics are folded in

    def _record(self, layer, expert_counts, top_weights, top_index) -> None:
        """Keep references only: the statistics are computed later, in a batch, so that the forward pass
        launches no extra kernels (expert_counts None: every token kept top_index.shape[-1] experts)."""
        self._pending[layer].append((expert_counts, top_weights, top_index))
        self._num_routed[layer] += top_index.shape[0]
        if len(self._pending[layer]) >= self._MAX_PENDING:
            self._fold(layer)

    @torch.no_grad()
    def _fold(self, layer: int) -> None:
        """Fold a layer's pending routing decisions into its accumulators (on its device)."""
        pending, self._pending[layer] = self._pending[layer], []
        if not pending:
            return
        device = pending[0][2].device
        if self._selections[layer] is None:
            self._selections[layer] = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=device)
            self._entropy_sums[layer] = torch.zeros((), dtype=torch.float64, device=device)
        # One batch of kernels for all pending calls (a patch keeps its slot width K, so they concatenate).
        top_index = torch.cat([index.reshape(-1, index.shape[-1]) for _, _, index in pending])  # [N, K]
        weights = torch.cat([w.reshape(-1, w.shape[-1]) for _, w, _ in pending]).float()  # [N, K]
        flat_index = top_index.reshape(-1)
        # Sentinel slots (index E) land in the last bin, which get_stats drops.
        self._selections[layer].scatter_add_(0, flat_index, torch.ones_like(flat_index))
        shares = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self._entropy_sums[layer] += -torch.xlogy(shares, shares).sum()
        if self.record_token_counts:
            if pending[0][0] is None:  # a method without counts keeps all K slots (top-k, native)
                counts = torch.full((top_index.shape[0],), top_index.shape[-1], device=device)
            else:
                counts = torch.cat([expert_counts.reshape(-1) for expert_counts, _, _ in pending])
            self._token_counts[layer].append(counts.to(torch.int16))

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
                routed, in order; needs record_token_counts=True).
            num_tokens, num_layers, method, params, weights_renormalized, experts_implementation.
        """
        if self._num_routed[0] == 0:
            raise RuntimeError("no tokens were routed since the last patch or reset_stats(): run the model first")
        for layer in range(self.num_layers):
            self._fold(layer)
        num_tokens = self._num_routed[0]
        selections = torch.stack([s.to("cpu") for s in self._selections])[:, : self.num_experts].double()  # [L, E]
        weight_entropy = sum(e.item() for e in self._entropy_sums) / sum(self._num_routed)
        stats = {}
        if self.record_token_counts:
            token_counts = torch.stack([torch.cat(c).to("cpu", torch.int64) for c in self._token_counts], dim=1)
            stats.update(summarize_expert_counts(token_counts, self.params["min_k"], self.params["max_k"], self.native_top_k))
            stats["per_layer_avg_experts"] = token_counts.double().mean(dim=0).tolist()
            stats["token_counts"] = token_counts
        else:
            per_layer = (selections.sum(dim=-1) / num_tokens).tolist()
            avg = sum(per_layer) / len(per_layer)
            stats.update(avg_experts=avg, reduction_vs_baseline=100.0 * (1 - avg / self.native_top_k))
            stats["per_layer_avg_experts"] = per_layer
        stats.update(
            weight_entropy=weight_entropy,
            expert_utilization=expert_load_balance(selections),
            expert_utilization_per_layer=(selections / num_tokens).tolist(),
            num_tokens=num_tokens,
            num_layers=self.num_layers,
            method=self.method,
            params=dict(self.params),
            weights_renormalized=bool(self.params.get("renormalize", False)),
            experts_implementation=self.experts_implementation,
        )
        return stats


# ----------------------------------------------------------------------------------------------------
# 9. The experiment: 25 configurations x 12 prompts, resumable, with per-config results on disk
# ----------------------------------------------------------------------------------------------------

PROMPTS: dict[str, list[str]] = {
    "simple": ["The cat sat on the", "Hello, my name is", "The capital of France is"],
    "medium": [
        "In machine learning, a neural network",
        "The process of photosynthesis involves",
        "Climate change refers to long-term shifts in",
    ],
    "complex": [
        "Explain the relationship between quantum entanglement and",
        "Compare and contrast the economic policies of",
        "The philosophical implications of consciousness suggest that",
    ],
    "technical": [
        "In Python, a decorator is a function that",
        "The time complexity of quicksort is",
        "Transformer attention mechanism computes",
    ],
}
DESIGN_ALPHAS = (0.01, 0.05, 0.10, 0.20)
DESIGN_MAX_KS = (2, 4, 8, 16, 32, 64)
BASELINE_CONFIG = "topk_8_baseline"


@dataclass(frozen=True)
class RoutingConfig:
    """One routing configuration of the sweep: a name and how to patch the model."""

    name: str
    method: str  # "native", "bh", "topk" or "topp"
    params: tuple = ()  # (("alpha", 0.05), ("max_k", 8), ...): hashable, ordered

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def apply(self, patcher: "OLMoERouterPatcher") -> None:
        """Patch (or, for the native baseline, observe) the patcher's model with this configuration."""
        if self.method == "native":
            patcher.observe()
        elif self.method == "bh":
            patcher.patch_with_bh(**self.kwargs)
        elif self.method == "topk":
            patcher.patch_with_topk(**self.kwargs)
        elif self.method == "topp":
            patcher.patch_with_topp(**self.kwargs)
        else:
            raise ValueError(f"method must be one of 'native', 'bh', 'topk', 'topp', got {self.method!r}")


def bh_config_name(max_k: int, alpha: float, pvalue_method: str = DEFAULT_PVALUE_METHOD) -> str:
    """The design's naming, bh_k{max_k}_a{alpha*100:03d}; the design's own p-value gets a 'bh1mp' prefix."""
    prefix = "bh" if pvalue_method == DEFAULT_PVALUE_METHOD else "bh1mp"
    return f"{prefix}_k{max_k}_a{round(alpha * 100):03d}"


def design_configs(pvalue_method: str = DEFAULT_PVALUE_METHOD) -> list[RoutingConfig]:
    """The design's 25 configurations: the native top-8 baseline, then max_k x alpha BH configurations."""
    configs = [RoutingConfig(BASELINE_CONFIG, "native")]
    for max_k in DESIGN_MAX_KS:
        for alpha in DESIGN_ALPHAS:
            params = (("alpha", alpha), ("max_k", max_k), ("min_k", 1), ("pvalue_method", pvalue_method))
            configs.append(RoutingConfig(bh_config_name(max_k, alpha, pvalue_method), "bh", params))
    return configs


def design_pvalue_configs(max_k: int = 8) -> list[RoutingConfig]:
    """The design's own p-value (1 - softmax) at the 4 alphas, to show what it does."""
    return [
        RoutingConfig(bh_config_name(max_k, alpha, "one_minus_prob"), "bh",
                      (("alpha", alpha), ("max_k", max_k), ("min_k", 1), ("pvalue_method", "one_minus_prob")))
        for alpha in DESIGN_ALPHAS
    ]  # fmt: skip


def _synchronize(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _warm_up(model, tokenizer, prompts: dict[str, list[str]], new_tokens: int) -> None:
    """Generate exactly `new_tokens` tokens for every prompt, untimed, so that the shapes a timed run meets
    (each prompt length, each key/value length while decoding) have had their first-call costs."""
    device = next(model.parameters()).device
    for prompt in (prompt for group_prompts in prompts.values() for prompt in group_prompts):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip


def run_config(
    model, tokenizer, patcher: "OLMoERouterPatcher", config: RoutingConfig, prompts: dict[str, list[str]],
    max_new_tokens: int = 20,
) -> dict:
    """Greedy generation of every prompt under one configuration, with routing statistics and timings.

    Statistics cover the prompt and the generated tokens. Timing synchronises the device and excludes a
    short warm-up generation of every prompt, which takes this configuration's first-call costs per prompt
    length (the routing's CUDA-graph capture per shape, compilation). Returns a JSON-serialisable dict.
    """
    device = next(model.parameters()).device
    config.apply(patcher)
    try:
        _warm_up(model, tokenizer, prompts, new_tokens=2)
        prompt_results, all_counts, group_counts = [], [], {group: [] for group in prompts}
        selections, entropy_weighted, num_routed = None, 0.0, 0
        for group, group_prompts in prompts.items():
            for prompt in group_prompts:
                input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                patcher.reset_stats()
                _synchronize(device)
                start = time.perf_counter()
                output_ids = model.generate(
                    input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                _synchronize(device)
                elapsed = time.perf_counter() - start
                stats = patcher.get_stats()
                counts = stats["token_counts"]  # [tokens routed, L]
                all_counts.append(counts)
                group_counts[group].append(counts)
                layer_selections = torch.tensor(stats["expert_utilization_per_layer"]) * stats["num_tokens"]
                selections = layer_selections if selections is None else selections + layer_selections
                entropy_weighted += stats["weight_entropy"] * counts.numel()
                num_routed += counts.numel()
                new_tokens = output_ids.shape[1] - input_ids.shape[1]
                prompt_results.append({
                    "group": group,
                    "prompt": prompt,
                    "generated_text": tokenizer.decode(output_ids[0, input_ids.shape[1]:], skip_special_tokens=True),
                    "prompt_tokens": input_ids.shape[1],
                    "new_tokens": new_tokens,
                    "time_s": elapsed,
                    "tokens_per_second": new_tokens / elapsed if elapsed > 0 else float("nan"),
                    "avg_experts": stats["avg_experts"],
                    "token_counts": counts.tolist(),
                })  # fmt: skip
        params = patcher.params
        counts = torch.cat(all_counts)
        total_time = sum(p["time_s"] for p in prompt_results)
        total_new = sum(p["new_tokens"] for p in prompt_results)
        summary = summarize_expert_counts(counts, params["min_k"], params["max_k"], patcher.native_top_k)
        summary.update(
            inference_time=total_time,
            tokens_per_second=total_new / total_time if total_time > 0 else float("nan"),
            avg_time_per_prompt=total_time / len(prompt_results),
            weight_entropy=entropy_weighted / num_routed,
            expert_utilization=expert_load_balance(selections),
        )
        return {
            "name": config.name,
            "method": config.method,
            "params": params,
            "status": "ok",
            "summary": summary,
            "groups": {
                group: summarize_expert_counts(torch.cat(c), params["min_k"], params["max_k"], patcher.native_top_k)
                for group, c in group_counts.items()
            },
            "per_layer_avg_experts": counts.double().mean(0).tolist(),
            "expert_utilization_per_layer": (selections / counts.shape[0]).tolist(),
            "experts_implementation": patcher.experts_implementation,
            "weights_renormalized": bool(params.get("renormalize", False)),
            "prompts": prompt_results,
        }
    finally:
        patcher.unpatch()


def run_sweep(
    model, tokenizer, configs: list[RoutingConfig], prompts: dict[str, list[str]] = PROMPTS,
    max_new_tokens: int = 20, output_dir: str | Path = "results", seed: int = 0, redo: bool = False,
    progress: bool = True, metadata: dict | None = None,
) -> dict[str, dict]:
    """Run every configuration; save each one's results as soon as it finishes.

    Results go to output_dir/configs/<name>.json (atomic writes). A rerun with the same settings skips
    configurations already saved (unless redo=True), so an interrupted sweep loses at most the one in
    flight. A configuration that raises (e.g. out of memory) is saved with status "failed" and its error,
    and the sweep goes on. Returns {name: result} in configuration order.
    """
    import json

    from tqdm.auto import tqdm

    if not configs:
        raise ValueError("configs must name at least one RoutingConfig")
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs must have distinct names, got duplicates in {names}")
    config_dir = Path(output_dir) / "configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    settings = {"prompts": prompts, "max_new_tokens": max_new_tokens, "seed": seed, **(metadata or {})}
    patcher = OLMoERouterPatcher(model)
    results = {}
    warmed_up = False
    bar = tqdm(total=len(configs) * sum(len(p) for p in prompts.values()), disable=not progress, desc="configs x prompts")
    for config in configs:
        path = config_dir / f"{config.name}.json"
        if path.exists() and not redo:
            saved = json.loads(path.read_text())
            if saved.get("settings") == json.loads(json.dumps(settings)) and saved.get("status") == "ok":
                results[config.name] = saved
                bar.update(len(saved["prompts"]))
                continue
        if not warmed_up:
            # Once, with the model's own routing: every prompt's full generation, so that first-call costs of
            # each attention shape (cuDNN/SDPA plans per key/value length on a GPU) fall on no configuration;
            # without it the first one measured paid them (3-5x on some prompts; benchmarks/gpu_notes.md).
            _warm_up(model, tokenizer, prompts, new_tokens=max_new_tokens)
            warmed_up = True
        torch.manual_seed(seed)
        bar.set_postfix_str(config.name)
        try:
            result = run_config(model, tokenizer, patcher, config, prompts, max_new_tokens)
        except Exception as error:  # noqa: BLE001 - a failed config is recorded, the sweep goes on
            if str(next(model.parameters()).device).startswith("cuda"):
                torch.cuda.empty_cache()
            result = {"name": config.name, "method": config.method, "params": config.kwargs, "status": "failed",
                      "error": f"{type(error).__name__}: {error}", "prompts": []}  # fmt: skip
        result["settings"] = settings
        _atomic_write_text(path, json.dumps(result))
        results[config.name] = json.loads(json.dumps(result))
        bar.update(sum(len(p) for p in prompts.values()))
    bar.close()
    return results


# ----------------------------------------------------------------------------------------------------
# 10. Outputs: summary table, saturation analysis, JSON/CSV, the 9-panel figure, the markdown report
# ----------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [
    "config", "method", "pvalue_method", "alpha", "max_k", "min_k", "status",
    "avg_experts", "std_experts", "min_experts", "max_experts", "median_experts",
    "ceiling_hit_rate", "floor_hit_rate", "reduction_vs_baseline",
    "inference_time", "tokens_per_second", "avg_time_per_prompt", "weight_entropy", "expert_utilization",
    "perplexity", "token_accuracy", "eval_avg_experts",
]  # fmt: skip


def summary_table(results: dict[str, dict], quality: dict[str, dict] | None = None):
    """One row per configuration with the design's metrics (the CSV). Failed configs keep their row.

    With `quality` (from run_quality_sweep), each row gains the held-out perplexity, next-token accuracy
    and the average experts measured during that evaluation (eval_avg_experts)."""
    import pandas as pd

    rows = []
    for name, result in results.items():
        params = result.get("params", {})
        row = {
            "config": name, "method": result["method"], "pvalue_method": params.get("pvalue_method"),
            "alpha": params.get("alpha"), "max_k": params.get("max_k"), "min_k": params.get("min_k"),
            "status": result["status"],
        }  # fmt: skip
        row.update(result.get("summary", {}))
        measured = (quality or {}).get(name, {})
        if measured.get("status") == "ok":
            row.update(perplexity=measured["perplexity"], token_accuracy=measured["token_accuracy"],
                       eval_avg_experts=measured["avg_experts"])  # fmt: skip
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.reindex(columns=SUMMARY_COLUMNS + [c for c in table.columns if c not in SUMMARY_COLUMNS])


def saturation_analysis(table, threshold_percent: float = 5.0):
    """Per alpha: the smallest max_k beyond which raising max_k grows avg_experts by < threshold_percent.

    Uses the BH rows of `summary_table` (one p-value method). Returns one row per alpha with the
    saturation max_k (NaN if avg_experts still grows at the largest step) and the growth at each step.
    """
    import pandas as pd

    rows = []
    bh = table[(table["method"] == "bh") & (table["status"] == "ok")]
    for (pvalue_method, alpha), group in bh.groupby(["pvalue_method", "alpha"]):
        group = group.sort_values("max_k")
        max_ks, averages = group["max_k"].tolist(), group["avg_experts"].tolist()
        growth = [100.0 * (averages[i + 1] / averages[i] - 1.0) for i in range(len(averages) - 1)]
        saturation = float("nan")
        for i in range(len(growth)):
            if all(g < threshold_percent for g in growth[i:]):
                saturation = max_ks[i]
                break
        rows.append({
            "pvalue_method": pvalue_method, "alpha": alpha, "saturation_max_k": saturation,
            "avg_experts_at_largest_max_k": averages[-1],
            "growth_percent_by_step": {f"{max_ks[i]}->{max_ks[i + 1]}": round(g, 2) for i, g in enumerate(growth)},
        })  # fmt: skip
    return pd.DataFrame(rows)


def environment_info(model=None, device=None) -> dict:
    """Versions, hardware and date, for the report and the JSON."""
    import datetime
    import platform

    import transformers

    device = str(device or (next(model.parameters()).device if model is not None else "cpu"))
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "hardware": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }  # fmt: skip
    if model is not None:
        info["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        info["model_parameters"] = sum(p.numel() for p in model.parameters())
    return info


def write_results(
    results: dict[str, dict], output_dir: str | Path, metadata: dict, quality: dict[str, dict] | None = None,
    token_analysis: dict | None = None,
) -> dict[str, Path]:
    """results/bh_routing_full_results.json (everything), results/bh_routing_summary.csv (one row per
    config) and, with quality results, results/bh_routing_frontier.csv (BH against top-k/top-p)."""
    import json

    output_dir = Path(output_dir)
    table = summary_table(results, quality)
    saturation = saturation_analysis(table)
    full = {
        "metadata": metadata,
        "summary": json.loads(table.to_json(orient="records")),
        "saturation": json.loads(saturation.to_json(orient="records")),
        "configs": results,
    }
    paths = {"json": output_dir / "bh_routing_full_results.json", "csv": output_dir / "bh_routing_summary.csv"}
    if quality:
        frontier = frontier_table(quality)
        full["quality"] = quality
        full["frontier"] = json.loads(frontier.to_json(orient="records"))
        full["token_analysis"] = token_analysis
        paths["frontier_csv"] = output_dir / "bh_routing_frontier.csv"
        _atomic_write_text(paths["frontier_csv"], frontier.to_csv(index=False))
    _atomic_write_text(paths["json"], json.dumps(full, indent=1))
    _atomic_write_text(paths["csv"], table.to_csv(index=False))
    return paths


def _save_figure(figure, path: str | Path, dpi: int):
    """Lay out and save atomically (a temporary file renamed), so a crash never leaves half a PNG."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.stem + ".tmp" + path.suffix)
    figure.savefig(temporary, dpi=dpi)
    temporary.replace(path)
    return figure


def _use_headless_backend_unless_inline() -> None:
    """Agg when no notebook displays the figures (headless runs, tests); the inline backend otherwise."""
    import matplotlib

    if "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")


def _max_k_axis(ax, ticks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(k) for k in ticks])
    ax.minorticks_off()


def plot_analysis(results: dict[str, dict], path: str | Path, focus_max_k: int = 8):
    """The 3 x 3 figure: (1) avg experts vs max_k per alpha, (2) ceiling hit rate, (3) reduction vs
    baseline heatmap over max_k x alpha, (4) experts by complexity group, (5) per-layer averages,
    (6) distribution of per-token counts, (7) expert utilisation, (8) throughput, (9) saturation.
    Panels 4-7 show the configurations with max_k = focus_max_k. Returns the matplotlib figure."""
    _use_headless_backend_unless_inline()
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np
    import seaborn as sns

    table = summary_table(results)
    ok = table[table["status"] == "ok"]
    bh = ok[(ok["method"] == "bh") & (ok["pvalue_method"] == DEFAULT_PVALUE_METHOD)]
    baseline = results.get(BASELINE_CONFIG, {})
    alphas = sorted(bh["alpha"].unique())
    colors = dict(zip(alphas, sns.color_palette("viridis", len(alphas))))
    focus = {a: results[bh_config_name(focus_max_k, a)] for a in alphas if bh_config_name(focus_max_k, a) in results
             and results[bh_config_name(focus_max_k, a)]["status"] == "ok"}  # fmt: skip
    figure, axes = plt.subplots(3, 3, figsize=(18, 15))
    ax = axes[0, 0]
    for alpha in alphas:
        rows = bh[bh["alpha"] == alpha].sort_values("max_k")
        ax.plot(rows["max_k"], rows["avg_experts"], "o-", color=colors[alpha], label=f"alpha={alpha:g}")
    ax.axhline(NATIVE_TOP_K, color="grey", ls="--", label="native top-8")
    ax.set(xlabel="max_k", ylabel="avg experts per token", title="1. Experts vs max_k")
    _max_k_axis(ax, DESIGN_MAX_KS)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for alpha in alphas:
        rows = bh[bh["alpha"] == alpha].sort_values("max_k")
        ax.plot(rows["max_k"], rows["ceiling_hit_rate"], "o-", color=colors[alpha], label=f"alpha={alpha:g}")
    ax.set(xlabel="max_k", ylabel="% of decisions at max_k", title="2. Ceiling hit rate")
    _max_k_axis(ax, DESIGN_MAX_KS)
    ax = axes[0, 2]
    if len(bh):
        heat = bh.pivot_table(index="max_k", columns="alpha", values="reduction_vs_baseline")
        sns.heatmap(heat, annot=True, fmt=".1f", cmap="RdYlGn", center=0, ax=ax, cbar_kws={"label": "%"})
    ax.set_title("3. Reduction vs native top-8 (%)")
    ax = axes[1, 0]
    groups = list(next((r["groups"] for r in results.values() if r["status"] == "ok"), {}))
    width = 0.8 / (len(focus) + 1)
    if baseline.get("status") == "ok":
        ax.bar(np.arange(len(groups)), [baseline["groups"][g]["avg_experts"] for g in groups], width, color="grey",
               label="native top-8")  # fmt: skip
    for i, (alpha, result) in enumerate(focus.items(), start=1):
        values = [result["groups"].get(g, {}).get("avg_experts", np.nan) for g in groups]
        ax.bar(np.arange(len(groups)) + i * width, values, width, color=colors[alpha], label=f"alpha={alpha:g}")
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set(ylabel="avg experts per token", title=f"4. Experts by prompt complexity (max_k={focus_max_k})")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    if baseline.get("status") == "ok":
        ax.plot(baseline["per_layer_avg_experts"], color="grey", ls="--", label="native top-8")
    for alpha, result in focus.items():
        ax.plot(result["per_layer_avg_experts"], "o-", color=colors[alpha], label=f"alpha={alpha:g}")
    ax.set(xlabel="layer", ylabel="avg experts per token", title=f"5. Per-layer experts (max_k={focus_max_k})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax = axes[1, 2]
    bins = np.arange(0, focus_max_k + 2) - 0.5
    for alpha, result in focus.items():
        counts = np.concatenate([np.asarray(p["token_counts"]).ravel() for p in result["prompts"]])
        ax.hist(counts, bins=bins, histtype="step", lw=2, density=True, color=colors[alpha], label=f"alpha={alpha:g}")
    ax.set(xlabel="experts kept (token x layer)", ylabel="share", title=f"6. Per-token counts (max_k={focus_max_k})")
    ax.legend(fontsize=8)
    ax = axes[2, 0]
    utilization_config = focus.get(0.05) or next(iter(focus.values()), None)
    if utilization_config is not None:
        sns.heatmap(np.asarray(utilization_config["expert_utilization_per_layer"]), cmap="magma", ax=ax,
                    cbar_kws={"label": "share of tokens choosing the expert"})  # fmt: skip
        ax.set(xlabel="expert", ylabel="layer", title=f"7. Expert utilisation ({utilization_config['name']})")
    ax = axes[2, 1]
    throughput = ok.sort_values("avg_experts")
    ax.barh(throughput["config"], throughput["tokens_per_second"],
            color=["grey" if c == BASELINE_CONFIG else "tab:blue" for c in throughput["config"]])  # fmt: skip
    ax.tick_params(axis="y", labelsize=6)
    ax.set(xlabel="generated tokens / s", title="8. Throughput (sorted by avg experts)")
    ax = axes[2, 2]
    for alpha in alphas:
        rows = bh[bh["alpha"] == alpha].sort_values("max_k")
        growth = 100 * (rows["avg_experts"].to_numpy()[1:] / rows["avg_experts"].to_numpy()[:-1] - 1)
        ax.plot(rows["max_k"].to_numpy()[1:], growth, "o-", color=colors[alpha], label=f"alpha={alpha:g}")
    ax.axhline(5.0, color="red", ls=":", label="5% saturation threshold")
    ax.set(xlabel="max_k (step from the previous max_k)", ylabel="growth of avg experts (%)", title="9. Saturation")
    _max_k_axis(ax, DESIGN_MAX_KS[1:])
    ax.legend(fontsize=8)
    figure.suptitle("BH routing analysis", fontsize=16)
    return _save_figure(figure, path, dpi=110)


def _markdown_table(frame, float_format: str = "{:.2f}") -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    lines = [header, "|" + " --- |" * len(frame.columns)]
    for _, row in frame.iterrows():
        cells = [float_format.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_layer_heatmap(results: dict[str, dict], path: str | Path):
    """Average experts per layer (rows: configurations, columns: layers), from any results dict whose
    entries carry per_layer_avg_experts (the sweep's or the quality sweep's)."""
    _use_headless_backend_unless_inline()
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns

    rows = {name: r["per_layer_avg_experts"] for name, r in results.items() if r.get("status") == "ok"}
    figure, ax = plt.subplots(figsize=(max(6, 0.5 * len(next(iter(rows.values()), [])) + 4), 0.3 * len(rows) + 2))
    sns.heatmap(np.asarray(list(rows.values())), yticklabels=list(rows), annot=len(rows) * len(next(iter(rows.values()))) <= 400,
                fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": "average experts per token"})  # fmt: skip
    ax.set(xlabel="layer", title="Average experts per layer and configuration")
    return _save_figure(figure, path, dpi=110)


def _quality_findings(quality: dict[str, dict], token_analysis: dict | None, results: dict[str, dict]) -> list[str]:
    """Plain statements answering: at equal compute, does BH beat top-k and top-p, by how much, where."""
    findings = []
    frontier = frontier_table(quality)
    native = quality.get(BASELINE_CONFIG, {})
    robust = frontier[frontier["pvalue_method"] == DEFAULT_PVALUE_METHOD] if len(frontier) else frontier
    for method, label in (("topk", "top-k"), ("topp", "top-p")):
        if not len(robust):
            break
        inside = robust.dropna(subset=[f"delta_vs_{method}_percent"])
        if not len(inside):
            findings.append(f"No BH configuration's average experts fell inside the measured {label} range.")
            continue
        deltas = inside[f"delta_vs_{method}_percent"]
        best = inside.loc[deltas.idxmin()]
        worst = inside.loc[deltas.idxmax()]
        findings.append(
            f"At equal average experts, BH (robust_z) had lower perplexity than {label} in {int((deltas < 0).sum())} of "
            f"{len(inside)} configurations inside {label}'s measured range (median difference {deltas.median():+.2f}%; "
            f"best {best['config']} at {best['avg_experts']:.2f} experts: {best['perplexity']:.3f} vs "
            f"{best[f'{method}_perplexity_at_equal_experts']:.3f}, {best[f'delta_vs_{method}_percent']:+.2f}%; worst "
            f"{worst['config']}: {worst[f'delta_vs_{method}_percent']:+.2f}%)."
        )
    if native.get("status") == "ok" and len(robust):
        design = robust[robust["config"].isin([bh_config_name(k, a) for k in DESIGN_MAX_KS for a in DESIGN_ALPHAS])]
        if len(design):
            best = design.loc[design["perplexity"].idxmin()]
            findings.append(
                f"Against native top-8 (perplexity {native['perplexity']:.3f} at 8 experts), the best of the design's "
                f"BH configurations ({best['config']}, {best['avg_experts']:.2f} experts) has perplexity "
                f"{best['perplexity']:.3f} ({100 * (best['perplexity'] / native['perplexity'] - 1):+.1f}%)."
            )
        floored = robust[robust["config"].str.contains("_min")].sort_values("avg_experts")
        if len(floored):
            findings.append("BH on a floor of min_k experts (alpha=0.2, max_k=8): " + "; ".join(
                f"{r.config}: {r.avg_experts:.2f} experts, perplexity {r.perplexity:.3f} "
                f"({100 * (r.perplexity / native['perplexity'] - 1):+.1f}% vs native)" for r in floored.itertuples()) + ".")
    if token_analysis:
        findings.append(
            f"Token level ({token_analysis['config']}): Spearman correlation between a position's experts (mean "
            f"over layers) and the native model's surprisal of the next token: "
            f"{token_analysis['spearman_experts_vs_next_token_surprisal']:+.3f} over {token_analysis['num_positions']} positions."
        )
    return findings


def write_report(
    results: dict[str, dict], path: str | Path, metadata: dict, figure_path: str = "visualizations/bh_routing_analysis.png",
    quality: dict[str, dict] | None = None, token_analysis: dict | None = None,
) -> str:
    """The markdown report, generated from the results only. Returns the text (also written to path)."""
    table = summary_table(results, quality)
    ok = table[table["status"] == "ok"]
    failed = table[table["status"] != "ok"]
    bh = ok[(ok["method"] == "bh") & (ok["pvalue_method"] == DEFAULT_PVALUE_METHOD)]
    design_p = ok[(ok["method"] == "bh") & (ok["pvalue_method"] == "one_minus_prob")]
    baseline = results.get(BASELINE_CONFIG)
    lines = [
        "# BH routing report",
        "",
        f"Generated by `bh_routing.write_report` from the run below; every number comes from "
        f"`bh_routing_full_results.json` / `bh_routing_summary.csv` of this run.",
        "",
        "## Run",
        "",
        f"- Model: `{metadata.get('model')}` ({metadata.get('model_source', 'unknown source')}), "
        f"{metadata.get('model_parameters', '?'):,} parameters, dtype {metadata.get('model_dtype')}",
        f"- Hardware: {metadata.get('hardware')} (device `{metadata.get('device')}`)",
        f"- Versions: python {metadata.get('python')}, torch {metadata.get('torch')}, transformers {metadata.get('transformers')}",
        f"- Date: {metadata.get('date')}; seed {metadata.get('seed')}; greedy generation of "
        f"{metadata.get('max_new_tokens')} new tokens per prompt",
        f"- Prompts: {sum(len(v) for v in metadata.get('prompts', {}).values())} in "
        f"{len(metadata.get('prompts', {}))} complexity groups; configurations: {len(table)} "
        f"({len(ok)} ok, {len(failed)} failed)",
        "- Statistics cover every routing decision (token x layer) over the prompt and the generated tokens.",
        "",
        "## What was found",
        "",
    ]
    findings = []
    if baseline and baseline["status"] == "ok":
        findings.append(f"Native top-8 routing kept {baseline['summary']['avg_experts']:.2f} experts per token "
                        f"at {baseline['summary']['tokens_per_second']:.1f} generated tokens/s.")  # fmt: skip
    focus = bh[bh["max_k"] == 8].sort_values("alpha")
    if len(focus):
        spans = ", ".join(f"{r.avg_experts:.2f} at alpha={r.alpha:g}" for r in focus.itertuples())
        findings.append(
            f"BH with the calibrated robust_z p-value and max_k=8 kept on average {spans} experts per token "
            f"(reduction vs top-8 from {focus['reduction_vs_baseline'].min():.1f}% to "
            f"{focus['reduction_vs_baseline'].max():.1f}%); the count per decision ranged from "
            f"{focus['min_experts'].min():.0f} to {focus['max_experts'].max():.0f}, with standard deviation up to "
            f"{focus['std_experts'].max():.2f}."
        )
        order = []
        for alpha in focus["alpha"]:
            groups = results[bh_config_name(8, alpha)]["groups"]
            ranked = sorted(groups, key=lambda g: groups[g]["avg_experts"])
            order.append(", ".join(f"{g} {groups[g]['avg_experts']:.2f}" for g in ranked))
        findings.append(
            "Complexity groups ranked by average experts at max_k=8, fewest first: "
            + "; ".join(f"alpha={a:g}: {o}" for a, o in zip(focus["alpha"], order))
            + ". The design expected simple < medium < complex ~ technical (2-4 experts for simple prompts, "
            "6-10 for complex ones)."
        )
        claim_holds = all(
            2 <= results[bh_config_name(8, a)]["groups"].get("simple", {}).get("avg_experts", -1) <= 4
            and 6 <= results[bh_config_name(8, a)]["groups"].get("complex", {}).get("avg_experts", -1) <= 10
            for a in focus["alpha"]
        )  # fmt: skip
        findings.append("The design's claim 'simple tokens use 2-4 experts, complex tokens 6-10' "
                        + ("holds" if claim_holds else "does not hold") + " in this run at max_k=8.")
    if len(design_p):
        all_floor = bool((design_p["floor_hit_rate"] == 100.0).all())
        findings.append(
            "The design's own p-value (1 - softmax) kept "
            + ", ".join(f"{r.avg_experts:.2f} at alpha={r.alpha:g}" for r in design_p.sort_values("alpha").itertuples())
            + " experts per token"
            + (" — exactly min_k for every token, as the bound in docs/bh_routing_analysis.md proves it must for alpha < 63/64."
               if all_floor else ".")
        )  # fmt: skip
    saturation = saturation_analysis(table)
    if len(saturation):
        robust = saturation[saturation["pvalue_method"] == DEFAULT_PVALUE_METHOD]
        findings.append("Saturation (smallest max_k beyond which avg experts grows < 5%): " + "; ".join(
            f"alpha={r.alpha:g}: max_k={'not reached' if r.saturation_max_k != r.saturation_max_k else int(r.saturation_max_k)}"
            for r in robust.itertuples()) + ".")  # fmt: skip
    if len(failed):
        findings.append("Failed configurations: " + ", ".join(f"{r.config}" for r in failed.itertuples()) + ".")
    if quality:
        findings += _quality_findings(quality, token_analysis, results)
    else:
        findings.append("Not measured in this run: output quality (perplexity); routing counts alone do not show "
                        "what fewer experts cost.")  # fmt: skip
    paths = sorted({r.get("experts_implementation") or "eager" for r in results.values() if r["status"] == "ok"})
    if VARIABLE_K_EXPERTS in paths:
        speed = ("the routed configurations ran the variable-k experts path, which computes only the kept (token, "
                 "expert) pairs, against the native baseline on the model's own path; generating a few tokens per "
                 "prompt is bound by per-token launch overhead more than by expert compute (per-layer and "
                 "per-phase speed: benchmarks/README.md)")  # fmt: skip
    else:
        speed = ("they include the routing overhead; the GPU speed of the variable-k experts path (the patcher's "
                 "default on CUDA in bf16) is in benchmarks/README.md")  # fmt: skip
    findings.append(f"Timings are end-to-end greedy generation on this hardware with the experts path "
                    f"{', '.join(paths)}; {speed}.")  # fmt: skip
    lines += [f"- {f}" for f in findings]
    columns = ["config", "alpha", "max_k", "avg_experts", "std_experts", "min_experts", "max_experts", "median_experts",
               "ceiling_hit_rate", "floor_hit_rate", "reduction_vs_baseline", "tokens_per_second", "weight_entropy",
               "expert_utilization"]  # fmt: skip
    if quality:
        columns += ["perplexity", "token_accuracy"]
    lines += ["", "## All configurations", "", _markdown_table(ok[columns].fillna("-")), ""]
    if len(focus):
        group_rows = []
        for name in [BASELINE_CONFIG] + [bh_config_name(8, a) for a in focus["alpha"]]:
            if name in results and results[name]["status"] == "ok":
                group_rows.append({"config": name, **{g: s["avg_experts"] for g, s in results[name]["groups"].items()}})
        import pandas as pd

        lines += ["## Average experts by prompt complexity", "", _markdown_table(pd.DataFrame(group_rows)), ""]
    if len(saturation):
        sat = saturation.copy()
        sat["growth_percent_by_step"] = sat["growth_percent_by_step"].astype(str)
        lines += ["## Saturation", "", _markdown_table(sat.fillna("not reached")), ""]
    if quality:
        import pandas as pd

        evaluated = pd.DataFrame([
            {"config": name, "method": r["method"], "avg_experts": r["avg_experts"], "perplexity": r["perplexity"],
             "token_accuracy": r["token_accuracy"]}
            for name, r in quality.items() if r["status"] == "ok"
        ]).sort_values("avg_experts")  # fmt: skip
        settings = next(iter(quality.values())).get("settings", {})
        lines += [
            "## Quality at equal compute",
            "",
            f"Held-out text: {metadata.get('eval_text', 'unknown')}, {settings.get('num_tokens', '?')} tokens, windows "
            f"of {settings.get('window', '?')} tokens advancing by {settings.get('stride', '?')} (each token scored once; "
            "average experts over every routing decision of the evaluation).",
            "",
            _markdown_table(evaluated, "{:.3f}"),
            "",
            "BH against the baselines interpolated at the same average experts (negative delta: BH better):",
            "",
            _markdown_table(frontier_table(quality).fillna("outside range"), "{:.3f}"),
            "",
            "![Efficiency frontier](visualizations/bh_routing_frontier.png)",
            "",
        ]
        if token_analysis:
            lines += [
                f"Tokens with the fewest experts under {token_analysis['config']} (token, mean experts, occurrences): "
                + ", ".join(f"`{t!r}` {m} ({c})" for t, m, c in token_analysis["fewest_experts"]),
                "",
                "Tokens with the most experts: "
                + ", ".join(f"`{t!r}` {m} ({c})" for t, m, c in token_analysis["most_experts"]),
                "",
                "![Experts per layer](visualizations/bh_routing_layers.png)",
                "",
            ]
    sample_configs = [c for c in (BASELINE_CONFIG, bh_config_name(8, 0.05), bh_config_name(2, 0.05)) if c in results
                      and results[c]["status"] == "ok"]  # fmt: skip
    if sample_configs:
        lines += ["## Sample generations", ""]
        for index in (0, 3, 6, 9):
            prompt = results[sample_configs[0]]["prompts"][index]["prompt"] if index < len(results[sample_configs[0]]["prompts"]) else None
            if prompt is None:
                continue
            lines.append(f"**{prompt}**")
            lines.append("")
            for name in sample_configs:
                text = results[name]["prompts"][index]["generated_text"].replace("\n", " ").strip()
                lines.append(f"- `{name}`: {text}")
            lines.append("")
    lines += ["## Figure", "", f"![BH routing analysis]({figure_path})", ""]
    text = "\n".join(lines)
    _atomic_write_text(Path(path), text)
    return text


# ----------------------------------------------------------------------------------------------------
# 11. Quality: perplexity at equal compute, baselines, the efficiency frontier, token-level analysis
# ----------------------------------------------------------------------------------------------------

HELDOUT_TEXT_PATH = REPO_DIR / "data" / "heldout.txt"
BASELINE_TOP_KS = (1, 2, 3, 4, 5, 6, 7, 8)
BASELINE_TOP_PS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FLOORED_BH_MIN_KS = (2, 3, 4, 6)


def baseline_configs(top_ks=BASELINE_TOP_KS, top_ps=BASELINE_TOP_PS, max_k: int = NATIVE_TOP_K) -> list[RoutingConfig]:
    """Training-free peers to compare at equal average experts: native top-k truncated to k, and top-p
    (fewest experts reaching probability mass p, capped at max_k like the native router)."""
    configs = [RoutingConfig(f"topk_k{k}", "topk", (("k", k),)) for k in top_ks]
    configs += [RoutingConfig(f"topp_p{round(p * 100):03d}", "topp", (("p", p), ("min_k", 1), ("max_k", max_k)))
                for p in top_ps]  # fmt: skip
    return configs


def floored_bh_configs(min_ks=FLOORED_BH_MIN_KS, alpha: float = 0.20, max_k: int = NATIVE_TOP_K) -> list[RoutingConfig]:
    """BH on top of a floor: every token keeps min_k experts and BH adds the significant ones up to max_k.
    Places BH on the frontier between 2 and 8 experts, where the design's min_k = 1 configurations
    (which keep 1-2 experts on average) cannot go."""
    return [RoutingConfig(f"{bh_config_name(max_k, alpha)}_min{min_k}", "bh",
                          (("alpha", alpha), ("max_k", max_k), ("min_k", min_k), ("pvalue_method", DEFAULT_PVALUE_METHOD)))
            for min_k in min_ks]  # fmt: skip


def load_heldout_text(source: str | Path = "embedded") -> str:
    """Evaluation text: "embedded" (data/heldout.txt, never trained on), "wikitext2" (WikiText-2 raw test
    split through `datasets`, needs internet), or a path to a text file."""
    if str(source) == "embedded":
        return HELDOUT_TEXT_PATH.read_text()
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


def _windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (begin, end, num_scored): each window scores its last num_scored tokens, which no
    earlier window scored; the tokens before them are context only (the Hugging Face perplexity recipe)."""
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


@torch.no_grad()
def evaluate_language_model(
    model, token_ids: torch.Tensor, window: int = 256, stride: int | None = None, batch_size: int = 8,
    patcher: "OLMoERouterPatcher | None" = None,
) -> dict:
    """Perplexity and next-token accuracy on `token_ids` ([N] int64) with sliding windows.

    Windows of `window` tokens advance by `stride` (default: window, i.e. disjoint windows; a smaller
    stride gives every scored token more context). Each token is scored once. With a patched `patcher`,
    the routing decisions of the scored tokens' positions are returned too.

    Returns {"perplexity", "token_accuracy", "num_scored", "mean_nll", "nll" [S], "targets" [S],
    "inputs" [S], "expert_counts" [S, L] or None}: nll[i] is the surprisal (nats) of targets[i] given its
    context; inputs[i] is the token at the position that predicts it, and expert_counts[i] the experts
    kept there in each layer.
    """
    if token_ids.dim() != 1 or token_ids.numel() < 2:
        raise ValueError(f"token_ids must be a 1-D tensor of at least 2 tokens, got shape {tuple(token_ids.shape)}")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    stride = window if stride is None else stride
    if not (1 <= stride <= window):
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    device = next(model.parameters()).device
    windows = _windows(token_ids.numel(), window, stride)
    nll_parts, target_parts, input_parts, correct_parts, count_parts = [], [], [], [], []
    # Windows of equal length are batched together (all but possibly the last).
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        for length in sorted({end - begin for begin, end, _ in batch}, reverse=True):
            group = [w for w in batch if w[1] - w[0] == length]
            inputs = torch.stack([token_ids[begin:end] for begin, end, _ in group]).to(device)  # [B, length]
            if patcher is not None:
                patcher.reset_stats()
            logits = model(inputs, use_cache=False).logits.float()  # [B, length, V]
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
            targets = inputs[:, 1:]
            nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, length - 1]
            correct = log_probs.argmax(-1) == targets
            counts = patcher.get_stats()["token_counts"].view(len(group), length, -1) if patcher else None
            for row, (_, _, num_scored) in enumerate(group):
                nll_parts.append(nll[row, -num_scored:].cpu())
                target_parts.append(targets[row, -num_scored:].cpu())
                input_parts.append(inputs[row, length - 1 - num_scored : length - 1].cpu())
                correct_parts.append(correct[row, -num_scored:].cpu())
                if counts is not None:  # the input positions that made these predictions
                    count_parts.append(counts[row, length - 1 - num_scored : length - 1])
    nll = torch.cat(nll_parts).double()
    return {
        "perplexity": math.exp(nll.mean().item()),
        "token_accuracy": torch.cat(correct_parts).double().mean().item(),
        "num_scored": nll.numel(),
        "mean_nll": nll.mean().item(),
        "nll": nll,
        "targets": torch.cat(target_parts),
        "inputs": torch.cat(input_parts),
        "expert_counts": torch.cat(count_parts) if count_parts else None,
    }


def run_quality_sweep(
    model, token_ids: torch.Tensor, configs: list[RoutingConfig], output_dir: str | Path = "results",
    window: int = 256, stride: int | None = None, batch_size: int = 8, redo: bool = False, progress: bool = True,
    metadata: dict | None = None,
) -> dict[str, dict]:
    """Perplexity, accuracy and average experts of every configuration on the same tokens.

    Saved per configuration to output_dir/quality/<name>.json as soon as it finishes (resumed like
    run_sweep; failures recorded). The per-token arrays (nll, expert counts) are kept for the baseline and
    the BH configurations in output_dir/quality/<name>.pt for the token-level analysis.
    """
    import json

    from tqdm.auto import tqdm

    if not configs:
        raise ValueError("configs must name at least one RoutingConfig")
    quality_dir = Path(output_dir) / "quality"
    quality_dir.mkdir(parents=True, exist_ok=True)
    settings = {"num_tokens": int(token_ids.numel()), "window": window, "stride": stride or window, **(metadata or {})}
    patcher = OLMoERouterPatcher(model)
    results = {}
    for config in tqdm(configs, disable=not progress, desc="quality"):
        path = quality_dir / f"{config.name}.json"
        if path.exists() and not redo:
            saved = json.loads(path.read_text())
            if saved.get("settings") == json.loads(json.dumps(settings)) and saved.get("status") == "ok":
                results[config.name] = saved
                continue
        try:
            config.apply(patcher)
            evaluation = evaluate_language_model(model, token_ids, window, stride, batch_size, patcher)
            counts = evaluation["expert_counts"]
            result = {
                "name": config.name, "method": config.method, "params": dict(patcher.params), "status": "ok",
                "perplexity": evaluation["perplexity"], "token_accuracy": evaluation["token_accuracy"],
                "mean_nll": evaluation["mean_nll"], "num_scored": evaluation["num_scored"],
                "avg_experts": counts.double().mean().item(),
                "per_layer_avg_experts": counts.double().mean(0).tolist(),
            }  # fmt: skip
            tensors = {"nll": evaluation["nll"].float(), "targets": evaluation["targets"], "inputs": evaluation["inputs"],
                       "expert_counts": counts.to(torch.int16)}  # fmt: skip
            temporary = quality_dir / f"{config.name}.pt.tmp"
            torch.save(tensors, temporary)
            temporary.replace(quality_dir / f"{config.name}.pt")
        except Exception as error:  # noqa: BLE001 - recorded, the sweep goes on
            result = {"name": config.name, "method": config.method, "params": config.kwargs, "status": "failed",
                      "error": f"{type(error).__name__}: {error}"}  # fmt: skip
        finally:
            patcher.unpatch()
        result["settings"] = settings
        _atomic_write_text(path, json.dumps(result))
        results[config.name] = json.loads(json.dumps(result))
    return results


def frontier_table(quality: dict[str, dict]):
    """For each BH configuration: its perplexity and the perplexity of top-k and top-p at the same average
    experts; NaN where BH's average lies outside the baseline's measured range. Negative
    `delta_vs_topk_percent` means BH is better at equal compute.

    Between two measured baselines the log-perplexity (mean NLL) is interpolated linearly in average
    experts: that is the mean NLL of routing a matching fraction of tokens with each of the two, whereas
    interpolating perplexity itself would flatter BH (perplexity is convex in the experts kept)."""
    import numpy as np
    import pandas as pd

    ok = {name: r for name, r in quality.items() if r["status"] == "ok"}

    def curve(method):
        points = sorted((r["avg_experts"], r["perplexity"]) for r in ok.values() if r["method"] == method)
        return np.array([p[0] for p in points]), np.array([p[1] for p in points])

    rows = []
    curves = {"topk": curve("topk"), "topp": curve("topp")}
    for name, result in ok.items():
        if result["method"] != "bh":
            continue
        row = {"config": name, "pvalue_method": result["params"].get("pvalue_method"), "alpha": result["params"].get("alpha"),
               "max_k": result["params"].get("max_k"), "avg_experts": result["avg_experts"], "perplexity": result["perplexity"]}  # fmt: skip
        for method, (xs, ys) in curves.items():
            inside = len(xs) >= 2 and xs[0] <= result["avg_experts"] <= xs[-1]
            at_equal = float(np.exp(np.interp(result["avg_experts"], xs, np.log(ys)))) if inside else float("nan")
            row[f"{method}_perplexity_at_equal_experts"] = at_equal
            row[f"delta_vs_{method}_percent"] = 100.0 * (result["perplexity"] / at_equal - 1.0) if inside else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_frontier(quality: dict[str, dict], path: str | Path):
    """Average experts per token (x) against perplexity (y) for BH, top-k and top-p (and native top-8)."""
    _use_headless_backend_unless_inline()
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 6))
    ok = [r for r in quality.values() if r["status"] == "ok"]
    styles = {"topk": ("s-", "tab:grey", "top-k (k = 1..8)"), "topp": ("^-", "tab:orange", "top-p"),
              "bh": ("o", "tab:blue", "BH (robust_z)"), "bh1mp": ("x", "tab:red", "BH (1 - softmax, the design)")}  # fmt: skip
    for key, (marker, color, label) in styles.items():
        if key == "bh":
            points = [r for r in ok if r["method"] == "bh" and r["params"].get("pvalue_method") == DEFAULT_PVALUE_METHOD]
        elif key == "bh1mp":
            points = [r for r in ok if r["method"] == "bh" and r["params"].get("pvalue_method") == "one_minus_prob"]
        else:
            points = [r for r in ok if r["method"] == key]
        points.sort(key=lambda r: r["avg_experts"])
        if points:
            ax.plot([r["avg_experts"] for r in points], [r["perplexity"] for r in points], marker, color=color, label=label)
            if key == "bh":
                for r in points:
                    ax.annotate(r["name"].replace("bh_", ""), (r["avg_experts"], r["perplexity"]), fontsize=6)
    native = next((r for r in ok if r["method"] == "native"), None)
    if native:
        ax.plot([native["avg_experts"]], [native["perplexity"]], "*", ms=14, color="black", label="native top-8")
    ax.set(xlabel="average experts per token (all layers)", ylabel="held-out perplexity", yscale="log",
           title="Efficiency frontier: quality at equal compute")  # fmt: skip
    ax.legend()
    return _save_figure(figure, path, dpi=120)


def token_level_analysis(output_dir: str | Path, config_name: str, tokenizer, baseline_name: str = BASELINE_CONFIG,
                         num_tokens: int = 15, min_occurrences: int = 5) -> dict:
    """Which tokens draw the most and fewest experts under `config_name`, and whether the count follows
    difficulty: Spearman correlation between a position's average experts (over layers) and the baseline's
    surprisal of the token it predicts."""
    import pandas as pd
    from scipy.stats import spearmanr

    quality_dir = Path(output_dir) / "quality"
    routed = torch.load(quality_dir / f"{config_name}.pt")
    baseline = torch.load(quality_dir / f"{baseline_name}.pt")
    experts = routed["expert_counts"].double().mean(-1)  # [S]
    correlation = spearmanr(experts.numpy(), baseline["nll"].numpy())
    frame = pd.DataFrame({"token": [tokenizer.decode([int(t)]) for t in routed["inputs"].tolist()], "experts": experts.numpy()})
    per_token = frame.groupby("token")["experts"].agg(["mean", "count"])
    per_token = per_token[per_token["count"] >= min_occurrences].sort_values("mean")
    return {
        "config": config_name,
        "spearman_experts_vs_next_token_surprisal": float(correlation.statistic),
        "spearman_p_value": float(correlation.pvalue),
        "num_positions": int(experts.numel()),
        "fewest_experts": [(t, round(r["mean"], 3), int(r["count"])) for t, r in per_token.head(num_tokens).iterrows()],
        "most_experts": [(t, round(r["mean"], 3), int(r["count"])) for t, r in per_token.tail(num_tokens)[::-1].iterrows()],
    }
