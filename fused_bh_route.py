"""BH routing of a layer in one Triton kernel: for each token's E router logits, the robust_z statistic, each
expert's statistic against the critical statistic of its rank, Benjamini-Hochberg's count, the kept experts (most
probable first) and their weights, the sentinel E in the slots left empty. It is `bh_routing.route_bh` for the
p-value methods that read robust_z's statistic against a null (robust_z, empirical), which stays the reference it
is tested against (tests/test_fused_route.py, under Triton's CPU interpreter).

    from fused_bh_route import fused_bh_route
    weights, index, counts, nonfinite = fused_bh_route(logits, critical, temperature, min_k, max_k, renormalize,
                                                       trimmed, nonfinite_width)

1. The kernel (`_bh_route_kernel`): one program per ROWS tokens, every expert of a token in registers.
2. The entry point (`fused_bh_route`) and where it runs (`fused_route_supported`).

Why one kernel: in decode a BH route of torch operations is about 20 small kernels per layer (softmax, top-k,
the statistic's moments, the ranks' histogram, the count, the gathers), each a launch and a pass over memory
for one token; here the route reads the logits once and writes its outputs once. Sorting is by rank
(each logit compared with every other: E^2 comparisons a token, no sort network), so the kernel has no
data-dependent branch and replays in a CUDA graph.

Rows with a non-finite logit (a NaN, an infinity) it routes by the patcher's rule for them
(`bh_routing.PatchedRouter.finite_fallback`, for a family whose selection logits are its logits): the route reads
the raw logits, so that the rule's own passes (a finiteness reduction, a top-k and a softmax of the finite
logits, the selects between the two routings: four kernels a layer on a decode step) cost nothing more. What it
leaves to the caller: the statistics' counters, which the patcher folds for every layer at once (one
scatter-add a decode step on the compiled path) rather than per layer.

Shapes: T tokens, E experts, K = max_k slots; EP and KP the next powers of two.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs route with the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["fused_bh_route", "fused_route_supported", "launch_warps", "ROWS_PER_PROGRAM", "MAX_EXPERTS"]

ROWS_PER_PROGRAM = 1  # tokens a program routes: a token's E x E comparisons stay in registers (see launch_warps)
MAX_EXPERTS = 128  # beyond, a token's E x E comparisons outgrow a program's registers: the torch route serves
ROOT_EPS = math.sqrt(torch.finfo(torch.float32).eps)  # the statistic's floor, the work dtype's as the torch route's

# ----------------------------------------------------------------------------------------------------
# 1. The kernel
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _descending_rank(x, experts):
        """Each logit's rank among its row's, largest first, ties to the lower expert: [R, EP] -> [R, EP] int32
        (padding, at -inf, ranks after every expert)."""
        other, mine = x[:, None, :], x[:, :, None]
        earlier = experts[None, None, :] < experts[None, :, None]
        ahead = (other > mine) | ((other == mine) & earlier)
        return tl.sum(ahead.to(tl.int32), axis=2)

    @triton.jit
    def _robust_z(x, rank, valid, num_experts, TRIMMED: tl.constexpr, ROOT_EPS: tl.constexpr):
        """robust_z's statistic (`bh_routing._robust_location_scale`): (x - center) / std of the row's logits
        without its TRIMMED largest, moments centred on the mean, a row spread beyond 2**32 scaled by a power
        of two, the spread floored at sqrt(eps) of the centre's size. [R, EP] -> [R, EP]."""
        mean = tl.sum(tl.where(valid, x, 0.0), axis=1) / num_experts  # [R]
        spread = tl.max(x, axis=1) - mean
        scale = tl.where(spread > 4294967296.0, tl.exp2(-tl.floor(tl.log2(spread))), 1.0)
        centered = tl.where(valid, (x - mean[:, None]) * scale[:, None], 0.0)
        total_square = tl.sum(centered * centered, axis=1)
        top = tl.where(rank < TRIMMED, centered, 0.0)
        num_bulk = num_experts - TRIMMED
        bulk_mean = -tl.sum(top, axis=1) / num_bulk
        bulk_square = (total_square - tl.sum(top * top, axis=1)) / num_bulk
        bulk_std = tl.sqrt(tl.maximum(bulk_square - bulk_mean * bulk_mean, 0.0))
        center = mean + bulk_mean / scale
        floor = ROOT_EPS * (1.0 + tl.abs(center)) * scale
        inverse_std = scale / tl.maximum(bulk_std, floor)
        return x * inverse_std[:, None] + (-center * inverse_std)[:, None]

    @triton.jit
    def _bh_count(statistics, rank, critical_ptr, valid):
        """BH's count max{j : s_(j) >= c_j}, s_(j) the j-th largest statistic: the statistic is increasing in the
        logit (a positive scale and a shift), so an expert of logit rank r holds s_(r+1), and the count is the
        largest r + 1 whose expert passes c_(r+1); the same count as `bh_routing.fast_bh_count`'s
        max{j : #{i : s_i >= c_j} >= j}, ties included, from E loads rather than E x E comparisons.
        [R, EP], [R, EP] -> [R] int32."""
        critical = tl.load(critical_ptr + rank, mask=valid, other=float("inf"))  # c at each expert's own rank
        return tl.max(tl.where(valid & (statistics >= critical), rank + 1, 0), axis=1)

    @triton.jit
    def _routed_logits(raw, valid, temperature):
        """(the logits a row is routed by: its logits over the temperature where all are finite, else the
        non-finite rule's, its finite logits with NaN and +-inf at -inf; [R] whether each row is finite).
        [R, EP] -> [R, EP] (padding at -inf), [R]."""
        finite = (raw == raw) & (tl.abs(raw) < float("inf"))  # NaN != NaN
        row_finite = tl.sum((valid & ~finite).to(tl.int32), axis=1) == 0
        divisor = tl.where(row_finite, temperature, 1.0)[:, None]
        return tl.where(valid & finite, raw / divisor, -float("inf")), row_finite

    @triton.jit
    def _bh_route_kernel(
        logits_ptr,
        critical_ptr,
        weights_ptr,
        index_ptr,
        counts_ptr,
        nonfinite_ptr,
        num_rows,
        num_experts,
        temperature,
        min_k,
        max_k,
        nonfinite_width,
        TRIMMED: tl.constexpr,
        ROOT_EPS: tl.constexpr,
        EXPERTS: tl.constexpr,
        SLOTS: tl.constexpr,
        ROWS: tl.constexpr,
        RENORMALIZE: tl.constexpr,
    ):
        """weights [T, K] float32, index [T, K] int64 (E in empty slots), counts [T] int64 of `route_bh` for
        ROWS tokens of logits [T, E], with critical [E] float32 (robust_z's statistic against the null); a row
        with a non-finite logit routed by the non-finite rule (`fused_bh_route`), flagged in nonfinite [T] bool."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        experts = tl.arange(0, EXPERTS)
        valid = (experts < num_experts)[None, :]
        in_rows = rows < num_rows
        loaded = tl.load(logits_ptr + rows[:, None] * num_experts + experts[None, :], mask=in_rows[:, None] & valid)
        x, row_finite = _routed_logits(tl.where(in_rows[:, None], loaded.to(tl.float32), 0.0), valid, temperature)
        rank = _descending_rank(x, experts)  # one ranking for BH's route and the rule's
        statistics = _robust_z(x, rank, valid, num_experts, TRIMMED, ROOT_EPS)  # NaN in a non-finite row: unread
        count = tl.minimum(tl.maximum(_bh_count(statistics, rank, critical_ptr, valid), min_k), max_k)
        count = tl.where(row_finite, count, nonfinite_width)
        exponentials = tl.exp(x - tl.max(x, axis=1)[:, None])  # padding: exp(-inf) = 0
        probabilities = exponentials / tl.sum(exponentials, axis=1)[:, None]  # NaN where no logit is finite
        slots = tl.arange(0, SLOTS)
        at_slot = rank[:, None, :] == slots[None, :, None]  # [R, KP, EP]
        index = tl.sum(tl.where(at_slot, experts[None, None, :], 0), axis=2)  # [R, KP]
        weights = tl.sum(tl.where(at_slot, probabilities[:, None, :], 0.0), axis=2)
        kept = slots[None, :] < count[:, None]
        weights = tl.where(kept, weights, 0.0)
        if RENORMALIZE:
            weights = weights / tl.maximum(tl.sum(weights, axis=1), 1.1754943508222875e-38)[:, None]
        weights = tl.where(weights == weights, weights, 0.0)  # a row with no finite logit: weights 0
        slot_mask = in_rows[:, None] & (slots[None, :] < max_k)
        targets = rows[:, None] * max_k + slots[None, :]
        tl.store(weights_ptr + targets, weights, mask=slot_mask)
        tl.store(index_ptr + targets, tl.where(kept, index, num_experts).to(tl.int64), mask=slot_mask)
        tl.store(counts_ptr + rows, count.to(tl.int64), mask=in_rows)
        tl.store(nonfinite_ptr + rows, ~row_finite, mask=in_rows)


# ----------------------------------------------------------------------------------------------------
# 2. The entry point
# ----------------------------------------------------------------------------------------------------


def launch_warps(num_experts: int) -> int:
    """Warps a program of `ROWS_PER_PROGRAM` tokens runs with: enough threads that the [E, E] comparisons of a
    token fit their registers without spilling to local memory, which ptxas reports (tests/test_fused_route.py
    checks it for sm75 and sm90 at 64 and 128 experts; benchmarks/gpu_notes.md has the counts)."""
    return 4 if num_experts <= 64 else 8


def fused_route_supported(device: torch.device | str) -> bool:
    """Whether `fused_bh_route` runs on `device`: CUDA with Triton (elsewhere Triton's interpreter only); a
    layer of more than `MAX_EXPERTS` experts routes with torch's operations all the same."""
    return triton is not None and torch.device(device).type == "cuda"


def fused_bh_route(
    logits, critical, temperature: float, min_k: int, max_k: int, renormalize: bool, trimmed: int, nonfinite_width: int
):
    """`bh_routing.route_bh_tensors` for robust_z's statistic in one kernel: logits [T, E] (any float dtype),
    critical [E] float32 on the logits' device (c_j: p <= alpha j / E <=> s >= c_j), `trimmed` the largest
    logits the statistic leaves out (E / 4). Returns (weights [T, max_k] float32, index [T, max_k] int64 with
    E in empty slots, counts [T] int64, nonfinite [T] bool).

    A row with a NaN or infinite logit (nonfinite) keeps its `nonfinite_width` largest finite logits (ties to
    the lower expert; NaN and +-inf rank last), weighted by their softmax over its finite logits without the
    temperature (renormalised as the route is; 0 where no logit is finite), count nonfinite_width: the
    patcher's rule for such rows (`bh_routing.PatchedRouter.finite_fallback`) for a family whose selection
    logits are its logits. Arguments unchecked (the routing method checked them at patch time)."""
    num_rows, num_experts = logits.shape
    logits = logits.contiguous()
    weights = torch.empty(num_rows, max_k, device=logits.device, dtype=torch.float32)
    index = torch.empty(num_rows, max_k, device=logits.device, dtype=torch.int64)
    counts = torch.empty(num_rows, device=logits.device, dtype=torch.int64)
    nonfinite = torch.empty(num_rows, device=logits.device, dtype=torch.bool)
    if num_rows == 0:
        return weights, index, counts, nonfinite
    _bh_route_kernel[(triton.cdiv(num_rows, ROWS_PER_PROGRAM),)](
        logits, critical, weights, index, counts, nonfinite, num_rows, num_experts, float(temperature), min_k, max_k,
        nonfinite_width, TRIMMED=trimmed, ROOT_EPS=ROOT_EPS, EXPERTS=triton.next_power_of_2(num_experts),
        SLOTS=triton.next_power_of_2(max_k), ROWS=ROWS_PER_PROGRAM, RENORMALIZE=bool(renormalize),
        num_warps=launch_warps(num_experts),
    )  # fmt: skip
    return weights, index, counts, nonfinite
