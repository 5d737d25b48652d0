"""Variable-k experts: an experts forward for transformers' MoE models that computes only the kept
(token, expert) pairs, so that fewer experts per token take less time, with the compile and CUDA-graph
helpers a fast routing path needs. It knows nothing of how the experts were chosen: any router that writes
the sentinel index E (= num_experts) into the slots it leaves empty can use it.

    import variable_k_experts
    variable_k_experts.register_variable_k_experts()
    model.set_experts_implementation("variable_k")

1. Pairs sorted by expert and grouped GEMMs (`sort_pairs_by_expert`, `grouped_matmul`), and what an experts
   module of transformers' experts interface offers (`is_experts_module`, `eager_skips_sentinels`,
   `grouped_mm_masks_sentinels`, `variable_k_unsupported`).
2. The torch reference path (`variable_k_experts_torch`, any layout, any device).
3. The fused Triton path for the OLMoE layout (`variable_k_experts_triton`; `variable_k_experts_decode` for
   the few pairs of a decode step).
4. The plan and the entry point (`variable_k_plan`, `variable_k_experts_forward`,
   `register_variable_k_experts`): experts_implementation="variable_k".
5. Compile and CUDA-graph helpers (`compile_once`, `raise_recompile_limit`, `CudaGraphed`, `graph_pool`,
   `capture_cuda_graph`).

transformers' experts paths take a fixed slot width K: "eager" loops over experts in Python with a host sync
per layer, and "grouped_mm" runs its gather, activation and combine passes over all T x K slots (and, when
sentinel slots may occur, extra masking passes), so fewer experts per token save little time. Here the kept
pairs are sorted by expert (sentinels last), one grouped GEMM per projection runs over the kept rows only
(grouped_mm skips rows past the last group's offset), and the three element-wise passes (gather,
SiLU-and-multiply, weighted combine) read the number of kept pairs from the device and touch only those rows:
Triton kernels on CUDA, plain torch elsewhere (the reference). No pass reads a count back to the host, so the
path has no per-layer sync and can be CUDA-graphed.

Shapes: T tokens, K slots per token, E experts, H hidden size, I expert width, S = T x K sorted pairs.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch reference path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = [
    "VARIABLE_K_EXPERTS",
    "DECODE_PAIRS",
    "register_variable_k_experts",
    "variable_k_experts_forward",
    "variable_k_plan",
    "VariableKPlan",
    "variable_k_unsupported",
    "fused_path_supported",
    "variable_k_experts_torch",
    "variable_k_experts_triton",
    "variable_k_experts_decode",
    "sort_pairs_by_expert",
    "grouped_mm_usable",
    "grouped_matmul",
    "is_experts_module",
    "eager_skips_sentinels",
    "grouped_mm_masks_sentinels",
    "compile_once",
    "raise_recompile_limit",
    "CudaGraphed",
    "graph_pool",
    "capture_cuda_graph",
]

VARIABLE_K_EXPERTS = "variable_k"  # the name registered in transformers' ExpertsInterface
# Up to this many (token, slot) pairs (decoding a few sequences) the fused path computes each kept pair with
# matrix-vector kernels on its expert's weights: there a sort and grouped GEMMs cost more launches and fixed
# time than the few experts' bytes.
DECODE_PAIRS = 16


# ----------------------------------------------------------------------------------------------------
# 1. Pairs sorted by expert, grouped GEMMs, and what an experts module offers
# ----------------------------------------------------------------------------------------------------


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


def is_experts_module(module) -> bool:
    """An experts module decorated with transformers' `use_experts_implementation`."""
    return all(hasattr(module, name) for name in ("has_gate", "is_transposed", "_is_expert_parallel", "num_experts"))


def variable_k_unsupported(experts: torch.nn.Module) -> str | None:
    """Why the variable-k path cannot run this experts module (None: it can). It serves every layout of the
    experts interface (gate/up concatenated or interleaved through the module's own `_apply_gate`, weights
    transposed or not, biases, no gate) except a norm after each expert."""
    if getattr(experts, "has_post_expert_norm", False):
        return f"{type(experts).__name__} (a norm after each expert)"
    if not is_experts_module(experts):
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


# ----------------------------------------------------------------------------------------------------
# 2. The torch reference path
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# 3. The fused Triton path (the OLMoE layout, SiLU, CUDA)
# ----------------------------------------------------------------------------------------------------


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


