#!/usr/bin/env python3
"""Train the project's embedded default model: a tiny OLMoE (transformers' own OlmoeForCausalLM).

Pipeline (all seeded):
  1. reads the corpus written by scripts/prepare_corpus.py (data/corpus/train.txt, val.txt and the
     committed data/heldout.txt; documents separated by a line "<|endoftext|>");
  2. trains a byte-level BPE tokenizer (HF `tokenizers`) on the training split only;
  3. builds an OlmoeConfig with OLMoE-1B-7B's routing geometry (64 experts, top-8,
     norm_topk_prob=False, load-balancing loss with router_aux_loss_coef=0.01 during training) but
     few, narrow layers;
  4. trains with AdamW (bf16 autocast on CUDA, fp32 on CPU) on random windows of the token stream,
     warm-up + cosine schedule, evaluates the validation split periodically and keeps the best
     checkpoint;
  5. reports held-out loss / perplexity / bits per byte and router diagnostics (mean per-layer
     entropy of the 64-way router softmax and of the renormalised top-8 probabilities);
  6. saves config.json, model.safetensors, tokenizer files, generation_config.json and
     training_log.json to --out (default models/tiny-olmoe/).

Examples:
  python scripts/train_tiny_olmoe.py --smoke                      # CPU check, < 2 minutes
  python scripts/train_tiny_olmoe.py --device cuda --max-minutes 5 # the real run (steps chosen
                                                                    # from measured speed)
  python scripts/train_tiny_olmoe.py --device cuda --steps 4000    # fixed number of steps

`--steps 0` (default) measures the step time over the first steps and then fixes the total number
of steps so that training fits --max-minutes; the chosen number is written to training_log.json,
and passing it as --steps reproduces the schedule. --max-minutes is also a hard stop: training ends
there and the best checkpoint so far is saved. GPU kernels (index_add_, scatter) are not bitwise
deterministic, so a rerun matches only up to floating-point noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DOC_SEP = "\n<|endoftext|>\n"
EOS = "<|endoftext|>"
PAD = "<|padding|>"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [d.strip("\n") for d in text.split(DOC_SEP) if d.strip()]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        model_max_length=10**6,
        clean_up_tokenization_spaces=False,
    )
    return hf


def encode_stream(tok, docs: list[str], eos_id: int) -> np.ndarray:
    """Token ids of the documents, each followed by the end-of-text token."""
    out = []
    for i in range(0, len(docs), 512):
        for enc in tok.encode_batch(docs[i : i + 512], add_special_tokens=False):
            out.extend(enc.ids)
            out.append(eos_id)
    return np.asarray(out, dtype=np.int32)


# ----------------------------------------------------------------------------- model
def build_config(args, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        output_router_logits=True,  # training: transformers adds router_aux_loss_coef * aux to the loss
        router_aux_loss_coef=0.01,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        use_cache=True,
    )


class _Bf16ExpertsView:
    """Reads an experts module's attributes, giving its expert weights as (differentiable) bf16 casts."""

    def __init__(self, module):
        self._m = module

    def __getattr__(self, name):
        v = getattr(self._m, name)
        if name in ("gate_up_proj", "down_proj", "up_proj"):
            return v.to(torch.bfloat16)
        return v


