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
import json
import math
import os
import platform
import random
import sys
import time
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

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=None,
                                 bos_token=None, model_max_length=10**6, clean_up_tokenization_spaces=False)
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
@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, batch: int, device, amp: bool, n_bytes: int | None = None,
             router_stats: bool = False, max_tokens: int | None = None) -> dict:
    """Loss over non-overlapping windows of the token stream: every token after the first is predicted
    once (the last window may be shorter). With max_tokens, only the first max_tokens predictions."""
    model.eval()
    n = stream.numel() - 1  # number of predicted tokens
    full = True
    if max_tokens and max_tokens < n:
        n, full = max_tokens, False
    n_win = math.ceil(n / seq_len)
    tot_loss, tot_tok = 0.0, 0
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    L = model.config.num_hidden_layers
    ent = torch.zeros(L, dtype=torch.float64)
    ent_top = torch.zeros(L, dtype=torch.float64)
    top1 = torch.zeros(L, dtype=torch.float64)
    topk_mass = torch.zeros(L, dtype=torch.float64)
    load = torch.zeros(L, E, dtype=torch.float64)
    n_rows = 0
    n_full = n // seq_len
    groups = [(i, min(i + batch, n_full), seq_len) for i in range(0, n_full, batch)]
    if n % seq_len:
        groups.append((n_full, n_full + 1, n % seq_len))  # the shorter tail window
    for a, b, length in groups:
        starts = torch.arange(a, b) * seq_len
        pos = starts[:, None] + torch.arange(length + 1)[None, :]
        chunk = stream[pos].to(device, dtype=torch.long)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=x, output_router_logits=router_stats)
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        tot_loss += loss.item()
        tot_tok += y.numel()
        if router_stats:
            for li, rl in enumerate(out.router_logits):
                p = torch.softmax(rl.float(), dim=-1)
                ent[li] += (-(p * torch.log(p.clamp_min(1e-30))).sum(-1)).sum().item()
                tv, ti = torch.topk(p, K, dim=-1)
                q = tv / tv.sum(-1, keepdim=True)
                ent_top[li] += (-(q * torch.log(q.clamp_min(1e-30))).sum(-1)).sum().item()
                top1[li] += tv[:, 0].sum().item()
                topk_mass[li] += tv.sum(-1).sum().item()
                load[li] += torch.bincount(ti.reshape(-1), minlength=E).double().cpu()
            n_rows += x.numel()
    model.train()
    res = {"tokens": tot_tok, "loss": tot_loss / tot_tok, "perplexity": math.exp(tot_loss / tot_tok)}
    if n_bytes and full:
        res["bytes"] = n_bytes
        res["bits_per_byte"] = tot_loss / math.log(2) / n_bytes
    if router_stats:
        frac = load / load.sum(-1, keepdim=True)
        res["router"] = {
            "mean_entropy_per_layer": [round(v, 4) for v in (ent / n_rows).tolist()],
            "mean_entropy": round((ent / n_rows).mean().item(), 4),
            "uniform_entropy_log64": round(math.log(E), 4),
            "mean_top8_renormalised_entropy_per_layer": [round(v, 4) for v in (ent_top / n_rows).tolist()],
            "mean_top8_renormalised_entropy": round((ent_top / n_rows).mean().item(), 4),
            "uniform_top8_entropy_log8": round(math.log(K), 4),
            "mean_top1_prob_per_layer": [round(v, 4) for v in (top1 / n_rows).tolist()],
            "mean_top8_mass_per_layer": [round(v, 4) for v in (topk_mass / n_rows).tolist()],
            "expert_load_max_over_mean_per_layer": [round(v, 3) for v in (frac.max(-1).values * E).tolist()],
            "expert_load_min_over_mean_per_layer": [round(v, 3) for v in (frac.min(-1).values * E).tolist()],
        }
    return res


