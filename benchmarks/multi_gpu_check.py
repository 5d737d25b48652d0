"""The patcher on a model spread over several GPUs with device_map="auto" (run on a machine with >= 2 GPUs).

Prints: which GPU each layer landed on; whether BH routing on the spread model gives the same counts and
logits as on one GPU; whether generation works; whether unpatching restores the logits bit for bit.
"""

import sys
import tempfile
from pathlib import Path

import torch
from common import relative_error, strengthen_experts
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bh_experiment as bx  # noqa: E402
import bh_routing as br  # noqa: E402 - importable only once the repository root is on sys.path


def main() -> None:
    assert torch.cuda.device_count() >= 2, "needs at least 2 GPUs"
    model = bx.build_random_olmoe(None, seed=0, num_hidden_layers=6, hidden_size=256, intermediate_size=128)
    strengthen_experts(model)
    directory = tempfile.mkdtemp()
    model.save_pretrained(directory)
    per_gpu = {i: "60MiB" for i in range(torch.cuda.device_count())}  # small, so the layers must spread
    spread = AutoModelForCausalLM.from_pretrained(
        directory, device_map="auto", max_memory=per_gpu, dtype=torch.bfloat16
    ).eval()
    single = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to("cuda:0").eval()
    devices = sorted({str(layer.mlp.gate.weight.device) for layer in spread.model.layers})
    print("layers spread over", devices, spread.hf_device_map)
    input_ids = torch.randint(2, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native_spread = spread(input_ids.to("cuda:0")).logits.float().cpu()
        native_single = single(input_ids.to("cuda:0")).logits.float().cpu()
    print(f"unpatched spread vs single: relative error {relative_error(native_spread, native_single):.2e}")
    for options in ({"cuda_graphs": False, "compile_routing": False}, {}):
        compare(spread, single, input_ids, options)


def compare(spread, single, input_ids, options) -> None:
    print("patcher options:", options or "defaults (compiled; CUDA graphs only where the routers share one GPU)")
    results = {}
    for name, candidate in (("spread", spread), ("single", single)):
        first = next(candidate.parameters()).device
        if name == "spread":
            try:
                br.OLMoERouterPatcher(candidate, cuda_graphs=True, record_token_counts=True)
            except ValueError as error:
                print("cuda_graphs=True on the spread model is refused:", error)
        with torch.no_grad():
            before = candidate(input_ids.to(first)).logits.float().cpu()
        patcher = br.OLMoERouterPatcher(candidate, **options, record_token_counts=True)
        patcher.patch_with_bh(alpha=0.1, min_k=0, max_k=16)
        with torch.no_grad():
            logits = candidate(input_ids.to(first)).logits.float().cpu()
        counts = patcher.get_stats()["token_counts"]
        generated = candidate.generate(input_ids[:1].to(first), max_new_tokens=8, do_sample=False, pad_token_id=1).cpu()
        patcher.unpatch()
        with torch.no_grad():
            after = candidate(input_ids.to(first)).logits.float().cpu()
        results[name] = (logits, counts, generated)
        print(
            f"{name}: avg experts {counts.double().mean():.3f}, distinct counts {counts.unique().tolist()}, "
            f"restored bit-identical {torch.equal(before, after)}"
        )
    (logits_a, counts_a, gen_a), (logits_b, counts_b, gen_b) = results["spread"], results["single"]
    relative = relative_error(logits_a, logits_b)
    differing = (counts_a != counts_b).any(-1).sum().item()
    print(
        f"spread vs single GPU: counts identical {torch.equal(counts_a, counts_b)} ({differing} of "
        f"{counts_a.shape[0]} tokens differ in some layer), logits relative error {relative:.2e}, "
        f"generations identical {torch.equal(gen_a, gen_b)}"
    )


if __name__ == "__main__":
    main()