def register_bf16_grouped_mm() -> bool:
    """Register "grouped_mm_bf16": transformers' grouped_mm experts path run on bf16 casts of the fp32
    expert weights (torch's grouped_mm is not autocast-aware; its fast kernel is bf16)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
    except ImportError:
        return False

    def grouped_mm_bf16_forward(self, hidden_states, top_k_index, top_k_weights):
        return grouped_mm_experts_forward(_Bf16ExpertsView(self), hidden_states, top_k_index, top_k_weights)

    ALL_EXPERTS_FUNCTIONS["grouped_mm_bf16"] = grouped_mm_bf16_forward
    return True


def pick_experts_impl(model, batch_fn, device, amp, requested: str) -> tuple[str, dict]:
    """Try the fast experts implementations on a real training batch, keep the fastest that works."""
    if requested != "auto":
        if requested == "grouped_mm_bf16":
            register_bf16_grouped_mm()
        model.config._experts_implementation = requested
        return requested, {}
    if device.type != "cuda":
        model.config._experts_implementation = "eager"
        return "eager", {}
    timings = {}
    candidates = (["grouped_mm_bf16"] if register_bf16_grouped_mm() else []) + ["grouped_mm", "eager"]
    for impl in candidates:
        try:
            model.config._experts_implementation = impl
            x = batch_fn()
            ts = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = model(input_ids=x, labels=x)
                out.loss.backward()
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            timings[impl] = min(ts[1:])
            log(f"experts implementation {impl}: {timings[impl] * 1000:.1f} ms per forward+backward")
            if impl == "grouped_mm":
                break  # a grouped_mm path works: the eager loop over 64 experts is always slower on GPU
        except Exception as e:  # noqa: BLE001
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            timings[impl] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            log(f"experts implementation {impl} failed: {timings[impl]}")
    ok = {k: v for k, v in timings.items() if isinstance(v, float)}
    best = min(ok, key=ok.get)
    model.config._experts_implementation = best
    return best, timings


# ----------------------------------------------------------------------------- evaluation
def window_groups(n: int, seq_len: int, batch: int) -> list[tuple[int, int, int]]:
    """Batches (first window, end window, window length) of the non-overlapping windows that predict n tokens."""
    n_full = n // seq_len
    groups = [(i, min(i + batch, n_full), seq_len) for i in range(0, n_full, batch)]
    if n % seq_len:
        groups.append((n_full, n_full + 1, n % seq_len))  # the shorter tail window
    return groups


def window_batch(stream: torch.Tensor, first: int, end: int, seq_len: int, length: int, device):
    """Inputs and targets of windows first..end-1 (each starting at a multiple of seq_len)."""
    starts = torch.arange(first, end) * seq_len
    pos = starts[:, None] + torch.arange(length + 1)[None, :]
    chunk = stream[pos].to(device, dtype=torch.long)
    return chunk[:, :-1], chunk[:, 1:]


class RouterStats:
    """Per-layer sums of router diagnostics over the evaluated tokens."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.entropy = torch.zeros(num_layers, dtype=torch.float64)
        self.topk_entropy = torch.zeros(num_layers, dtype=torch.float64)
        self.top1 = torch.zeros(num_layers, dtype=torch.float64)
        self.topk_mass = torch.zeros(num_layers, dtype=torch.float64)
        self.load = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.n_rows = 0

    def add(self, router_logits, n_tokens: int) -> None:
        for li, rl in enumerate(router_logits):
            p = torch.softmax(rl.float(), dim=-1)
            self.entropy[li] += (-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).sum().item()
            tv, ti = torch.topk(p, self.top_k, dim=-1)
            q = tv / tv.sum(-1, keepdim=True)
            self.topk_entropy[li] += (-(q * torch.log(q.clamp_min(1e-30))).sum(-1)).sum().item()
            self.top1[li] += tv[:, 0].sum().item()
            self.topk_mass[li] += tv.sum(-1).sum().item()
            self.load[li] += torch.bincount(ti.reshape(-1), minlength=self.num_experts).double().cpu()
        self.n_rows += n_tokens

    def summary(self) -> dict:
        E, n_rows = self.num_experts, self.n_rows
        frac = self.load / self.load.sum(-1, keepdim=True)

        def per_layer(total, digits=4):
            return [round(v, digits) for v in (total / n_rows).tolist()]

        return {
            "mean_entropy_per_layer": per_layer(self.entropy),
            "mean_entropy": round((self.entropy / n_rows).mean().item(), 4),
            "uniform_entropy_log64": round(math.log(E), 4),
            "mean_top8_renormalised_entropy_per_layer": per_layer(self.topk_entropy),
            "mean_top8_renormalised_entropy": round((self.topk_entropy / n_rows).mean().item(), 4),
            "uniform_top8_entropy_log8": round(math.log(self.top_k), 4),
            "mean_top1_prob_per_layer": per_layer(self.top1),
            "mean_top8_mass_per_layer": per_layer(self.topk_mass),
            "expert_load_max_over_mean_per_layer": [round(v, 3) for v in (frac.max(-1).values * E).tolist()],
            "expert_load_min_over_mean_per_layer": [round(v, 3) for v in (frac.min(-1).values * E).tolist()],
        }


