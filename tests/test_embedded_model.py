"""The committed embedded model: plain transformers loads it, it has learned the language and its router
has learned to prefer experts (issue 4's acceptance)."""

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bh_experiment as bx
import bh_routing as br


def test_embedded_model_loads_with_plain_transformers_and_has_learned():
    model = AutoModelForCausalLM.from_pretrained(bx.EMBEDDED_MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(bx.EMBEDDED_MODEL_DIR)
    config = model.config
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (64, 8, False)
    assert (bx.EMBEDDED_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    token_ids = tokenizer(bx.load_heldout_text("embedded")[:40_000], return_tensors="pt").input_ids[0][:4096]
    result = bx.evaluate_language_model(model, token_ids, window=256)
    assert result["perplexity"] < 100 < config.vocab_size  # uniform guessing: perplexity = vocabulary size
    with torch.no_grad():
        router_logits = model(token_ids[None, :512], output_router_logits=True).router_logits
    probabilities = torch.softmax(torch.cat([r.float() for r in router_logits]), dim=-1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean().item()
    assert entropy < 0.85 * math.log(64)  # well below uniform routing


def test_bh_counts_vary_per_token_on_the_embedded_model():
    model, tokenizer = bx.load_model("embedded", device="cpu")
    patcher = br.OLMoERouterPatcher(model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.2, max_k=8)
    ids = tokenizer(bx.load_heldout_text("embedded")[:3000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        model(ids)
    counts = patcher.get_stats()["token_counts"]
    assert len(counts.unique()) >= 4 and counts.float().std() > 0.5
