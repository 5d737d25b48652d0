"""Benjamini-Hochberg adaptive expert routing for OLMoE and any transformers MoE family: the module a user
imports to route a model. The experiment (text, evaluation, tables, the report) is `bh_experiment.py`; the
experts path that computes only the kept pairs is `variable_k_experts.py`; how each transformers MoE family's
router scores and weights experts (`RouterSpec`, `find_moe_layers`, `moe_shape`) is `moe_families.py`.

    from bh_routing import MoERouterPatcher
    patcher = MoERouterPatcher(model).patch("bh", alpha=0.05, max_k=8)  # model.generate(...) now routes by BH
    model.generate(ids, max_new_tokens=5, do_sample=False)
    print(patcher.get_stats()["avg_experts"]); patcher.unpatch()

1. Argument checks shared by every routing method.
2. The Benjamini-Hochberg step-up procedure: `bh_reject` (the procedure as stated) and the sort-free count
   `fast_bh_count` the hot path uses (tested equal to it).
3. P-values, one object per method in a registry (`PVALUE_METHODS`): the default `robust_z` (a per-token
   Gaussian bulk null, calibrated by simulation), the design's `one_minus_prob`, and the nulls fitted to each
   layer (`empirical`, `pooled`); `compute_p_values`.
4. Calibration: the tables fitted to each layer on calibration text (`fit_routing_calibration`).
5. How one layer routes: `route_bh`, `route_topk`, `route_topp`, `route_hc`, `route_skip`, `route_entropy`,
   `route_layer_budget`, each returning a `Routing`.
6. Routing methods, one object per method in a registry (`ROUTING_METHODS`): parameters, the route a layer
   runs (built from a `LayerContext`), configuration names (`RoutingConfig`); `route_logits`.
7. The design's routing functions with one return contract: `benjamini_hochberg_routing`, `topk_routing`,
   `topp_routing`, `run_bh_multi_k`, `compare_multi_k_statistics`, `summarize_expert_counts`.
8. `MoERouterPatcher`: swaps the router of every MoE layer for a registered method, so that the experts
   module computes only the kept pairs, and records the routing statistics (`routing_statistics.py`: the
   counters it keeps on the device); `drop_copied_compiled_call`, for a model copied after a compiled generate.

Shapes use E for the number of experts (64 for OLMoE), K for a method's slot width (max_k, or k for top-k),
L for the number of MoE layers, and "..." for leading token dimensions ([tokens] inside the model,
[batch, seq_len] for users).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import math
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fused_bh_route import MAX_EXPERTS as FUSED_MAX_EXPERTS
from fused_bh_route import fused_bh_route, fused_route_supported
from moe_families import MoEShape, find_moe_layers, moe_shape
from routing_statistics import (
    TOKEN_COUNTS_CAPACITY,
    RoutingStatistics,
    accumulate_routing,
    flat_counts,
    nonfinite_rows,
    summarize_count_histogram,
    write_token_counts,
)
from variable_k_experts import (
    VARIABLE_K_EXPERTS,
    CudaGraphed,
    compile_once,
    eager_skips_sentinels,
    fused_path_supported,
    grouped_mm_masks_sentinels,
    raise_recompile_limit,
    register_variable_k_experts,
    variable_k_plan,
    variable_k_unsupported,
)

__all__ = [
    # p-values and BH
    "bh_reject", "compute_p_values", "PValueMethod", "PVALUE_METHODS", "register_pvalue_method", "pvalue_method_of",
    "DEFAULT_PVALUE_METHOD", "NullTable",
    # calibration
    "RoutingCalibration", "fit_routing_calibration",
    # routing methods and configurations
    "Routing", "RouterShape", "LayerContext", "RoutingMethod", "ROUTING_METHODS", "register_routing_method",
    "routing_method", "RoutingConfig", "route_logits",
    # the design's routing functions
    "benjamini_hochberg_routing", "topk_routing", "topp_routing", "run_bh_multi_k", "compare_multi_k_statistics",
    "summarize_expert_counts",
    # for a method defined in another file
    "check_temperature", "MIN_TEMPERATURE", "resolve_renormalize", "config_suffix", "route_layer_budget",
    "route_alloct", "layer_tensor",
    # families and the patcher
    "find_moe_layers", "moe_shape", "MoERouterPatcher", "OLMoERouterPatcher", "PATCHER_ATTRIBUTE",
    "TOKEN_COUNTS_CAPACITY", "drop_copied_compiled_call",
]  # fmt: skip

NATIVE_TOP_K = 8  # OLMoE-1B-7B routes every token to 8 experts: the default k of `topk_routing`
DEFAULT_PVALUE_METHOD = "robust_z"
MIN_TRANSFORMERS = "5.24"  # the first release whose experts paths skip the sentinel expert index
PATCHER_ATTRIBUTE = "_bh_routing_patcher"  # set on a model while a patcher holds it
PATCH_ATTRIBUTE = "_moe_patch"  # a patched router's PatchedRouter
COMPILED_CALL_ATTRIBUTE = "_compiled_call"  # where transformers' generate keeps a model's compiled forward
EXPERTS_PATHS = (VARIABLE_K_EXPERTS, "model")  # MoERouterPatcher(experts_path=...)


# ----------------------------------------------------------------------------------------------------
# 1. Argument checks
# ----------------------------------------------------------------------------------------------------


def _check_logits(router_logits: torch.Tensor, check_values: bool = True, any_rank: bool = False) -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if router_logits.dim() not in (2, 3) and not (any_rank and router_logits.dim() >= 1):
        raise ValueError(
            "router_logits must have shape [tokens, num_experts] or [batch, seq_len, num_experts], "
            f"got rank {router_logits.dim()} with shape {tuple(router_logits.shape)}"
        )
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a floating-point tensor, got dtype {router_logits.dtype}")
    if router_logits.shape[-1] < 1:
        raise ValueError("router_logits must have at least one expert in its last dimension")
    # `.all()` syncs with the device: the patcher never calls it, and routes a non-finite row by its rule instead
    # (`PatchedRouter.routed`).
    if check_values and not bool(torch.isfinite(router_logits).all()):
        raise ValueError("router_logits must be finite: found NaN or +/-inf values")


def _check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")


# The smallest temperature: float32's resolution at 1. Logits are divided by T in float32 (`_work_logits`); far
# below it 1/T leaves float32's range (a subnormal T) and robust_z's sums of squared logits overflow for logits
# of ordinary size (at T = 1e-20 a logit of 1 becomes 1e20, its square 1e40): NaN weights, or no count at all.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).eps)  # 2**-23, about 1.2e-7


def check_temperature(temperature: float) -> None:
    """ValueError naming `temperature` unless it is a finite number >= MIN_TEMPERATURE."""
    bad_type = not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
    if bad_type or not math.isfinite(temperature) or temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be a finite number >= {MIN_TEMPERATURE:.3g} (float32's resolution, the dtype logits "
            f"are divided in), got {temperature!r}"
        )


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


def _check_top_p(p: float) -> None:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not (0.0 < p <= 1.0):
        raise ValueError(f"p must be a number in (0, 1], got {p!r}")


def _layered(value) -> bool:
    """Whether a parameter is given once per MoE layer (a tuple; a list once read back from JSON)."""
    return isinstance(value, (list, tuple))


def _per_layer(value, check: Callable):
    """A parameter given once, or once per MoE layer as a non-empty list or tuple (returned as a tuple), every
    value checked by `check`, which names the parameter."""
    if _layered(value):
        if not value:
            check(value)  # the parameter's own error, naming it
        for item in value:
            check(item)
        return tuple(value)
    check(value)
    return value


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
# 3. P-values: one object per p-value method, in a registry
# ----------------------------------------------------------------------------------------------------
#
# A p-value method reads each expert's statistic (larger: more relevant to the token) against a null
# distribution of it. BH's hot path never materialises the p-values: each expert's first passing rank j
# (smallest j with p <= alpha*j/E) is read off its statistic against the critical statistics c_j, and
# `fast_bh_count` turns ranks into counts.
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
#
# one_minus_prob (the design document): p_i = 1 - softmax(logits / T)_i. BH rejects k experts only if
#   p_(k) <= k*alpha/m, i.e. k experts each have prob >= 1 - k*alpha/m; their probabilities sum to at
#   most 1, so k*(1 - k*alpha/m) <= 1, i.e. alpha >= m*(k-1)/k^2. Over k = 2..m that bound is smallest at
#   k = m: (m-1)/m (0.984 for m = 64). So for alpha < (m-1)/m BH rejects at most one expert and the count
#   is max(min_k, <=1) whatever the logits; for alpha >= (m-1)/m it can reject all m (at alpha = 1 it
#   always does, since p_(m) <= 1). Kept so that the report can show what the design's formula does.
#
# empirical: robust_z's statistic, but its null is the layer's own bulk shape rather than a Gaussian: the
#   statistic of calibration logits whose token-specific signal is removed (each expert's logit permuted
#   across tokens, `permute_experts`), pooled over experts. On text like the calibration text and with no
#   token-specific signal, p-values are uniform pooled over experts, whatever the shape of the layer's
#   logits; per expert they are not (an expert whose logits run high gets small p-values more often), which
#   BH's guarantee would need.
#
# pooled: the public attempt's p-value, P(Z >= z) with Z drawn from every raw logit of the layer on the
#   calibration text, all experts pooled (signal included; not standardised per token).

_NULL_SIMULATED_TOKENS = 2**17  # 131072 simulated tokens x E experts: p resolves to ~1e-7 at E=64
_NULL_SEED = 20240902
_NULL_GRID = (-40.0, 80.0, 1.0 / 64)  # s grid (first, last, step) of the tabulated log survival function
_null_table_cache: dict[tuple[int, str], NullTable] = {}
_critical_statistics_cache: dict[tuple[float, int, str], torch.Tensor] = {}
MIN_ROBUST_Z_EXPERTS = 4  # J = E/4 >= 1 trimmed logits and a bulk of E - J >= 3 to estimate its spread


def robust_z_trimmed(num_experts: int) -> int:
    """J: how many of the largest logits robust_z's null estimate leaves out (E/4, 16 for OLMoE)."""
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
    num_trimmed = robust_z_trimmed(num_experts)
    # Moments of all E logits, then remove the J largest, centred on the mean so that the sums of
    # squares do not cancel in float32.
    mean = logits.mean(dim=-1, keepdim=True)  # [..., 1]
    # A row spread beyond 2**32 (max - mean; its centred logits lie within E times that) is scaled by a power of
    # two, which changes no rounding, so that its sums of squares stay in float32's range (the statistic is
    # scale-free); every other row is left as it is.
    spread = top_logits[..., :1] - mean  # [..., 1]
    scale = torch.where(spread > 2.0**32, torch.exp2(-torch.floor(torch.log2(spread))), 1.0)
    centered = (logits - mean) * scale
    total_square = torch.linalg.vecdot(centered, centered).unsqueeze(-1)  # [..., 1]
    centered_top = (top_logits[..., :num_trimmed] - mean) * scale  # [..., J]
    num_bulk = num_experts - num_trimmed
    bulk_mean = -centered_top.sum(-1, keepdim=True) / num_bulk  # the E centred logits sum to 0
    bulk_square = (total_square - centered_top.square().sum(-1, keepdim=True)) / num_bulk
    bulk_std = (bulk_square - bulk_mean.square()).clamp_min(0).sqrt()  # in the scaled units
    center = mean + bulk_mean / scale
    # A token whose bulk logits are equal up to rounding has no spread to measure: a floor of sqrt(eps) of their
    # size (far below any router's spread) keeps its statistics finite and near 0, no evidence, however the
    # rounding of its mean falls on each path (a floor of eps let that rounding noise pass for signal).
    floor = math.sqrt(torch.finfo(logits.dtype).eps) * (1.0 + center.abs()) * scale
    return center, scale / bulk_std.clamp_min(floor)


