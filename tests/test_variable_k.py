"""The variable-k experts path (section 7): same outputs as transformers' eager experts, only kept pairs
computed, no host sync. The Triton kernels run here under Triton's CPU interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bh_experiment
import bh_routing
import variable_k_experts

NUM_EXPERTS = 64
REPO = Path(__file__).resolve().parent.parent


def _experts(dtype=torch.float32, hidden_size=64, intermediate_size=32):
    model = bh_experiment.build_random_olmoe(seed=0, hidden_size=hidden_size, intermediate_size=intermediate_size)
    model = model.to(dtype)
    model.set_experts_implementation("eager")
    return model, model.model.layers[0].mlp.experts


def _routing(num_tokens: int, slots: int, seed: int = 0, counts=None):
    """Top-`slots` routing of random logits in which token t keeps counts[t] experts (default
    (t + slots) mod (slots + 1), so every count 0..slots occurs, tokens with no expert included); sentinel E
    in the other slots."""
    generator = torch.Generator().manual_seed(seed)
    weights, index = torch.softmax(torch.randn(num_tokens, NUM_EXPERTS, generator=generator), -1).topk(slots)
    counts = (torch.arange(num_tokens) + slots) % (slots + 1) if counts is None else counts
    kept = torch.arange(slots)[None] < counts[:, None]
    return torch.where(kept, weights, 0.0), torch.where(kept, index, NUM_EXPERTS), counts


def _relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens,slots", [(37, 8), (5, 3), (1, 8), (64, 16)])
def test_torch_reference_matches_eager(dtype, tolerance, num_tokens, slots):
    model, experts = _experts(dtype)
    weights, index, counts = _routing(num_tokens, slots)
    hidden = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected = experts(hidden, index, weights)
    actual = variable_k_experts.variable_k_experts_torch(hidden, index, weights, experts)
    assert actual.dtype == dtype and actual.shape == hidden.shape
    assert _relative_error(actual, expected) < tolerance
    assert torch.all(actual[counts == 0] == 0)  # no expert kept: the MoE output is exactly zero


def test_registered_implementation_matches_eager_in_a_model(tiny_model, input_ids):
    variable_k_experts.register_variable_k_experts()
    tiny_model.set_experts_implementation("eager")
    expected = tiny_model(input_ids).logits
    tiny_model.set_experts_implementation(variable_k_experts.VARIABLE_K_EXPERTS)
    assert torch.allclose(tiny_model(input_ids).logits, expected, atol=1e-5)


def test_rows_past_the_kept_pairs_are_never_used(monkeypatch):
    """The grouped GEMM leaves rows past the kept pairs undefined: poison them with NaN, the output
    must not change, and the kept count handed to it must be the number of non-sentinel slots."""
    model, experts = _experts()
    weights, index, counts = _routing(40, 8)
    hidden = torch.randn(40, 64)
    expected = variable_k_experts.variable_k_experts_torch(hidden, index, weights, experts)
    real_grouped_matmul = variable_k_experts.grouped_matmul
    kept_counts = []

    def poisoned(rows, expert_weights, offsets, grouped=None):
        output = real_grouped_matmul(rows, expert_weights, offsets, grouped).clone()
        kept_counts.append(int(offsets[-1]))
        output[int(offsets[-1]) :] = float("nan")
        return output

    monkeypatch.setattr(variable_k_experts, "grouped_matmul", poisoned)
    actual = variable_k_experts.variable_k_experts_torch(hidden, index, weights, experts)
    assert kept_counts == [int(counts.sum())] * 2
    assert torch.isfinite(actual).all() and torch.equal(actual, expected)


def test_sort_gives_expert_groups_with_sentinels_last():
    index = torch.tensor([[3, 64, 64], [0, 3, 64], [63, 0, 3]])
    pair_order, offsets = variable_k_experts.sort_pairs_by_expert(index, NUM_EXPERTS)
    sorted_ids = index.reshape(-1)[pair_order]
    assert sorted_ids.tolist() == [0, 0, 3, 3, 3, 63, 64, 64, 64]
    assert offsets.dtype == torch.int32 and offsets.shape == (NUM_EXPERTS,)
    assert offsets[0] == 2 and offsets[2] == 2 and offsets[3] == 5 and offsets[62] == 5 and offsets[63] == 6


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_on_the_path():
    """.item(), .tolist(), bool(tensor) and nonzero all go through these ops; the path must call none."""
    model, experts = _experts()
    weights, index, _ = _routing(33, 8)
    with _OpRecorder() as recorder:
        variable_k_experts.variable_k_experts_torch(torch.randn(33, 64), index, weights, experts)
    assert "aten._grouped_mm" in recorder.ops  # the real grouped GEMM ran (not the per-expert fallback)
    assert not recorder.ops & {"aten._local_scalar_dense", "aten.nonzero", "aten.item"}


def test_unsupported_expert_layout_is_refused():
    model, experts = _experts()
    experts.has_post_expert_norm = True
    weights, index, _ = _routing(4, 8)
    with pytest.raises(NotImplementedError, match="norm after each expert"):
        variable_k_experts.variable_k_experts_forward(experts, torch.randn(4, 64), index, weights)


def test_each_expert_computes_exactly_its_kept_pairs(monkeypatch):
    """The grouped GEMM's group of expert e holds the pairs routed to e, so an expert no token kept gets an
    empty group (no compute), and sentinel slots belong to no group."""
    model, experts = _experts()
    weights, index, _ = _routing(50, 8)
    group_sizes = []

    def recording(rows, expert_weights, offsets, grouped=None):
        group_sizes.append(torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long()))
        return real(rows, expert_weights, offsets, grouped)

    real = variable_k_experts.grouped_matmul
    monkeypatch.setattr(variable_k_experts, "grouped_matmul", recording)
    variable_k_experts.variable_k_experts_torch(torch.randn(50, 64), index, weights, experts)
    kept_per_expert = torch.bincount(index[index < NUM_EXPERTS], minlength=NUM_EXPERTS)
    assert (kept_per_expert == 0).any()  # some experts are chosen by no token here
    assert len(group_sizes) == 2 and all(torch.equal(sizes, kept_per_expert) for sizes in group_sizes)


def test_patcher_variable_k_path_matches_the_model_path(tiny_model, input_ids):
    tiny_model.set_experts_implementation("eager")
    before = tiny_model(input_ids).logits
    results = {}
    for path in ("model", "variable_k"):
        patcher = bh_routing.OLMoERouterPatcher(tiny_model, experts_path=path, record_token_counts=True)
        assert patcher.experts_path == path
        for name, patch in {
            "bh": lambda p: p.patch_with_bh(alpha=0.2, min_k=1, max_k=8),
            "topk": lambda p: p.patch_with_topk(k=3),
        }.items():
            patch(patcher)
            results[path, name] = (tiny_model(input_ids).logits, patcher.get_stats())
            assert results[path, name][1]["experts_implementation"] == ("eager" if path == "model" else "variable_k")
        patcher.unpatch()
        assert tiny_model.config._experts_implementation == "eager"  # restored
        assert torch.equal(tiny_model(input_ids).logits, before)  # bit for bit
    for name in ("bh", "topk"):
        assert torch.allclose(results["model", name][0], results["variable_k", name][0], atol=1e-5)
        assert torch.equal(results["model", name][1]["token_counts"], results["variable_k", name][1]["token_counts"])


def test_patcher_default_experts_path_on_cpu_is_the_model_path(tiny_model):
    assert bh_routing.OLMoERouterPatcher(tiny_model).experts_path == "model"


def test_patcher_rejects_unknown_experts_path(tiny_model):
    with pytest.raises(ValueError, match="experts_path must be one of"):
        bh_routing.OLMoERouterPatcher(tiny_model, experts_path="fast")


TRITON_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import bh_experiment
import variable_k_experts
assert variable_k_experts.triton is not None
model = bh_experiment.build_random_olmoe(seed=0, hidden_size=96, intermediate_size=48)
experts = model.model.layers[0].mlp.experts
model.set_experts_implementation("eager")
decode_calls, decode = [], variable_k_experts.variable_k_experts_decode
compiler_is_compiling = torch.compiler.is_compiling
variable_k_experts.variable_k_experts_decode = lambda *args: decode_calls.append(1) or decode(*args)
# The interpreter rounds float32 to bfloat16 by truncation, twice the error of a GPU's round-to-nearest.
for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
    experts.to(dtype)  # the weights as this dtype holds them; the float64 reference below reads them exactly
    # (37, 8) and (3, 8) take the grouped path, the others (at most DECODE_PAIRS pairs) the decode path
    for num_tokens, slots in ((37, 8), (3, 8), (1, 8), (2, 8), (6, 2)):
        generator = torch.Generator().manual_seed(num_tokens)
        weights, index = torch.softmax(torch.randn(num_tokens, 64, generator=generator), -1).topk(slots)
        counts = (torch.arange(num_tokens) + slots) % (slots + 1)
        kept = torch.arange(slots)[None] < counts[:, None]
        weights, index = torch.where(kept, weights, 0.0), torch.where(kept, index, 64)
        hidden = torch.randn(num_tokens, 96, generator=generator).to(dtype)
        experts.to(torch.float64)
        expected = experts(hidden.double(), index, weights.double())
        experts.to(dtype)
        calls = len(decode_calls)
        kernel = variable_k_experts.variable_k_experts_triton
        actual = kernel(hidden, index, weights, experts.gate_up_proj, experts.down_proj)
        error = ((actual.double() - expected).norm() / expected.norm()).item()
        assert actual.dtype == dtype and error < tolerance, (dtype, num_tokens, slots, error)
        assert torch.all(actual[counts == 0] == 0)
        assert len(decode_calls) - calls == (num_tokens * slots <= variable_k_experts.DECODE_PAIRS), (num_tokens, slots)
        # Without a grouped GEMM (a T4, float16): per-expert matmuls eagerly, the decode kernels when compiled.
        for compiling in (False, True):
            torch.compiler.is_compiling, calls = (lambda c=compiling: c), len(decode_calls)
            actual = kernel(hidden, index, weights, experts.gate_up_proj, experts.down_proj, grouped=False)
            torch.compiler.is_compiling = compiler_is_compiling
            error = ((actual.double() - expected).norm() / expected.norm()).item()
            assert error < tolerance, (dtype, num_tokens, slots, compiling, error)
            decoded = compiling or num_tokens * slots <= variable_k_experts.DECODE_PAIRS
            assert len(decode_calls) - calls == decoded, (num_tokens, slots, compiling)
for dtype, served in ((torch.float16, True), (torch.bfloat16, True), (torch.float32, True), (torch.float64, False)):
    experts.to(dtype)  # the fused path serves a T4's float16 too, with or without a grouped GEMM
    assert variable_k_experts.fused_path_supported(experts, torch.device("cuda")) is served, dtype
print("triton interpreter ok")
"""


