"""The experiment harness: what the notebook, the scripts and the benchmarks run around `bh_routing`.

    import bh_experiment as bx
    from bh_routing import MoERouterPatcher
    model, tokenizer = bx.load_model("embedded")  # or a local directory, or "allenai/OLMoE-1B-7B-0924"
    token_ids = tokenizer(bx.load_heldout_text("embedded"), return_tensors="pt").input_ids[0, :2048]
    patcher = MoERouterPatcher(model, record_token_counts=True).patch("bh", alpha=0.05, max_k=8)
    quality = bx.evaluate_language_model(model, token_ids, window=256, patcher=patcher)  # perplexity, counts

1. Models: `load_model` (the embedded default, a local directory or a hub id), `load_config`, `memory_plan`,
   `environment_info`, `build_random_moe` (random weights of any family, e.g. the real shape from a config).
2. Text and evaluation: `load_heldout_text`, `sliding_windows`, `evaluate_language_model` (perplexity with the
   routing decisions of every scored position), `collect_router_logits` (calibration text), the oracle check
   (`oracle_drop_effects`).
3. Timed generation: `generate_timed` on a generation path (`GENERATION_PATHS`, `fastest_generation_path`,
   `generation_settings`, `generate_with`), `throughput_summary`; the paths and the evaluation measured before a run
   (`choose_generation_path`, `probe_evaluation`) and the run's time estimated from them (`estimate_runtime`).
4. Tables: quality at equal compute against the baselines with paired bootstrap intervals (`frontier_table`,
   `best_at_budget`, `layer_matched_table`), saturation, the calibration diagnostics (`null_rejection_rates`,
   `bulk_shape`, `null_pvalue_quantiles`), the token level and the oracle table.
5. Results on disk: `atomic_write`, `ResultStore` (one file per configuration, resumable, failures recorded),
   the fingerprints a result is resumed by.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import pickle
import platform
import re
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import transformers
from scipy.stats import false_discovery_control, rankdata, spearmanr
from scipy.stats import t as student_t

from bh_routing import (
    NATIVE_TOP_K,
    PVALUE_METHODS,
    ROUTING_METHODS,
    MoERouterPatcher,
    RouterShape,
    compute_p_values,
    permute_experts,
    pvalue_method_of,
    robust_z_trimmed,
    route_logits,
    routing_method,
)
from moe_families import RouterSpec, find_moe_layers, moe_shape
from variable_k_experts import fused_path_supported, grouped_mm_usable

__all__ = [
    "HUB_MODEL_ID",
    "EMBEDDED_MODEL_DIR",
    "load_model",
    "load_config",
    "model_source",
    "memory_plan",
    "GIB",
    "environment_info",
    "run_settings",
    "build_random_moe",
    "EMBEDDED_TEXTS",
    "load_heldout_text",
    "evaluate_language_model",
    "collect_router_logits",
    "ORACLE_CONTEXT",
    "oracle_drop_effects",
    "GENERATION_PATHS",
    "fastest_generation_path",
    "GenerationProbe",
    "probe_generation",
    "fast_compiled_path",
    "generation_candidates",
    "choose_generation_path",
    "probe_evaluation",
    "estimate_runtime",
    "generation_settings",
    "generate_timed",
    "generate_with",
    "throughput_summary",
    "progress",
    "repetition",
    "generation_measures",
    "group_intervals",
    "window_dependence",
    "block_length",
    "politis_white_block",
    "bootstrap_window_weights",
    "bootstrap_interval",
    "family_significance",
    "STRONGEST",
    "window_sums",
    "frontier_table",
    "best_at_budget",
    "layer_matched_table",
    "saturation_analysis",
    "null_rejection_rates",
    "bulk_shape",
    "null_pvalue_quantiles",
    "count_correlation",
    "token_level_analysis",
    "oracle_table",
    "atomic_write",
    "atomic_write_text",
    "save_figure",
    "note_failures",
    "ResultStore",
    "function_fingerprint",
    "measurement_span",
    "halving_batches",
]

# What results depend on: the routing, its statistics, the families, the experts path, BH's fused route (a
# GPU run's), the harness and the allocations it fits: every project module the last two import.
FINGERPRINTED_SOURCES = (
    "bh_routing.py",
    "routing_statistics.py",
    "moe_families.py",
    "variable_k_experts.py",
    "fused_bh_route.py",
    "bh_experiment.py",
    "bh_allocation.py",
)
GAUSSIAN_BULK_TOKENS = 2**15  # simulated tokens behind `bulk_shape`'s Gaussian reference


# ----------------------------------------------------------------------------------------------------
# 1. Models: the hub model, a local directory, the embedded default, or random weights of any family
# ----------------------------------------------------------------------------------------------------


HUB_MODEL_ID = "allenai/OLMoE-1B-7B-0924"  # the model the project studies; needs the hub and a GPU
REPO_DIR = Path(__file__).resolve().parent
EMBEDDED_MODEL_DIR = REPO_DIR / "models" / "tiny-olmoe"


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


LOSS_CHUNK_ELEMENTS = 2**26  # float32 logits per chunk of the loss (256 MiB): never a full [B, W, V] copy


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


def measurement_span(*sweeps: dict) -> dict:
    """{"first", "last"}: when the earliest and the latest of the sweeps' results ({name: result}, as
    `ResultStore.run` returns them) were saved, UTC, whatever run resumed or reused them; "unknown" counts
    results saved without a time (by an older version)."""
    times = [r.get("saved_at") for sweep in sweeps for r in sweep.values() if isinstance(r, dict)]
    known = sorted(t for t in times if t)
    return {"first": known[0] if known else None, "last": known[-1] if known else None,
            "unknown": len(times) - len(known)}  # fmt: skip


def environment_info(model=None, device=None) -> dict:
    """Versions, hardware and date, for the report and the JSON."""

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


TINY_MOE_BASE = dict(
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
        config = TINY_MOE_BASE | TINY_MOE_CONFIGS[model_type]
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


# ----------------------------------------------------------------------------------------------------
# 2. Text and evaluation: held-out text, sliding-window perplexity, router logits, the oracle check
# ----------------------------------------------------------------------------------------------------


HELDOUT_TEXT_PATH = REPO_DIR / "data" / "heldout.txt"


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


def heldout_documents(source: str | Path = "embedded") -> list[str]:
    """The documents of a held-out text (`load_heldout_text`), split at lines holding only <|endoftext|>."""
    documents = load_heldout_text(source).split("\n<|endoftext|>\n")
    return [doc.strip() for doc in documents if doc.strip() and doc.strip() != "<|endoftext|>"]


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


def halving_batches(items: list, batch_size: int, run: Callable[[list], object], what: str) -> tuple[list, int]:
    """run(batch) over `items`, `batch_size` at a time; on out-of-memory the batch is halved and retried (its
    partial results dropped), down to 1, where the error is raised. Every GPU batch of the harness goes
    through here. Returns ([run's result of each batch], the batch size that ran last)."""
    results, position = [], 0
    while position < len(items):
        batch = items[position : position + batch_size]
        try:
            result = run(batch)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            result = None
        if result is None:  # outside the except block, where the failed batch's tensors are already released
            batch_size //= 2
            torch.cuda.empty_cache()
            warnings.warn(f"out of memory: {what} with batches of {batch_size}", stacklevel=3)
            continue
        results.append(result)
        position += len(batch)
    return results, batch_size


def _score_all(model, token_ids, windows, batch_size, patcher) -> tuple[dict[str, list], int]:
    """Every window scored, `batch_size` windows per forward pass (halved on out-of-memory: `halving_batches`).
    Returns the parts and the batch size that ran last."""
    device = next(model.parameters()).device
    parts = _empty_parts()
    score = functools.partial(_score_batch, model, token_ids, device=device, patcher=patcher)
    scored, batch_size = halving_batches(windows, batch_size, score, "evaluating")
    for batch in scored:
        for name, values in batch.items():
            parts[name] += values
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
    capacity = None if patcher is None else patcher.statistics.token_capacity
    if capacity is not None and batch_size * window > capacity:  # a forward pass's counts must fit the ring
        raise ValueError(
            f"batch_size x window ({batch_size} x {window}) must be <= the patcher's token_capacity ({capacity}): "
            "lower batch_size or window, or MoERouterPatcher(model, record_token_counts=True, token_capacity=...)"
        )
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
    logits each patched router received): a list of L float32 tensors [positions, E'] on the CPU (the batch
    halved on out-of-memory: `halving_batches`). These are the logits the routing methods route
    (`RouterSpec.selection`): the router's own logits, except for the sigmoid and group-limited families, whose
    E' selectable experts vary by token."""
    _check_windows(window, window, batch_size)
    layers = find_moe_layers(model)
    collected: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(layer):
        spec = layers[layer].spec
        return lambda module, args, output: collected[layer].append(
            (output[0] if spec.plain else spec.selection(output[0])[0]).detach().float().cpu()
        )

    def forward(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        for parts in collected:  # what a batch that ran out of memory had collected is dropped with it
            parts.clear()
        model(torch.stack(batch).to(device), use_cache=False)
        return [list(parts) for parts in collected]

    handles = [moe.router.register_forward_hook(keep(layer)) for layer, moe in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        spans = [(begin, end) for begin, end, _ in sliding_windows(token_ids.numel(), window, window)]
        full = [token_ids[begin:end] for begin, end in spans if end - begin == window]
        tail = [token_ids[begin:end] for begin, end in spans if end - begin != window]  # the last span, if short
        batches, _ = halving_batches(full, batch_size, forward, "collecting router logits")
        batches += [forward(tail)] if tail else []
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat([part for batch in batches for part in batch[layer]]) for layer in range(len(layers))]


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


ORACLE_CONTEXT = 64  # tokens of context before each position of the oracle check


@torch.no_grad()
def oracle_drop_effects(
    model, token_ids: torch.Tensor, layer: int, positions, context: int = ORACLE_CONTEXT, batch_positions: int = 16
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
    num_slots, captured = spec.top_k, []
    hook = _drop_last_position_slots(num_slots, context, captured, spec)

    def drop_effects(chunk):  # (router logits [P, E], loss increases [P, k]) of a chunk of positions
        captured.clear()
        prefixes = torch.stack([token_ids[t - context + 1 : t + 1] for t in chunk])  # [P, context]
        inputs = prefixes.repeat_interleave(num_slots + 1, dim=0).to(device)  # [P (k + 1), context]
        logits = model(inputs, use_cache=False).logits[:, -1].float()  # [P (k + 1), V]
        targets = token_ids[torch.tensor(chunk) + 1].repeat_interleave(num_slots + 1).to(device)
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None]).squeeze(-1)
        nll = nll.view(len(chunk), num_slots + 1).cpu()
        return torch.cat(captured), nll[:, 1:] - nll[:, :1]

    handle = moe_layers[layer].router.register_forward_hook(hook)
    try:
        chunks, _ = halving_batches(positions, batch_positions, drop_effects, "the oracle check")
    finally:
        handle.remove()
    return {
        "layer": layer,
        "positions": torch.tensor(positions),
        "router_logits": torch.cat([logits for logits, _ in chunks]),
        "loss_increase": torch.cat([increase for _, increase in chunks]).double(),
    }


# ----------------------------------------------------------------------------------------------------
# 3. Timed generation
# ----------------------------------------------------------------------------------------------------


def progress(items, label: str, name: Callable = str):
    """Yield each of `items`, then print one line for it, "label i/n: name(item) (x.x s)", so that a headless
    run's log shows how far a loop got and what each step took (a line per step, no carriage returns)."""
    items = list(items)
    for index, item in enumerate(items, 1):
        started = time.perf_counter()
        yield item
        print(f"{label} {index}/{len(items)}: {name(item)} ({time.perf_counter() - started:.1f} s)", flush=True)


def repetition(token_ids, n: int = 3) -> dict:
    """How repetitive a generated sequence of tokens is: the share of its n-grams that occurred earlier in it
    ("repeated_ngram_share"), the share of its tokens equal to the token before ("repeat_previous_share"), and
    the longest run of one token repeated ("longest_repeat_run", in tokens). Degenerate text scores high."""
    ids = [int(token) for token in token_ids]
    grams, seen, repeated = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)], set(), 0
    for gram in grams:
        repeated, seen = repeated + (gram in seen), seen | {gram}
    runs, run = [1] if ids else [0], 1
    for previous, token in zip(ids, ids[1:], strict=False):
        run = run + 1 if token == previous else 1
        runs.append(run)
    same = sum(token == previous for previous, token in zip(ids, ids[1:], strict=False))
    return {
        "repeated_ngram_share": repeated / len(grams) if grams else 0.0,
        "repeat_previous_share": same / (len(ids) - 1) if len(ids) > 1 else 0.0,
        "longest_repeat_run": max(runs),
    }