@torch.no_grad()
def evaluate(
    model,
    stream: torch.Tensor,
    seq_len: int,
    batch: int,
    device,
    amp: bool,
    n_bytes: int | None = None,
    router_stats: bool = False,
    max_tokens: int | None = None,
) -> dict:
    """Loss over non-overlapping windows of the token stream: every token after the first is predicted
    once (the last window may be shorter). With max_tokens, only the first max_tokens predictions."""
    model.eval()
    n = stream.numel() - 1  # number of predicted tokens
    full = True
    if max_tokens and max_tokens < n:
        n, full = max_tokens, False
    cfg = model.config
    router = RouterStats(cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) if router_stats else None
    tot_loss, tot_tok = 0.0, 0
    for first, end, length in window_groups(n, seq_len, batch):
        x, y = window_batch(stream, first, end, seq_len, length, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=x, output_router_logits=router_stats)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        tot_loss += loss.item()
        tot_tok += y.numel()
        if router is not None:
            router.add(out.router_logits, x.numel())
    model.train()
    res = {"tokens": tot_tok, "loss": tot_loss / tot_tok, "perplexity": math.exp(tot_loss / tot_tok)}
    if n_bytes and full:
        res["bytes"] = n_bytes
        res["bits_per_byte"] = tot_loss / math.log(2) / n_bytes
    if router is not None:
        res["router"] = router.summary()
    return res


# ----------------------------------------------------------------------------- set-up
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Train the tiny OLMoE (see module docstring).")
    ap.add_argument("--data", default=str(ROOT / "data"), help="data dir with corpus/ and heldout.txt")
    ap.add_argument("--out", default=None, help="output dir (default models/tiny-olmoe, smoke: /tmp/tiny-olmoe-smoke)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--smoke", action="store_true", help="tiny, fast CPU check (< 2 minutes)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--expert-width", type=int, default=48, help="intermediate_size of each expert")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--no-tie-embeddings", dest="tie_embeddings", action="store_false")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128, help="sequences per step")
    ap.add_argument("--steps", type=int, default=0, help="0: choose from measured speed and --max-minutes")
    ap.add_argument("--max-minutes", type=float, default=5.0, help="training-loop time budget (hard stop)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--experts-impl", default="auto", help="auto | eager | grouped_mm | batched_mm")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.smoke:
        apply_smoke_settings(args)
    return args


def apply_smoke_settings(args: argparse.Namespace) -> None:
    """--smoke: a configuration small enough for a quick CPU check."""
    args.vocab = min(args.vocab, 1024)
    args.seq_len, args.batch = 128, 8
    args.steps = args.steps or 40
    args.warmup, args.log_every, args.eval_every = 10, 10, 20
    args.max_minutes = min(args.max_minutes, 1.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def environment_versions(device: torch.device) -> dict:
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
    }


# ----------------------------------------------------------------------------- data
def load_splits(data: Path, smoke: bool, seed: int) -> dict[str, list[str]]:
    """Documents of each split; with smoke, a seeded sample of 200 training documents and 10 of the others."""
    docs = {
        "train": read_docs(data / "corpus" / "train.txt"),
        "val": read_docs(data / "corpus" / "val.txt"),
        "heldout": read_docs(data / "heldout.txt"),
    }
    if smoke:
        rng = random.Random(seed)
        docs = {"train": rng.sample(docs["train"], 200), "val": docs["val"][:10], "heldout": docs["heldout"][:10]}
    return docs


def corpus_statistics(docs: dict[str, list[str]], stats_file: Path) -> dict:
    stats = {k: {"documents": len(d), "bytes": sum(len(x.encode()) for x in d)} for k, d in docs.items()}
    if stats_file.exists():
        stats["prepare_corpus_stats"] = json.loads(stats_file.read_text())
    return stats