def robust_z_statistic(logits: torch.Tensor, top_logits: torch.Tensor | None = None) -> torch.Tensor:
    """s = (z - mean) / std of the token's logits without its J largest. [..., E] -> [..., E].

    top_logits: the token's largest logits ([..., >= J], from a topk already at hand), or None.
    """
    if top_logits is None:
        top_logits = torch.topk(logits, robust_z_trimmed(logits.shape[-1]), dim=-1).values
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
        # A NaN statistic is no evidence (p = 1), never an index: NaN cast to an integer is out of any range.
        statistics = statistics.nan_to_num(nan=-math.inf)
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


def fast_bh_count_robust_z_cpu(logits: torch.Tensor, top_logits: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
    """BH's count for robust_z from the top J statistics alone, exact, for the CPU.

    BH's k exceeds J only if more than J experts have s >= c_j >= c_E. When at most J experts clear the
    loosest critical value c_E, k = max{j <= J : s_(j) >= c_j}, and s_(1..J) are the top-J logits already
    sorted. The other tokens (rare) go through the full histogram. [..., E] -> [...] int64.
    """
    num_experts = logits.shape[-1]
    num_top = robust_z_trimmed(num_experts)
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
        full = fast_bh_count(first_passing_rank(robust_z_statistic(rows, row_top), critical))
        num_significant = (
            num_significant.reshape(-1).index_put((flat_many.nonzero().squeeze(-1),), full).reshape(many.shape)
        )
    return num_significant


def _work_logits(router_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32 (float64 if given): p-values are never computed in bf16/fp16."""
    work_dtype = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    return router_logits.to(work_dtype) / temperature


def first_passing_rank(statistics: torch.Tensor, critical: torch.Tensor) -> torch.Tensor:
    """Smallest rank j with s_i >= c_j (E + 1 if none): j = 1 + #{j : c_j > s_i}. [..., E] -> [..., E] int32."""
    num_experts = statistics.shape[-1]
    return (
        1
        + num_experts
        - torch.searchsorted(critical.flip(0), statistics.float().contiguous(), right=True, out_int32=True)
    )


class PValueMethod:
    """How a token's E router logits become E p-values of "expert i is not relevant to this token": each
    expert's statistic (larger: more relevant) read against a null distribution of it.

    Subclass, then `register_pvalue_method(Subclass())`: BH and Higher Criticism (pvalue_method=<name>),
    `compute_p_values`, `fit_routing_calibration` (for a fitted null) and configuration names then know it.
    A p-value must fall as its expert's logit rises, so that the experts a test rejects are the most probable.
    Arguments of the methods below: logits [..., E] as the router gave them; scaled_logits = logits / T in
    float32 or better; top_logits [..., >= top_width] the largest scaled logits, sorted (or None).
    """

    name = ""
    code = ""  # how configuration names write it: bh{code}_k8_a005
    fitted = False  # its null is fitted to each layer on calibration text (`fit_routing_calibration`)
    fused = False  # its statistic is robust_z's, read against critical statistics: `fused_bh_route` routes it

    def check(self, num_experts: int) -> None:
        """ValueError if the method cannot test `num_experts` experts (checked before any forward pass)."""

    def top_width(self, num_experts: int) -> int:
        """How many of a token's largest scaled logits `statistics` reads (0: none)."""
        return 0

    def fit(self, logits: torch.Tensor, generator: torch.Generator) -> NullTable:
        """A fitted method's null for one layer from its calibration logits [N, E] (float32, on the CPU)."""
        raise NotImplementedError

    def null(self, num_experts: int, fitted: NullTable | None, device) -> NullTable | None:
        """The null the statistics are read against, on `device`; fitted: the layer's fitted null, if any."""
        if self.fitted and fitted is None:
            raise ValueError(
                f"pvalue_method={self.name!r} needs a fitted null table (null=, from a RoutingCalibration: "
                "fit_routing_calibration); robust_z and one_minus_prob need none"
            )
        return fitted

    def statistics(self, logits, scaled_logits, top_logits=None) -> torch.Tensor:
        """Every expert's statistic: [..., E]."""
        raise NotImplementedError

    def top_statistics(self, logits, scaled_logits, top_logits, top_index) -> torch.Tensor:
        """The statistics of the experts in top_index [..., W] (most probable first): [..., W]."""
        return self.statistics(logits, scaled_logits, top_logits).gather(-1, top_index)

    def p_values(self, statistics: torch.Tensor, null: NullTable | None) -> torch.Tensor:
        """The p-values of statistics [...] under `null`: [...], float32 or better."""
        return null.p_values(statistics)

    def critical(self, alpha: float, num_experts: int, null: NullTable | None, device) -> torch.Tensor | None:
        """c_j [E] on `device`, with p(s) <= alpha * j / E  <=>  s >= c_j (None: not read through a null)."""
        return null.critical_statistics(alpha, num_experts).to(device)

    def first_passing_rank(self, statistics, critical, alpha: float) -> torch.Tensor:
        """Each expert's smallest rank j with p <= alpha * j / E (E + 1 if none): [..., E] int."""
        return first_passing_rank(statistics, critical)

    def fast_count(self, scaled_logits, top_logits, critical) -> torch.Tensor | None:
        """BH's count by an exact shortcut that branches on the data (eager CPU calls only), or None."""
        return None


class OneMinusProbPValue(PValueMethod):
    """The design's p_i = 1 - softmax(logits / T)_i (keeps min_k experts for every alpha < (E-1)/E)."""

    name, code = "one_minus_prob", "1mp"

    def statistics(self, logits, scaled_logits, top_logits=None):
        return torch.softmax(scaled_logits, dim=-1)  # the probability itself

    def p_values(self, statistics, null):
        return 1.0 - statistics

    def critical(self, alpha, num_experts, null, device):
        return None

    def first_passing_rank(self, statistics, critical, alpha):
        # 1 - prob_i <= alpha*j/m  <=>  j >= m * (1 - prob_i) / alpha
        num_experts = statistics.shape[-1]
        return torch.ceil(num_experts * (1.0 - statistics) / alpha).long().clamp(1, num_experts + 1)


class RobustZStatistic(PValueMethod):
    """The statistic s = (z - mean) / std of the token's logits without its J = E/4 largest (`robust_z_statistic`)."""

    fused = True

    def check(self, num_experts):
        robust_z_trimmed(num_experts)

    def top_width(self, num_experts):
        return robust_z_trimmed(num_experts)

    def statistics(self, logits, scaled_logits, top_logits=None):
        return robust_z_statistic(scaled_logits, top_logits)

    def top_statistics(self, logits, scaled_logits, top_logits, top_index):
        center, inverse_std = _robust_location_scale(scaled_logits, top_logits)
        return (top_logits - center) * inverse_std

    def fast_count(self, scaled_logits, top_logits, critical):
        return fast_bh_count_robust_z_cpu(scaled_logits, top_logits, critical)


class RobustZPValue(RobustZStatistic):
    """robust_z: the statistic against its simulated null under a Gaussian bulk (no calibration data)."""

    name, code = "robust_z", ""

    def null(self, num_experts, fitted, device):
        return robust_z_null(num_experts, device)

    def critical(self, alpha, num_experts, null, device):
        return robust_z_critical_statistics(alpha, num_experts, device)  # cached per (alpha, E, device)


class EmpiricalPValue(RobustZStatistic):
    """empirical: the robust_z statistic against the layer's fitted null (permuted calibration logits)."""

    name, code, fitted = "empirical", "emp", True

    def fit(self, logits, generator):
        return NullTable.from_sample(robust_z_statistic(permute_experts(logits, generator)))


class PooledPValue(PValueMethod):
    """pooled: the raw logit against every raw logit of the layer on the calibration text (the public attempt's)."""

    name, code, fitted = "pooled", "pool", True

    def fit(self, logits, generator):
        return NullTable.from_sample(logits)

    def statistics(self, logits, scaled_logits, top_logits=None):
        return logits.to(scaled_logits.dtype)  # the pooled null is a null of the raw logit


def register(registry: dict, kind: type, item):
    """Make `item` (an instance of `kind` with a name) known in `registry` by its name, replacing an item of the
    same name: the one way a routing method or a p-value method is added."""
    if not isinstance(item, kind) or not item.name:
        raise ValueError(f"method must be a {kind.__name__} with a name, got {item!r}")
    registry[item.name] = item
    return item


def registered(registry: dict, argument: str, name: str):
    """The item of `registry` called `name`; ValueError naming the argument and the registered names otherwise."""
    if name not in registry:
        raise ValueError(f"{argument} must be one of {sorted(registry)}, got {name!r}")
    return registry[name]


PVALUE_METHODS: dict[str, PValueMethod] = {}


def register_pvalue_method(method: PValueMethod) -> PValueMethod:
    """Make `method` known by its name (replacing a method of the same name)."""
    return register(PVALUE_METHODS, PValueMethod, method)


def pvalue_method_of(name: str) -> PValueMethod:
    """The registered p-value method called `name`."""
    return registered(PVALUE_METHODS, "pvalue_method", name)


for _pvalue in (RobustZPValue(), OneMinusProbPValue(), EmpiricalPValue(), PooledPValue()):
    register_pvalue_method(_pvalue)


def compute_p_values(
    router_logits: torch.Tensor,
    pvalue_method: str = DEFAULT_PVALUE_METHOD,
    temperature: float = 1.0,
    null: NullTable | None = None,
) -> torch.Tensor:
    """Per-expert p-values for "expert i is not relevant to this token".

    Args:
        router_logits: [..., E] router logits (any float dtype; computed in float32, or float64 if given).
        pvalue_method: a registered p-value method (`PVALUE_METHODS`): "robust_z" (default),
            "one_minus_prob" (the design's formula), "empirical" (robust_z's statistic against the layer's
            fitted null), "pooled" (the raw logit against the layer's pooled logits); see section 3's notes.
        temperature: softmax temperature; of these, only "one_minus_prob" depends on it.
        null: the layer's fitted NullTable for a fitted method (`RoutingCalibration.null`).
    Returns:
        [..., E] p-values in (0, 1], float32 (float64 for float64 input), in expert order.
    """
    _check_logits(router_logits, any_rank=True)
    method = pvalue_method_of(pvalue_method)
    check_temperature(temperature)
    table = method.null(router_logits.shape[-1], null, router_logits.device)
    scaled_logits = _work_logits(router_logits, temperature)  # [..., E]
    return method.p_values(method.statistics(router_logits, scaled_logits), table)


# ----------------------------------------------------------------------------------------------------
# 4. Calibration: tables fitted to each layer on calibration text disjoint from the evaluation
# ----------------------------------------------------------------------------------------------------
#
# nulls: each fitted p-value method's null per layer (`PValueMethod.fit`).
# skip_beta: each layer's median over calibration tokens of w2 / w1 (dynamic skipping, beta="median").
# entropy_knots: each layer's quantiles of the router entropy (entropy-adaptive k).


def permute_experts(router_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each expert's column permuted independently across tokens: [N, E] -> [N, E]. Keeps every expert's
    marginal distribution and removes what is specific to a token (the null of "no token-specific signal")."""
    order = torch.rand(router_logits.shape, generator=generator).argsort(dim=0).to(router_logits.device)
    return router_logits.gather(0, order)


def router_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's routing distribution: [..., E] -> [...]."""
    return -torch.xlogy(probabilities, probabilities).sum(dim=-1)


ENTROPY_QUANTILES = 256  # the entropy-adaptive k's resolution: bands of 1/256 of the calibration tokens


@dataclass
class RoutingCalibration:
    """Per-layer tables fitted on calibration text (`fit_routing_calibration`) for the methods that read the
    model's own routers: BH and HC with a fitted p-value ("empirical", "pooled"), dynamic skipping with
    beta="median", entropy-adaptive k. Saved and loaded with `save` / `load` (a small torch file)."""

    nulls: dict[str, list[NullTable]]  # per fitted p-value method, per layer
    skip_beta: list[float]  # per layer: median of w2 / w1
    entropy_knots: torch.Tensor  # [L, ENTROPY_QUANTILES + 1] router-entropy quantiles (nats)
    info: dict  # num_tokens, num_experts, seed and what the caller adds (text, model)
    # Experts per layer by allocation (e.g. bh_allocation's "schedule"): [S, L] rows of rising total.
    allocations: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = "fitted in this process"  # where it came from (the file `load` read), for the messages of `check`

    @property
    def num_layers(self) -> int:
        return len(self.skip_beta)

    def null(self, pvalue_method: str, layer: int) -> NullTable:
        """The layer's fitted null of a fitted p-value method (e.g. "empirical", "pooled")."""
        if pvalue_method not in self.nulls:
            raise ValueError(
                f"pvalue_method must be one of {tuple(self.nulls)} for this calibration, got {pvalue_method!r}"
            )
        return self.nulls[pvalue_method][layer]

    def allocation(self, name: str, budget: float) -> list[float]:
        """Experts per layer of allocation `name` at an average of `budget` experts per token: its row of that
        average, or the linear mix of the two rows around it (a layer then keeps a fractional budget)."""
        if name not in self.allocations:
            fitted = sorted(self.allocations) or "[] (none fitted: bh_allocation.fit_allocations adds them)"
            raise ValueError(f"allocation must be one of {fitted} for this calibration, got {name!r}")
        table = self.allocations[name].double()  # [S, L], S >= 2 rows of rising average
        averages = table.mean(dim=-1)  # [S]
        low, high = float(averages[0]), float(averages[-1])
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not low - 1e-9 <= budget <= high + 1e-9:
            raise ValueError(
                f"budget must be a number in [{low:g}, {high:g}] for the {name!r} allocation, got {budget!r}"
            )
        above = int(torch.searchsorted(averages, torch.tensor(float(budget), dtype=torch.float64)))
        upper = min(max(above, 1), len(averages) - 1)
        share = float((budget - averages[upper - 1]) / (averages[upper] - averages[upper - 1]))
        return torch.lerp(table[upper - 1], table[upper], min(max(share, 0.0), 1.0)).tolist()

    def check(self, num_layers: int | None = None, num_experts: int | None = None) -> RoutingCalibration:
        """ValueError naming the calibration's source and what differs, unless its tables agree on the number of
        layers (and with `num_layers`, the model's MoE layers) and it was fitted on `num_experts` selectable
        experts (if given: `MoERouterPatcher.shape.num_experts`). Returns the calibration."""
        layers = {"skip_beta": len(self.skip_beta), "entropy_knots": int(self.entropy_knots.shape[0])}
        layers |= {f"nulls[{name!r}]": len(tables) for name, tables in self.nulls.items()}
        layers |= {f"allocations[{name!r}]": int(table.shape[-1]) for name, table in self.allocations.items()}
        if len(set(layers.values())) > 1:
            raise ValueError(f"calibration ({self.source}) has tables of different numbers of layers: {layers}")
        if num_layers is not None and self.num_layers != num_layers:
            raise ValueError(
                f"calibration ({self.source}) has {self.num_layers} layers, this model {num_layers} MoE layers"
            )
        fitted = self.info.get("num_experts")
        if num_experts is not None and fitted != num_experts:
            raise ValueError(
                f"calibration ({self.source}) was fitted on {fitted} experts per layer; this model's routers choose "
                f"among {num_experts}: fit one on this model (fit_routing_calibration)"
            )
        return self

    def save(self, path: str | Path) -> Path:
        """Write the tables to `path` with torch.save (no pickled code: `load` reads them with weights_only)."""
        nulls = {name: [(t.first, t.step, t.log_survival) for t in tables] for name, tables in self.nulls.items()}
        state = {"nulls": nulls, "skip_beta": self.skip_beta, "entropy_knots": self.entropy_knots, "info": self.info}
        torch.save(state | {"allocations": self.allocations}, path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RoutingCalibration:
        """The calibration `save` wrote to `path`, its tables checked (`check`); ValueError naming the file if it
        cannot be read or lacks a table."""
        try:
            state = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch.load's errors (OSError, RuntimeError, UnpicklingError...) name no file
            raise ValueError(f"{path}: not a readable calibration file ({type(error).__name__}: {error})") from error
        found = set(state) if isinstance(state, dict) else set()
        missing = sorted({"nulls", "skip_beta", "entropy_knots", "info"} - found)
        if missing:
            raise ValueError(f"{path}: not a calibration file written by RoutingCalibration.save: it lacks {missing}")
        nulls = {name: [NullTable(*table) for table in tables] for name, tables in state["nulls"].items()}
        tables = {"skip_beta": state["skip_beta"], "entropy_knots": state["entropy_knots"], "info": state["info"]}
        return cls(nulls, **tables, allocations=state.get("allocations", {}), source=str(path)).check()


def fit_routing_calibration(router_logits: list[torch.Tensor], seed: int = 0, info: dict | None = None):
    """A RoutingCalibration from each layer's router logits on calibration text ([N, E] per layer, e.g.
    `bh_experiment.collect_router_logits`): every fitted p-value method's null, in registry order, and the
    tables of dynamic skipping and entropy-adaptive k. Deterministic for a given seed (the permutations)."""
    if not router_logits or any(t.dim() != 2 or t.shape[0] < 2 for t in router_logits):
        raise ValueError("router_logits must be a non-empty list of [tokens >= 2, num_experts] tensors, one per layer")
    generator = torch.Generator().manual_seed(seed)
    fitted = [method for method in PVALUE_METHODS.values() if method.fitted]
    nulls, skip_beta, knots = {method.name: [] for method in fitted}, [], []
    levels = torch.linspace(0, 1, ENTROPY_QUANTILES + 1, dtype=torch.float64)
    for logits in router_logits:
        logits = logits.detach().float().cpu()
        for method in fitted:
            nulls[method.name].append(method.fit(logits, generator))
        top = torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1).values  # [N, 2]
        skip_beta.append(float((top[:, 1] / top[:, 0]).median()))
        entropy = router_entropy(torch.softmax(logits.double(), dim=-1))
        knots.append(torch.quantile(entropy, levels).float())
    num_tokens, num_experts = router_logits[0].shape
    info = {"num_tokens": int(num_tokens), "num_experts": int(num_experts), "seed": seed} | (info or {})
    return RoutingCalibration(nulls, skip_beta, torch.stack(knots), info)


# ----------------------------------------------------------------------------------------------------
# 5. How one layer routes: the routing functions behind every method
# ----------------------------------------------------------------------------------------------------


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


def _bh_count(method: PValueMethod, logits, scaled_logits, top_logits, alpha, critical, with_stats):
    """BH's number of rejections per token, and (when the full path ran) each expert's first passing rank
    and the statistics. The p-values are never materialised (section 3's notes)."""
    # A shortcut branches on the data (free on the CPU): eager only, never in a compiled graph.
    if scaled_logits.device.type == "cpu" and not torch.compiler.is_compiling() and not with_stats:
        count = method.fast_count(scaled_logits, top_logits, critical)
        if count is not None:
            return count, None, None
    # No data-dependent branch here: no host synchronisation on a GPU, one graph under torch.compile.
    statistics = method.statistics(logits, scaled_logits, top_logits)  # [..., E]
    first_rank = method.first_passing_rank(statistics, critical, alpha)
    return fast_bh_count(first_rank), first_rank, statistics


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
    NullTable for a fitted p-value method ("empirical", "pooled").
    """
    num_experts = logits.shape[-1]
    method = pvalue_method_of(pvalue_method)
    scaled_logits = _work_logits(logits, temperature)  # [..., E]
    probabilities = torch.softmax(scaled_logits, dim=-1)  # [..., E]
    # One top-k gives the experts to keep (most probable first) and the logits the statistic trims.
    top_logits, top_index = torch.topk(scaled_logits, max(max_k, method.top_width(num_experts)), dim=-1)
    if critical is None:
        critical = method.critical(alpha, num_experts, method.null(num_experts, null, "cpu"), logits.device)
    num_significant, first_rank, statistics = _bh_count(
        method, logits, scaled_logits, top_logits, alpha, critical, with_stats
    )
    expert_counts = num_significant.clamp(min_k, max_k)
    top_probabilities = probabilities.gather(-1, top_index[..., :max_k])
    top_weights, kept_index = _keep_top(
        top_probabilities, top_index[..., :max_k], expert_counts, num_experts, renormalize
    )
    extra_stats = {}
    if with_stats:
        p_values = method.p_values(statistics, method.null(num_experts, null, logits.device))
        extra_stats = {
            "p_values": p_values,
            "bh_threshold": _bh_critical_value(num_significant, alpha, num_experts, p_values.dtype),
            "significant_mask": first_rank <= num_significant.unsqueeze(-1),
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
    method = pvalue_method_of(pvalue_method)
    searched = _hc_searched(beta, num_experts)
    scaled_logits = _work_logits(logits, temperature)  # [..., E]
    probabilities = torch.softmax(scaled_logits, dim=-1)
    width = max(max_k, searched, method.top_width(num_experts))
    top_logits, top_index = torch.topk(scaled_logits, width, dim=-1)  # [..., width]
    top_statistics = method.top_statistics(logits, scaled_logits, top_logits, top_index)
    sorted_p = method.p_values(top_statistics, method.null(num_experts, null, logits.device))  # ascending
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


def route_entropy(logits, knots, temperature, min_k, max_k, renormalize, bands=None) -> Routing:
    """Entropy-adaptive k: a token whose router entropy lies at quantile q of the layer's calibration
    entropies (knots: [Q + 1] quantiles at 0, 1/Q, ..., 1) keeps min_k + floor(q * bands) experts, clamped
    to max_k, the more uncertain router getting more experts. bands = max_k - min_k + 1 (None) splits the
    calibration tokens evenly between the counts; another (any number > 0) moves the layer's average."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    entropy = router_entropy(probabilities).contiguous()  # [...]
    below = torch.searchsorted(knots.to(entropy.dtype), entropy, right=True)  # knots <= entropy
    quantile = ((below - 1).clamp_min(0) / (knots.numel() - 1)).to(entropy.dtype)  # [...] in [0, 1]
    num_bands = max_k - min_k + 1 if bands is None else bands
    expert_counts = (min_k + torch.floor(quantile * num_bands).long()).clamp(min_k, max_k)
    return _routing_of_counts(probabilities, expert_counts, max_k, renormalize, {"entropy": entropy})


_GOLDEN = 0.6180339887498949  # frac(r * golden ratio): an evenly spread, content-free sequence in [0, 1)


def route_layer_budget(logits, budget: float, temperature, renormalize, width: int | None = None) -> Routing:
    """A fixed budget of experts per token for one layer, unrelated to the token: floor(budget) experts, one
    more for a share frac(budget) of the tokens chosen by position (row r of the call gets it when
    frac(r * 0.618...) < frac(budget)), the most probable ones, in `width` slots (None: ceil(budget), at
    least 1). The baseline at equal per-layer budget, for evaluation: in one-token decode steps every token
    is row 0 and gets the extra expert."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    rows = torch.arange(math.prod(logits.shape[:-1]), device=logits.device, dtype=torch.float64)
    extra = torch.remainder(rows * _GOLDEN, 1.0) < (budget - math.floor(budget))
    expert_counts = (math.floor(budget) + extra.long()).reshape(logits.shape[:-1]).clamp_min(0)
    width = max(1, math.ceil(budget)) if width is None else width
    return _routing_of_counts(probabilities, expert_counts, width, renormalize)


def route_alloct(logits, budget: float, temperature, min_k, max_k, renormalize) -> Routing:
    """Alloc-T's token-level redistribution within a layer's budget (Liu et al. 2026, "Alloc-MoE",
    arXiv 2604.08133, as its summary states it: a global top-(K x T) of the routing scores): the call's T
    tokens share round(budget x T) experts, every token keeping its min_k most probable and the other slots
    going to the highest probabilities of all tokens together, at most max_k per token. A token's count depends
    on the other tokens of the call: in a one-token decode step it is round(budget)."""
    probabilities = torch.softmax(_work_logits(logits, temperature), dim=-1)  # [..., E]
    flat = probabilities.reshape(-1, probabilities.shape[-1])  # [T, E]
    num_tokens, spare_slots = flat.shape[0], max_k - min_k
    top_probabilities, top_index = torch.topk(flat, max_k, dim=-1)  # [T, K], most probable first
    expert_counts = torch.full((num_tokens,), min_k, dtype=torch.int64, device=logits.device)
    extra = min(max(round(budget * num_tokens) - min_k * num_tokens, 0), num_tokens * spare_slots)
    if extra and spare_slots:  # Python ints from the shapes: no data-dependent branch
        pool = top_probabilities[:, min_k:].reshape(-1)  # [T (K - min_k)]: each token's slots past its floor
        given = torch.topk(pool, extra).indices // spare_slots  # the token of each slot given
        expert_counts = expert_counts.index_add(0, given, torch.ones_like(given))
    top_weights, kept_index = _keep_top(top_probabilities, top_index, expert_counts, flat.shape[-1], renormalize)
    shape = (*logits.shape[:-1], max_k)
    return Routing(top_weights.reshape(shape), kept_index.reshape(shape), expert_counts.reshape(logits.shape[:-1]),
                   probabilities, {})  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# 6. Routing methods: one object per method, in a registry
# ----------------------------------------------------------------------------------------------------


ANY_NUM_EXPERTS = 1 << 16  # a model of any size (`RouterShape.of(None)`): no bound of E or k is known yet


@dataclass(frozen=True)
class RouterShape:
    """What a routing method knows of the routers it replaces, the same in every layer."""

    num_experts: int  # the experts a token may choose from (E', fewer than E for group-limited routers)
    native_top_k: int = NATIVE_TOP_K
    norm_topk_prob: bool = False  # the model renormalises its kept weights (renormalize=None follows it)
    native_slices: bool = False  # the router's own output is its top-k softmax probabilities, sorted and
    # unscaled, so that its first k slots are top-k at k (`RouterSpec.plain` and `sorted_output`)
    known: bool = True  # False: a model of any size (`RoutingConfig.of` without a shape), whose own top-k
    # and experts bound nothing yet: the patcher checks them against its model

    @classmethod
    def of(cls, shape) -> RouterShape:
        """The RouterShape of `shape`: a RouterShape (e.g. `patcher.shape`), a `MoEShape` (`moe_shape(config)`),
        or None for a model of any size."""
        if shape is None:
            return cls(ANY_NUM_EXPERTS, ANY_NUM_EXPERTS, known=False)
        if isinstance(shape, MoEShape):
            return cls(shape.selectable, shape.top_k)
        if not isinstance(shape, RouterShape):
            raise ValueError(f"shape must be a RouterShape, a MoEShape (moe_shape(config)) or None, got {shape!r}")
        return shape


@dataclass(frozen=True)
class LayerContext:
    """What a routing method sees of one MoE layer when it builds that layer's route (`layer_route`): the
    patcher builds one per layer, `route_logits` one for the layer it is given."""

    layer: int
    shape: RouterShape
    device: torch.device
    calibration: RoutingCalibration | None = None  # the model's fitted tables, read at `layer`
    num_layers: int | None = None  # the model's MoE layers (None: not known, e.g. one layer's logits alone)
    fused: bool = False  # the layer may route with a fused kernel (`fused_bh_route`) where its method has one


def resolve_renormalize(renormalize: bool | None, shape: RouterShape) -> bool:
    """Whether a configuration renormalises its kept weights: as the model does (None), or as given (True or
    False; ValueError naming `renormalize` for anything else, e.g. the text "false")."""
    if renormalize is not None and not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be True, False or None (as the model), got {renormalize!r}")
    return shape.norm_topk_prob if renormalize is None else renormalize


def _percent_code(value: float | tuple) -> str:
    """0.05 -> '005': the design's way of writing alpha (and p) in configuration names; a value that is not
    a whole percentage keeps its digits (0.001 -> '0p001'), so that different values never share a name; one
    value per layer is written 'L' and a checksum of the values."""
    if _layered(value):
        return f"L{zlib.crc32(repr(tuple(value)).encode()):08x}"
    percent = round(value * 100)
    return f"{percent:03d}" if math.isclose(value * 100, percent, abs_tol=1e-9) else f"{value:g}".replace(".", "p")


class RoutingMethod:
    """A routing method: its name, its parameters, how it routes, and how its configurations are named.

    Subclass, then `register_routing_method(Subclass())`; the patcher (`MoERouterPatcher.patch(name,
    **params)`), `RoutingConfig.of(name, **params)`, `route_logits` and the experiment's tables then know it.
    A method sees one layer at a time (`LayerContext`), never the patcher.
    """

    name = ""
    changes_routing = True  # False: the model's own router runs unchanged (the native baseline)
    is_baseline = False  # a reference curve of the equal-compute comparison (`frontier_table`)
    per_layer: tuple[str, ...] = ()  # parameters that may be given one value per MoE layer (a tuple), e.g. BH's alpha
    per_token = True  # how many experts a token keeps depends on the token (False: on its layer alone)

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

    def layer_tables(self, params: dict, context: LayerContext) -> dict:
        """The constants a configuration routes the context's layer with, from its calibration ({} if none)."""
        use, calibration, layer = self.calibration_use(params), context.calibration, context.layer
        if use is not None and calibration is None:
            raise ValueError(
                f"method {self.name!r} with {params} uses {use}: give a RoutingCalibration "
                "(calibration=fit_routing_calibration(...), e.g. MoERouterPatcher(model, calibration=...))"
            )
        if use is not None and not 0 <= layer < calibration.num_layers:
            raise ValueError(f"layer must be in [0, {calibration.num_layers}) for this calibration, got {layer!r}")
        return {}

    def layer_params(self, params: dict, context: LayerContext) -> dict:
        """`params` with each per-layer parameter given as a tuple replaced by the context's layer's value."""
        layered = {}
        for name in self.per_layer:
            values = params.get(name)
            if _layered(values):
                layers = context.num_layers if context.num_layers is not None else len(values)
                if len(values) != layers or not 0 <= context.layer < len(values):
                    raise ValueError(
                        f"{name} has {len(values)} values, one per MoE layer, for a model of {layers} MoE layers "
                        f"(layer {context.layer})"
                    )
                layered[name] = values[context.layer]
        return params | layered

    def layer_route(self, params: dict, context: LayerContext, compiled: bool = False) -> Callable:
        """The function one MoE layer routes with, built at patch time with the layer's tables on its device:
        (selection_logits [T, E'], native_weights [T, k], native_index [T, k]) -> (top_weights [T, K],
        top_index [T, K], expert_counts [T] or None when every token keeps K). Only a method
        `in_expert_space` reads the router's own weights and index, unless its function is marked
        `reads_native = False` (an eager call passes None else, and a CUDA graph replays it).

        It must trace under torch.compile(fullgraph=True) and replay in a CUDA graph: tensor ops only, no
        host sync, no Python state changed. compiled: the function runs eagerly (not inside a compiled
        model) and may fuse itself with torch.compile.

        A route whose function is marked `nonfinite_rule = True` (the fused BH kernel, top-k below the router's
        k) applies the patcher's rule for rows with a non-finite logit itself (`PatchedRouter.finite_fallback`):
        given the raw logits and `nonfinite_width=`, it returns those rows [T] bool as a fourth output."""
        tables = _tables_to(self.layer_tables(params, context), context)
        # A route reaching only objects of its own layer (the method through the registry, one global): a
        # compiled forward checks every object it reads at every decode step, and an object that several
        # layers share costs each layer an identity check evaluated in Python.
        return functools.partial(_route_with_tables, self.name, self.layer_params(params, context), tables)

    def layered(self, params: dict) -> str | None:
        """The first of `per_layer` that `params` give one value per MoE layer (None: every one given once)."""
        return next((name for name in self.per_layer if _layered(params.get(name))), None)

    def baseline(self, params: dict) -> str | None:
        """The reference curve of the equal-compute comparison this configuration is a point of (None: none). A
        baseline with a parameter per layer is a rule to compare, not a point of its curve."""
        return self.name if self.is_baseline and self.layered(params) is None else None

    def in_expert_space(self, params: dict, shape: RouterShape) -> bool:
        """Whether `layer_route` returns experts of the router's own output (the patcher then applies no
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

    def per_layer_words(self, params: dict) -> str:
        """What a series adds when a parameter is given per layer (', alpha per layer'), else ''."""
        name = self.layered(params)
        return "" if name is None else f", {name} per layer"


def _route_with_tables(method: str, params: dict, tables: dict, logits, native_weights, native_index):
    """A layer route of `RoutingMethod.layer_route`: the registered method's Routing of the logits, as tensors."""
    # A method that reads no tables may define route(logits, params, with_stats=False) without them.
    routing = ROUTING_METHODS[method].route(logits, params, **({"tables": tables} if tables else {}))
    return routing.top_weights, routing.top_index, routing.expert_counts


def _tables_to(tables: dict, context: LayerContext) -> dict:
    """A layer's tables with every tensor (and NullTable) on the layer's device: the layer's own
    (`layer_tensor`), even where layers share a table (the pooled null), so that no two layers' routes read
    one object."""
    return {name: _owned_copy(value, (name, context.layer), context.device) for name, value in tables.items()}


def _owned_copy(value, place: tuple, device):
    if isinstance(value, NullTable):
        return NullTable(value.first, value.step, layer_tensor(place, value.log_survival, device))
    return layer_tensor(place, value, device) if isinstance(value, torch.Tensor) else value


KEPT_PER_PLACE = 16  # distinct values kept for one place (a layer's table): configurations alternated in turn
_kept_tensors: dict[tuple, list[torch.Tensor]] = {}


def layer_tensor(place: tuple, tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device` as the tensor of `place` (a table and its layer): the same object an earlier patch
    got there for equal values, else a copy of its own. A compiled model's CUDA graphs hold these tensors by
    address (static inputs); a fresh copy at every patch made each switch back to a configuration record its
    decode graph again, and every later decode step check the stale graph first (`benchmarks/gpu_notes.md`)."""
    tensor = tensor.to(device)
    kept = _kept_tensors.setdefault((place, str(tensor.device), tensor.dtype, tuple(tensor.shape)), [])
    same = next((old for old in kept if torch.equal(old, tensor)), None)
    if same is None:
        same = tensor.clone()
        kept.append(same)
        del kept[:-KEPT_PER_PLACE]
    return same


ROUTING_METHODS: dict[str, RoutingMethod] = {}


def register_routing_method(method: RoutingMethod) -> RoutingMethod:
    """Make `method` known by its name (replacing a method of the same name)."""
    return register(ROUTING_METHODS, RoutingMethod, method)


def routing_method(name: str) -> RoutingMethod:
    """The registered method called `name`."""
    return registered(ROUTING_METHODS, "method", name)


def _pvalue_code(pvalue_method: str) -> str:
    """How a configuration name writes its p-value method (the method's code; the name of an unknown one)."""
    return PVALUE_METHODS[pvalue_method].code if pvalue_method in PVALUE_METHODS else str(pvalue_method)


def _check_pvalue_params(pvalue_method: str, num_experts: int) -> None:
    pvalue_method_of(pvalue_method).check(num_experts)  # refuses too few experts before any forward pass


def _null_tables(params: dict, context: LayerContext) -> dict:
    """{"null": the layer's fitted NullTable} for a fitted p-value method, else {}."""
    if not pvalue_method_of(params["pvalue_method"]).fitted:
        return {}
    return {"null": context.calibration.null(params["pvalue_method"], context.layer)}


def _bh_layer_route(route, critical, constants, logits, native_weights, native_index):
    """A layer route of `BenjaminiHochbergMethod.layer_route`: `route_bh_tensors` with the layer's critical
    statistics (built at patch time, so that no call looks up a cache)."""
    return route(logits, critical, *constants)


def _fused_bh_layer_route(critical, constants, logits, native_weights, native_index, nonfinite_width=None):
    """`_bh_layer_route` in one kernel (`fused_bh_route`), for a method whose statistic is robust_z's; with the
    non-finite rule given `nonfinite_width` (`RoutingMethod.layer_route`; None: the caller masked such rows)."""
    _, temperature, min_k, max_k, _, renormalize = constants
    width, trimmed = max_k if nonfinite_width is None else nonfinite_width, robust_z_trimmed(logits.shape[-1])
    routed = fused_bh_route(logits, critical, temperature, min_k, max_k, renormalize, trimmed, width)
    return routed if nonfinite_width is not None else routed[:3]


_fused_bh_layer_route.nonfinite_rule = True  # `RoutingMethod.layer_route`


class BenjaminiHochbergMethod(RoutingMethod):
    """BH over the E tests "expert i is not relevant to this token" (`benjamini_hochberg_routing`)."""

    name = "bh"
    per_layer = ("alpha",)

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
        alpha = _per_layer(alpha, _check_alpha)
        check_temperature(temperature)
        _check_k_bounds(min_k, max_k, shape.num_experts)
        _check_pvalue_params(pvalue_method, shape.num_experts)
        params = dict(alpha=alpha, temperature=temperature, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method)
        return params | {"renormalize": resolve_renormalize(renormalize, shape)}

    def calibration_use(self, params):
        fitted = pvalue_method_of(params["pvalue_method"]).fitted
        return f"the layer's fitted {params['pvalue_method']!r} null" if fitted else None

    def layer_tables(self, params, context):
        return RoutingMethod.layer_tables(self, params, context) | _null_tables(params, context)

    def route(self, logits, params, with_stats=False, tables=None):
        return route_bh(logits, with_stats=with_stats, null=(tables or {}).get("null"), **params)

    def layer_route(self, params, context, compiled=False):
        params = self.layer_params(params, context)
        constants = tuple(
            params[name] for name in ("alpha", "temperature", "min_k", "max_k", "pvalue_method", "renormalize")
        )
        # The layer's critical statistics on its device, built now rather than in a timed forward, and the
        # layer's own copy (see RoutingMethod.layer_route).
        method, num_experts = pvalue_method_of(params["pvalue_method"]), context.shape.num_experts
        null = self.layer_tables(params, context).get("null")
        critical = method.critical(params["alpha"], num_experts, method.null(num_experts, null, "cpu"), context.device)
        critical = None if critical is None else layer_tensor(("critical", context.layer), critical, context.device)
        if context.fused and method.fused and num_experts <= FUSED_MAX_EXPERTS:  # one kernel, on CUDA (issue 29)
            return functools.partial(_fused_bh_layer_route, critical, constants)
        route = compile_once(route_bh_tensors) if compiled else route_bh_tensors
        return functools.partial(_bh_layer_route, route, critical, constants)

    def config_name(
        self, alpha=0.05, max_k=16, min_k=1, pvalue_method=DEFAULT_PVALUE_METHOD, temperature=1.0, renormalize=None
    ) -> str:
        """The design's bh_k{max_k}_a{alpha*100:03d}; 'bh1mp' for the design's own p-value, 'bhemp' and
        'bhpool' for the fitted nulls; a suffix for each other parameter that differs from its default
        (e.g. _min4 for min_k = 4)."""
        prefix = "bh" + _pvalue_code(pvalue_method)
        return f"{prefix}_k{max_k}_a{_percent_code(alpha)}" + config_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return f"BH ({params['pvalue_method']})" + self.per_layer_words(params)


def _require_for_name(method: str, **needed) -> None:
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ValueError(f"a {method!r} configuration's name needs {missing} (e.g. the model's top-k), got none")


def config_suffix(min_k: int, default_min_k: int, temperature: float, renormalize: bool | None) -> str:
    """The end of a configuration's name for the common parameters that differ from their defaults."""
    suffix = f"_min{min_k}" if min_k != default_min_k else ""
    suffix += f"_t{temperature:g}" if temperature != 1.0 else ""
    return suffix + ("" if renormalize is None else "_renorm" if renormalize else "_raw")


def _native_slots(k: int, logits, native_weights, native_index):
    """The router's own first k slots: top-k at its own k (`TopKMethod.in_expert_space`; the patcher observes it)."""
    return native_weights[..., :k], native_index[..., :k], None


def _router_top_k(k: int, native_k: int, logits, native_weights, native_index, nonfinite_width=None):
    """Top-k below the router's own k (`native_k`; `TopKMethod.in_expert_space`): the router's first k slots as
    it computes them (float32 softmax, top-k at native_k: ties ordered alike) over the finite logits, so that one
    top-k is also the non-finite rule's, of width k (`nonfinite_rule`): a compiled forward drops the router's."""
    finite_logits = torch.isfinite(logits)
    probabilities = torch.softmax(logits.float().masked_fill(~finite_logits, -math.inf), dim=-1)  # NaN: none finite
    # A non-finite logit ranks after every finite one, even one whose probability underflows to 0.
    index = probabilities.masked_fill(~finite_logits, -1.0).topk(native_k, dim=-1).indices[..., :k]
    routed = (probabilities.gather(-1, index).nan_to_num(0.0), index, None)
    return routed if nonfinite_width is None else (*routed, ~finite_logits.all(dim=-1))


_router_top_k.nonfinite_rule = True  # `RoutingMethod.layer_route`
_router_top_k.reads_native = False  # in expert space, yet computed from the logits alone: `PatchedRouter` graphs it


def _without_counts(route, logits, native_weights, native_index):
    """A layer route whose every token keeps its K slots: no counts (the statistics read K)."""
    return route(logits, native_weights, native_index)[:2] + (None,)


class TopKMethod(RoutingMethod):
    """The k most probable experts (`topk_routing`; the native router truncated to k)."""

    name = "topk"
    is_baseline = True
    per_token = False

    def parameters(self, shape, k=None, temperature=1.0, renormalize=None) -> dict:
        k = shape.native_top_k if k is None else k
        _check_top_k(k, shape.num_experts)
        check_temperature(temperature)
        renormalize = resolve_renormalize(renormalize, shape)
        return dict(k=k, temperature=temperature, min_k=k, max_k=k, renormalize=renormalize)

    def route(self, logits, params, with_stats=False, tables=None):
        return route_topk(logits, params["k"], params["temperature"], params["renormalize"])

    def in_expert_space(self, params, shape):
        # The router's own output is this routing at its own k (any family: same slots, same weights, bit for
        # bit), and its first k slots are at a smaller k for a plain softmax router, sorted, not renormalised.
        k, renormalize = params["k"], params["renormalize"]
        native = params["temperature"] == 1.0 and renormalize == shape.norm_topk_prob
        sliceable = native and not renormalize and shape.native_slices
        return native and (k == shape.native_top_k or (sliceable and k < shape.native_top_k))

    def layer_route(self, params, context, compiled=False):
        if not self.in_expert_space(params, context.shape):
            return functools.partial(_without_counts, super().layer_route(params, context))
        if params["k"] == context.shape.native_top_k:
            return functools.partial(_native_slots, params["k"])
        return functools.partial(_router_top_k, params["k"], context.shape.native_top_k)  # with the non-finite rule

    def config_name(self, k=None, temperature=1.0, renormalize=None) -> str:
        _require_for_name(self.name, k=k)
        return f"topk_k{k}" + config_suffix(1, 1, temperature, renormalize)

    def series(self, params):
        return "top-k"


class TopPMethod(RoutingMethod):
    """The fewest most probable experts reaching probability mass p (`topp_routing`; Huang et al. 2024)."""

    name = "topp"
    is_baseline = True
    per_layer = ("p",)

    def parameters(self, shape, p=0.5, temperature=1.0, min_k=1, max_k=None, renormalize=None) -> dict:
        p = _per_layer(p, _check_top_p)
        check_temperature(temperature)
        max_k = shape.num_experts if max_k is None else max_k
        _check_k_bounds(min_k, max_k, shape.num_experts)
        renormalize = resolve_renormalize(renormalize, shape)
        return dict(p=p, temperature=temperature, min_k=min_k, max_k=max_k, renormalize=renormalize)

    def route(self, logits, params, with_stats=False, tables=None):
        return route_topp(logits, **params)

    def config_name(self, p=0.5, temperature=1.0, min_k=1, max_k=None, renormalize=None) -> str:
        name = f"topp_p{_percent_code(p)}" + ("" if max_k is None else f"_max{max_k}")
        return name + config_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return "top-p" + self.per_layer_words(params)


class NativeMethod(TopKMethod):
    """The model's own routing, unchanged and observed (the sweep's baseline)."""

    name = "native"
    changes_routing = False
    is_baseline = False

    def parameters(self, shape, k=None) -> dict:
        if k is not None and shape.known and k != shape.native_top_k:
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


def _check_bands(bands) -> None:
    if not isinstance(bands, (int, float)) or isinstance(bands, bool) or not 0 < bands <= 1024:
        raise ValueError(f"bands must be a number in (0, 1024] (counts per calibration quantile), got {bands!r}")


def _check_skip_beta(beta) -> None:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 < beta <= 1:
        raise ValueError(f"beta must be a number in (0, 1] or 'median' (each layer's calibrated w2/w1), got {beta!r}")


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
        check_temperature(temperature)
        params = dict(beta=beta, min_k=min_k, max_k=max_k, pvalue_method=pvalue_method, temperature=temperature)
        return params | {"renormalize": resolve_renormalize(renormalize, shape)}

    calibration_use = BenjaminiHochbergMethod.calibration_use
    layer_tables = BenjaminiHochbergMethod.layer_tables

    def route(self, logits, params, with_stats=False, tables=None):
        return route_hc(logits, with_stats=with_stats, null=(tables or {}).get("null"), **params)

    def config_name(
        self, beta=0.3, max_k=None, min_k=1, pvalue_method=DEFAULT_PVALUE_METHOD, temperature=1.0, renormalize=None
    ) -> str:
        name = "hc" + _pvalue_code(pvalue_method) + f"_b{_percent_code(beta)}"
        return name + ("" if max_k is None else f"_k{max_k}") + config_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        return f"HC ({params['pvalue_method']})"


class DynamicSkipMethod(RoutingMethod):
    """Dynamic skipping (`route_skip`): beta a number, or "median" for each layer's calibrated median of
    w2 / w1 (Lu et al. 2024, "Not All Experts are Equal", ACL 2024, section 4)."""

    name = "skip"
    per_layer = ("beta",)

    def parameters(self, shape, beta=0.3, k=None, min_k=1, temperature=1.0, renormalize=None) -> dict:
        beta = beta if beta == "median" else _per_layer(beta, _check_skip_beta)
        if beta == "median":
            _check_fitted_temperature(temperature)
        k = shape.native_top_k if k is None else k
        _check_top_k(k, shape.num_experts)
        _check_k_bounds(min_k, k, shape.num_experts)
        check_temperature(temperature)
        renormalize = resolve_renormalize(renormalize, shape)
        return dict(beta=beta, k=k, min_k=min_k, max_k=k, temperature=temperature, renormalize=renormalize)

    def calibration_use(self, params):
        return "each layer's median w2 / w1 (beta='median')" if params["beta"] == "median" else None

    def layer_tables(self, params, context):
        tables = super().layer_tables(params, context)
        median = params["beta"] == "median"
        return tables | ({"beta": context.calibration.skip_beta[context.layer]} if median else {})

    def route(self, logits, params, with_stats=False, tables=None):
        beta = (tables or {}).get("beta", params["beta"])
        if isinstance(beta, str):
            raise ValueError("beta='median' needs the layer's tables (layer_tables with a RoutingCalibration)")
        return route_skip(logits, beta, params["k"], params["temperature"], params["min_k"], params["renormalize"])

    def config_name(self, beta=0.3, k=None, min_k=1, temperature=1.0, renormalize=None) -> str:
        code = "med" if beta == "median" else _percent_code(beta)
        return f"skip_b{code}" + ("" if k is None else f"_k{k}") + config_suffix(min_k, 1, temperature, renormalize)

    def series(self, params):
        if params["beta"] == "median":
            return "dynamic skip (median beta)"
        return "dynamic skip" + self.per_layer_words(params)


class EntropyMethod(RoutingMethod):
    """Entropy-adaptive k (`route_entropy`), with each layer's calibrated entropy quantiles."""

    name = "entropy"
    per_layer = ("bands",)

    def parameters(self, shape, min_k=1, max_k=None, temperature=1.0, renormalize=None, bands=None) -> dict:
        max_k = shape.native_top_k if max_k is None else max_k
        _check_k_bounds(min_k, max_k, shape.num_experts)
        _check_fitted_temperature(temperature)
        bands = None if bands is None else _per_layer(bands, _check_bands)
        renormalize = resolve_renormalize(renormalize, shape)
        return dict(min_k=min_k, max_k=max_k, temperature=temperature, renormalize=renormalize, bands=bands)

    def calibration_use(self, params):
        return "each layer's router-entropy quantiles"

    def layer_tables(self, params, context):
        return super().layer_tables(params, context) | {"knots": context.calibration.entropy_knots[context.layer]}

    def route(self, logits, params, with_stats=False, tables=None):
        if not tables or "knots" not in tables:
            raise ValueError("method 'entropy' needs the layer's tables (layer_tables with a RoutingCalibration)")
        return route_entropy(logits, tables["knots"], **params)

    def config_name(self, max_k=None, min_k=1, temperature=1.0, renormalize=None, bands=None) -> str:
        name = "entropy" + ("" if max_k is None else f"_k{max_k}") + config_suffix(min_k, 1, temperature, renormalize)
        if bands is None:
            return name
        return name + "_bands" + (_percent_code(bands) if _layered(bands) else f"{bands:g}")

    def series(self, params):
        return "entropy k" + self.per_layer_words(params)


class LayerBudgetMethod(RoutingMethod):
    """Top-k at a given average per layer (`route_layer_budget`): budgets[l] experts per token in layer l,
    e.g. another configuration's per-layer averages, to compare it at equal per-layer budget."""

    name = "layerk"
    is_baseline = False
    per_token = False

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
        check_temperature(temperature)
        renormalize = resolve_renormalize(renormalize, shape)
        min_k, max_k = math.floor(min(budgets)), max(1, math.ceil(max(budgets)))
        return dict(budgets=budgets, min_k=min_k, max_k=max_k, temperature=temperature, renormalize=renormalize)

    def layer_tables(self, params, context):
        if not 0 <= context.layer < len(params["budgets"]):
            raise ValueError(f"layer {context.layer} has no budget: budgets has {len(params['budgets'])} layers")
        return {"budget": float(params["budgets"][context.layer])}

    def route(self, logits, params, with_stats=False, tables=None):
        if not tables or "budget" not in tables:
            raise ValueError("method 'layerk' routes one layer at a time: give the layer (route_logits(..., layer=))")
        return route_layer_budget(logits, tables["budget"], params["temperature"], params["renormalize"])

    def config_name(self, budgets=(), temperature=1.0, renormalize=None) -> str:
        return "layerk_" + "_".join(f"{b:.2f}" for b in budgets) + config_suffix(1, 1, temperature, renormalize)

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
    shape = RouterShape(router_logits.shape[-1], num_experts_per_tok)
    params = spec.parameters(shape, **params)
    context = LayerContext(layer, shape, router_logits.device, calibration)
    tables = _tables_to(spec.layer_tables(params, context), context)
    params = spec.layer_params(params, context)
    return spec.route(router_logits, params, with_stats, **({"tables": tables} if tables else {}))


_ALL_METHODS = (BenjaminiHochbergMethod(), TopKMethod(), TopPMethod(), NativeMethod())
_ALL_METHODS += (HigherCriticismMethod(), DynamicSkipMethod(), EntropyMethod(), LayerBudgetMethod())
for _method in _ALL_METHODS:
    register_routing_method(_method)


_WORDS = {"true": True, "false": False, "none": None}  # text booleans read strictly (bool("false") is True)


def _literal(text: str):
    """A configuration value from text: a Python literal, true / false / none in any case, else the text."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass(frozen=True)
class RoutingConfig:
    """One routing configuration: a name, a registered method and the parameters it sets."""

    name: str
    method: str
    params: tuple = ()  # (("alpha", 0.05), ("max_k", 8), ...): hashable, ordered

    @classmethod
    def of(cls, method: str, shape: RouterShape | MoEShape | None = None, **params) -> RoutingConfig:
        """A configuration named by its method's naming rule, e.g. RoutingConfig.of("bh", alpha=0.05, max_k=8).

        Every value is checked now, with the method's own messages (ValueError naming the argument): against the
        model `shape` describes (`moe_shape(config)`, or a patcher's `shape`) if given, else against a model of
        any size, whose own bounds (max_k <= E, the native k) the patcher checks when it patches."""
        spec = routing_method(method)
        spec.check_names(params)
        spec.parameters(RouterShape.of(shape), **params)
        return cls(spec.config_name(**params), method, tuple(params.items()))

    @classmethod
    def parse(cls, spec: str, shape: RouterShape | MoEShape | None = None) -> RoutingConfig:
        """A configuration from text, "method" or "method:name=value,...": e.g. "bh:alpha=0.05,max_k=8",
        "topk:k=2", "native:k=8", checked as `of` checks it. Values are read as Python literals (0.05, 8, True,
        None), the words true, false and none in any case as True, False and None; other text stays a string
        ("pvalue_method=robust_z")."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"spec must be 'method' or 'method:name=value,...', got {spec!r}")
        method, _, given = spec.partition(":")
        params = {}
        for item in filter(None, (part.strip() for part in given.split(","))):
            name, equals, text = item.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"spec must be 'method' or 'method:name=value,...', got {spec!r} (at {item!r})")
            params[name.strip()] = _literal(text.strip())
        return cls.of(method.strip(), shape, **params)

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    def apply(self, patcher: MoERouterPatcher) -> MoERouterPatcher:
        """Patch (or, for the native routing, observe) the patcher's model with this configuration."""
        return patcher.patch(self.method, **self.kwargs)


# ----------------------------------------------------------------------------------------------------
# 7. The design's routing functions: one contract for BH and the baselines
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


def compare_multi_k_statistics(results: dict[int, dict], baseline_k: int = NATIVE_TOP_K) -> dict[int, dict]:
    """One row per max_k of `run_bh_multi_k` results, {max_k: {"alpha", the metrics of
    `summarize_expert_counts`}}: a table as pandas reads it, `pandas.DataFrame.from_dict(rows, orient="index")`."""
    rows = {}
    for max_k, result in results.items():
        params = result["params"]
        summary = summarize_expert_counts(result["expert_counts"], params["min_k"], max_k, baseline_k)
        rows[max_k] = {"alpha": params["alpha"], **summary}
    return rows


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


# ----------------------------------------------------------------------------------------------------
# 8. The router patcher
# ----------------------------------------------------------------------------------------------------


def _require_transformers() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__.split("+")[0]) < Version(MIN_TRANSFORMERS):
        raise RuntimeError(
            f"MoERouterPatcher needs transformers >= {MIN_TRANSFORMERS} (its experts module must skip the "
            f"sentinel expert index); found {transformers.__version__}. pip install -r requirements.txt"
        )


_PATCHED_ROUTER_CLASSES: dict[type, type] = {}


def _refuse_pickling(self, protocol):
    """A patched model holds routes, CUDA graphs and hooks made at run time: saving it would save a patch that
    cannot be loaded (copy.deepcopy and torch.save pickle too)."""
    raise TypeError(
        "a patched model cannot be pickled or copied (pickle, torch.save(model), copy.deepcopy): call the "
        "patcher's unpatch() first, or save model.state_dict(), which patching leaves unchanged"
    )


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
        namespace["__reduce_ex__"] = _refuse_pickling
        _PATCHED_ROUTER_CLASSES[router_class] = type(f"Patched{router_class.__name__}", (router_class,), namespace)
    return _PATCHED_ROUTER_CLASSES[router_class]


def drop_copied_compiled_call(model: torch.nn.Module) -> bool:
    """Drop the compiled forward that transformers' generate keeps on `model` (`get_compiled_call`, as
    `model._compiled_call`) when it runs another model's forward; True if one was dropped.

    copy.deepcopy shares a function rather than copying it, so a copy of a model made after a compiled
    generate keeps the original's compiled call, bound to the original: every compiled decode step of the copy
    would run the original's modules, its routers included, and a patch of the copy would route its prompt
    alone. Dropped, generate compiles the copy's own forward. `MoERouterPatcher.patch` calls it."""
    compiled = getattr(model, COMPILED_CALL_ATTRIBUTE, None)
    bound_to = getattr(getattr(compiled, "__wrapped__", None), "__self__", model)  # torch.compile wraps the method
    if bound_to is model:
        return False
    delattr(model, COMPILED_CALL_ATTRIBUTE)
    return True


class PatchedRouter:
    """What one MoE layer's router does after its own forward while patched (`patched_router_class`): the
    method's route of the layer, the family's weighting of the kept experts, and the layer's statistics
    (`accumulate_routing`).

    Under torch.compile (a model compiled whole, e.g. by generate with a static cache) it is traced
    into the model's graph, with its plain route; run eagerly it calls its `eager` form: the route fused
    by torch.compile and replayed as one CUDA graph where the patcher uses them. The layer is
    held as this object, never as a Python int a compiled graph would specialise on.

    A compiled forward re-checks at every call each object the traced router reached (dynamo's guards): it
    reads plain attributes of this object, decided at patch time, and, apart from the patcher, no object that
    another layer reaches (each costs every layer an identity check evaluated in Python).
    """

    def __init__(self, patcher: MoERouterPatcher, index: int, routes: tuple, graphed: bool):
        layer, self.patcher, self.index = patcher.layers[index], patcher, index
        self.spec, self.renormalize = layer.spec, patcher.params.get("renormalize", False)
        params = patcher.params  # a row with non-finite logits keeps the native k, within [min_k, max_k]
        self.fallback_width = min(max(patcher.native_top_k, params["min_k"]), params["max_k"])
        self.family_weighting = not (layer.spec.plain or patcher.in_expert_space)
        self.route, eager_route = routes  # None, None: the native routing, observed
        function = getattr(self.route, "func", None)  # what the route says of itself: `RoutingMethod.layer_route`
        self.route_rules_nonfinite = getattr(function, "nonfinite_rule", False) and not self.family_weighting
        if self.route_rules_nonfinite:
            self.route = functools.partial(self.route, nonfinite_width=self.fallback_width)
            eager_route = functools.partial(eager_route, nonfinite_width=self.fallback_width)
        self.own_weights = self.route is None or patcher.in_expert_space  # the router's weights kept as they are
        self.accumulators = None
        if patcher.record_statistics:
            self.accumulators = patcher.statistics.allocate(index, layer.router.weight.device)
        # A route that slices the router's own output (`reads_native`, in expert space unless its function says
        # otherwise) is given it and not graphed: no kernel worth a graph. Every other route reads the logits
        # alone, so that a graph replaying it copies no other input. Top-k below the router's k (`_router_top_k`)
        # is one: launched kernel by kernel, its eager route lengthened a prefill against BH's graphed one.
        self.reads_native = patcher.in_expert_space and getattr(function, "reads_native", True)
        self.eager_route = None
        if eager_route is not None:
            outputs = functools.partial(self.eager_outputs, eager_route, self.accumulators is not None)
            self.eager_route = CudaGraphed(outputs) if graphed and not self.reads_native else outputs

    def release(self) -> None:
        """Drop the route's CUDA graphs now (at unpatch): a patch can outlive its unpatch until the garbage
        collector breaks its reference cycles, and its graphs' memory with it."""
        getattr(self.eager_route, "release", lambda: None)()

    def accumulate(self, top_weights, top_index, expert_counts, keep, nonfinite) -> None:
        accumulate_routing(self.accumulators, top_weights, top_index, expert_counts, keep, nonfinite)

    def traced_record(self) -> Callable | None:
        """How a traced call records: not at all without statistics; inside a compiled forward of the decoder
        stack, at its end (`defer`); in a layer compiled on its own, at once (`accumulate`)."""
        if self.accumulators is None:
            return None
        return self.accumulate if self.patcher._step_routings is None else self.defer

    def defer(self, top_weights, top_index, expert_counts, keep, nonfinite) -> None:
        """`accumulate` inside a compiled forward of the decoder stack: the token counts now, the sums with
        every other layer's at the stack's end (`RoutingStatistics.accumulate_step`), where one
        scatter-add replaces one per layer and step."""
        if self.accumulators.token_counts is not None:
            write_token_counts(self.accumulators, top_index, expert_counts, keep)
        self.patcher._step_routings[self.index] = (top_weights, top_index, expert_counts, keep, nonfinite)

    def routed(self, route, router_logits, native_weights, native_index):
        """(weights [T, K], index [T, K], counts [T] or None, nonfinite [T] bool) of the method, in expert
        space. The method routes every row whose logits are all finite; a row with a NaN or infinite logit (a
        float16 overflow, a broken router) gets `finite_fallback`'s routing, the same on every path (eager,
        compiled, CUDA-graphed), and is counted in the statistics' `nonfinite_rows`; a route that applies
        it itself (`route_rules_nonfinite`, where the selection logits are the logits) reads the raw logits."""
        if self.route_rules_nonfinite:
            return route(router_logits, native_weights, native_index)
        finite_logits = torch.isfinite(router_logits)  # [T, E]
        finite = finite_logits.all(dim=-1, keepdim=True)  # [T, 1]
        logits = router_logits.masked_fill(~finite, 0.0)  # the method never sees a row it cannot route
        if not self.family_weighting:
            top_weights, top_index, expert_counts = route(logits, native_weights, native_index)
        else:
            selection, allowed = self.spec.selection(logits)
            _, top_index, expert_counts = route(selection, native_weights, native_index)
            top_index = self.spec.expand(top_index, allowed)
            top_weights = self.spec.weights(logits, top_index, self.renormalize)
        routing = self.finite_fallback(finite_logits, finite, router_logits, top_weights, top_index, expert_counts)
        return (*routing, ~finite.squeeze(-1))

    def finite_fallback(self, finite_logits, finite, router_logits, top_weights, top_index, expert_counts) -> tuple:
        """The rule for rows whose logits are not all finite (finite_logits [T, E] per logit, finite [T, 1] per
        row): such a row keeps the family's own top-k of its finite logits (NaN and +-inf logits never kept), k the
        model's top-k clamped to the configuration's [min_k, max_k], weighted as the family weights them over its
        finite logits (all 0 when none is finite); every other row keeps the method's (weights, index, counts)."""
        slots, width = top_index.shape[-1], min(self.fallback_width, top_index.shape[-1])
        clean = router_logits.masked_fill(~finite_logits, -math.inf)
        selection, allowed = self.spec.selection(clean)
        index = self.spec.expand(selection.float().topk(width, dim=-1).indices, allowed)  # [T, width]
        if width < slots:  # the method's other slots: the sentinel
            index = torch.cat([index, index.new_full((index.shape[0], slots - width), self.spec.num_experts)], -1)
        weights = self.spec.weights(clean, index, self.renormalize).nan_to_num(0.0)
        top_weights = torch.where(finite, top_weights, weights.to(top_weights.dtype))
        top_index = torch.where(finite, top_index, index.to(top_index.dtype))
        if expert_counts is not None or width < slots:
            counts = flat_counts(top_index, expert_counts).reshape(top_index.shape[:-1])
            expert_counts = torch.where(finite.squeeze(-1), counts, width)
        return top_weights, top_index, expert_counts

    def traced(self, router_logits, native_weights, native_index, keep) -> tuple:
        """The layer's patched (weights, index) in the router's dtypes, statistics recorded (`traced_record`),
        inside a compiled forward; () when observing."""
        if self.route is None:  # the router's own routing, whatever its logits
            top_weights, top_index, expert_counts = native_weights, native_index, None
            nonfinite = nonfinite_rows(router_logits)
        else:
            routing = self.routed(self.route, router_logits, native_weights, native_index)
            top_weights, top_index, expert_counts, nonfinite = routing
        record = self.traced_record()
        if record is not None:
            recorded = self.recorded_weights(router_logits, top_weights, top_index)
            record(recorded, top_index, expert_counts, keep, nonfinite)
        return () if self.route is None else (top_weights.to(native_weights.dtype), top_index)

    def eager_outputs(self, route, with_record, router_logits, dtype, native_weights, native_index) -> tuple:
        """The eager route's (weights in `dtype`, the router's, index) and, with_record, the weights, counts
        (None: every row keeps K) and non-finite rows its statistics read: the function a CUDA graph replays,
        which leaves the statistics to `eager` so that the graph launches no statistics kernel."""
        top_weights, top_index, *recorded = self.routed(route, router_logits, native_weights, native_index)
        outputs = (top_weights.to(dtype), top_index)
        return outputs + (top_weights, *recorded) if with_record else outputs

    def eager(self, router_logits, native_weights, native_index, keep) -> tuple:
        """`traced` run eagerly: the route (fused by torch.compile, replayed as a CUDA graph where the patcher
        uses them), then its statistics recorded outside the graph (`RoutingStatistics.record`)."""
        if self.eager_route is None:  # observing: the router's own routing
            if self.accumulators is not None:  # its non-finite rows found at the fold, for many calls at once
                record = self.patcher.statistics.record
                record(self.index, native_weights, native_index, None, keep, router_logits=router_logits)
            return ()
        natives = (native_weights, native_index) if self.reads_native else (None, None)
        top_weights, top_index, *recorded = self.eager_route(router_logits, native_weights.dtype, *natives)
        if recorded:  # the route's own weights, counts and non-finite rows
            self.patcher.statistics.record(self.index, recorded[0], top_index, recorded[1], keep, recorded[2])
        return top_weights, top_index

    def recorded_weights(self, router_logits, top_weights, top_index) -> torch.Tensor:
        """The kept weights the statistics read (their entropy, which scaling and renormalising leave alone).

        Where the router's own weights are kept (observing, top-k at its own k), the family's weights up to a
        factor per token, recomputed from the kept logits in float32 (`RouterSpec.relative_weights`): a second
        reader of the router's weights would make inductor store them, rounded, before the experts read them
        (the unpatched graph computes them inside the experts' kernel), and the model's outputs would differ
        from native's in the last bits (bf16), its greedy tokens where two logits nearly tie."""
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

        from bh_routing import MoERouterPatcher
        patcher = MoERouterPatcher(model)
        patcher.patch_with_bh(alpha=0.05, max_k=8)      # or patcher.patch("bh", alpha=0.05, max_k=8)
        outputs = model.generate(ids, max_new_tokens=5, do_sample=False)
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
    settings are left as they are, apart from a higher recompile limit (one graph per configuration). A copy
    of a model made after a compiled generate compiles its own forward once patched (`drop_copied_compiled_call`).

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
        fused_routing: bool | None = None,
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
            (CUDA, Triton, the OLMoE layout, bf16, float16 or float32; a T4 too), else "model" (on a CPU, eager
            or grouped_mm are as fast as the torch reference).
        calibration: the model's RoutingCalibration (`fit_routing_calibration`), for the methods that read
            per-layer tables (BH / HC with a fitted null, dynamic skipping with beta="median", entropy k);
            may also be set later (patcher.calibration = ...), before `patch`.
        record_statistics: accumulate the routing statistics (on each layer's device, in place: a few small
            kernels per layer); False routes without them, and get_stats raises.
        fused_routing: route BH with robust_z's statistic (pvalue_method "robust_z" or "empirical") in one Triton
            kernel per layer (`fused_bh_route`) instead of torch's ~20 (None: where it runs, a model on CUDA
            with Triton; True: ValueError where it does not run; False: the torch route)."""
        _require_transformers()
        raise_recompile_limit()
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
        self.shape = RouterShape(spec.selectable, spec.top_k, spec.renormalize, spec.plain and spec.sorted_output)
        self.num_experts, self.native_top_k = spec.num_experts, spec.top_k
        self.shared_experts = [layer.shared_experts for layer in self.layers]
        self.router_devices = sorted({router.weight.device for router in self.routers}, key=str)
        self.experts_path = self._choose_experts_path(experts_path)
        on_cuda = self.routers[0].weight.device.type == "cuda"
        if compile_routing is None:
            compile_routing = on_cuda and importlib.util.find_spec("triton") is not None
        self.compile_routing = bool(compile_routing)
        self.cuda_graphs = self._choose_cuda_graphs(cuda_graphs, on_cuda)
        self.fused_routing = self._choose_fused_routing(fused_routing)
        self.statistics = RoutingStatistics(self.num_layers, self.num_experts, record_token_counts, token_capacity)
        self.record_statistics = bool(record_statistics)
        self.calibration = calibration  # checked against the model (the property's setter)
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

    @property
    def calibration(self) -> RoutingCalibration | None:
        """The model's RoutingCalibration, for the methods that read per-layer tables; set before `patch`."""
        return self._calibration

    @calibration.setter
    def calibration(self, calibration: RoutingCalibration | None) -> None:
        if calibration is not None and not isinstance(calibration, RoutingCalibration):
            raise ValueError(f"calibration must be a RoutingCalibration or None, got {type(calibration).__name__}")
        self._calibration = None if calibration is None else calibration.check(self.num_layers, self.shape.num_experts)

    def _choose_fused_routing(self, fused_routing: bool | None) -> bool:
        supported = all(fused_route_supported(device) for device in self.router_devices)
        if fused_routing is None:
            return supported
        if not isinstance(fused_routing, bool):
            raise ValueError(f"fused_routing must be True, False or None, got {fused_routing!r}")
        if fused_routing and not supported:
            raise ValueError(f"fused_routing=True needs routers on CUDA with Triton, got {self.router_devices}")
        return fused_routing

    def _choose_experts_path(self, experts_path: str | None) -> str:
        experts = self.experts[0]
        if experts_path is None:
            fused = fused_path_supported(experts, next(experts.parameters()).device)
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
        in_expert_space = spec.changes_routing and spec.in_expert_space(params, self.shape)
        # The router's own routing at its own k (top-k at the native k) is observed, not recomputed.
        native = not spec.changes_routing or (in_expert_space and params["max_k"] == self.native_top_k)
        routes = [(None, None)] * self.num_layers
        if not native:
            compiled = self.compile_routing
            routes = [(spec.layer_route(params, c), spec.layer_route(params, c, compiled)) for c in self.contexts()]
        self.unpatch()
        self._claim_model()
        drop_copied_compiled_call(self.model)  # a copy's compiled decode steps must run its own routers
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

    def contexts(self) -> list[LayerContext]:
        """What a routing method sees of each MoE layer when it builds the layer's route."""
        return [
            LayerContext(i, self.shape, router.weight.device, self.calibration, self.num_layers, self.fused_routing)
            for i, router in enumerate(self.routers)
        ]

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
            getattr(router, PATCH_ATTRIBUTE).release()
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

    __reduce_ex__ = _refuse_pickling  # a patcher is tied to its model in this process (hooks, graphs, threads)

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
        batch, length = inputs.shape[:2]
        if mask.shape[0] != batch or mask.shape[1] < length:  # shapes only: no device sync
            raise ValueError(
                f"attention_mask must be [batch, >= length] = [{batch}, >= {length}] for this forward pass, got "
                f"{list(mask.shape)} (patcher.set_attention_mask: set the batch's own mask, or None)"
            )
        return mask[:, -length:].reshape(-1).bool()

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
            nonfinite_rows: (token, layer) decisions whose router logits were not all finite, routed by the
                model's own top-k of their finite logits (`PatchedRouter.finite_fallback`; observed: as the
                router gave them); a warning says how many when there are any.
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
