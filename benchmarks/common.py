"""Helpers shared by the benchmark and check scripts of this folder (imported as `common`: a script's own
folder is first on sys.path when it runs as `python benchmarks/<script>.py`)."""

import statistics

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def strengthen_experts(model, experts: int = 6, factor: float = 25.0) -> None:
    """Scale the router rows of the first `experts` experts in every layer: on random weights, a few strong
    experts make BH keep different numbers of experts for different tokens."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[:experts] *= factor


def median_ms(function, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of function() in ms, each call between two CUDA events."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