def variable_k_experts_triton(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, row_programs=None,
                              grouped: bool = True):  # fmt: skip
    """The fused variable-k experts forward (SiLU-gated experts): sort, Triton gather, two grouped GEMMs
    with a Triton SiLU-and-multiply between them, Triton weighted combine; for at most `DECODE_PAIRS`
    (token, slot) pairs, `variable_k_experts_decode` instead. Shapes as in `variable_k_experts_forward`;
    row_programs: programs of the row kernels (None: a few per SM). grouped: torch has a grouped GEMM here
    (`grouped_mm_usable`); without one (a T4, float16) a compiled forward takes the decode kernels at any
    size (no host read, no gathered weights) and an eager one (a prefill) one matmul per expert after a single
    read of the offsets. Runs wherever Triton runs (CUDA; CPU under TRITON_INTERPRET=1)."""
    num_tokens, slots = top_k_index.shape
    num_experts, double_intermediate, hidden_size = gate_up_proj.shape
    num_pairs = num_tokens * slots
    hidden_states, top_k_index, top_k_weights = (t.contiguous() for t in (hidden_states, top_k_index, top_k_weights))
    if num_pairs == 0:
        return torch.empty_like(hidden_states)
    if num_pairs <= DECODE_PAIRS or not grouped and torch.compiler.is_compiling():
        return variable_k_experts_decode(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    pair_order, offsets = sort_pairs_by_expert(top_k_index, num_experts)
    sorted_hidden = torch.empty(num_pairs, hidden_size, device=hidden_states.device, dtype=gate_up_proj.dtype)
    pair_rows = torch.empty_like(pair_order)
    row_programs = _num_row_programs(hidden_states.device) if row_programs is None else row_programs
    row_programs = (min(num_pairs, row_programs),)
    _gather_kept_pairs_kernel[row_programs](
        hidden_states, pair_order, offsets, sorted_hidden, pair_rows, hidden_size, num_experts, SLOTS=slots, BLOCK=1024
    )
    gate_up = grouped_matmul(sorted_hidden, gate_up_proj, offsets, grouped=grouped)  # [S, 2I]
    activated = torch.empty(num_pairs, double_intermediate // 2, device=gate_up.device, dtype=gate_up.dtype)
    _silu_and_mul_kept_kernel[row_programs](
        gate_up, activated, offsets, double_intermediate // 2, num_experts, BLOCK=1024
    )
    expert_outputs = grouped_matmul(activated, down_proj, offsets, grouped=grouped)  # [S, H]
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


def fused_path_supported(experts: torch.nn.Module, device: torch.device) -> bool:
    """The fused path: CUDA with Triton, the OLMoE layout and SiLU gating, in bf16, float16 or float32 (with a
    grouped GEMM kernel, sm80+ in bf16, or without one: `variable_k_experts_triton`'s grouped=False)."""
    return (
        triton is not None
        and device.type == "cuda"
        and _olmoe_layout(experts)
        and getattr(experts.config, "hidden_act", None) == "silu"
        and experts.gate_up_proj.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


# ----------------------------------------------------------------------------------------------------
# 4. The plan and the entry point
# ----------------------------------------------------------------------------------------------------


class VariableKPlan(NamedTuple):
    """How `variable_k_experts_forward` runs one experts module on one device and dtype: decided once,
    eagerly (`variable_k_plan`), so that a compiled forward reads it and traces no capability check."""

    device: torch.device
    dtype: torch.dtype
    fused: bool  # the Triton path (`fused_path_supported`)
    grouped: bool  # torch's grouped GEMM (`grouped_mm_usable`), else one matmul per expert
    row_programs: int  # programs of the Triton row kernels


def variable_k_plan(experts: torch.nn.Module) -> VariableKPlan:
    """The plan of `experts` on its weights' device and dtype, made now and kept on the module
    (`experts._variable_k_plan`). NotImplementedError if the variable-k path cannot serve the module."""
    unsupported = variable_k_unsupported(experts)
    if unsupported is not None:
        raise NotImplementedError(f"experts_implementation={VARIABLE_K_EXPERTS!r} cannot serve {unsupported}")
    weight = experts.down_proj
    fused = fused_path_supported(experts, weight.device)
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
                "variable_k_experts.variable_k_plan(experts) on every experts module (the patcher does) before "
                "compiling"
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
    Where `fused_path_supported` (CUDA, Triton, the OLMoE layout, SiLU; bf16, float16 or float32) the Triton
    path runs, with torch's grouped GEMM where it has one (`grouped_mm_usable`); otherwise the torch reference
    (on a GPU without a grouped GEMM kernel, one matmul per expert). The choice is the module's
    `variable_k_plan`, made eagerly; a compiled forward only reads it.
    """
    plan = _plan_of(experts)
    if not plan.fused:
        # torch traces its grouped GEMM in bfloat16 only (its meta function refuses other dtypes).
        grouped = plan.grouped and (plan.dtype == torch.bfloat16 or not torch.compiler.is_compiling())
        return variable_k_experts_torch(hidden_states, top_k_index, top_k_weights, experts, grouped)
    arguments = (hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, plan.row_programs,
                 plan.grouped)  # fmt: skip
    if torch.compiler.is_compiling() or hidden_states.device.index == torch.cuda.current_device():
        return variable_k_experts_triton(*arguments)
    with torch.cuda.device(hidden_states.device):  # Triton launches on the current device
        return variable_k_experts_triton(*arguments)


def register_variable_k_experts() -> None:
    """Make experts_implementation="variable_k" known to transformers (from_pretrained, set_experts_implementation)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(VARIABLE_K_EXPERTS, variable_k_experts_forward)


# ----------------------------------------------------------------------------------------------------
# 5. Compile and CUDA-graph helpers
# ----------------------------------------------------------------------------------------------------


def raise_recompile_limit(limit: int = 128) -> None:
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
        raise_recompile_limit()
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


GRAPHED_MAX_ROWS = 256  # calls of more rows (a prompt, an evaluation window) run directly: see CudaGraphed
CAPTURE_AT_CALL = 3  # a shape is captured at its third call: one seen once a generate (a prefill) runs directly
_GRAPH_POOLS: dict[int, tuple] = {}  # CUDA device index -> the memory pool every CudaGraphed capture shares


def graph_pool(device: torch.device) -> tuple:
    """The graph memory pool of `device` that every `CudaGraphed` capture shares (made on first use)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _GRAPH_POOLS:
        _GRAPH_POOLS[index] = torch.cuda.graph_pool_handle()
    return _GRAPH_POOLS[index]


class CudaGraphed:
    """Replay `function(*args)` as one CUDA graph per (shape, dtype, device) of its tensor arguments.

    Capturing needs a function without host synchronisation. The tensor arguments are copied into the
    graph's static buffers and the outputs (a tuple of tensors or None) are cloned out, because the next
    replay (the next layer) overwrites them; arguments that are not tensors (None) are part of the key. The
    function must leave every other tensor alone: the two warm-up runs before a capture run it too. A key is
    captured at its `capture_at`-th call, the ones before run directly, so that a shape seen once a generate
    (a prompt's prefill, whose capture would cost more than its replays save) is not captured after every
    patch. At most `max_graphs` keys are kept (least recently used dropped); `release` drops them all. Other
    devices than CUDA, calls inside another capture or a compiled region, and calls whose first tensor has more
    than `max_rows` rows (an evaluation window, whose launches a graph would not shorten noticeably) call the
    function directly.

    Memory: every capture allocates in one pool per device (`graph_pool`), so that the hundreds of small
    graphs of a sweep (layers x shapes x configurations) share its segments instead of holding at least one
    each. This is safe because no data lives in the pool from one replay to the next: the static inputs are
    allocated outside it, and a replay's outputs are cloned out before any other graph is replayed on the
    stream, so a graph may overwrite another's intermediates and outputs."""

    def __init__(self, function, max_graphs: int = 16, max_rows: int = GRAPHED_MAX_ROWS,
                 capture_at: int = CAPTURE_AT_CALL):  # fmt: skip
        self.function, self.max_graphs, self.max_rows, self.capture_at = function, max_graphs, max_rows, capture_at
        self.graphs: dict = {}
        self.calls: dict = {}  # key -> its calls so far, until it is captured

    def __call__(self, *args):
        tensor = next(arg for arg in args if isinstance(arg, torch.Tensor))
        direct = tensor.device.type != "cuda" or tensor.shape[0] > self.max_rows
        if direct or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return self.function(*args)
        device = tensor.device
        key = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        entry = self.graphs.pop(key, None)
        if entry is None:
            if not self.captures(key):
                return self.function(*args)
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

    def captures(self, key) -> bool:
        """Count a call of `key` that has no graph: whether it is the one to capture."""
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] < self.capture_at:
            return False
        del self.calls[key]
        return True

    def release(self) -> None:
        """Drop every graph, returning its memory to the shared pool (the patcher does at unpatch)."""
        self.graphs.clear()
        self.calls.clear()

    def _capture(self, device, args):
        with torch.cuda.device(device):
            static_args = [arg.clone() if isinstance(arg, torch.Tensor) else arg for arg in args]
            graph, static_outputs = capture_cuda_graph(lambda: self.function(*static_args), graph_pool(device))
        return graph, static_args, static_outputs


def capture_cuda_graph(function: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture function() as a CUDA graph on the current device: (graph, the outputs graph.replay() refills);
    `pool`: a graph memory pool to allocate in (`graph_pool`), else the graph's own.

    function is first run twice on a side stream, so that lazy initialisations (allocator pools, cuBLAS
    handles, autotuning) happen outside the capture; it must not synchronise with the host."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(2):
            function()
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = function()
    return graph, outputs