# ----------------------------------------------------------------------------- main
def main() -> None:
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
        args.vocab = min(args.vocab, 1024)
        args.seq_len, args.batch = 128, 8
        args.steps = args.steps or 40
        args.warmup, args.log_every, args.eval_every = 10, 10, 20
        args.max_minutes = min(args.max_minutes, 1.0)
    eval_cap = 4096 if args.smoke else None  # smoke: evaluate on the first 4096 tokens only
    out_dir = Path(args.out or ("/tmp/tiny-olmoe-smoke" if args.smoke else ROOT / "models" / "tiny-olmoe"))
    t_start = time.time()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    import tokenizers
    import transformers
    from transformers import GenerationConfig, OlmoeForCausalLM

    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "numpy": np.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
    }
    log(f"versions: {versions}")

    # ---- data
    data = Path(args.data)
    train_docs = read_docs(data / "corpus" / "train.txt")
    val_docs = read_docs(data / "corpus" / "val.txt")
    held_docs = read_docs(data / "heldout.txt")
    if args.smoke:
        rng = random.Random(args.seed)
        train_docs = rng.sample(train_docs, 200)
        val_docs, held_docs = val_docs[:10], held_docs[:10]
    corpus_stats = {
        "train": {"documents": len(train_docs), "bytes": sum(len(d.encode()) for d in train_docs)},
        "val": {"documents": len(val_docs), "bytes": sum(len(d.encode()) for d in val_docs)},
        "heldout": {"documents": len(held_docs), "bytes": sum(len(d.encode()) for d in held_docs)},
    }
    stats_file = data / "corpus" / "stats.json"
    if stats_file.exists():
        corpus_stats["prepare_corpus_stats"] = json.loads(stats_file.read_text())
    log(f"corpus: {[(k, v['documents'], v['bytes']) for k, v in corpus_stats.items() if 'bytes' in v]}")

    t0 = time.time()
    tok = train_tokenizer(train_docs, args.vocab)
    hf_tok = wrap_tokenizer(tok)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    vocab_size = tok.get_vocab_size()
    log(f"tokenizer: vocab {vocab_size}, eos {eos_id}, pad {pad_id} ({time.time() - t0:.1f}s)")
    t0 = time.time()
    train_ids = torch.from_numpy(encode_stream(tok, train_docs, eos_id))
    val_ids = torch.from_numpy(encode_stream(tok, val_docs, eos_id))
    held_ids = torch.from_numpy(encode_stream(tok, held_docs, eos_id))
    for k, ids in (("train", train_ids), ("val", val_ids), ("heldout", held_ids)):
        corpus_stats[k]["tokens"] = int(ids.numel())
        corpus_stats[k]["bytes_per_token"] = round(corpus_stats[k]["bytes"] / ids.numel(), 3)
    log(f"tokens: train {train_ids.numel():,} val {val_ids.numel():,} heldout {held_ids.numel():,} "
        f"({time.time() - t0:.1f}s)")
    time_prep = time.time() - t_start

    # ---- model
    config = build_config(args, vocab_size, eos_id, pad_id)
    torch.manual_seed(args.seed)
    model = OlmoeForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_active = n_params - n_expert + n_expert * config.num_experts_per_tok // config.num_experts
    log(f"parameters: {n_params:,} total, {n_expert:,} in experts, ~{n_active:,} active per token")

    train_dev = train_ids.to(device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    n_train = train_dev.numel()

    def get_batch():
        starts = torch.randint(0, n_train - args.seq_len - 1, (args.batch,), generator=gen)
        pos = starts[:, None] + torch.arange(args.seq_len + 1)[None, :]
        return train_dev[pos.to(device)].long()

    probe_rng_state = gen.get_state()
    impl, impl_timings = pick_experts_impl(model, lambda: get_batch()[:, :-1], device, amp, args.experts_impl)
    gen.set_state(probe_rng_state)  # the probe does not consume training batches
    log(f"experts implementation: {impl}")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    total_steps = args.steps  # 0 = decided after measuring

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        T = max(total_steps, args.warmup + 1)
        prog = min(1.0, (step - args.warmup) / (T - args.warmup))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    budget_s = args.max_minutes * 60
    measure_from, measure_to = 10, 60
    curve, val_curve = [], []
    best = {"val_loss": float("inf"), "step": -1, "state": None}
    model.train()
    t_train = time.time()
    t_measure = None
    step = 0
    acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
    stop_reason = "steps"
    while True:
        if total_steps and step >= total_steps:
            break
        elapsed = time.time() - t_train
        if elapsed > budget_s:
            stop_reason = "time budget"
            log(f"time budget reached at step {step}")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = get_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        # transformers shifts labels inside; loss = CE + router_aux_loss_coef * aux_loss
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = out.aux_loss.detach().float()
        acc_ce += (out.loss.detach().float() - config.router_aux_loss_coef * aux)
        acc_aux += aux
        acc_n += 1
        step += 1

        if not args.steps and device.type == "cuda":
            if step == measure_from:
                torch.cuda.synchronize()
                t_measure = time.time()
            if step == measure_to:
                torch.cuda.synchronize()
                s_per_step = (time.time() - t_measure) / (measure_to - measure_from)
                remaining = budget_s - (time.time() - t_train)
                # leave room for the periodic evaluations and timing noise (7%)
                total_steps = step + int(0.93 * remaining / s_per_step)
                log(f"measured {s_per_step * 1000:.1f} ms/step -> total steps {total_steps} "
                    f"({total_steps * args.batch * args.seq_len / 1e6:.0f}M tokens)")
        elif not args.steps and step == measure_to:
            total_steps = measure_to * 2  # CPU without --steps: keep it short

        if step % args.log_every == 0:
            ce, ax = (acc_ce / acc_n).item(), (acc_aux / acc_n).item()
            curve.append({"step": step, "tokens": step * args.batch * args.seq_len, "train_ce": round(ce, 4),
                          "aux_loss": round(ax, 4), "lr": lr_at(step - 1), "grad_norm": round(gnorm.item(), 3),
                          "elapsed_s": round(time.time() - t_train, 1)})
            log(f"step {step}/{total_steps or '?'} ce {ce:.4f} aux {ax:.3f} lr {lr_at(step - 1):.2e} "
                f"gnorm {gnorm.item():.2f} {time.time() - t_train:.0f}s")
            acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
        if step % args.eval_every == 0 or (total_steps and step == total_steps):
            v = evaluate(model, val_ids, args.seq_len, 64, device, amp, max_tokens=eval_cap)
            val_curve.append({"step": step, "val_loss": round(v["loss"], 4), "val_ppl": round(v["perplexity"], 3)})
            log(f"  val loss {v['loss']:.4f} ppl {v['perplexity']:.2f}")
            if v["loss"] < best["val_loss"]:
                best = {"val_loss": v["loss"], "step": step,
                        "state": {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}}
    train_time = time.time() - t_train
    if not val_curve or val_curve[-1]["step"] != step:
        v = evaluate(model, val_ids, args.seq_len, 64, device, amp, max_tokens=eval_cap)
        val_curve.append({"step": step, "val_loss": round(v["loss"], 4), "val_ppl": round(v["perplexity"], 3)})
        if v["loss"] < best["val_loss"]:
            best = {"val_loss": v["loss"], "step": step, "state": None}
    if best["state"] is not None and best["step"] != step:
        log(f"restoring best validation checkpoint from step {best['step']}")
        model.load_state_dict(best["state"])
    del best["state"]

    # ---- held-out evaluation (in the dtype it is saved in; plain experts path, no bf16 casts)
    if impl == "grouped_mm_bf16":
        model.config._experts_implementation = "grouped_mm" if isinstance(impl_timings.get("grouped_mm"), float) else "eager"
    if args.save_dtype == "bfloat16":
        model.to(torch.bfloat16)
    held = evaluate(model, held_ids, args.seq_len, 32, device, amp=False, n_bytes=corpus_stats["heldout"]["bytes"],
                    router_stats=True, max_tokens=eval_cap)
    val_final = evaluate(model, val_ids, args.seq_len, 32, device, amp=False, max_tokens=eval_cap)
    train_eval = evaluate(model, train_ids, args.seq_len, 32, device, amp=False,
                          max_tokens=eval_cap or held_ids.numel())
    log(f"held-out: loss {held['loss']:.4f} ppl {held['perplexity']:.2f} bpb {held.get('bits_per_byte', float('nan')):.3f} "
        f"(uniform ppl = vocab {vocab_size}); router entropy {held['router']['mean_entropy']:.3f} "
        f"(log64 {math.log(64):.3f}), top-8 renorm {held['router']['mean_top8_renormalised_entropy']:.3f} "
        f"(log8 {math.log(8):.3f})")

    # ---- save (config without forced experts implementation, no aux loss in inference outputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config._experts_implementation = None
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False,
                                               max_new_tokens=64)
    model.to("cpu")
    model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok.save_pretrained(out_dir)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("_experts_implementation", None)
    cfg.pop("experts_implementation", None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    # sample generation as a sanity check
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

    size = (out_dir / "model.safetensors").stat().st_size
    training_log = {
        "seed": args.seed,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "versions": versions,
        "corpus": corpus_stats,
        "tokenizer": {"type": "byte-level BPE (HF tokenizers)", "vocab_size": vocab_size, "eos": EOS,
                      "eos_id": eos_id, "pad": PAD, "pad_id": pad_id, "trained_on": "train split only"},
        "model": {"class": "OlmoeForCausalLM", "parameters": n_params, "expert_parameters": n_expert,
                  "active_parameters_per_token": n_active, "hidden_size": args.hidden,
                  "expert_intermediate_size": args.expert_width, "layers": args.layers, "heads": args.heads,
                  "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
                  "tie_word_embeddings": args.tie_embeddings, "saved_dtype": args.save_dtype,
                  "model_safetensors_bytes": size},
        "hyperparameters": {"optimizer": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                            "warmup_steps": args.warmup, "schedule": f"linear warm-up, cosine to {args.min_lr_ratio} x lr",
                            "batch_sequences": args.batch, "seq_len": args.seq_len,
                            "tokens_per_step": args.batch * args.seq_len, "planned_steps": total_steps,
                            "steps_done": step, "stop_reason": stop_reason,
                            "tokens_seen": step * args.batch * args.seq_len,
                            "epochs_over_train_tokens": round(step * args.batch * args.seq_len / train_ids.numel(), 2),
                            "router_aux_loss_coef": 0.01, "output_router_logits_during_training": True,
                            "precision": "bf16 autocast, fp32 weights" if amp else "fp32",
                            "experts_implementation": impl, "experts_impl_probe_s": impl_timings,
                            "checkpoint_selection": "best validation loss over periodic evaluations",
                            "selected_step": best["step"]},
        "wall_time_s": {"data_and_tokenizer": round(time_prep, 1), "training_loop": round(train_time, 1),
                        "total": round(time.time() - t_start, 1)},
        "train_curve": curve,
        "val_curve": val_curve,
        "final": {"heldout": held, "val": val_final, "train_sample_same_size_as_heldout": train_eval,
                  "uniform_perplexity_reference": vocab_size,
                  "eval_dtype": args.save_dtype, "eval_seq_len": args.seq_len},
        "samples_greedy": samples,
    }
    (out_dir / "training_log.json").write_text(json.dumps(training_log, indent=2) + "\n")
    log(f"saved to {out_dir} (model.safetensors {size / 1e6:.2f} MB); total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
