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
7. `OLMoERouterPatcher`: swaps a model's top-8 router for any method above, so that the experts module
   computes only the selected (token, expert) pairs, and records routing statistics.

Shapes use E for the number of experts (64 for OLMoE), K for a method's slot width (max_k, or k for top-k),
and "..." for any leading token dimensions ([tokens] inside the model, [batch, seq_len] for users).
"""

from __future__ import annotations

import inspect
import math
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
    "OLMoERouterPatcher",
]

PVALUE_METHODS = ("robust_z", "one_minus_prob")
DEFAULT_PVALUE_METHOD = "robust_z"
HUB_MODEL_ID = "allenai/OLMoE-1B-7B-0924"
REPO_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL_DIR = REPO_DIR / "models" / "tiny-olmoe"
NATIVE_TOP_K = 8  # OLMoE-1B-7B routes every token to 8 experts; "reduction vs baseline" is relative to it


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


def _robust_z_statistic(logits: torch.Tensor, top_logits: torch.Tensor | None = None) -> torch.Tensor:
    """s = (z - mean) / std of the token's logits without its J largest. [..., E] -> [..., E].

    top_logits: the token's largest logits ([..., >= J], from a topk already at hand), or None.
    """
    num_experts = logits.shape[-1]
    num_trimmed = _num_trimmed(num_experts)
    if top_logits is None:
        top_logits = torch.topk(logits, num_trimmed, dim=-1).values
    top_logits = top_logits[..., :num_trimmed]
    # Centre first so that the sums of squares below do not cancel catastrophically in float32.
    shift = logits.mean(dim=-1, keepdim=True)  # [..., 1]
    centered, centered_top = logits - shift, top_logits - shift
    num_bulk = num_experts - num_trimmed
    bulk_mean = (centered.sum(-1, keepdim=True) - centered_top.sum(-1, keepdim=True)) / num_bulk
    bulk_square = (centered.square().sum(-1, keepdim=True) - centered_top.square().sum(-1, keepdim=True)) / num_bulk
    bulk_std = (bulk_square - bulk_mean.square()).clamp_min(0).sqrt()
    # A token whose bulk logits are all equal has std 0: keep the statistic finite.
    bulk_std = bulk_std.clamp_min(torch.finfo(logits.dtype).eps * (1.0 + (shift + bulk_mean).abs()))
    return (centered - bulk_mean) / bulk_std


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


def _route_bh(logits, alpha, temperature, min_k, max_k, pvalue_method, renormalize, with_stats=False) -> _Routing:
    num_experts = logits.shape[-1]
    scaled_logits = _work_logits(logits, temperature)  # [..., E]
    probabilities = torch.softmax(scaled_logits, dim=-1)  # [..., E]
    # One top-k gives the experts to keep (most probable first) and the logits the null estimate trims.
    width = max(max_k, _num_trimmed(num_experts))
    top_logits, top_index = torch.topk(scaled_logits, width, dim=-1)  # [..., width]
    if pvalue_method == "robust_z":
        statistics = _robust_z_statistic(scaled_logits, top_logits)  # [..., E]
        critical = _robust_z_critical_statistics(alpha, num_experts, logits.device)  # [E], decreasing
        # s_i >= c_j  <=>  j >= 1 + #{j : c_j > s_i}
        first_passing_rank = 1 + num_experts - torch.searchsorted(
            critical.flip(0), statistics.float(), right=True, out_int32=True
        )
    else:
        # 1 - prob_i <= alpha*j/m  <=>  j >= m * (1 - prob_i) / alpha
        first_passing_rank = torch.ceil(num_experts * (1.0 - probabilities) / alpha).long().clamp(1, num_experts + 1)
    num_significant = _bh_count_from_first_passing_rank(first_passing_rank)  # [...]
    expert_counts = num_significant.clamp(min_k, max_k)
    top_probabilities = probabilities.gather(-1, top_index[..., :max_k])
    top_weights, kept_index = _keep_top(top_probabilities, top_index[..., :max_k], expert_counts, num_experts, renormalize)
    extra_stats = {}
    if with_stats:
        p_values = 1.0 - probabilities if pvalue_method == "one_minus_prob" else _robust_z_p_values(statistics)
        extra_stats = {
            "p_values": p_values,
            "bh_threshold": _bh_critical_value(num_significant, alpha, num_experts, p_values.dtype),
            "significant_mask": first_passing_rank <= num_significant.unsqueeze(-1),
            "num_significant": num_significant,
        }
    return _Routing(top_weights, kept_index, expert_counts, probabilities, extra_stats)


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
# 7. The router patcher
# ----------------------------------------------------------------------------------------------------


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

    The experts module must skip sentinel indices: "eager" does; "grouped_mm" does when flagged as expert
    parallel, which the patcher sets while patched (if this transformers supports it); any other
    implementation is switched to "eager" while patched. `unpatch` restores all of it.

        patcher = OLMoERouterPatcher(model)
        patcher.patch_with_bh(alpha=0.05, max_k=8)
        outputs = model.generate(...)
        stats = patcher.get_stats()
        patcher.unpatch()

    Also usable as a context manager (`with OLMoERouterPatcher(model) as patcher:`), which unpatches on
    exit. Patching again replaces the previous patch (and resets the statistics).
    """

    def __init__(self, model: torch.nn.Module, record_token_counts: bool = True):
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

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
        self._handles: list = []
        self._route: Callable[[torch.Tensor], _Routing] | None = None
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
        if pvalue_method == "robust_z":  # build the null table now, not inside a timed forward
            for router in self.routers:
                robust_z_null_table(self.num_experts, router.weight.device)
        route = lambda logits: _route_bh(logits, alpha, temperature, min_k, max_k, pvalue_method, renormalize)  # noqa: E731
        return self._install("bh", params, route)

    def patch_with_topk(self, k: int = NATIVE_TOP_K, temperature: float = 1.0, renormalize: bool | None = None):
        """Route each token to its k most probable experts (k=8 reproduces OLMoE's router)."""
        _check_top_k(k, self.num_experts)
        _check_temperature(temperature)
        renormalize = self.norm_topk_prob if renormalize is None else bool(renormalize)
        params = dict(k=k, temperature=temperature, min_k=k, max_k=k, renormalize=renormalize)
        return self._install("topk", params, lambda logits: _route_topk(logits, k, temperature, renormalize))

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
        route = lambda logits: _route_topp(logits, p, temperature, min_k, max_k, renormalize)  # noqa: E731
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
        if method != "native":
            self._make_experts_skip_sentinels()
        self.experts_implementation = self._current_experts_implementation()
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._make_hook(layer)))
        return self

    def _current_experts_implementation(self) -> str:
        return getattr(self.model.config, "_experts_implementation", None) or "eager"

    def _make_experts_skip_sentinels(self) -> None:
        implementation = self._current_experts_implementation()
        if implementation == "eager":
            return
        if implementation == "grouped_mm" and _grouped_mm_masks_sentinels():
            self._saved_expert_parallel_flags = [getattr(e, "_is_expert_parallel", False) for e in self.experts]
            for experts in self.experts:
                experts._is_expert_parallel = True
            return
        self._saved_experts_implementation = implementation
        self.model.set_experts_implementation("eager")

    def _make_hook(self, layer: int):
        def hook(module, args, output):
            router_logits = output[0]  # [T, E] in the model's dtype
            if self._route is None:  # observe(): the native top-k, unchanged
                top_weights, top_index = output[1], output[2]  # [T, k]
                expert_counts = torch.full(top_index.shape[:-1], top_index.shape[-1], device=top_index.device)
                self._record(layer, expert_counts, top_weights, top_index)
                return None
            routing = self._route(router_logits)
            self._record(layer, routing.expert_counts, routing.top_weights, routing.top_index)
            return router_logits, routing.top_weights.to(router_logits.dtype), routing.top_index

        return hook

    # --- statistics ----------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Forget the routing statistics recorded so far."""
        self._token_counts: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._selections: list[torch.Tensor | None] = [None] * self.num_layers  # [E+1] per layer
        self._entropy_sums: list[torch.Tensor | None] = [None] * self.num_layers
        self._num_routed: list[int] = [0] * self.num_layers

    @torch.no_grad()
    def _record(self, layer, expert_counts, top_weights, top_index) -> None:
        """Accumulate on the router's device with no host synchronisation."""
        flat_index = top_index.reshape(-1)
        if self._selections[layer] is None:
            self._selections[layer] = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=flat_index.device)
            self._entropy_sums[layer] = torch.zeros((), dtype=torch.float64, device=flat_index.device)
        # Sentinel slots (index E) land in the last bin, which get_stats drops.
        self._selections[layer].scatter_add_(0, flat_index, torch.ones_like(flat_index))
        weights = top_weights.float()
        shares = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self._entropy_sums[layer] += -torch.xlogy(shares, shares).sum()
        self._num_routed[layer] += expert_counts.numel()
        if self.record_token_counts:
            self._token_counts[layer].append(expert_counts.reshape(-1).to(torch.int16))

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
        num_tokens = self._num_routed[0]
        selections = torch.stack([s.to("cpu") for s in self._selections])[:, : self.num_experts].double()  # [L, E]
        load_shares = selections / selections.sum(dim=-1, keepdim=True).clamp_min(1)
        load_entropy = -torch.xlogy(load_shares, load_shares).sum(dim=-1) / math.log(self.num_experts)  # [L]
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
            expert_utilization=load_entropy.mean().item(),
            expert_utilization_per_layer=(selections / num_tokens).tolist(),
            num_tokens=num_tokens,
            num_layers=self.num_layers,
            method=self.method,
            params=dict(self.params),
            weights_renormalized=bool(self.params.get("renormalize", False)),
            experts_implementation=self.experts_implementation,
        )
        return stats