def test_triton_kernels_match_eager_under_the_interpreter():
    """`make test` installs Triton into .venv/triton-interpreter (outside the main environment, so the rest
    of the suite sees a CPU install as users have it) and sets BH_TRITON_INTERPRETER_SITE."""
    site = os.environ.get("BH_TRITON_INTERPRETER_SITE")
    if not site:
        pytest.skip("BH_TRITON_INTERPRETER_SITE not set (make test sets it)")
    assert Path(site, "triton").is_dir(), f"no Triton in {site}"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": site}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK, str(REPO)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton interpreter ok" in result.stdout


SM75_CHECK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import variable_k_experts as vk

SIZES = {"hidden_size": "i32", "intermediate_size": "i32", "num_experts": "i32"}
KERNELS = {  # name: (pointer arguments and their element types, the constexprs at the OLMoE shape's sizes)
    "_gather_kept_pairs_kernel": ({"hidden_ptr": "fp16", "pair_order_ptr": "i64", "offsets_ptr": "i32",
                                   "sorted_hidden_ptr": "fp16", "pair_rows_ptr": "i64"}, {"SLOTS": 8, "BLOCK": 256}),
    "_silu_and_mul_kept_kernel": ({"gate_up_ptr": "fp16", "output_ptr": "fp16", "offsets_ptr": "i32"},
                                  {"BLOCK": 256}),
    "_combine_kept_pairs_kernel": ({"expert_outputs_ptr": "fp16", "pair_rows_ptr": "i64", "top_k_index_ptr": "i64",
                                    "top_k_weights_ptr": "fp16", "output_ptr": "fp16"},
                                   {"SLOTS": 8, "BLOCK": 256, "ROWS_ARE_PAIRS": False}),
    "_pair_gate_up_kernel": ({"hidden_ptr": "fp16", "top_k_index_ptr": "i64", "gate_up_ptr": "fp16",
                              "activated_ptr": "fp16"}, {"SLOTS": 8, "BLOCK_N": 32, "BLOCK_K": 128}),
    "_pair_down_kernel": ({"activated_ptr": "fp16", "top_k_index_ptr": "i64", "down_ptr": "fp16",
                           "expert_outputs_ptr": "fp16"}, {"BLOCK_N": 32, "BLOCK_K": 128}),
}
for name, (pointers, constants) in KERNELS.items():
    kernel = getattr(vk, name)
    signature = {}
    for argument in kernel.arg_names:
        if argument in pointers:
            signature[argument] = "*" + pointers[argument]
        else:
            signature[argument] = "constexpr" if argument in constants else SIZES[argument]
    constexprs = {(kernel.arg_names.index(k),): v for k, v in constants.items()}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 75, 32))
    assert compiled.asm["cubin"] and ".target sm_75" in compiled.asm["ptx"], name
    print(name, "sm_75", len(compiled.asm["cubin"]))