def generation_measures(prompt_results: list[dict]) -> dict:
    """What a configuration's generations show beside its speed: the average experts over the prompts' tokens
    and over the generated tokens apart (each prompt result's "token_counts" [tokens, layers], the first
    "prompt_tokens" rows its prompt's), and the means over prompts of `repetition` of "generated_ids"."""
    prompt, generated = [], []
    for result in prompt_results:
        counts = np.asarray(result["token_counts"], dtype=np.float64).reshape(
            -1, max(1, len(result["token_counts"][0]))
        )
        prompt.append(counts[: result["prompt_tokens"]])
        generated.append(counts[result["prompt_tokens"] :])
    repeats = [repetition(result["generated_ids"]) for result in prompt_results]
    measures = {
        "avg_experts_prompt_tokens": float(np.concatenate(prompt).mean()) if prompt else math.nan,
        "avg_experts_generated_tokens": float(np.concatenate(generated).mean())
        if sum(map(len, generated))
        else math.nan,
    }
    return measures | {key: float(np.mean([r[key] for r in repeats])) for key in (repeats[0] if repeats else {})}


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
    """The generation path to time on `device` when nothing is measured: "static_compiled" on a GPU, where CUDA
    graphs remove the launch cost that bounds decoding; "dynamic" on a CPU, where compiling costs seconds per
    configuration and buys little (benchmarks/README.md measures the paths on both). `choose_generation_path`
    measures where this is not known."""
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


class _StaticCaches(dict):
    """(batch, length) -> StaticCache, shared by the models of one cache layout (a dict that can be weakly held)."""


_LAYOUT_CACHES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # layout -> its _StaticCaches
_MODEL_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its layout's _StaticCaches


