"""Before a run's work: the generation path the sweep times on, chosen by measurement where it is not known,
and the run's time estimated from counted work and measured rates (bh_experiment, bh_allocation)."""

import math

import pytest
import torch

import bh_allocation as ba
import bh_experiment as bx
import bh_routing as br


def test_a_probe_costs_its_first_calls_and_its_tokens():
    probe = bx.GenerationProbe("static_compiled", first_call_seconds=30.0, tokens_per_second=200.0)
    assert probe.seconds(calls=29, tokens=20_000) == pytest.approx(29 * 30.0 + 100.0)
    estimate = bx.estimate_runtime(probe, 29, 20_000, 50_000.0, 5_000_000)
    assert estimate == pytest.approx({"sweep": 970.0, "evaluation": 100.0, "total": 1070.0})
    nothing_evaluated = bx.estimate_runtime(probe, 1, 200, None, 0)
    assert nothing_evaluated["evaluation"] == 0.0 and nothing_evaluated["total"] == pytest.approx(31.0)
    unmeasured = bx.estimate_runtime(probe, 1, 200, None, 1000)  # the evaluation probe ran out of memory
    assert math.isnan(unmeasured["evaluation"]) and math.isnan(unmeasured["total"])
    with pytest.raises(ValueError, match="work must be >= 0"):
        bx.estimate_runtime(probe, -1, 200, None, 0)


def test_the_candidates_are_measured_only_where_the_faster_path_is_not_known():
    assert bx.generation_candidates("cpu", fast_compiled=False) == ["dynamic"]
    assert bx.generation_candidates("cuda:0", fast_compiled=True) == ["static_compiled"]
    assert bx.generation_candidates("cuda", fast_compiled=False) == ["dynamic", "static_compiled"]  # a T4, float16
    assert not bx.fast_compiled_path(bx.build_random_olmoe(seed=0))  # no fused kernels on a CPU


def fake_probes(monkeypatch, rates, failing=()):
    """probe_generation replaced by fixed (first call, tokens/s) per path; `failing` paths raise as dynamo does."""
    probed = []

    def probe(model, tokenizer, prompt, new_tokens, path, max_cache_len=None):
        probed.append(path)
        if path in failing:
            raise RuntimeError(f"{path} did not compile")
        return bx.GenerationProbe(path, *rates[path])

    monkeypatch.setattr(bx, "probe_generation", probe)
    return probed


@pytest.mark.parametrize(("calls", "tokens", "chosen"), [(1, 10_000, "static_compiled"), (29, 23_200, "dynamic")])
def test_the_chosen_path_is_the_faster_for_the_sweep_compilations_included(
    monkeypatch, tiny_model, calls, tokens, chosen
):
    rates = {"dynamic": (0.5, 40.0), "static_compiled": (60.0, 160.0)}  # compiled: 4x per token, 60 s a config
    probed = fake_probes(monkeypatch, rates)
    lines = []
    probe, probes = bx.choose_generation_path(
        tiny_model, None, "w1 w2", 20, 64, calls, tokens, ["dynamic", "static_compiled"], lines.append
    )
    assert probe.path == chosen and probed == ["dynamic", "static_compiled"] and len(probes) == 2
    chosen_lines = [line for line in lines if "(chosen: the faster)" in line]
    assert len(chosen_lines) == 1 and chosen_lines[0].startswith(f"generation path {chosen}:")


def test_a_path_that_does_not_compile_is_left_out_and_named(monkeypatch, tiny_model):
    fake_probes(monkeypatch, {"dynamic": (0.5, 40.0), "static_compiled": (60.0, 160.0)}, failing=("static_compiled",))
    lines = []
    probe, probes = bx.choose_generation_path(
        tiny_model, None, "w1", 4, 16, 1, 100, ["dynamic", "static_compiled"], lines.append
    )
    assert probe.path == "dynamic" and [p.path for p in probes] == ["dynamic"]
    assert any("'static_compiled' left out: static_compiled did not compile" in line for line in lines)
    fake_probes(monkeypatch, {}, failing=("dynamic", "static_compiled"))
    with pytest.raises(RuntimeError, match="no generation path of"):
        bx.choose_generation_path(tiny_model, None, "w1", 4, 16, 1, 100, ["dynamic", "static_compiled"], print)
    with pytest.raises(ValueError, match=r"candidates must name paths of \['dynamic', 'static', 'static_compiled'\]"):
        bx.choose_generation_path(tiny_model, None, "w1", 4, 16, 1, 100, ["eager"], print)


