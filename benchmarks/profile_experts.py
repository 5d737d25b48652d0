"""Where the variable-k path's time goes in a 4096-token MoE layer (OLMoE-1B-7B shape, bf16): a
torch.profiler kernel table at 8 and 2 experts per token, and the sort alone for several key dtypes.

    python benchmarks/profile_experts.py
"""

import functools
import sys
from pathlib import Path

import torch
from bench_experts import routing_with_counts
from common import median_ms
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bh_experiment  # noqa: E402
import variable_k_experts  # noqa: E402


def main() -> None:
    config = Path(__file__).resolve().parent / "olmoe-1b-7b-0924.config.json"
    model = bh_experiment.build_random_olmoe(config, device="cuda", dtype=torch.bfloat16, num_hidden_layers=1)
    experts = model.model.layers[0].mlp.experts
    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(4096, experts.hidden_dim, device="cuda", generator=generator).bfloat16()
    for k in (8, 2):
        weights, index = routing_with_counts(4096, torch.full((4096,), k, device="cuda"), generator)
        call = functools.partial(variable_k_experts.variable_k_experts_forward, experts, hidden, index, weights)
        median_ms(call)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        print(f"--- k = {k}: CUDA kernel time per call (us), 10 calls")
        for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:14]:
            print(f"{event.device_time_total / 10:9.1f}  {event.key[:110]}")
    flat = index.reshape(-1)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        keys = flat.to(dtype)
        print(f"sort of {keys.numel()} {dtype}: {median_ms(functools.partial(torch.sort, keys)) * 1000:.1f} us")
    keys = flat.to(torch.uint8)
    boundaries = torch.arange(64, device="cuda", dtype=torch.uint8)
    print("searchsorted on uint8:", torch.searchsorted(torch.sort(keys)[0], boundaries, right=True)[-3:].tolist())


if __name__ == "__main__":
    with torch.no_grad():
        main()
