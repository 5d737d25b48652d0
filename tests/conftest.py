"""Shared fixtures. Tests run offline on the CPU: the hub is never reached."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import bh_experiment  # noqa: E402


@pytest.fixture
def tiny_model():
    """A randomly initialised 2-layer OLMoE (64 experts, top-8) whose routers have a few strong experts.

    A random router has no relevant experts (BH rightly keeps min_k everywhere); scaling five router rows
    plants experts whose logits stand out for some tokens and not others, so counts vary per token.
    """
    model = bh_experiment.build_random_olmoe(seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[:5] *= 25.0
    return model


@pytest.fixture
def input_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, 512, (3, 11), generator=generator)


@pytest.fixture
def word_tokenizer():
    """A word-level tokenizer over "w0".."w511" (the tiny model's vocabulary); other words map to w0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w1")