def _static_caches(model) -> _StaticCaches:
    """The static caches of `model`'s layout (its decoder config, dtype and devices), shared with every live model
    of that layout (e.g. copies of one model sharing its weights), freed with the last of them."""
    if model not in _MODEL_CACHES:
        config = model.config.get_text_config(decoder=True).to_json_string()
        devices = tuple(sorted({str(parameter.device) for parameter in model.parameters()}))
        layout = (type(model).__name__, config, str(model.dtype), devices)
        _MODEL_CACHES[model] = _LAYOUT_CACHES.setdefault(layout, _StaticCaches())
    return _MODEL_CACHES[model]


def generate_with(model, input_ids: torch.Tensor, settings: dict | None = None, **kwargs):
    """model.generate(input_ids, **settings, **kwargs), where a static cache (`generation_settings`) is one kept
    for the model's layout, batch and length and reset in place, rather than a new one each call as
    transformers' generate makes: a compiled forward under CUDA graphs is recorded on its cache's tensors and
    would be recorded again at every generate on a new cache's (benchmarks/gpu_notes.md). Models of one
    layout share it (generate calls of one thread follow one another), so a cache that generate returns
    (`past_key_values`) holds that call's keys and values only until the next call."""
    settings = dict(settings or {})
    if settings.get("cache_implementation") == "static":
        del settings["cache_implementation"]
        length = settings.pop("max_cache_len", None)
        if length is None and not isinstance(kwargs.get("max_new_tokens"), int):
            raise ValueError("a static cache needs its length: max_cache_len in settings, or max_new_tokens")
        key = (input_ids.shape[0], length or input_ids.shape[1] + kwargs["max_new_tokens"])
        caches = _static_caches(model)
        if key not in caches:
            from transformers import StaticCache

            caches[key] = StaticCache(config=model.config, max_cache_len=key[1])
        settings["cache"] = caches[key]
        settings["cache"].reset()  # in place: the tensors a recorded graph reads stay where they are
    return model.generate(input_ids, **settings, **kwargs)


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
    output_ids = generate_with(
        model,
        input_ids,
        settings,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **minimum,
    )
    synchronize(device)
    return input_ids, output_ids, time.perf_counter() - start


class GenerationProbe(NamedTuple):
    """One generation path measured on a model as it is: the seconds its first call takes beyond a steady call
    (compilation and CUDA-graph capture on a compiled path) and the tokens/s of a steady call."""

    path: str
    first_call_seconds: float
    tokens_per_second: float

    def seconds(self, calls: int, tokens: int) -> float:
        """The time of `calls` first calls (one per configuration patched) and `tokens` generated tokens."""
        return calls * self.first_call_seconds + tokens / self.tokens_per_second


def probe_generation(model, tokenizer, prompt: str, new_tokens: int, path: str, max_cache_len=None) -> GenerationProbe:
    """`path` measured with `prompt`: one generate of `new_tokens` (its first call), then one more, timed."""
    settings = generation_settings(path, max_cache_len, next(model.parameters()).device)
    first = generate_timed(model, tokenizer, prompt, new_tokens, exact=True, settings=settings)[2]
    steady = generate_timed(model, tokenizer, prompt, new_tokens, exact=True, settings=settings)[2]
    return GenerationProbe(path, max(first - steady, 0.0), new_tokens / steady)


def fast_compiled_path(model) -> bool:
    """Whether the variable-k path's fused kernels with torch's grouped GEMM serve every MoE layer of `model`
    where it is (a GPU of sm80+ in bf16 with Triton, the OLMoE layout), the path measured fastest: where the
    compiled path's timings show what routing saves. Without a grouped GEMM (a T4, float16) the fused decode
    kernels serve, but which generation path is faster there is measured (`choose_generation_path`)."""
    device = next(model.parameters()).device
    return all(
        fused_path_supported(layer.experts, device) and grouped_mm_usable(device, layer.experts.gate_up_proj.dtype)
        for layer in find_moe_layers(model)
    )


def generation_candidates(device, fast_compiled: bool) -> list[str]:
    """The paths `choose_generation_path` measures on `device`: the one `fastest_generation_path` names on a
    CPU, or on a GPU where the fused kernels serve (`fast_compiled`); both dynamic and static compiled on any
    other GPU, where which is faster is not known beforehand."""
    known = torch.device(device).type != "cuda" or fast_compiled
    return [fastest_generation_path(device)] if known else ["dynamic", "static_compiled"]


def choose_generation_path(
    model,
    tokenizer,
    prompt: str,
    new_tokens: int,
    max_cache_len: int,
    calls: int,
    tokens: int,
    candidates=None,
    log=print,
    patcher=None,
    routing=None,
) -> tuple[GenerationProbe, list[GenerationProbe]]:
    """The path the sweep generates on, measured on `prompt`.

    candidates: the paths to measure (names of `GENERATION_PATHS`); None: on a CPU the dynamic path and on a
    GPU with `fast_compiled_path` the static compiled one (`fastest_generation_path`), on any other GPU (a T4,
    float16, a family without the fused kernels) both. Of those, the one whose sweep of `calls`
    configurations and `tokens` generated tokens takes least time (compilations included) is chosen. A path
    that fails to compile is left out, with its error in `log`. patcher and routing (a `RoutingConfig`),
    given together: each path is probed with the model patched with `routing` (a sweep's configuration, whose
    hooks, kernels and statistics cost time the model's own routing does not), and unpatched after; neither:
    the model's own routing. Returns (the chosen probe, every probe)."""
    device = next(model.parameters()).device
    if candidates is None:
        candidates = generation_candidates(device, fast_compiled_path(model))
    unknown = sorted(set(candidates) - set(GENERATION_PATHS))
    if not candidates or unknown:
        raise ValueError(f"candidates must name paths of {sorted(GENERATION_PATHS)}, got {candidates!r}")
    if (patcher is None) != (routing is None):
        raise ValueError(f"patcher and routing must be given together or not at all, got {patcher=}, {routing=}")
    probes = []
    for path in candidates:
        probe = functools.partial(probe_generation, model, tokenizer, prompt, new_tokens, path, max_cache_len)
        try:
            probes.append(_probe_routed(probe, path, patcher, routing, log))
        except RuntimeError as error:  # dynamo's and inductor's errors are RuntimeErrors
            log(f"generation path {path!r} left out: {error}")
    if not probes:
        raise RuntimeError(f"no generation path of {candidates} ran on {device}")
    chosen = min(probes, key=lambda probe: probe.seconds(calls, tokens))
    for probe in probes:
        log(
            f"generation path {probe.path}: {probe.tokens_per_second:.1f} tok/s, its first call "
            f"{probe.first_call_seconds:.1f} s longer; the sweep ~{probe.seconds(calls, tokens) / 60:.1f} min"
            + (" (chosen: the faster)" if probe is chosen and len(probes) > 1 else "")
        )
    return chosen, probes


def _probe_routed(probe, path: str, patcher, routing, log) -> GenerationProbe:
    """`probe()` of `path` with `routing` patched afresh (a configuration's first call compiles it) and unpatched
    after; if that fails (e.g. out of memory), with the model's own routing, said in `log`: the sweep records
    that configuration's failure itself, and the run goes on."""
    if routing is not None:
        try:
            routing.apply(patcher)
            return probe()
        except RuntimeError as error:
            log(f"generation path {path!r} with {routing.name} failed ({error}): probed unpatched instead")
        finally:
            patcher.unpatch()
    return probe()


