"""Routing statistics: the counters a `bh_routing.MoERouterPatcher` keeps on each layer's device while it
routes, how a routing call is folded into them (eagerly, inside a compiled forward, inside a CUDA graph), and
the summaries read from them. It knows nothing of how the experts were chosen: a call gives the kept weights
and expert indices [..., K] (the sentinel E in unused slots), optionally its counts, the rows that count and
the rows whose router logits were not all finite.

1. Counters on the device (`LayerAccumulators`), updated in place with device ops only (`accumulate_routing`,
   `accumulate_sums`, `accumulate_layers`, `write_token_counts`), and `nonfinite_rows`.
2. Summaries of counts (`summarize_count_histogram`, `expert_load_balance`).
3. `RoutingStatistics`: a patcher's per-layer counters, eager calls kept and folded in batches, compiled
   steps folded with one scatter-add per 8 layers, and what `MoERouterPatcher.get_stats` reads.

Shapes: E experts, K slots a call, L layers, N rows (tokens) a call.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

__all__ = [
    "LayerAccumulators", "static_zeros", "counters_width", "accumulate_routing", "accumulate_sums",
    "accumulate_layers", "flat_counts", "ring_write", "write_token_counts", "nonfinite_rows",
    "summarize_count_histogram", "expert_load_balance", "RoutingStatistics", "TOKEN_COUNTS_CAPACITY",
    "STATISTICS_FOLD_LAYERS",
]  # fmt: skip

TOKEN_COUNTS_CAPACITY = 1 << 16  # routed positions whose per-token counts a patcher keeps (a ring buffer)


# ----------------------------------------------------------------------------------------------------
# 1. Counters on the device, updated in place
# ----------------------------------------------------------------------------------------------------


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
        entropy_sum [1]: sum over kept rows of the entropy (nats) of the kept weights, normalised (a weight that
            is not finite counts as 0).
        nonfinite [1]: kept rows whose router logits were not all finite (`PatchedRouter.routed`).
        (the five are views of one float64 `counters` tensor [2E + 5], which one scatter-add updates per
        call: float64 counts are exact up to 2**53; inductor compiles a float64 scatter-add into atomic adds
        where an int64 one falls back to aten's sort-based kernel, several launches per call; and a compiled
        forward guards on every tensor it reads, one more guard evaluation per tensor and decode step. A
        patcher's layers on one device hold their `counters` as rows of one tensor: `accumulate_layers`.)
        token_counts [C] int16 or None: a ring buffer of every routed row's count (-1 for a row left out),
            written at positions written, written + 1, ... modulo C.
        written [1] int64 or None: rows written to the ring buffer so far.
    Scalars are [1], not 0-d: inductor has dropped in-place updates of 0-d static tensors (on the CPU).
    """

    def __init__(self, num_experts: int, device, token_capacity: int | None, counters: torch.Tensor | None = None):
        self.num_experts = num_experts
        # counters: given as a row of one tensor for several layers (`RoutingStatistics.allocate_layers`).
        width = counters_width(num_experts)
        self.counters = static_zeros((width,), torch.float64, device) if counters is None else counters
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
        return self.counters[-3:-2]

    @property
    def entropy_sum(self) -> torch.Tensor:
        return self.counters[-2:-1]

    @property
    def nonfinite(self) -> torch.Tensor:
        return self.counters[-1:]

    def tensors(self) -> list[torch.Tensor]:
        named = [self.counters, self.token_counts, self.written]
        return [tensor for tensor in named if tensor is not None]


def counters_width(num_experts: int) -> int:
    """Length of a layer's float64 counters (`LayerAccumulators`): selections and histogram (E + 1 each),
    decisions, entropy sum, non-finite rows."""
    return 2 * (num_experts + 1) + 3


def accumulate_routing(
    accumulators: LayerAccumulators, top_weights, top_index, expert_counts=None, keep=None, nonfinite=None
):
    """Fold one routing call into a layer's accumulators, in place, with device ops only (no host sync, no
    allocation kept, traceable by torch.compile): weights and index [..., K]; expert_counts [...] (None: all
    K kept); keep [N] bool over the flattened rows (None: all count), e.g. the positions that are not padding;
    nonfinite [...] bool, the rows whose router logits were not all finite (None: none)."""
    accumulate_sums(accumulators, top_weights, top_index, expert_counts, keep, nonfinite)
    if accumulators.token_counts is not None:
        write_token_counts(accumulators, top_index, expert_counts, keep)