def build_tokenizer(train_docs: list[str], vocab: int):
    """The trained tokenizer and its transformers wrapper."""
    t0 = time.time()
    tok = train_tokenizer(train_docs, vocab)
    hf_tok = wrap_tokenizer(tok)
    log(
        f"tokenizer: vocab {tok.get_vocab_size()}, eos {tok.token_to_id(EOS)}, pad {tok.token_to_id(PAD)} "
        f"({time.time() - t0:.1f}s)"
    )
    return tok, hf_tok


def encode_splits(tok, docs: dict[str, list[str]], eos_id: int, corpus_stats: dict) -> dict[str, torch.Tensor]:
    """Token stream of each split; adds its token count and bytes per token to corpus_stats."""
    t0 = time.time()
    ids = {k: torch.from_numpy(encode_stream(tok, d, eos_id)) for k, d in docs.items()}
    for k, stream in ids.items():
        corpus_stats[k]["tokens"] = int(stream.numel())
        corpus_stats[k]["bytes_per_token"] = round(corpus_stats[k]["bytes"] / stream.numel(), 3)
    log(
        f"tokens: train {ids['train'].numel():,} val {ids['val'].numel():,} heldout {ids['heldout'].numel():,} "
        f"({time.time() - t0:.1f}s)"
    )
    return ids


