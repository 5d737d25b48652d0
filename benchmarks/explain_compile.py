"""Diagnose torch.compile of the BH hot path on CUDA: graph breaks, and time of compiled vs eager."""

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bh_routing as br  # noqa: E402 - importable only once the repository root is on sys.path

warnings.simplefilter("always")
logits = torch.randn(4096, 64, device="cuda").bfloat16()
critical = br.robust_z_critical_statistics(0.05, 64, logits.device)
args = (logits, critical, 0.05, 1.0, 1, 8, "robust_z", False)
explanation = torch._dynamo.explain(br.route_bh_tensors)(*args)
print("graphs", explanation.graph_count, "breaks", explanation.graph_break_count)
for reason in explanation.break_reasons[:10]:
    print("BREAK:", str(reason)[:400])
compiled = torch.compile(br.route_bh_tensors, dynamic=True)
for function, name in ((br.route_bh_tensors, "eager"), (compiled, "compiled")):
    for _ in range(5):
        function(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        function(*args)
    torch.cuda.synchronize()
    print(name, f"{(time.perf_counter() - start) / 50 * 1000:.3f} ms")
activities = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
with torch.profiler.profile(activities=activities) as prof:
    for _ in range(10):
        compiled(*args)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