def flat_counts(top_index: torch.Tensor, expert_counts) -> torch.Tensor:
    """[N] int64 experts kept per row of a routing call (top_index [..., K], expert_counts [...] or None): K
    for every row of a method without counts."""
    slots = top_index.shape[-1]
    if expert_counts is None:
        return top_index.new_full((top_index.numel() // slots,), slots)
    return expert_counts.reshape(-1).long()


def accumulate_sums(
    accumulators: LayerAccumulators, top_weights, top_index, expert_counts=None, keep=None, nonfinite=None
):
    """The order-free part of `accumulate_routing`: selections, count histogram, decisions, entropy sum,
    non-finite rows."""
    slots = top_index.shape[-1]
    counts = None if expert_counts is None else expert_counts.reshape(1, -1)
    weights, index = top_weights.reshape(1, -1, slots), top_index.reshape(1, -1, slots)
    nonfinite = None if nonfinite is None else nonfinite.reshape(1, -1)
    accumulate_layers(accumulators.counters.unsqueeze(0), weights, index, counts, keep, nonfinite)


def accumulate_layers(counters, top_weights, top_index, expert_counts=None, keep=None, nonfinite=None):
    """`accumulate_sums` of one routing call of each of L layers, with one scatter-add: counters [L, 2E + 5]
    float64 (each a layer's `LayerAccumulators.counters`), top_weights and top_index [L, N, K], expert_counts
    [L, N] (None: all K kept), keep [N] bool (None: every row counts), the same rows for every layer, nonfinite
    [L, N] bool (None: every row's logits were finite)."""
    num_layers, num_rows, slots = top_index.shape
    width = counters.shape[-1]
    bins = (width - 3) // 2  # E + 1: the selections' and the histogram's
    expert_counts = flat_counts(top_index, expert_counts).reshape(num_layers, num_rows)
    # Statistics never join an autograd graph; a weight that is not finite (an observed router's own, on
    # non-finite logits) counts as 0, so that one such row cannot make the entropy sum NaN.
    weights = top_weights.detach().float().nan_to_num(0.0, 0.0, 0.0)
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
    if nonfinite is not None:  # (a Python choice: no data-dependent branch)
        positions.append((start + 2 * bins + 2).expand(num_layers, num_rows).reshape(-1))
        values.append((nonfinite.reshape(num_layers, num_rows).double() * row_weight).reshape(-1))
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


def nonfinite_rows(router_logits: torch.Tensor) -> torch.Tensor:
    """[T] bool: the rows of router_logits [T, E] with a NaN or infinite logit (what an observed router's
    statistics count as `nonfinite_rows`)."""
    return ~torch.isfinite(router_logits).all(dim=-1)


# ----------------------------------------------------------------------------------------------------
# 2. Summaries of counts
# ----------------------------------------------------------------------------------------------------


def _value_at_rank(cumulative: torch.Tensor, rank: int) -> int:
    """The value at 0-based `rank` of the sorted sample whose histogram has cumulative sums `cumulative`."""
    return int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype), right=True))


def summarize_count_histogram(histogram: torch.Tensor, min_k: int, max_k: int, baseline_k: int):
    """The design's expert-selection metrics (`bh_routing.summarize_expert_counts`) of the counts whose
    histogram over the values 0, 1, ... is `histogram` (any leading shape, summed): avg, std, min, max and
    median experts (the median interpolated between the two middle counts as torch.quantile does), and as
    percentages ceiling_hit_rate (counts equal to max_k), floor_hit_rate (equal to min_k) and
    reduction_vs_baseline = 100 * (1 - avg_experts / baseline_k)."""
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


def expert_load_balance(selections: torch.Tensor) -> float:
    """Mean over layers of the normalised entropy of how often each expert was chosen: 1 when every
    expert is chosen equally often, 0 when one expert takes everything. selections: [L, E] counts."""
    selections = selections.double()
    load_shares = selections / selections.sum(dim=-1, keepdim=True).clamp_min(1)
    return (-torch.xlogy(load_shares, load_shares).sum(dim=-1) / math.log(selections.shape[-1])).mean().item()


# ----------------------------------------------------------------------------------------------------
# 3. A patcher's statistics
# ----------------------------------------------------------------------------------------------------


def _rows(tensor: torch.Tensor, *shape: int) -> torch.Tensor:
    """tensor.reshape(*shape), without the call (a dispatch per eager routing call) where it has as many dims."""
    return tensor if tensor.dim() == len(shape) else tensor.reshape(*shape)


STATISTICS_FOLD_LAYERS = 8  # layers folded in per scatter-add of a compiled step (`accumulate_step`)


