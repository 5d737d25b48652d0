"""Perplexity with sliding windows, the quality sweep, the frontier table and the token-level analysis."""

import math

import pytest
import torch

import bh_experiment as bx
import bh_routing as br


def test_windows_score_every_token_once():
    for num_tokens, window, stride in [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 4), (5, 16, 16)]:
        windows = bx.sliding_windows(num_tokens, window, stride)
        scored = []
        for begin, end, num_scored in windows:
            assert end - begin <= window and 0 < num_scored <= end - begin - 1
            scored += list(range(end - num_scored, end))
        assert len(scored) == len(set(scored))  # never twice
        if stride < window:
            assert scored == list(range(1, num_tokens))  # overlapping windows score every token but the first
        else:
            assert scored == [
                t for t in range(1, num_tokens) if t % window != 0
            ]  # a window's first token has no context


def test_perplexity_matches_the_models_own_loss(tiny_model):
    token_ids = torch.randint(2, 512, (64,), generator=torch.Generator().manual_seed(0))
    result = bx.evaluate_language_model(tiny_model, token_ids, window=64)
    with torch.no_grad():
        loss = tiny_model(token_ids[None], labels=token_ids[None]).loss.item()
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["num_scored"] == 63 and torch.equal(result["targets"], token_ids[1:])
    assert torch.equal(result["inputs"], token_ids[:-1])
    with torch.no_grad():
        predictions = tiny_model(token_ids[None]).logits[0, :-1].argmax(-1)
    assert result["token_accuracy"] == pytest.approx((predictions == token_ids[1:]).double().mean().item())
    # Batching and window boundaries do not change what a window computes.
    windowed = bx.evaluate_language_model(tiny_model, torch.cat([token_ids, token_ids]), window=64, batch_size=1)
    assert windowed["num_scored"] == 126
    torch.testing.assert_close(windowed["nll"][:63], result["nll"])


def test_expert_counts_are_aligned_with_the_predicting_positions(tiny_model):
    token_ids = torch.randint(2, 512, (150,), generator=torch.Generator().manual_seed(1))
    patcher = br.OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.2, min_k=0, max_k=16)
    result = bx.evaluate_language_model(tiny_model, token_ids, window=40, stride=20, batch_size=3, patcher=patcher)
    counts = result["expert_counts"]
    assert counts.shape == (149, 2)
    # Routing of a position depends only on its prefix (causal model): rerun the first 40 tokens alone.
    patcher.reset_stats()
    with torch.no_grad():
        tiny_model(token_ids[None, :40])
    direct = patcher.get_stats()["token_counts"]
    assert torch.equal(counts[:39], direct[:39].to(counts.dtype))


def plain_scores(model, token_ids, window):
    """The loss without chunks: the full [B, W, V] float32 log-softmax."""
    inputs = token_ids.view(-1, window)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(inputs).logits.float()[:, :-1], dim=-1)
    return -log_probs.gather(-1, inputs[:, 1:, None]).squeeze(-1).reshape(-1)


@pytest.mark.parametrize("chunk_elements", [1, 512 * 7, 512 * 1000])  # one position, 7 positions, all at once
def test_the_chunked_loss_equals_the_plain_loss(tiny_model, monkeypatch, chunk_elements):
    monkeypatch.setattr(bx, "LOSS_CHUNK_ELEMENTS", chunk_elements)
    token_ids = torch.randint(2, 512, (4 * 32,), generator=torch.Generator().manual_seed(3))
    result = bx.evaluate_language_model(tiny_model, token_ids, window=32, batch_size=4)
    torch.testing.assert_close(result["nll"].float(), plain_scores(tiny_model, token_ids, 32), atol=1e-5, rtol=1e-5)


