"""The design document's usage examples, run as written (model path swapped for a local model).

From ../shared/seed/000_55b24757482a70a4.txt, sections "Using BH Routing Module" and "Integrating with
OLMoE". Only the from_pretrained path and the generate(...) arguments are filled in.
"""

import torch


def test_using_bh_routing_module():
    router_logits = torch.randn(2, 10, 64)

    from bh_routing import benjamini_hochberg_routing

    # router_logits from OLMoE: [batch, seq_len, 64]
    weights, experts, counts = benjamini_hochberg_routing(router_logits, alpha=0.05, temperature=1.0, min_k=1, max_k=8)
    assert weights.shape == (2, 10, 64) and experts.shape == (2, 10, 8) and counts.shape == (2, 10)

    weights, experts, counts, stats = benjamini_hochberg_routing(router_logits, alpha=0.05, max_k=8, return_stats=True)
    assert stats["p_values"].shape == (2, 10, 64)
    assert stats["bh_threshold"].shape == (2, 10)
    assert stats["significant_mask"].shape == (2, 10, 64)

    from bh_routing import compare_multi_k_statistics, run_bh_multi_k

    results = run_bh_multi_k(router_logits, max_k_values=[4, 8, 16, 32], alpha=0.05)
    comparison_df = compare_multi_k_statistics(results)
    print(comparison_df)
    assert len(comparison_df) == 4


def test_integrating_with_olmoe(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)  # stands in for the hub model, which these machines cannot reach
    from transformers import OlmoeForCausalLM

    from bh_routing import OLMoERouterPatcher

    model = OlmoeForCausalLM.from_pretrained(tmp_path)
    patcher = OLMoERouterPatcher(model)

    # Patch with BH routing
    patcher.patch_with_bh(alpha=0.05, max_k=8)

    # Run inference
    outputs = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=1)

    # Get routing statistics
    stats = patcher.get_stats()
    print(f"Average experts: {stats['avg_experts']:.2f}")
    assert 1 <= stats["avg_experts"] <= 8 and outputs.shape == (1, 6)

    # Restore original routing
    patcher.unpatch()
    assert not patcher.is_patched