def _stacked(routings: list[tuple]) -> tuple:
    """(weights [L, N, K] float32, index [L, N, K] int32, counts [L, N] int32 or None, keep [N] or None,
    nonfinite [L, N] bool or None) of L layers' routings (weights, index, counts or None, keep or None,
    nonfinite or None) of the same N rows; the first layer's keep.

    Each layer's tensors are cast before they are stacked: inductor computes a concatenation of at most 8
    inputs (its max_pointwise_cat_inputs) inside the kernel that reads it, where each input is an op of its
    own, but copies every input of a longer one, or one that is already stored, with a kernel of its own
    (benchmarks/gpu_notes.md counts what that costs a decode step)."""
    weights, index, counts, keep, nonfinite = zip(*routings, strict=True)
    slots = index[0].shape[-1]
    if all(layer_counts is None for layer_counts in counts):
        counts = None
    else:
        counts = torch.stack([flat_counts(i, c).int() for i, c in zip(index, counts, strict=True)])
    if all(rows is None for rows in nonfinite):
        nonfinite = None
    else:
        every = zip(index, nonfinite, strict=True)
        nonfinite = torch.stack([i[..., 0].reshape(-1) < 0 if n is None else n.reshape(-1) for i, n in every])
    weights = torch.stack([w.reshape(-1, slots).float() for w in weights])
    return weights, torch.stack([i.reshape(-1, slots).int() for i in index]), counts, keep[0], nonfinite


class _PendingCall(NamedTuple):
    """One eager routing call that `RoutingStatistics.record` keeps until its fold (arguments of `record`)."""

    weights: torch.Tensor
    index: torch.Tensor
    counts: torch.Tensor | None
    keep: torch.Tensor | None
    nonfinite: torch.Tensor | None
    logits: torch.Tensor | None


def _pending_nonfinite(pending: list[_PendingCall]) -> torch.Tensor | None:
    """[N] bool, the non-finite rows of pending calls in order, or None when no call gave them or its logits:
    the logits are read in one pass where every call gave them (an observed router's), one call at a time
    otherwise; a call that gave neither had none."""
    if all(call.logits is not None for call in pending):
        return nonfinite_rows(torch.cat([_rows(call.logits, -1, call.logits.shape[-1]) for call in pending]))
    if all(call.nonfinite is None and call.logits is None for call in pending):
        return None
    every = []
    for call in pending:
        nonfinite = call.nonfinite
        if call.logits is not None:
            nonfinite = nonfinite_rows(_rows(call.logits, -1, call.logits.shape[-1]))
        every.append(call.index[..., 0].reshape(-1) < 0 if nonfinite is None else nonfinite.reshape(-1))
    return torch.cat(every)