def test_out_of_memory_halves_the_batch_and_keeps_every_result(tiny_model, monkeypatch):
    token_ids = torch.randint(2, 512, (8 * 24,), generator=torch.Generator().manual_seed(4))
    patcher = br.OLMoERouterPatcher(tiny_model, record_token_counts=True)
    patcher.patch_with_bh(alpha=0.2, min_k=0, max_k=16)
    reference = bx.evaluate_language_model(tiny_model, token_ids, window=24, batch_size=8, patcher=patcher)
    forward = type(tiny_model).forward
    attempts = []

    def small_memory(model, input_ids, **kwargs):
        attempts.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:  # the routers ran before the simulated failure: their records must go
            forward(model, input_ids[:1], **kwargs)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(model, input_ids, **kwargs)

    monkeypatch.setattr(type(tiny_model), "forward", small_memory)
    with pytest.warns(UserWarning) as warned:
        backed_off = bx.evaluate_language_model(tiny_model, token_ids, window=24, batch_size=8, patcher=patcher)
    assert [str(w.message) for w in warned] == [f"out of memory: evaluating with batches of {b}" for b in (4, 2)]
    assert attempts[:3] == [8, 4, 2] and backed_off["batch_size"] == 2
    torch.testing.assert_close(backed_off["nll"], reference["nll"])
    assert torch.equal(backed_off["expert_counts"], reference["expert_counts"])
    monkeypatch.setattr(type(tiny_model), "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning):
        bx.evaluate_language_model(tiny_model, token_ids, window=24, batch_size=2)


def test_bad_evaluation_arguments(tiny_model):
    with pytest.raises(ValueError, match="token_ids"):
        bx.evaluate_language_model(tiny_model, torch.tensor([5]))
    with pytest.raises(ValueError, match="stride"):
        bx.evaluate_language_model(tiny_model, torch.arange(10), window=4, stride=5)
    with pytest.raises(ValueError, match="window"):
        bx.evaluate_language_model(tiny_model, torch.arange(10), window=1)


def test_frontier_and_token_analysis_of_evaluated_configurations(tiny_model, word_tokenizer):
    token_ids = torch.randint(2, 512, (300,), generator=torch.Generator().manual_seed(2))
    patcher = br.OLMoERouterPatcher(tiny_model, record_token_counts=True)
    configs = [br.RoutingConfig.of("native", k=8)] + [br.RoutingConfig.of("topk", k=k) for k in (1, 2, 4, 8)]
    configs += [br.RoutingConfig.of("topp", p=p, max_k=8) for p in (0.5, 0.9)]
    configs += [br.RoutingConfig.of("bh", alpha=alpha, max_k=8) for alpha in (0.05, 0.2)]
    quality, evaluations = {}, {}
    for config in configs:
        config.apply(patcher)
        evaluations[config.name] = bx.evaluate_language_model(tiny_model, token_ids, window=64, patcher=patcher)
        quality[config.name] = {
            "name": config.name,
            "method": config.method,
            "params": dict(patcher.params),
            "status": "ok",
            "perplexity": evaluations[config.name]["perplexity"],
            "avg_experts": evaluations[config.name]["expert_counts"].double().mean().item(),
        }
        patcher.unpatch()
    assert quality["topk_k8"]["perplexity"] == pytest.approx(quality["topk_8_baseline"]["perplexity"])
    assert quality["topk_k2"]["avg_experts"] == 2 and quality["topk_8_baseline"]["avg_experts"] == 8
    table = bx.frontier_table(quality)
    assert list(table["config"]) == ["bh_k8_a005", "bh_k8_a020"] and set(table["series"]) == {"BH (robust_z)"}
    for row in table.itertuples():
        if 1 <= row.avg_experts <= 8:  # inside the top-k curve: interpolated between its neighbours
            lower = max(k for k in (1, 2, 4, 8) if k <= row.avg_experts)
            upper = min(k for k in (1, 2, 4, 8) if k >= row.avg_experts)
            bounds = sorted([quality[f"topk_k{lower}"]["perplexity"], quality[f"topk_k{upper}"]["perplexity"]])
            assert bounds[0] * (1 - 1e-9) <= row.topk_perplexity_at_equal_experts <= bounds[1] * (1 + 1e-9)
    routed = evaluations["bh_k8_a020"]
    analysis = bx.token_level_analysis(
        routed["expert_counts"],
        routed["inputs"],
        evaluations["topk_8_baseline"]["nll"],
        word_tokenizer,
        min_occurrences=1,
    )
    assert analysis["num_positions"] == routed["num_scored"]
    assert -1 <= analysis["spearman_experts_vs_next_token_surprisal"] <= 1
    assert analysis["fewest_experts"] and analysis["most_experts"]
    means = [m for _, m, _ in analysis["fewest_experts"]]
    assert means == sorted(means)


def test_frontier_interpolation_on_known_numbers():
    def entry(name, method, avg, ppl, **params):
        return {"name": name, "method": method, "status": "ok", "avg_experts": avg, "perplexity": ppl, "params": params}

    quality = {
        "topk_k2": entry("topk_k2", "topk", 2.0, 30.0),
        "topk_k4": entry("topk_k4", "topk", 4.0, 20.0),
        "topp_a": entry("topp_a", "topp", 1.0, 40.0),
        "topp_b": entry("topp_b", "topp", 5.0, 16.0),
        "bh": entry("bh", "bh", 3.0, 24.0, pvalue_method="robust_z", alpha=0.05, max_k=8),
        "bh_out": entry("bh_out", "bh", 6.0, 15.0, pvalue_method="robust_z", alpha=0.2, max_k=8),
    }
    table = bx.frontier_table(quality).set_index("config")
    # Halfway between 2 and 4 experts: the geometric mean of 30 and 20 (mean NLL interpolated).
    assert table.loc["bh", "topk_perplexity_at_equal_experts"] == pytest.approx(math.sqrt(30.0 * 20.0))
    assert table.loc["bh", "delta_vs_topk_percent"] == pytest.approx(100 * (24.0 / math.sqrt(600.0) - 1))
    assert table.loc["bh", "topp_perplexity_at_equal_experts"] == pytest.approx(40.0**0.5 * 16.0**0.5)
    assert math.isnan(table.loc["bh_out", "topk_perplexity_at_equal_experts"])  # outside the measured range


def test_heldout_text_sources(tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello")
    assert bx.load_heldout_text(text_file) == "hello"
    with pytest.raises(FileNotFoundError, match="source"):
        bx.load_heldout_text(tmp_path / "missing.txt")
    with pytest.raises(RuntimeError, match="embedded"):
        bx.load_heldout_text("wikitext2")  # offline here: a clear error naming the embedded text
    assert len(bx.load_heldout_text("embedded")) > 100_000