print("sm75 ok")
"""


def test_triton_kernels_compile_for_a_t4_in_float16():
    """The variable-k kernels built for sm75 (a T4) with float16 data, by Triton's own compiler and ptxas,
    without the card: a T4 itself is not available here (issue 29)."""
    site = os.environ.get("BH_TRITON_INTERPRETER_SITE")
    if not site:
        pytest.skip("BH_TRITON_INTERPRETER_SITE not set (make test sets it)")
    env = {**os.environ, "PYTHONPATH": site, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", SM75_CHECK, str(REPO)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("sm_75") == 5 and "sm75 ok" in result.stdout


def test_grouped_gemm_only_where_torch_has_a_kernel(monkeypatch):
    """torch's grouped GEMM only where it has a kernel, sm80+ in bf16 (not a T4): elsewhere the fused path
    runs without it (its decode kernels, per-expert matmuls; the interpreter check)."""
    try:
        for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
            variable_k_experts.grouped_mm_usable.cache_clear()
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            assert variable_k_experts.grouped_mm_usable(torch.device("cuda", 0), torch.bfloat16) is expected
        variable_k_experts.grouped_mm_usable.cache_clear()
        assert not variable_k_experts.grouped_mm_usable(torch.device("cuda", 0), torch.float32)
        assert variable_k_experts.grouped_mm_usable(torch.device("cpu"), torch.float32)  # torch >= 2.9 here
    finally:
        variable_k_experts.grouped_mm_usable.cache_clear()


def test_per_expert_fallback_matches_the_grouped_gemm(monkeypatch):
    """Without a grouped GEMM kernel (a T4, float32 on CUDA) each expert's rows get one matmul."""
    model, experts = _experts()
    weights, index, _ = _routing(29, 8)
    hidden = torch.randn(29, 64)
    arguments = (hidden, index, weights, experts)
    expected = variable_k_experts.variable_k_experts_torch(*arguments)
    monkeypatch.setattr(variable_k_experts, "grouped_mm_usable", lambda device, dtype: False)
    assert torch.allclose(variable_k_experts.variable_k_experts_torch(*arguments), expected, atol=1e-6)