class RoutingStatistics:
    """Per-layer routing statistics of a patcher (`LayerAccumulators`), kept on each layer's device and read
    only by the methods below (which synchronise). A call may name the rows that count (`keep`, e.g. the
    positions an attention mask marks as real, not padding): the others are left out of every statistic.

    Compiled forwards (CUDA-graphed or not) update the accumulators in place (`accumulate_routing`); eager
    calls, the patcher's CUDA-graphed routes among them, go through `record`, which keeps references and folds
    them in batches of `max_pending` calls or `max_pending_rows` rows per layer, whichever comes first, so that
    an eager forward pays a list append rather than a dozen small kernels per layer.

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
        self.groups: list[tuple[torch.Tensor, list[int]]] = []  # (counters [L_d, 2E + 5], its layers) per device
        self._pending: list[list[_PendingCall]] = [[] for _ in range(num_layers)]
        self._pending_rows = [0] * num_layers

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
            counters = static_zeros((len(layers), counters_width(self.num_experts)), torch.float64, device)
            for row, layer in enumerate(layers):
                self.layers[layer] = LayerAccumulators(self.num_experts, device, capacity, counters=counters[row])
            self.groups.append((counters, layers))

    def accumulate_step(self, routings: dict) -> None:
        """Fold one forward pass's routing of its layers into their sums, traceable (the patcher calls it at
        the end of a compiled forward): one `accumulate_layers` per `STATISTICS_FOLD_LAYERS` layers of a device
        whose layers all routed (`_stacked` says why not all at once), one `accumulate_sums` per other layer.
        routings: layer -> (weights [..., K], index [..., K], counts [...] or None, keep or None, nonfinite [...]
        or None), every layer over the same rows."""
        folded = set()
        for counters, layers in self.groups:
            if all(layer in routings for layer in layers):
                for start in range(0, len(layers), STATISTICS_FOLD_LAYERS):
                    chunk = layers[start : start + STATISTICS_FOLD_LAYERS]
                    stacked = _stacked([routings[layer] for layer in chunk])
                    accumulate_layers(counters[start : start + len(chunk)], *stacked)
                folded.update(layers)
        for layer, routing in routings.items():
            if layer not in folded:
                accumulate_sums(self.layers[layer], *routing)

    def reset(self) -> None:
        """Forget everything recorded so far (in place: compiled forwards and graphs keep the same tensors)."""
        self._pending, self._pending_rows = [[] for _ in range(self.num_layers)], [0] * self.num_layers
        for accumulators in self.layers:
            for tensor in accumulators.tensors() if accumulators is not None else []:
                tensor.zero_()

    max_pending = 256  # eager calls kept per layer before they are folded in
    # ... or fewer, once they hold this many rows: an eager evaluation's windows (thousands of rows a call)
    # would otherwise keep hundreds of MB a layer alive until the fold.
    max_pending_rows = 16384

    def record(self, layer: int, top_weights, top_index, expert_counts=None, keep=None, nonfinite=None,
               router_logits=None) -> None:  # fmt: skip
        """One eager routing call of `layer` (arguments as `accumulate_routing`): its token counts are written
        now (a compiled forward may write the next ones), its sums folded in later. router_logits [..., E]:
        in place of `nonfinite`, the call's logits, whose non-finite rows the fold finds for all the calls
        at once (an observed router's call then launches no kernel)."""
        accumulators = self.allocate(layer, top_index.device)
        if accumulators.token_counts is not None:
            write_token_counts(accumulators, top_index, expert_counts, keep)
        weights = top_weights.detach() if top_weights.requires_grad else top_weights  # detach: an op per call
        pending = self._pending[layer]
        pending.append(_PendingCall(weights, top_index, expert_counts, keep, nonfinite, router_logits))
        self._pending_rows[layer] += top_index.numel() // top_index.shape[-1]
        if len(pending) >= self.max_pending or self._pending_rows[layer] >= self.max_pending_rows:
            self._fold(layer)

    def _fold(self, layer: int) -> None:
        """Fold a layer's pending calls into its accumulators as one call (a patch keeps its slot width K)."""
        pending, self._pending[layer], self._pending_rows[layer] = self._pending[layer], [], 0
        if not pending:
            return
        slots, device = pending[0].index.shape[-1], pending[0].index.device
        weights = torch.cat([_rows(call.weights, -1, slots) for call in pending])
        index = torch.cat([_rows(call.index, -1, slots) for call in pending])
        counts = keep = None
        if any(call.counts is not None for call in pending):
            full = [call.index.new_full(call.index.shape[:-1], slots) if call.counts is None else call.counts
                    for call in pending]  # fmt: skip
            counts = torch.cat([_rows(c, -1) for c in full])
        if any(call.keep is not None for call in pending):  # a call without a mask keeps every row
            every = [call.index[..., 0].reshape(-1) >= 0 if call.keep is None else call.keep.reshape(-1).to(device)
                     for call in pending]  # fmt: skip
            keep = torch.cat(every)
        accumulate_sums(self.allocate(layer, device), weights, index, counts, keep, _pending_nonfinite(pending))

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
        token_counts (if recorded), num_tokens, num_layers and nonfinite_rows, with a warning when there are
        any (see `MoERouterPatcher.get_stats`)."""
        histograms, selections = self.histograms(), self.selections()  # [L, E + 1], [L, E]
        num_tokens, decisions = self.num_tokens, sum(int(layer.decisions) for layer in self.layers)
        nonfinite = sum(int(layer.nonfinite) for layer in self.layers)
        if nonfinite:
            warnings.warn(
                f"{nonfinite} of {decisions} (token, layer) routing decisions had non-finite router logits (NaN or "
                "inf, e.g. a float16 overflow): a routing method gave them the model's own top-k of their finite "
                "logits (MoERouterPatcher's rule), an observed router its own output",
                stacklevel=3,
            )
        values = torch.arange(histograms.shape[-1], dtype=torch.float64)
        stats = summarize_count_histogram(histograms, min_k, max_k, baseline_k) | {
            "per_layer_avg_experts": ((histograms.double() * values).sum(dim=-1) / num_tokens).tolist(),
            "weight_entropy": sum(float(layer.entropy_sum) for layer in self.layers) / decisions,
            "expert_utilization": expert_load_balance(selections),
            "expert_utilization_per_layer": (selections / num_tokens).tolist(),
            "num_tokens": num_tokens,
            "num_layers": self.num_layers,
            "nonfinite_rows": nonfinite,
        }
        return stats | ({"token_counts": self.token_counts()} if self.record_token_counts else {})