@torch.no_grad()
def probe_evaluation(model, window: int, batch_size: int) -> float | None:
    """Tokens/s of `evaluate_language_model` with the model's own routing: `batch_size` windows of random
    tokens, timed the second time (the first allocates the batch's memory and, on out-of-memory, halves the
    batch as a run does). None where not even one window fits in memory: the run then records each
    evaluation's failure, and nothing is estimated for it."""
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(model.config.vocab_size, (window * batch_size,), generator=generator)
    try:
        batch_size = evaluate_language_model(model, token_ids, window, None, batch_size)["batch_size"]
        synchronize(next(model.parameters()).device)
        started = time.perf_counter()
        scored = evaluate_language_model(model, token_ids, window, None, batch_size)["num_scored"]
    except torch.OutOfMemoryError:
        return None
    return scored / (time.perf_counter() - started)


def estimate_runtime(generation: GenerationProbe, calls: int, generated_tokens: int, evaluate_tokens_per_second,
                     evaluated_tokens: int) -> dict[str, float]:  # fmt: skip
    """Seconds of a run's parts from its counted work and measured rates: "sweep" (`calls` configurations
    patched, `generated_tokens` generated, at `generation`'s rates), "evaluation" (`evaluated_tokens` forward
    tokens at `evaluate_tokens_per_second`; NaN where that rate is None, unmeasured) and "total"."""
    if min(calls, generated_tokens, evaluated_tokens) < 0:
        raise ValueError(f"work must be >= 0, got {calls=}, {generated_tokens=}, {evaluated_tokens=}")
    sweep = generation.seconds(calls, generated_tokens)
    evaluation = 0.0
    if evaluated_tokens:
        evaluation = math.nan if evaluate_tokens_per_second is None else evaluated_tokens / evaluate_tokens_per_second
    return {"sweep": sweep, "evaluation": evaluation, "total": sweep + evaluation}


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
# 4. Tables: quality at equal compute with bootstrap intervals, calibration diagnostics, token level, oracle
# ----------------------------------------------------------------------------------------------------


FRONTIER_RESAMPLES = 1000  # paired bootstrap resamples of the evaluation windows
FRONTIER_LEVEL = 0.95
STRONGEST = "strongest"  # the lowest of the baseline curves at each average experts
FAMILY_LEVEL = 0.05  # the level at which a family of comparisons is corrected (Holm, Benjamini-Hochberg)


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


def _autocovariance(values: np.ndarray, lag: int) -> float:
    return float(values[lag:] @ values[: len(values) - lag]) / len(values)