def sample_batch(stream: torch.Tensor, seq_len: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of seq_len + 1 tokens (inputs and, shifted by one, their targets)."""
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=generator)
    pos = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return stream[pos.to(stream.device)].long()


# ----------------------------------------------------------------------------- training
def build_model(args: argparse.Namespace, vocab_size: int, eos_id: int, pad_id: int, device):
    from transformers import OlmoeForCausalLM

    config = build_config(args, vocab_size, eos_id, pad_id)
    torch.manual_seed(args.seed)
    return OlmoeForCausalLM(config).to(device)


def count_parameters(model) -> dict:
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - n_expert + n_expert * model.config.num_experts_per_tok // model.config.num_experts
    log(f"parameters: {n_params:,} total, {n_expert:,} in experts, ~{n_active:,} active per token")
    return {"parameters": n_params, "expert_parameters": n_expert, "active_parameters_per_token": n_active}


def probe_experts_impl(model, sample, generator: torch.Generator, device, amp: bool, requested: str):
    """pick_experts_impl on training batches, leaving the batch generator where it was."""
    state = generator.get_state()
    impl, timings = pick_experts_impl(model, lambda: sample()[:, :-1], device, amp, requested)
    generator.set_state(state)  # the probe does not consume training batches
    log(f"experts implementation: {impl}")
    return impl, timings


def make_optimizer(model, args: argparse.Namespace, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device.type == "cuda",
    )


def learning_rate(step: int, total_steps: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr at total_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    T = max(total_steps, args.warmup + 1)
    prog = min(1.0, (step - args.warmup) / (T - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def train_step(model, opt, x: torch.Tensor, lr: float, grad_clip: float, device, amp: bool):
    """One optimiser step; returns (cross-entropy, aux loss, gradient norm) as tensors."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
    # transformers shifts labels inside; loss = CE + router_aux_loss_coef * aux_loss
    out.loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    aux = out.aux_loss.detach().float()
    return out.loss.detach().float() - model.config.router_aux_loss_coef * aux, aux, gnorm


class StepPlanner:
    """Chooses the number of steps when --steps is 0: on CUDA from the time of steps MEASURE_FROM to
    MEASURE_TO, so that training fits the time budget; on CPU a short fixed run."""

    MEASURE_FROM, MEASURE_TO = 10, 60

    def __init__(self, device, budget_s: float, tokens_per_step: int):
        self.device, self.budget_s, self.tokens_per_step = device, budget_s, tokens_per_step
        self.t_measure = None

    def total_steps(self, step: int, total_steps: int, t_train: float) -> int:
        if self.device.type != "cuda":
            return self.MEASURE_TO * 2 if step == self.MEASURE_TO else total_steps  # CPU: keep it short
        if step == self.MEASURE_FROM:
            torch.cuda.synchronize()
            self.t_measure = time.time()
        if step == self.MEASURE_TO:
            torch.cuda.synchronize()
            s_per_step = (time.time() - self.t_measure) / (self.MEASURE_TO - self.MEASURE_FROM)
            remaining = self.budget_s - (time.time() - t_train)
            # leave room for the periodic evaluations and timing noise (7%)
            total_steps = step + int(0.93 * remaining / s_per_step)
            log(
                f"measured {s_per_step * 1000:.1f} ms/step -> total steps {total_steps} "
                f"({total_steps * self.tokens_per_step / 1e6:.0f}M tokens)"
            )
        return total_steps


@dataclass
class Run:
    """What the training loop records."""

    total_steps: int  # 0 until StepPlanner chooses it
    step: int = 0
    stop_reason: str = "steps"
    train_time: float = 0.0
    curve: list = field(default_factory=list)
    val_curve: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_loss": float("inf"), "step": -1, "state": None})


def record_train_loss(run: Run, args: argparse.Namespace, ce: float, aux: float, gnorm, t_train: float) -> None:
    lr = learning_rate(run.step - 1, run.total_steps, args)
    run.curve.append(
        {
            "step": run.step,
            "tokens": run.step * args.batch * args.seq_len,
            "train_ce": round(ce, 4),
            "aux_loss": round(aux, 4),
            "lr": lr,
            "grad_norm": round(gnorm.item(), 3),
            "elapsed_s": round(time.time() - t_train, 1),
        }
    )
    log(
        f"step {run.step}/{run.total_steps or '?'} ce {ce:.4f} aux {aux:.3f} lr {lr:.2e} "
        f"gnorm {gnorm.item():.2f} {time.time() - t_train:.0f}s"
    )


def validate(model, run: Run, val_ids: torch.Tensor, args: argparse.Namespace, device, amp: bool, eval_cap) -> dict:
    """Validation loss at the current step, appended to the run's validation curve."""
    v = evaluate(model, val_ids, args.seq_len, 64, device, amp, max_tokens=eval_cap)
    run.val_curve.append({"step": run.step, "val_loss": round(v["loss"], 4), "val_ppl": round(v["perplexity"], 3)})
    return v


def periodic_validation(model, run: Run, val_ids, args, device, amp: bool, eval_cap) -> None:
    """Validate, keeping a CPU copy of the weights when they are the best so far."""
    v = validate(model, run, val_ids, args, device, amp, eval_cap)
    log(f"  val loss {v['loss']:.4f} ppl {v['perplexity']:.2f}")
    if v["loss"] < run.best["val_loss"]:
        state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        run.best = {"val_loss": v["loss"], "step": run.step, "state": state}


def train(model, opt, sample, val_ids, args: argparse.Namespace, device, amp: bool, eval_cap) -> Run:
    """The training loop: stops after run.total_steps or at the time budget, validating periodically."""
    run = Run(total_steps=args.steps)
    budget_s = args.max_minutes * 60
    planner = StepPlanner(device, budget_s, args.batch * args.seq_len)
    model.train()
    t_train = time.time()
    acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
    while not (run.total_steps and run.step >= run.total_steps):
        if time.time() - t_train > budget_s:
            run.stop_reason = "time budget"
            log(f"time budget reached at step {run.step}")
            break
        lr = learning_rate(run.step, run.total_steps, args)
        ce, aux, gnorm = train_step(model, opt, sample(), lr, args.grad_clip, device, amp)
        acc_ce += ce
        acc_aux += aux
        acc_n += 1
        run.step += 1
        if not args.steps:
            run.total_steps = planner.total_steps(run.step, run.total_steps, t_train)
        if run.step % args.log_every == 0:
            record_train_loss(run, args, (acc_ce / acc_n).item(), (acc_aux / acc_n).item(), gnorm, t_train)
            acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
        if run.step % args.eval_every == 0 or (run.total_steps and run.step == run.total_steps):
            periodic_validation(model, run, val_ids, args, device, amp, eval_cap)
    run.train_time = time.time() - t_train
    return run


def restore_best_checkpoint(model, run: Run, val_ids, args, device, amp: bool, eval_cap) -> None:
    """Validate the last step if the loop did not, and load the best validated weights."""
    if not run.val_curve or run.val_curve[-1]["step"] != run.step:
        v = validate(model, run, val_ids, args, device, amp, eval_cap)
        if v["loss"] < run.best["val_loss"]:
            run.best = {"val_loss": v["loss"], "step": run.step, "state": None}  # the current weights
    if run.best["state"] is not None and run.best["step"] != run.step:
        log(f"restoring best validation checkpoint from step {run.best['step']}")
        model.load_state_dict(run.best["state"])
    del run.best["state"]


# ----------------------------------------------------------------------------- final evaluation and saving
def final_evaluation(model, ids: dict, corpus_stats: dict, args, device, eval_cap, impl: str, impl_timings) -> dict:
    """Held-out, validation and same-size training losses in the saved dtype, on a plain experts path
    (no bf16 casts), with router diagnostics on the held-out split."""
    if impl == "grouped_mm_bf16":
        grouped_mm_works = isinstance(impl_timings.get("grouped_mm"), float)
        model.config._experts_implementation = "grouped_mm" if grouped_mm_works else "eager"
    if args.save_dtype == "bfloat16":
        model.to(torch.bfloat16)
    held_ids, n_bytes = ids["heldout"], corpus_stats["heldout"]["bytes"]
    held = evaluate(
        model, held_ids, args.seq_len, 32, device, amp=False, n_bytes=n_bytes, router_stats=True, max_tokens=eval_cap
    )
    val = evaluate(model, ids["val"], args.seq_len, 32, device, amp=False, max_tokens=eval_cap)
    train_cap = eval_cap or held_ids.numel()
    train = evaluate(model, ids["train"], args.seq_len, 32, device, amp=False, max_tokens=train_cap)
    log(
        f"held-out: loss {held['loss']:.4f} ppl {held['perplexity']:.2f} "
        f"bpb {held.get('bits_per_byte', float('nan')):.3f} (uniform ppl = vocab {model.config.vocab_size}); "
        f"router entropy {held['router']['mean_entropy']:.3f} (log64 {math.log(64):.3f}), "
        f"top-8 renorm {held['router']['mean_top8_renormalised_entropy']:.3f} (log8 {math.log(8):.3f})"
    )
    return {
        "heldout": held,
        "val": val,
        "train_sample_same_size_as_heldout": train,
        "uniform_perplexity_reference": model.config.vocab_size,
        "eval_dtype": args.save_dtype,
        "eval_seq_len": args.seq_len,
    }


def save_model(model, hf_tok, out_dir: Path, eos_id: int, pad_id: int) -> None:
    """Save on CPU; the config without a forced experts implementation and without router logits (aux loss)
    in inference outputs."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config._experts_implementation = None
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=64
    )
    model.to("cpu")
    model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok.save_pretrained(out_dir)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("_experts_implementation", None)
    cfg.pop("experts_implementation", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def generate_samples(model, hf_tok) -> dict[str, str]:
    """Greedy continuations of a few prompts, as a sanity check."""
    model.config._experts_implementation = "eager"
    samples = {}
    for prompt in ["The capital of France is", "Dog is", "In the beginning", "The os module"]:
        try:
            ids = hf_tok(prompt, return_tensors="pt").input_ids
            g = model.generate(ids, max_new_tokens=24, do_sample=False)
            samples[prompt] = hf_tok.decode(g[0], skip_special_tokens=False)
        except Exception as e:  # noqa: BLE001  (a sample must not lose the trained model)
            samples[prompt] = f"generation failed: {type(e).__name__}: {e}"
        log(f"sample: {samples[prompt]!r}")
    return samples


def model_record(args: argparse.Namespace, parameters: dict, size: int) -> dict:
    return {
        "class": "OlmoeForCausalLM",
        **parameters,
        "hidden_size": args.hidden,
        "expert_intermediate_size": args.expert_width,
        "layers": args.layers,
        "heads": args.heads,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "tie_word_embeddings": args.tie_embeddings,
        "saved_dtype": args.save_dtype,
        "model_safetensors_bytes": size,
    }


def hyperparameters_record(args: argparse.Namespace, run: Run, train_tokens: int, amp: bool, impl, impl_timings):
    tokens_per_step = args.batch * args.seq_len
    return {
        "optimizer": "AdamW",
        "lr": args.lr,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "warmup_steps": args.warmup,
        "schedule": f"linear warm-up, cosine to {args.min_lr_ratio} x lr",
        "batch_sequences": args.batch,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens_per_step,
        "planned_steps": run.total_steps,
        "steps_done": run.step,
        "stop_reason": run.stop_reason,
        "tokens_seen": run.step * tokens_per_step,
        "epochs_over_train_tokens": round(run.step * tokens_per_step / train_tokens, 2),
        "router_aux_loss_coef": 0.01,
        "output_router_logits_during_training": True,
        "precision": "bf16 autocast, fp32 weights" if amp else "fp32",
        "experts_implementation": impl,
        "experts_impl_probe_s": impl_timings,
        "checkpoint_selection": "best validation loss over periodic evaluations",
        "selected_step": run.best["step"],
    }


def tokenizer_record(tok) -> dict:
    return {
        "type": "byte-level BPE (HF tokenizers)",
        "vocab_size": tok.get_vocab_size(),
        "eos": EOS,
        "eos_id": tok.token_to_id(EOS),
        "pad": PAD,
        "pad_id": tok.token_to_id(PAD),
        "trained_on": "train split only",
    }


# ----------------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    eval_cap = 4096 if args.smoke else None  # smoke: evaluate on the first 4096 tokens only
    out_dir = Path(args.out or ("/tmp/tiny-olmoe-smoke" if args.smoke else ROOT / "models" / "tiny-olmoe"))
    t_start = time.time()
    seed_everything(args.seed)
    device = pick_device(args.device)
    amp = device.type == "cuda"
    versions = environment_versions(device)
    log(f"versions: {versions}")

    docs = load_splits(Path(args.data), args.smoke, args.seed)
    corpus_stats = corpus_statistics(docs, Path(args.data) / "corpus" / "stats.json")
    log(f"corpus: {[(k, v['documents'], v['bytes']) for k, v in corpus_stats.items() if 'bytes' in v]}")
    tok, hf_tok = build_tokenizer(docs["train"], args.vocab)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    ids = encode_splits(tok, docs, eos_id, corpus_stats)
    time_prep = time.time() - t_start

    model = build_model(args, tok.get_vocab_size(), eos_id, pad_id, device)
    parameters = count_parameters(model)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    sample = functools.partial(sample_batch, ids["train"].to(device), args.seq_len, args.batch, generator)
    impl, impl_timings = probe_experts_impl(model, sample, generator, device, amp, args.experts_impl)
    opt = make_optimizer(model, args, device)
    run = train(model, opt, sample, ids["val"], args, device, amp, eval_cap)
    restore_best_checkpoint(model, run, ids["val"], args, device, amp, eval_cap)
    final = final_evaluation(model, ids, corpus_stats, args, device, eval_cap, impl, impl_timings)

    save_model(model, hf_tok, out_dir, eos_id, pad_id)
    samples = generate_samples(model, hf_tok)
    size = (out_dir / "model.safetensors").stat().st_size
    training_log = {
        "seed": args.seed,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": versions,
        "corpus": corpus_stats,
        "tokenizer": tokenizer_record(tok),
        "model": model_record(args, parameters, size),
        "hyperparameters": hyperparameters_record(args, run, ids["train"].numel(), amp, impl, impl_timings),
        "wall_time_s": {
            "data_and_tokenizer": round(time_prep, 1),
            "training_loop": round(run.train_time, 1),
            "total": round(time.time() - t_start, 1),
        },
        "train_curve": run.curve,
        "val_curve": run.val_curve,
        "final": final,
        "samples_greedy": samples,
    }
    (out_dir / "training_log.json").write_text(json.dumps(training_log, indent=2) + "\n")
    log(f"saved to {out_dir} (model.safetensors {size / 1e6:.2f} MB); total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