def test_probes_run_the_sweeps_configuration_patched_afresh_on_each_path_and_unpatch(monkeypatch, tiny_model):
    seen = []  # (path, the patcher holding the model, its method) at each probe

    def probe(model, tokenizer, prompt, new_tokens, path, max_cache_len=None):
        holder = getattr(model, br.PATCHER_ATTRIBUTE, None)
        seen.append((path, holder, getattr(holder, "method", None)))
        return bx.GenerationProbe(path, 1.0, 100.0)

    monkeypatch.setattr(bx, "probe_generation", probe)
    patcher, routing = br.MoERouterPatcher(tiny_model), br.RoutingConfig.of("bh", alpha=0.05, max_k=8)
    bx.choose_generation_path(tiny_model, None, "w1", 4, 16, 1, 100, ["dynamic", "static_compiled"], print,
                              patcher=patcher, routing=routing)  # fmt: skip
    assert seen == [("dynamic", patcher, "bh"), ("static_compiled", patcher, "bh")]
    assert getattr(tiny_model, br.PATCHER_ATTRIBUTE, None) is None  # unpatched after the probes
    bx.choose_generation_path(tiny_model, None, "w1", 4, 16, 1, 100, ["dynamic"], print)
    assert seen[-1] == ("dynamic", None, None)  # without them: the model's own routing
    failing = br.RoutingConfig.of("topk", k=2)

    def out_of_memory_when_patched(model, tokenizer, prompt, new_tokens, path, max_cache_len=None):
        if getattr(model, br.PATCHER_ATTRIBUTE, None) is not None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return probe(model, tokenizer, prompt, new_tokens, path, max_cache_len)

    monkeypatch.setattr(bx, "probe_generation", out_of_memory_when_patched)
    lines = []  # a configuration that cannot run is the sweep's to record: the probe falls back, the run goes on
    chosen, _ = bx.choose_generation_path(tiny_model, None, "w1", 4, 16, 1, 100, ["dynamic"], lines.append,
                                          patcher=patcher, routing=failing)  # fmt: skip
    assert chosen.path == "dynamic" and seen[-1] == ("dynamic", None, None)
    assert (
        lines[0]
        == "generation path 'dynamic' with topk_k2 failed (CUDA out of memory (simulated)): probed unpatched instead"
    )
    assert getattr(tiny_model, br.PATCHER_ATTRIBUTE, None) is None
    with pytest.raises(ValueError, match="patcher and routing must be given together"):
        bx.choose_generation_path(tiny_model, None, "w1", 4, 16, 1, 100, ["dynamic"], print, routing=routing)


def test_probes_measure_the_model_as_it_is_and_leave_it_so(tiny_model, word_tokenizer):
    before = {name: p.clone() for name, p in tiny_model.state_dict().items()}
    probe, probes = bx.choose_generation_path(tiny_model, word_tokenizer, "w1 w2 w3", 6, 16, 3, 300, log=print)
    assert probes == [probe] and probe.path == "dynamic"  # the CPU's one candidate
    assert probe.tokens_per_second > 0 and probe.first_call_seconds >= 0
    rate = bx.probe_evaluation(tiny_model, window=16, batch_size=4)
    assert math.isfinite(rate) and rate > 0
    assert all(torch.equal(before[name], p) for name, p in tiny_model.state_dict().items())


def test_an_evaluation_probe_out_of_memory_measures_nothing(tiny_model, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bx, "evaluate_language_model", out_of_memory)
    assert bx.probe_evaluation(tiny_model, window=16, batch_size=4) is None


class CountingReuse:
    """Stands in for `PrefixReuse` over a loss whose greedy path raises layers in turn: counts the decoder
    layers each evaluation runs (one decoder layer per MoE layer), from its first layer unlike the base."""

    def __init__(self, num_layers):
        self.num_layers, self.base, self.computed = num_layers, None, 0

    def first_computed(self, experts):
        differing = [i for i, (k, b) in enumerate(zip(experts, self.base or (), strict=False)) if k != b]
        return 0 if self.base is None else differing[0] if differing else self.num_layers

    def __call__(self, experts):
        self.computed += self.num_layers - self.first_computed(experts)
        return sum(1.0 / (k + 0.01 * layer) for layer, k in enumerate(experts))

    def rebase(self, experts):
        value = self(experts)
        self.base = tuple(experts)
        return value


@pytest.mark.parametrize(("num_layers", "native_k"), [(2, 8), (4, 3), (16, 8)])
def test_the_allocation_fit_costs_at_most_its_counted_evaluations(num_layers, native_k):
    reuse = CountingReuse(num_layers)
    losses = ba.FitLosses(reuse)  # as fit_allocations asks for them
    ba.greedy_allocation(losses, num_layers, native_k, on_step=losses.rebase)
    losses.rebase((native_k,) * num_layers)
    ba.layer_sensitivities(losses, num_layers, native_k)
    bound = ba.fit_cost(num_layers, native_k)
    assert reuse.computed / num_layers <= bound
    assert reuse.computed / num_layers >= 0.5 * bound  # the count is what the fit costs, not a loose ceiling
    whole = num_layers * (native_k - 1) * (num_layers + 1) + 1  # every allocation evaluated whole
    assert num_layers < 16 or bound < 0.6 * whole  # OLMoE-1B-7B's 16 layers: 41% less than whole forwards


def test_the_matched_count_is_what_budget_matched_configs_makes():
    logits = [torch.randn(512, 64, generator=torch.Generator().manual_seed(layer)) for layer in range(2)]
    calibration = br.fit_routing_calibration(logits)
    calibration.allocations = {"schedule": torch.tensor([[1.0, 1.0], [2.0, 3.0], [8.0, 8.0]])}
    for rules in (tuple(ba.MATCHED_RULES), ("bh",)):
        made = ba.budget_matched_configs(calibration, logits, 2.5, 8, rules=rules)
        assert len(made) == ba.budget_matched_count(rules)