def block_length(series) -> int:
    """The block length of the intervals' circular block bootstrap over a series of adjacent windows: Politis
    & White's (`politis_white_block`), raised to ceil(sqrt(n)) when it finds dependence (a length above 1). Their
    rule minimises the mean squared error of the variance estimate, not the coverage error of an interval, and
    with a few dozen windows its intervals fall short of their level: on AR(1) windows of lag-1 correlation 0.5
    their coverage was about 0.83-0.88, with the floor about 0.90-0.93 (32 and 64 windows, Student-t quantiles
    of one degree of freedom fewer than the blocks; tests/test_tables.py), at the price of wider intervals."""
    block, n = politis_white_block(series), len(series)
    return block if block == 1 else int(min(max(block, math.ceil(math.sqrt(n))), max(1, n // 4)))


def politis_white_block(series) -> int:
    """The circular block bootstrap's block length for a series of adjacent windows, by Politis & White's
    automatic rule (2004, Econometric Reviews 23(1), with the correction of Patton, Politis & White 2009): the
    autocorrelations are read up to twice the first lag m after which K = max(5, sqrt(log10 n)) of them in a
    row stay below 2 sqrt(log10 n / n), through a flat-top lag window; b = (2 G^2 / D)^(1/3) n^(1/3), between
    1 (no dependence: the plain window bootstrap) and n / 4."""
    values = np.asarray(series, dtype=np.float64) - np.mean(series)
    n = len(values)
    variance = _autocovariance(values, 0)
    if n < 8 or variance == 0:
        return 1
    run, bound = max(5, int(math.sqrt(math.log10(n)))), 2 * math.sqrt(math.log10(n) / n)
    rho = [_autocovariance(values, lag) / variance for lag in range(n)]
    quiet = (m for m in range(1, n - run) if all(abs(rho[m + k]) < bound for k in range(1, run + 1)))
    lags = min(2 * next(quiet, n // 4), n - 1)
    window = [1.0 if abs(k / lags) <= 0.5 else 2 * (1 - abs(k / lags)) for k in range(-lags, lags + 1)]
    covariances = [_autocovariance(values, abs(k)) for k in range(-lags, lags + 1)]
    g = sum(w * c for w, c in zip(window, covariances, strict=True))
    big_g = sum(w * abs(k) * c for w, c, k in zip(window, covariances, range(-lags, lags + 1), strict=True))
    if g <= 0:
        return 1
    block = (2 * big_g**2 / ((4 / 3) * g**2)) ** (1 / 3) * n ** (1 / 3)
    return int(min(max(round(block), 1), max(1, n // 4)))


def window_dependence(quality: dict, reference: str | None = None, lags: int = 3) -> dict:
    """How alike adjacent evaluation windows are: the autocorrelation at lags 1..`lags` of the per-window mean
    NLL of `reference` (default: the first ok configuration of the native routing, else the first ok one),
    and the block length it gives (`block_length`). {"reference", "windows", "autocorrelation", "block"}."""
    ok = {name: r for name, r in quality.items() if r.get("status") == "ok" and "window_nll" in r}
    if not ok:
        return {"reference": None, "windows": 0, "autocorrelation": [], "block": 1}
    native = [name for name, r in ok.items() if not routing_method(r["method"]).changes_routing]
    name = reference if reference in ok else (native or list(ok))[0]
    series = np.asarray(ok[name]["window_nll"]) / np.asarray(ok[name]["window_tokens"])
    values = series - series.mean()
    acf = [_autocovariance(values, lag) / max(_autocovariance(values, 0), 1e-300) for lag in range(1, lags + 1)]
    return {"reference": name, "windows": len(series), "autocorrelation": acf, "block": block_length(series)}


def bootstrap_window_weights(num_windows: int, resamples: int = FRONTIER_RESAMPLES, seed: int = 0, block: int = 1):
    """[1 + resamples, W] multiplicities of each window: row 0 all ones (the point estimate), then `resamples`
    draws of W windows (the paired bootstrap: every configuration is resampled with the same windows). block 1:
    windows drawn with replacement; block b > 1: the circular block bootstrap (Politis & Romano 1992), ceil(W / b)
    runs of b adjacent windows with uniform starts, wrapping at the end, cut to W windows, so that the
    dependence of adjacent windows stays inside each draw and every window is drawn equally often."""
    rng = np.random.default_rng(seed)
    if block <= 1:
        draws = rng.multinomial(num_windows, np.full(num_windows, 1.0 / num_windows), size=resamples)
        return np.vstack([np.ones((1, num_windows)), draws]).astype(np.float64)
    starts = rng.integers(0, num_windows, size=(resamples, math.ceil(num_windows / block)))
    drawn = ((starts[:, :, None] + np.arange(block)) % num_windows).reshape(resamples, -1)[:, :num_windows]
    draws = np.zeros((resamples, num_windows))
    np.add.at(draws, (np.arange(resamples)[:, None], drawn), 1.0)
    return np.vstack([np.ones((1, num_windows)), draws])


def _resampled(results: list[dict], weights):
    """(mean NLL, average experts) of each result under each row of bootstrap weights: [R, C] each; None
    when some result lacks per-window sums or the results' windows differ."""
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
    out = np.full(x.shape, np.nan)
    for row in range(x.shape[0]):
        order = np.argsort(xs[row], kind="stable")
        curve_x, curve_y = xs[row][order], ys[row][order]
        inside = (x[row] >= curve_x[0]) & (x[row] <= curve_x[-1])
        out[row] = np.where(inside, np.interp(x[row], curve_x, curve_y), np.nan)
    return out


def bootstrap_interval(point, samples, blocks: int, level: float = FRONTIER_LEVEL) -> dict:
    """A bootstrap interval and p-value for each column: point [C] +- the Student-t quantile with blocks - 1
    degrees of freedom (the independent units the resampling drew) times the standard deviation of the
    resamples [R - 1, C], and the two-sided p-value of "the difference is 0" from the same t statistic. NaN
    where more than (1 - level) / 2 of the resamples are NaN (a point that leaves a curve's range in them)."""
    samples = np.asarray(samples, dtype=np.float64)
    point = np.asarray(point, dtype=np.float64)
    enough = (np.isfinite(samples).mean(axis=0) >= 1 - (1 - level) / 2) & np.isfinite(point)
    deviation = np.full(point.shape, np.nan)
    if enough.any():
        deviation[enough] = np.nanstd(samples[:, enough], axis=0, ddof=1)
    quantile = student_t.ppf(1 - (1 - level) / 2, max(blocks - 1, 1))
    with np.errstate(all="ignore"):
        p_value = 2 * student_t.sf(np.abs(point / deviation), max(blocks - 1, 1))
    return {"low": point - quantile * deviation, "high": point + quantile * deviation, "p": p_value}


def baseline_curves(results: list[dict]) -> dict[str, list[int]]:
    """{baseline key: indices of the results that are its curve's points} (`RoutingMethod.baseline`), in the
    registry's order of baseline methods."""
    curves = {name: [] for name, method in ROUTING_METHODS.items() if method.is_baseline}
    for index, result in enumerate(results):
        key = routing_method(result["method"]).baseline(result["params"])
        if key is not None:
            curves.setdefault(key, []).append(index)
    return curves


def _versus_baselines(ok: list[dict], resamples: int, seed: int, block: int = 1) -> dict:
    """For every result: its difference to each baseline curve at equal average experts (percent of
    perplexity), and to the strongest (the lowest baseline curve there), as point estimate and bootstrap
    samples: {key: [R, C]} (row 0 the point estimate; only row 0 without per-window sums)."""
    has_windows = ok and "window_tokens" in ok[0]
    weights = bootstrap_window_weights(len(ok[0]["window_tokens"]), resamples, seed, block) if has_windows else None
    resampled = None if weights is None else _resampled(ok, weights)
    measured = np.log([r["perplexity"] for r in ok]), np.asarray([r["avg_experts"] for r in ok], dtype=float)
    nll, experts = (measured[0][None], measured[1][None]) if resampled is None else resampled
    nll[0], experts[0] = measured  # row 0 as measured (the resampled row 0 equals it up to rounding)
    found, at_equal = {}, []
    for key, members in baseline_curves(ok).items():
        curve = _interpolate_rows(experts, experts[:, members], nll[:, members]) if len(members) >= 2 else None
        found[key] = np.full(nll.shape, np.nan) if curve is None else 100.0 * np.expm1(nll - curve)  # [R, C]
        at_equal += [] if curve is None else [curve]
    with np.errstate(all="ignore"):
        lowest = np.fmin.reduce(at_equal) if at_equal else np.full(nll.shape, np.nan)  # NaN only where all are
    blocks = math.ceil(len(ok[0]["window_tokens"]) / block) if has_windows else 1  # the units a resample draws
    return {"deltas": found | {STRONGEST: 100.0 * np.expm1(nll - lowest)}, "blocks": blocks}


def _delta_columns(compared: dict, column: int) -> dict:
    """The columns of one result's differences to every baseline (`_versus_baselines`): delta_vs_<key>_percent,
    _low, _high (the 95% interval) and _p (the two-sided p-value), NaN without resamples."""
    row = {}
    for key, delta in compared["deltas"].items():
        parts = {"low": math.nan, "high": math.nan, "p": math.nan}
        if len(delta) > 1:
            interval = bootstrap_interval(delta[:1, column], delta[1:, [column]], compared["blocks"])
            parts = {name: float(value[0]) for name, value in interval.items()}
        row |= {f"delta_vs_{key}_percent": float(delta[0, column])}
        row |= {f"delta_vs_{key}_{name}": value for name, value in parts.items()}
    return row


def frontier_table(quality: dict[str, dict], resamples: int = FRONTIER_RESAMPLES, seed: int = 0, block: int = 1):
    """Quality at equal compute: for each configuration of a method that is not a baseline (one row with
    its name, method, series and parameters), its perplexity and that of each baseline curve (top-k, top-p,
    the static schedule: `RoutingMethod.baseline`) and of the strongest (the lowest of them) at the same
    average experts; NaN where its average lies outside a curve's measured range. A negative
    `delta_vs_<key>_percent` means the configuration is better at equal compute; `..._low` / `..._high` bound
    its paired bootstrap 95% interval over evaluation windows (every configuration and baseline point resampled
    with the same windows, in blocks of `block` adjacent windows, the curves re-interpolated in each
    resample), and `..._p` is the two-sided bootstrap p-value, when the results carry per-window sums.

    Between two measured baseline points the log-perplexity (mean NLL) is interpolated linearly in
    average experts: that is the mean NLL of routing a matching fraction of tokens with each of the two,
    whereas interpolating perplexity itself would flatter the method (perplexity is convex in the
    experts kept).
    """
    ok = [r for r in quality.values() if r["status"] == "ok"]
    compared = _versus_baselines(ok, resamples, seed, block) if ok else {"deltas": {}, "blocks": 1}
    rows = []
    for column, result in enumerate(ok):
        method = routing_method(result["method"])
        if method.baseline(result["params"]) is not None or not method.changes_routing:
            continue  # a point of a baseline curve (top-p with one p per layer is a rule, not the curve)
        row = {"config": result["name"], "method": method.name, "series": method.series(result["params"])}
        row |= {"per_token": method.per_token, **result["params"]}
        row |= {"avg_experts": result["avg_experts"], "perplexity": result["perplexity"]}
        for key, delta in compared["deltas"].items():
            row[f"{key}_perplexity_at_equal_experts"] = result["perplexity"] / (1 + delta[0, column] / 100)
        rows.append(row | _delta_columns(compared, column))
    keys = [*(name for name, method in ROUTING_METHODS.items() if method.is_baseline), STRONGEST]
    parts = ("_percent", "_low", "_high", "_p")
    compared = [f"{key}_perplexity_at_equal_experts" for key in keys] + [
        f"delta_vs_{k}{p}" for k in keys for p in parts
    ]
    columns = ["config", "method", "series", "per_token", "avg_experts", "perplexity", *compared]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)  # the same columns with no rows


def paired_perplexity_difference(result: dict, reference: dict, resamples: int = FRONTIER_RESAMPLES, seed: int = 0,
                                 block: int = 1):  # fmt: skip
    """Perplexity of `result` against `reference`, both evaluated on the same windows (`window_sums`), in
    percent, with its paired bootstrap 95% interval and two-sided p-value: {"percent", "low", "high", "p"}."""
    weights = bootstrap_window_weights(len(result["window_tokens"]), resamples, seed, block)
    resampled = _resampled([result, reference], weights)
    if resampled is None:
        raise ValueError("result and reference must carry per-window sums over the same windows (window_sums)")
    delta = 100.0 * np.expm1(resampled[0][:, 0] - resampled[0][:, 1])  # [R]
    interval = bootstrap_interval(delta[:1], delta[1:, None], math.ceil(len(result["window_tokens"]) / block))
    return {"percent": float(delta[0])} | {name: float(value[0]) for name, value in interval.items()}


def layer_matched_table(quality: dict, matched: dict, frontier, resamples: int = FRONTIER_RESAMPLES, seed: int = 0,
                        block: int = 1):  # fmt: skip
    """Configurations at equal per-layer budget: for each name in `matched` (its `layerk` evaluation with the
    configuration's own per-layer averages), the range of its per-layer averages, its difference to top-k
    and to the strongest baseline at equal average experts (from `frontier`) and to top-k at equal per-layer
    budget, each with its paired bootstrap 95% interval and p-value."""
    by_config = frontier.set_index("config") if len(frontier) else None
    rows = []
    for name, reference in matched.items():
        result = quality.get(name, {})
        if reference.get("status") != "ok" or result.get("status") != "ok":
            continue
        layers = result["per_layer_avg_experts"]
        method = routing_method(result["method"])
        row = {"config": name, "series": method.series(result["params"]), "per_token": method.per_token}
        row |= {"avg_experts": result["avg_experts"], "layer_min": min(layers), "layer_max": max(layers)}
        for column in (
            f"delta_vs_{key}_{part}" for key in ("topk", STRONGEST) for part in ("percent", "low", "high", "p")
        ):
            at_equal = by_config is not None and name in by_config.index and column in by_config.columns
            row[column] = by_config.loc[name, column] if at_equal else math.nan
        paired = paired_perplexity_difference(result, reference, resamples, seed, block)
        rows.append(row | {f"delta_vs_layer_matched_{part}": value for part, value in paired.items()})
    return pd.DataFrame(rows)


BUDGETS = (1, 2, 3, 4, 6)  # experts per token at which the best method is named


def best_at_budget(
    quality: dict[str, dict],
    budgets=BUDGETS,
    tolerance: float = 0.01,
    resamples: int = FRONTIER_RESAMPLES,
    seed: int = 0,
    block: int = 1,
):
    """For each compute budget b and each series (method and variant, baselines included): its configuration
    with the lowest perplexity among those averaging at most b * (1 + tolerance) experts, ranked (rank 1: the
    best method at that budget); with its difference to every baseline curve and to the strongest at its own
    average experts, as in `frontier_table`, each with its paired bootstrap 95% interval and p-value.

    The interval is that of the chosen configuration; choosing the best of many configurations on the same
    windows favours it (winner's curse), which the interval does not account for.
    """
    ok = [r for r in quality.values() if r["status"] == "ok" and routing_method(r["method"]).changes_routing]
    if not ok:
        return pd.DataFrame()
    compared = _versus_baselines(ok, resamples, seed, block)
    rows = []
    for budget in budgets:
        best = {}
        for i, result in enumerate(ok):
            series = routing_method(result["method"]).series(result["params"])
            within = result["avg_experts"] <= budget * (1 + tolerance)
            if within and (series not in best or result["perplexity"] < ok[best[series]]["perplexity"]):
                best[series] = i
        for rank, (series, i) in enumerate(sorted(best.items(), key=lambda item: ok[item[1]]["perplexity"]), 1):
            per_token = routing_method(ok[i]["method"]).per_token
            row = {"budget": budget, "rank": rank, "series": series, "config": ok[i]["name"], "per_token": per_token}
            row |= {"avg_experts": ok[i]["avg_experts"], "perplexity": ok[i]["perplexity"]}
            rows.append(row | _delta_columns(compared, i))
    return pd.DataFrame(rows)


def family_significance(p_values, level: float = FAMILY_LEVEL) -> dict:
    """Which of a family of comparisons stay significant at `level` once corrected for the family's size, as
    boolean lists aligned with `p_values`: "holm" (Holm's step-down, family-wise error rate, Holm 1979) and
    "bh" (Benjamini-Hochberg, false discovery rate, 1995). NaN p-values are left out of the family (False)."""
    p = np.asarray(p_values, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(p))
    holm, bh = np.zeros(len(p), dtype=bool), np.zeros(len(p), dtype=bool)
    if len(finite):
        order = finite[np.argsort(p[finite], kind="stable")]
        passes = p[order] <= level / (len(finite) - np.arange(len(finite)))  # p_(i) <= level / (m - i + 1)
        holm[order[: int(np.argmin(passes)) if not passes.all() else len(finite)]] = True
        bh[finite] = false_discovery_control(p[finite]) <= level
    return {"comparisons": len(finite), "holm": holm.tolist(), "bh": bh.tolist()}


def saturation_analysis(table, group_by=("pvalue_method", "alpha"), threshold_percent: float = 5.0):
    """Per group (by default per p-value method and alpha): the smallest max_k beyond which raising
    max_k grows avg_experts by < threshold_percent.

    table: rows of one method's grid over max_k (columns: group_by, "max_k", "avg_experts", "status").
    Returns one row per group with the saturation max_k (NaN if avg_experts still grows at the largest
    step), the average at the largest max_k and the growth at each step.
    """

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


CALIBRATION_ALPHAS = (0.01, 0.05, 0.10, 0.20)


def null_rejection_rates(router_logits, alphas=CALIBRATION_ALPHAS, pvalue_methods=None, calibration=None, seed=0):
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

    pvalue_methods = tuple(PVALUE_METHODS) if pvalue_methods is None else pvalue_methods
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
    bulk = torch.sort(logits.double(), dim=-1).values[..., : num_experts - robust_z_trimmed(num_experts)]
    centered = bulk - bulk.mean(dim=-1, keepdim=True)
    variance = centered.square().mean(dim=-1).clamp_min(1e-300)
    skew = centered.pow(3).mean(dim=-1) / variance.pow(1.5)
    return skew, centered.pow(4).mean(dim=-1) / variance.square() - 3.0


def bulk_shape(router_logits, seed: int = 0):
    """Per layer: the mean over tokens of the skewness and excess kurtosis of each token's bulk (its logits
    without the E/4 largest, which robust_z's null estimate leaves out), next to the same for E i.i.d.
    Gaussian logits, the bulk robust_z assumes (not 0: the trimming and E's small size bias both).
    A DataFrame: layer, tokens, skew, excess_kurtosis, gaussian_skew, gaussian_excess_kurtosis."""

    num_experts = router_logits[0].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    gaussian = _bulk_moments(torch.randn(GAUSSIAN_BULK_TOKENS, num_experts, generator=generator))
    rows = []
    for layer, logits in enumerate(router_logits):
        skew, kurtosis = _bulk_moments(logits)
        row = {"layer": layer, "tokens": logits.shape[0], "skew": skew.mean().item()}
        row |= {"excess_kurtosis": kurtosis.mean().item(), "gaussian_skew": gaussian[0].mean().item()}
        rows.append(row | {"gaussian_excess_kurtosis": gaussian[1].mean().item()})
    return pd.DataFrame(rows)


def null_pvalue_quantiles(router_logits, pvalue_methods=None, calibration=None, seed=0, num_levels=60):
    """The p-values of permuted logits (as in `null_rejection_rates`, all experts) against the uniform they
    should follow: per layer and p-value method, observed quantiles at log-spaced levels from 1/(N E) to 1.
    A DataFrame: layer, pvalue_method, expected, observed (a QQ plot on log axes shows the tail BH uses)."""

    pvalue_methods = tuple(PVALUE_METHODS) if pvalue_methods is None else pvalue_methods
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for layer, logits in enumerate(router_logits):
        permuted = permute_experts(logits.float(), generator)
        levels = np.geomspace(1.0 / permuted.numel(), 1.0, num_levels)
        for method in pvalue_methods:
            null = calibration.null(method, layer) if pvalue_method_of(method).fitted and calibration else None
            p_values = compute_p_values(permuted, method, null=null).flatten().double()
            observed = torch.quantile(p_values[torch.randperm(p_values.numel(), generator=generator)[: 2**24]],
                                      torch.from_numpy(levels))  # fmt: skip
            rows += [{"layer": layer, "pvalue_method": method, "expected": e, "observed": o}
                     for e, o in zip(levels, observed.tolist(), strict=True)]  # fmt: skip
    return pd.DataFrame(rows)


def count_correlation(counts_a: torch.Tensor, counts_b: torch.Tensor) -> float:
    """Spearman correlation of two methods' experts per position (mean over layers) on the same positions:
    [S, L] each -> float (whether they spend their experts on the same tokens)."""

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


def _spearman_interval(x, y, slots: int, resamples: int, seed: int, level: float = FRONTIER_LEVEL) -> tuple:
    """The 95% interval of the Spearman correlation of x and y ([U x slots], `slots` values per unit: one routing
    decision's native slots), resampling units with replacement. The ranks are the full sample's: each resample
    is a weighted Pearson correlation of fixed ranks, close to re-ranking for samples this size."""
    units = len(x) // slots
    rx, ry = rankdata(x), rankdata(y)
    sums = [values.reshape(units, slots).sum(1) for values in (rx, ry, rx * rx, ry * ry, rx * ry)]
    weights = np.random.default_rng(seed).multinomial(units, np.full(units, 1.0 / units), size=resamples)
    sx, sy, sxx, syy, sxy = (weights @ np.stack(sums, 1)).T / (slots * units)  # means per resample
    with np.errstate(all="ignore"):
        correlation = (sxy - sx * sy) / np.sqrt((sxx - sx**2) * (syy - sy**2))
    interval = bootstrap_interval([spearmanr(x, y).statistic], correlation[:, None], units, level)
    return float(interval["low"][0]), float(interval["high"][0])


def oracle_table(effects: list[dict], configs, calibration=None, num_experts_per_tok: int = NATIVE_TOP_K,
                 resamples: int = FRONTIER_RESAMPLES, seed: int = 0):  # fmt: skip
    """Whether each configuration keeps the experts that matter (`oracle_drop_effects` per layer): over every
    (position, native slot) pair, the Spearman correlation between "the method keeps it" and the loss its
    drop costs, with its bootstrap 95% interval over the routing decisions (`_spearman_interval`), the share
    kept, and the mean loss increase of the experts it drops (what its choices would cost if the drops added
    up). The first row ranks by the router's own order (slot k - s) for reference.
    """
    increase = torch.cat([e["loss_increase"] for e in effects]).flatten().numpy()  # [P k]
    slots = torch.arange(num_experts_per_tok).expand(len(increase) // num_experts_per_tok, -1)

    def correlation(kept) -> dict:  # a constant (every slot kept, or none) correlates with nothing
        if np.min(kept) == np.max(kept):
            return {"spearman_kept_vs_loss": math.nan, "spearman_low": math.nan, "spearman_high": math.nan}
        low, high = _spearman_interval(kept, increase, num_experts_per_tok, resamples, seed)
        return {
            "spearman_kept_vs_loss": spearmanr(kept, increase).statistic,
            "spearman_low": low,
            "spearman_high": high,
        }

    rows = [{"config": "router order", "series": "reference", **correlation(-slots.flatten().numpy()),
             "kept_share": math.nan, "avg_kept": math.nan, "mean_loss_of_dropped": math.nan}]  # fmt: skip
    shape = RouterShape(effects[0]["router_logits"].shape[-1], num_experts_per_tok)
    for config in configs:
        method = routing_method(config.method)
        if not method.changes_routing:
            continue
        route = functools.partial(route_logits, config.method, calibration=calibration, **config.kwargs)
        routed = [route(e["router_logits"], e["layer"], num_experts_per_tok=num_experts_per_tok) for e in effects]
        counts = torch.cat([routing.expert_counts for routing in routed])
        kept = (slots < counts.clamp_max(num_experts_per_tok)[:, None]).flatten().numpy()
        row = {"config": config.name, "series": method.series(method.parameters(shape, **config.kwargs))}
        row |= correlation(kept) | {"kept_share": float(kept.mean()), "avg_kept": counts.double().mean().item()}
        rows.append(row | {"mean_loss_of_dropped": float(increase[~kept].mean()) if (~kept).any() else 0.0})
    return pd.DataFrame(rows)


def group_intervals(results: dict, resamples: int = FRONTIER_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Average experts per prompt group of each ok configuration of the sweep, with the bootstrap 95% interval
    from resampling the group's prompts (each prompt's decisions together; `bootstrap_interval`, Student-t with
    one degree of freedom fewer than the prompts, so that three prompts give a wide interval rather than their
    range): config, group, prompts, avg_experts, low, high. A group of one prompt gets no interval (NaN)."""
    rows = []
    for name, result in results.items():
        if result.get("status") != "ok":
            continue
        groups = {}
        for prompt in result["prompts"]:
            counts = np.asarray(prompt["token_counts"], dtype=np.float64)
            groups.setdefault(prompt["group"], []).append((counts.sum(), counts.size))
        for group, sums in groups.items():
            total, size = np.asarray(sums).T  # [P] each
            row = {"config": name, "group": group, "prompts": len(sums), "avg_experts": total.sum() / size.sum()}
            low = high = math.nan
            if len(sums) > 1:
                draws = np.random.default_rng(seed).multinomial(len(sums), np.full(len(sums), 1 / len(sums)), resamples)
                interval = bootstrap_interval(
                    [row["avg_experts"]], (draws @ total / (draws @ size))[:, None], len(sums)
                )
                low, high = float(interval["low"][0]), float(interval["high"][0])
            rows.append(row | {"low": low, "high": high})
    return pd.DataFrame(rows, columns=["config", "group", "prompts", "avg_experts", "low", "high"])


# ----------------------------------------------------------------------------------------------------
# 5. Results on disk: atomic writes, one file per configuration, resume, failures recorded
# ----------------------------------------------------------------------------------------------------


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary) on a temporary file beside `path`, then rename it to `path`: readers (and a
    run that is killed) never see a half-written file, and writers of the same path (two processes saving one
    configuration) each write their own temporary, the last rename winning. The temporary keeps the suffix
    (name.<random>.tmp.png), so writers that pick a format from it (matplotlib) work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    temporary = Path(name)
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
    """What a saved result depends on besides its settings: a hash of the sources that compute it
    (`FINGERPRINTED_SOURCES`) and the versions of Python, torch and transformers. A result saved under
    another fingerprint is recomputed."""
    digest = hashlib.sha256()
    for name in FINGERPRINTED_SOURCES:
        digest.update((REPO_DIR / name).read_bytes())
    return {
        "code_sha256": digest.hexdigest()[:16],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def function_fingerprint(*functions: Callable) -> str:
    """A hash of functions' compiled code (bytecode, names, constants, nested functions): it changes when
    their code does, whether they are defined in a file, a notebook cell or exec'd text (line numbers and
    comments do not count). The notebook adds its measuring functions' fingerprint to its resume key."""

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


RESULT_NAME = re.compile(r"[A-Za-z0-9_.+=-]+")  # what a result's file name may hold (`ResultStore.path`)


class ResultStore:
    """Results of a sweep, one JSON file per configuration in `directory`, written as each finishes.

    A configuration is resumed (read back instead of rerun) when its file holds status "ok", the same
    `settings` (the JSON of everything that changes its result, e.g. the model and the prompts) and the same
    `code_fingerprint()`. A configuration that raises is recorded with status "failed" and its error, and
    is retried next time. A saved file that cannot be read (truncated, corrupted) is named in a warning,
    moved aside (name.corrupt.json) and recomputed; so is a configuration whose tensors (name.pt) cannot be.
    `reuse`: another run's directory of the same results (e.g. the default run's results/quality): a result
    this store lacks is copied from there when it would resume there (same settings, code and key), instead
    of being computed; that directory is only read.

        from bh_experiment import ResultStore
        from bh_routing import RoutingConfig
        store = ResultStore(f"{output_dir}/configs", settings={"model": "embedded", "seed": 0})
        config = RoutingConfig.parse("topk:k=2")
        result = store.run(config.name, lambda: {"k": config.kwargs["k"]}, describe={"method": config.method})
    """

    def __init__(self, directory: str | Path, settings: dict, reuse: str | Path | None = None):
        self.directory = Path(directory)
        self.settings = _as_json({**settings, "code": code_fingerprint()})
        self.directory.mkdir(parents=True, exist_ok=True)
        same = reuse is not None and Path(reuse).resolve() == self.directory.resolve()
        self.reuse = None if reuse is None or same else Path(reuse)

    def path(self, name: str, suffix: str = ".json") -> Path:
        """The file of result `name` in the store's directory; ValueError for a name that is not one plain file
        name of letters, digits and _ . + = - (a name made of free text must not reach outside the store)."""
        if not isinstance(name, str) or not RESULT_NAME.fullmatch(name) or name.strip(".") == "":
            raise ValueError(
                f"name must be a file name of letters, digits and '_.+=-' inside {self.directory}, got {name!r}"
            )
        return self.directory / f"{name}{suffix}"

    def check_writable(self) -> None:
        """PermissionError (or the OSError met) naming the directory unless a file can be created there: checked
        before a result is computed, so that a read-only store loses no computation."""
        try:
            handle, name = tempfile.mkstemp(dir=self.directory, prefix=".writable.")
        except OSError as error:
            raise type(error)(error.errno, f"cannot write results to {self.directory}: {error.strerror}") from error
        os.close(handle)
        Path(name).unlink(missing_ok=True)

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

    def _read(self, directory: Path, name: str, key: dict | None) -> dict | None:
        """The result `name` saved in `directory` if it can be resumed (status ok, the store's settings and code,
        the same `key`, its tensors readable), else None; raises what reading a broken file raises."""
        try:
            text = (directory / self.path(name).name).read_text()
        except FileNotFoundError:  # none saved (a concurrent writer renames its file in whole: never half of it)
            return None
        saved = json.loads(text)
        if not isinstance(saved, dict):
            raise ValueError(f"expected a JSON object, found {type(saved).__name__}")
        resumable = saved.get("status") == "ok" and saved.get("settings") == self.settings
        resumable = resumable and saved.get("key") == _as_json(key)
        if resumable and saved.get("tensors"):
            self.load_tensors(name, directory)
        return saved if resumable else None

    def load(self, name: str, key: dict | None = None) -> dict | None:
        """The saved result of `name` if it can be resumed (status ok, same settings and code, the same `key`:
        what this one result depends on besides the store's settings, e.g. a configuration's parameters; its
        tensors readable), else None."""
        try:
            return self._read(self.directory, name, key)
        except (ValueError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            self._move_aside(name, error)
            return None

    def adopt(self, name: str, key: dict | None = None) -> dict | None:
        """The result `name` of the `reuse` directory, copied into this store, if it would resume there; else
        None (a file there that cannot be read is left as it is, and the result computed here)."""
        if self.reuse is None:
            return None
        try:
            saved = self._read(self.reuse, name, key)
        except (ValueError, RuntimeError, EOFError, OSError, pickle.UnpicklingError):
            return None
        if saved is None:
            return None
        self.check_writable()
        if saved.get("tensors"):
            tensors = (self.reuse / self.path(name, ".pt").name).read_bytes()
            atomic_write(self.path(name, ".pt"), lambda temporary: temporary.write_bytes(tensors))
        return self.save(name, {**saved, "reused_from": str(self.reuse)}, key)  # its own saved_at kept

    def save(self, name: str, result: dict, key: dict | None = None) -> dict:
        """Write `result` with the store's settings, its `key` and when it was saved (`saved_at`, UTC, kept from
        `result` if it has one); returns it as it reads back."""
        saved_at = result.get("saved_at") or datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        result = _as_json({**result, "name": name, "settings": self.settings, "key": key, "saved_at": saved_at})
        atomic_write_text(self.path(name), json.dumps(result))
        return result

    def run(self, name: str, compute: Callable[[], dict], describe: dict | None = None, redo: bool = False,
            key: dict | None = None) -> dict:  # fmt: skip
        """The result of `name`: resumed from disk (unless redo; with the same `key`, see `load`), else compute()
        saved as status "ok", or, if compute raises an Exception, a "failed" record with the error (`describe`
        adds fields to it, e.g. the method and parameters). KeyboardInterrupt and other BaseExceptions
        propagate, saving nothing."""
        saved = None if redo else (self.load(name, key) or self.adopt(name, key))
        if saved is not None:
            return saved
        self.check_writable()
        self.path(name, ".pt").unlink(missing_ok=True)  # an older run's tensors must not pass for this one's
        try:
            result = {**compute(), "status": "ok"}
        except Exception as error:  # noqa: BLE001 - a failed configuration is recorded; the sweep goes on
            result = {**(describe or {}), "status": "failed", "error": f"{type(error).__name__}: {error}"}
        if result["status"] == "failed" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # e.g. after an out-of-memory error, once its tensors are released
        return self.save(name, {**result, "tensors": self.path(name, ".pt").exists()}, key)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Per-token arrays of `name` beside its JSON (name.pt), written atomically."""
        return atomic_write(self.path(name, ".pt"), lambda temporary: torch.save(tensors, temporary))

    def load_tensors(self, name: str, directory: Path | None = None) -> dict[str, torch.Tensor]:
        """The per-token arrays saved by `save_tensors` (RuntimeError naming the file if it is unreadable), from
        the store's directory or `directory`."""
        path = (directory or self.directory) / self.path(name, ".pt").name
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise RuntimeError(f"{path}: saved tensors unreadable ({type(error).__name__}: {error})") from error
