"""Experts allocated to layers: static per-layer schedules of top-k at a budget of average experts per token,
and the per-token rules fitted to spend each layer's budget of a schedule. Importing this module registers
its routing methods with `bh_routing`; fitting needs the model, so it runs through `bh_experiment`.

    import bh_allocation
    from bh_routing import MoERouterPatcher
    calibration.allocations |= bh_allocation.fit_allocations(model, calibration_ids)  # then calibration.save(...)
    patcher = MoERouterPatcher(model, calibration=calibration).patch("schedule", budget=2.0)

1. Allocation methods: "schedule" (the greedy marginal-loss schedule, a reference curve of the frontier),
   "allocl" (Alloc-L), "lexi" (LExI), and "alloct" (Alloc-T: the tokens of a call share a layer's budget).
2. Fitting allocations: `greedy_allocation` and `dp_allocation` over any cost, with the model's costs
   (`budget_nll` for the greedy schedule, `layer_sensitivities` for Alloc-L, `lexi_perturbations` for LExI),
   all in `fit_allocations`.
3. The per-token rules at a schedule's layer budgets: one parameter per layer fitted on calibration logits
   (`fit_layer_parameter`), for BH, top-p, dynamic skipping and entropy k (`budget_matched_configs`).

Allocations: Chitty-Venkata et al. 2025, "LExI: Layer-Adaptive Active Experts for Efficient MoE Model
Inference", arXiv 2509.02753; Liu et al. 2026, "Alloc-MoE: Budget-Aware Expert Activation Allocation for
Efficient Mixture-of-Experts Inference", arXiv 2604.08133. Where this code differs from the papers is said at
each method.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch

import bh_experiment as bx
import bh_routing as br

__all__ = [
    "ALLOCATIONS",
    "fit_allocations",
    "fit_cost",
    "FitLosses",
    "PrefixReuse",
    "resumed_allocations",
    "greedy_allocation",
    "dp_allocation",
    "budget_nll",
    "layer_sensitivities",
    "lexi_perturbations",
    "fit_layer_parameter",
    "budget_matched_configs",
    "budget_matched_count",
]


# ----------------------------------------------------------------------------------------------------
# 1. Allocation methods
# ----------------------------------------------------------------------------------------------------


def _check_budget(budget, shape) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= shape.native_top_k:
        raise ValueError(
            f"budget must be a number in (0, {shape.native_top_k}] (average experts per token), got {budget!r}"
        )


class AllocationMethod(br.RoutingMethod):
    """Top-k with the number of experts set per layer by an allocation fitted to the model: at an average of
    `budget` experts per token, layer l keeps `RoutingCalibration.allocation(name, budget)[l]` experts for every
    token (a fractional budget: one more for that share of tokens, chosen by position, `route_layer_budget`)."""

    label = ""  # the allocation, in words
    per_token = False

    def parameters(self, shape, budget=2.0, temperature=1.0, renormalize=None) -> dict:
        _check_budget(budget, shape)
        br.check_temperature(temperature)
        renormalize = br.resolve_renormalize(renormalize, shape)
        return dict(budget=budget, min_k=0, max_k=shape.native_top_k, temperature=temperature, renormalize=renormalize)

    def calibration_use(self, params):
        return f"the {self.label} (allocations[{self.name!r}], bh_allocation.fit_allocations)"

    def allocation_of(self, params) -> str:
        """The name of the allocation whose layer budgets the configuration routes with."""
        return self.name

    def layer_tables(self, params, context):
        tables = super().layer_tables(params, context)
        budgets = context.calibration.allocation(self.allocation_of(params), params["budget"])
        return tables | {"budget": budgets[context.layer]}

    def layer_budget(self, tables) -> float:
        """The layer's budget from its tables (`layer_tables`); ValueError without them."""
        if not tables or "budget" not in tables:
            raise ValueError(f"method {self.name!r} routes one layer at a time: give the layer and the calibration")
        return tables["budget"]

    def route(self, logits, params, with_stats=False, tables=None):
        budget = self.layer_budget(tables)
        return br.route_layer_budget(logits, budget, params["temperature"], params["renormalize"], params["max_k"])

    def config_name(self, budget=2.0, temperature=1.0, renormalize=None) -> str:
        return f"{self.name}_b{budget:.2f}" + br.config_suffix(1, 1, temperature, renormalize)

    def series(self, params):
        return self.label


class ScheduleMethod(AllocationMethod):
    """The greedy marginal-loss schedule (`greedy_allocation` of `budget_nll` on calibration text): the static
    per-layer allocation the frontier compares every method with."""

    name, label, is_baseline = "schedule", "static schedule (greedy)", True


class AllocLMethod(AllocationMethod):
    """Alloc-L (Alloc-MoE's layer level): each layer's loss with only its own top-k lowered, on calibration
    text (`layer_sensitivities`), then the allocation of least summed loss at each budget (`dp_allocation`)."""

    name, label = "allocl", "Alloc-L allocation"


class LExIMethod(AllocationMethod):
    """LExI, data-free: each layer's output perturbation under top-k on Gaussian inputs (`lexi_perturbations`),
    then the allocation of least summed perturbation at each budget (`dp_allocation`; the paper searches it)."""

    name, label = "lexi", "LExI allocation"


class AllocTMethod(AllocationMethod):
    """Alloc-T (Alloc-MoE's token level, `route_alloct`) within the layer budgets of an allocation: the tokens of
    a call share round(b_l x T) experts in layer l, at least min_k and at most max_k each."""

    name, label, per_token = "alloct", "Alloc-T within the schedule", True

    def parameters(self, shape, budget=2.0, allocation="schedule", min_k=1, max_k=None, temperature=1.0,
                   renormalize=None) -> dict:  # fmt: skip
        params = super().parameters(shape, budget, temperature, renormalize)
        max_k = shape.native_top_k if max_k is None else max_k
        if not isinstance(allocation, str) or not allocation.isidentifier():  # it is written into names and paths
            raise ValueError(f"allocation must be the name of a fitted allocation, e.g. 'schedule', got {allocation!r}")
        if isinstance(min_k, bool) or not isinstance(min_k, int) or not 0 <= min_k <= max_k <= shape.num_experts:
            raise ValueError(f"min_k and max_k must be integers with 0 <= min_k <= max_k <= {shape.num_experts}")
        return params | dict(allocation=allocation, min_k=min_k, max_k=max_k)

    def calibration_use(self, params):
        return f"the layer budgets of allocations[{params['allocation']!r}] (bh_allocation.fit_allocations)"

    def allocation_of(self, params) -> str:
        return params["allocation"]

    def route(self, logits, params, with_stats=False, tables=None):
        keys = ("temperature", "min_k", "max_k", "renormalize")
        return br.route_alloct(logits, self.layer_budget(tables), *(params[key] for key in keys))

    def config_name(self, budget=2.0, allocation="schedule", min_k=1, max_k=None, temperature=1.0, renormalize=None):
        name = f"alloct_{allocation}_b{budget:.2f}" + ("" if max_k is None else f"_k{max_k}")
        return name + br.config_suffix(min_k, 1, temperature, renormalize)


ALLOCATIONS = ("schedule", "allocl", "lexi")  # the allocations `fit_allocations` fits, by method name
for _method in (ScheduleMethod(), AllocLMethod(), LExIMethod(), AllocTMethod()):
    br.register_routing_method(_method)


# ----------------------------------------------------------------------------------------------------
# 2. Fitting allocations
# ----------------------------------------------------------------------------------------------------


def greedy_allocation(loss: Callable[[tuple[int, ...]], float], num_layers: int, native_k: int, start: int = 1,
                      on_step: Callable[[tuple[int, ...]], object] | None = None):  # fmt: skip
    """The greedy marginal-loss path: from `start` experts in every layer, each step gives one more expert to
    the layer whose increment lowers loss(k) the most (each step costs one expert per token, so this is the
    largest drop per expert; ties go to the lowest layer), until every layer keeps native_k. `on_step`, if
    given, is called with the allocation each step raises before its candidates are evaluated
    (`PrefixReuse.rebase`). Returns [S, L] float64, row s the experts per layer after s steps
    (S = L (native_k - start) + 1)."""
    experts = [start] * num_layers
    rows = [tuple(experts)]
    while min(experts) < native_k:
        if on_step is not None:
            on_step(tuple(experts))
        raised = {layer: tuple(k + (i == layer) for i, k in enumerate(experts)) for layer in range(num_layers)
                  if experts[layer] < native_k}  # fmt: skip
        losses = {layer: loss(candidate) for layer, candidate in raised.items()}
        chosen = min(losses, key=lambda layer: (losses[layer], layer))
        experts = list(raised[chosen])
        rows.append(tuple(experts))
    return torch.tensor(rows, dtype=torch.float64)


def dp_allocation(costs: torch.Tensor, start: int = 1) -> torch.Tensor:
    """For every total of experts from L * start to L * K, the allocation k (start <= k_l <= K) of least summed
    cost sum_l costs[l, k_l], by dynamic programming over the layers (exact for a cost that adds over layers).
    costs: [L, K + 1], costs[l, k] of layer l keeping k experts. Returns [S, L] float64, one row per total."""
    costs = costs.double()
    num_layers, native_k = costs.shape[0], costs.shape[1] - 1
    choices = range(start, native_k + 1)
    best = {0: (0.0, ())}  # total -> (least cost, allocation) over the layers so far
    for layer in range(num_layers):
        extended = {}
        for total, (cost, allocation) in best.items():
            for k in choices:
                candidate = (cost + float(costs[layer, k]), (*allocation, k))
                if total + k not in extended or candidate[0] < extended[total + k][0]:
                    extended[total + k] = candidate
        best = extended
    return torch.tensor([best[total][1] for total in sorted(best)], dtype=torch.float64)


def budget_nll(model, patcher, token_ids, window: int, batch_size: int) -> Callable[[tuple], float]:
    """loss(k) for `greedy_allocation`: the mean NLL of `token_ids` with layer l keeping its k[l] most probable
    experts (`layerk`), through the model's `patcher` (left unpatched)."""

    def loss(experts: tuple) -> float:
        patcher.patch("layerk", budgets=tuple(float(k) for k in experts))
        try:
            return bx.evaluate_language_model(model, token_ids, window, None, batch_size)["mean_nll"]
        finally:
            patcher.unpatch()

    return loss


def decoder_layers(model, blocks: list) -> tuple[torch.nn.ModuleList, list[int]]:
    """The model's list of decoder layers (the first module list holding every block of `blocks`) and, for each
    block in order, the index of the decoder layer that holds it. ValueError when no module list holds them."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            holder = {id(part): index for index, layer in enumerate(module) for part in layer.modules()}
            if all(id(block) in holder for block in blocks):
                return module, [holder[id(block)] for block in blocks]
    raise ValueError(f"{type(model).__name__} has no module list of decoder layers holding its MoE blocks")


def _moved(value, device):
    """A decoder layer's output (a tensor, or a tuple of tensors and None) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    return type(value)(_moved(item, device) for item in value) if isinstance(value, tuple) else value


def _first_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else next(v for v in value if isinstance(v, torch.Tensor))


class PrefixReuse:
    """`budget_nll` of allocations that share their first MoE layers with a base allocation, computed from the
    decoder layer of the first MoE layer where they differ: the decoder layers before it return the base's
    outputs recorded on the same windows (kept on the CPU) instead of recomputing them. Their inputs and routing
    are the base's, so are their outputs: the same losses as whole forwards, bit for bit on a CPU and within
    the kernels' run-to-run variation on a GPU. A forward whose windows or shapes the base did not record runs
    whole. The greedy schedule's candidates, each one layer raised from its step's allocation, then cost about
    half a forward on average (`fit_cost`)."""

    def __init__(self, model, patcher, token_ids, window: int, batch_size: int):
        self.model, self.loss = model, budget_nll(model, patcher, token_ids, window, batch_size)
        self.layers, self.holders = decoder_layers(model, [layer.block for layer in br.find_moe_layers(model)])
        self.base, self.outputs, self.key = None, {}, None  # outputs[(windows' key, decoder layer)]
        self.computed = 0  # decoder layers run over whole evaluations, for the log

    def __call__(self, experts: tuple) -> float:
        """loss(experts), from the first decoder layer where experts differs from the base."""
        with self._replayed(self.first_computed(experts)):
            return self.loss(experts)

    def rebase(self, experts: tuple) -> float:
        """loss(experts), recording every decoder layer's output from its first difference with the old base
        on: `experts` is the base from now on."""
        start = self.first_computed(experts)
        hooks = [self.layers[j].register_forward_hook(self._recorder(j)) for j in range(start, len(self.layers))]
        try:
            with self._replayed(start):
                value = self.loss(experts)
        finally:
            for hook in hooks:
                hook.remove()
        self.base = tuple(experts)
        return value

    def first_computed(self, experts: tuple) -> int:
        """The first decoder layer `experts` must run: that of its first MoE layer unlike the base's (0 without
        a base; past the last layer for the base itself)."""
        if self.base is None:
            return 0
        differing = [layer for layer, (k, b) in enumerate(zip(experts, self.base, strict=True)) if k != b]
        return self.holders[differing[0]] if differing else len(self.layers)

    def _recorder(self, index: int):
        def record(module, args, output):
            self.outputs[(self.key, index)] = _moved(output, "cpu")

        return record

    def _keyed(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        self.key = (tuple(input_ids.shape), input_ids.cpu().numpy().tobytes())

    def _replay(self, original, start: int):
        """The forward of a decoder layer before `start`: the base's output of layer start - 1 on these windows,
        or the layer's own forward where the base has none of this shape."""

        def forward(*args, **kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            recorded = self.outputs.get((self.key, start - 1))
            if recorded is None or _first_tensor(recorded).shape != hidden_states.shape:
                return original(*args, **kwargs)
            return _moved(recorded, hidden_states.device)

        return forward

    @contextlib.contextmanager
    def _replayed(self, start: int):
        keying = self.model.register_forward_pre_hook(self._keyed, with_kwargs=True)
        replaced = [(layer, layer.__dict__.get("forward")) for layer in self.layers[:start]]
        for layer, _ in replaced:
            layer.forward = self._replay(layer.forward, start)
        self.computed += len(self.layers) - start
        try:
            yield
        finally:
            keying.remove()
            for layer, own in replaced:  # the layer's own instance attribute again, or its class's forward
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own


def layer_sensitivities(loss: Callable[[tuple], float], num_layers: int, native_k: int) -> torch.Tensor:
    """Alloc-L's sensitivity profile: costs[l, k] = loss with layer l alone at k experts (the others at
    native_k) less the loss with every layer at native_k, for k = 1..native_k; costs[l, 0] = inf.
    Returns [L, native_k + 1] float64, for `dp_allocation`."""
    native = (native_k,) * num_layers
    reference = loss(native)
    costs = torch.full((num_layers, native_k + 1), math.inf, dtype=torch.float64)
    for layer in range(num_layers):
        for k in range(1, native_k + 1):
            experts = tuple(k if i == layer else native_k for i in range(num_layers))
            costs[layer, k] = 0.0 if k == native_k else loss(experts) - reference
    return costs


@torch.no_grad()
def lexi_perturbations(model, patcher, tokens: int = 2048, iterations: int = 4, seed: int = 0) -> torch.Tensor:
    """LExI's data-free profile (its Algorithm 1): for each MoE layer l and k = 1..K, the mean over `iterations`
    draws of X ~ N(0, 1) [1, tokens, H] of || MoE_l(X; top-k) - MoE_l(X; native top-K) ||_F, the block alone
    on Gaussian inputs. Returns [L, K + 1] float64 (costs[l, 0] = inf), for `dp_allocation`."""
    layers, native_k = br.find_moe_layers(model), patcher.native_top_k
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.randn(1, tokens, model.config.hidden_size, generator=generator) for _ in range(iterations)]
    inputs = [x.to(parameter.device, parameter.dtype) for x in draws]  # the same draws for every layer
    costs = torch.full((len(layers), native_k + 1), math.inf, dtype=torch.float64)
    for index, layer in enumerate(layers):
        native = [_block_output(layer.block, x) for x in inputs]
        for k in range(1, native_k + 1):
            patcher.patch("layerk", budgets=tuple(float(k if i == index else native_k) for i in range(len(layers))))
            try:
                norms = [
                    (_block_output(layer.block, x) - y).double().norm() for x, y in zip(inputs, native, strict=True)
                ]
            finally:
                patcher.unpatch()
            costs[index, k] = float(torch.stack(norms).mean())
    return costs


def _block_output(block, hidden_states: torch.Tensor) -> torch.Tensor:
    output = block(hidden_states)
    return output[0] if isinstance(output, tuple) else output


def fit_cost(num_layers: int, native_k: int) -> float:
    """At most how many whole evaluations of the calibration text `fit_allocations` costs, counting an
    evaluation from decoder layer d as (L - d) / L of one (`PrefixReuse`, one decoder layer per MoE layer):
    the greedy schedule's L (K - 1) steps, each a rebase (at most one) and at most L candidates, one from
    each layer; Alloc-L's reference and its L (K - 1) profiles, K - 1 from each layer."""
    steps, from_each_layer = num_layers * (native_k - 1), (num_layers + 1) / 2  # sum over d of (L - d) / L
    return steps * (1 + from_each_layer) + 1 + (native_k - 1) * from_each_layer


class FitLosses:
    """The losses the fits ask for, each allocation evaluated once however many fits ask for it, through a
    `PrefixReuse`: `rebase(experts)` names the allocation a greedy step raises, which is recorded (and the reuse
    rebased on it) only when one of that step's candidates must be computed, so that the steps of a resumed fit
    whose losses are all known cost nothing. `evaluated`: losses already known (an interrupted fit's);
    `on_evaluation(evaluations)` is called after each new one (to save the progress)."""

    def __init__(self, reuse, evaluated: dict | None = None, on_evaluation: Callable[[dict], object] | None = None):
        self.reuse, self.evaluations, self.on_evaluation = reuse, dict(evaluated or {}), on_evaluation
        self.resumed, self.base = len(self.evaluations), None

    def __call__(self, experts: tuple) -> float:
        if experts not in self.evaluations:
            if self.base is not None:
                self._record(self.base, self.reuse.rebase(self.base))
                self.base = None
            self._record(experts, self.reuse(experts))
        return self.evaluations[experts]

    def rebase(self, experts: tuple) -> None:
        self.base = tuple(experts)

    def _record(self, experts: tuple, loss: float) -> None:
        if experts not in self.evaluations:
            self.evaluations[experts] = loss
            if self.on_evaluation is not None:
                self.on_evaluation(self.evaluations)


def fit_allocations(model, token_ids, window: int = 256, batch_size: int = 8, seed: int = 0, log=print,
                    evaluated: dict | None = None, on_evaluation: Callable | None = None) -> dict:  # fmt: skip
    """Every allocation of `ALLOCATIONS` fitted to `model`: the greedy schedule and Alloc-L on the calibration
    text `token_ids` (its mean NLL, each allocation evaluated from its first layer unlike the one it is
    derived from: `PrefixReuse`), LExI data-free. `evaluated` and `on_evaluation`: `FitLosses`' (a fit resumed
    from the losses an interrupted one had). Returns {name: [S, L] float64} for
    `RoutingCalibration.allocations`, rows from 1 expert in every layer to the native k."""
    patcher = br.MoERouterPatcher(model, record_statistics=False)
    num_layers, native_k = patcher.num_layers, patcher.native_top_k
    reuse = PrefixReuse(model, patcher, token_ids, window, batch_size)
    losses = FitLosses(reuse, evaluated, on_evaluation)
    fitted = {"schedule": greedy_allocation(losses, num_layers, native_k, on_step=losses.rebase)}
    losses.rebase((native_k,) * num_layers)  # Alloc-L's profiles each lower one layer from the native allocation
    fitted["allocl"] = dp_allocation(layer_sensitivities(losses, num_layers, native_k))
    fitted["lexi"] = dp_allocation(lexi_perturbations(model, patcher, seed=seed))
    whole = reuse.computed / len(reuse.layers)
    log(f"allocations fitted: {len(losses.evaluations)} allocations of {token_ids.numel()} calibration tokens "
        f"evaluated ({losses.resumed} resumed from an interrupted fit), {whole:.0f} evaluations' worth of decoder "
        "layers run")  # fmt: skip
    return fitted


FIT_PROGRESS = "allocations_progress"  # the store's record of an unfinished fit's losses


def resumed_allocations(store: bx.ResultStore, model, token_ids, window: int = 256, batch_size: int = 8,
                        seed: int = 0, redo: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """`fit_allocations` saved in `store` (its settings: what the allocations depend on) and read back by a
    later run with the same settings and code; RuntimeError with the error if the fit failed. Each allocation's
    loss is saved as it is evaluated (`FIT_PROGRESS`), so that a fit interrupted (a crash, a lost Colab
    runtime) resumes from them and loses at most the evaluation in flight; redo starts afresh."""
    progress = None if redo else store.load(FIT_PROGRESS)
    evaluated = {tuple(experts): loss for experts, loss in (progress or {}).get("evaluations", [])}

    def save(evaluations: dict) -> None:
        store.save(FIT_PROGRESS, {"status": "ok", "evaluations": [[list(k), v] for k, v in evaluations.items()]})

    fit = functools.partial(fit_allocations, model, token_ids, window, batch_size, seed, evaluated=evaluated,
                            on_evaluation=save)  # fmt: skip
    fitted = store.run("allocations", lambda: {name: table.tolist() for name, table in fit().items()}, redo=redo)
    if fitted["status"] != "ok":
        raise RuntimeError(f"the layer allocations could not be fitted: {fitted['error']}")
    return {name: torch.tensor(fitted[name], dtype=torch.float64) for name in ALLOCATIONS}


# ----------------------------------------------------------------------------------------------------
# 3. The per-token rules at a schedule's layer budgets
# ----------------------------------------------------------------------------------------------------

# For each rule: the configuration, its parameter fitted per layer, the parameter's range, and whether the
# average experts rise with it.
MATCHED_RULES = {
    "bh": (("bh", {"min_k": 1}), "alpha", (1e-6, 1.0), True),
    "topp": (("topp", {"min_k": 1}), "p", (1e-6, 1.0), True),
    "skip": (("skip", {}), "beta", (1e-6, 1.0), False),
    "entropy": (("entropy", {"min_k": 1}), "bands", (1e-3, None), True),
}


def fit_layer_parameter(
    config: br.RoutingConfig,
    name: str,
    budgets,
    layer_logits,
    calibration,
    bounds,
    increasing: bool = True,
    iterations: int = 24,
    num_experts_per_tok: int = 8,
    tokens: int = 2048,
) -> tuple:
    """For each layer l, the value of `config`'s parameter `name` at which the method's average experts per
    token on the layer's calibration logits (layer_logits[l], [N, E]) is budgets[l]: bisection over `bounds`
    on the average, which must be monotone in the parameter (rising with it if `increasing`), read on the
    layer's first `tokens` calibration tokens; the bound of the last interval nearer the budget, to 6
    significant digits. Returns one value per layer (a tuple)."""
    values = []
    for layer, (logits, budget) in enumerate(zip(layer_logits, budgets, strict=True)):
        logits = logits[:tokens]

        def average(value, logits=logits, layer=layer):
            params = config.kwargs | {name: value, "num_experts_per_tok": num_experts_per_tok}
            routing = br.route_logits(config.method, logits, layer, calibration, **params)
            return float(routing.expert_counts.double().mean())

        low, high = bounds
        for _ in range(iterations):
            middle = (low + high) / 2
            if (average(middle) < budget) == increasing:
                low = middle
            else:
                high = middle
        values.append(float(f"{min((low, high), key=lambda v: abs(average(v) - budget)):.6g}"))
    return tuple(values)


def budget_matched_count(rules=tuple(MATCHED_RULES)) -> int:
    """How many configurations `budget_matched_configs` makes for one budget: one per rule, and Alloc-T."""
    return len(rules) + 1


def budget_matched_configs(calibration, layer_logits, budget: float, native_k: int, allocation: str = "schedule",
                           rules=tuple(MATCHED_RULES)):  # fmt: skip
    """The per-token rules at the layer budgets of `allocation` at an average of `budget` experts: BH (robust_z)
    with one alpha per layer, top-p with one p per layer, dynamic skipping with one beta per layer and entropy
    k with one bands per layer, each fitted on the calibration logits (`fit_layer_parameter`), and Alloc-T
    within the same budgets (`rules`: those of `MATCHED_RULES` to fit). Names end in `_<allocation>_b<budget>`."""
    budgets = calibration.allocation(allocation, budget)
    configs = []
    for rule in rules:
        (method, fixed), name, (low, high), increasing = MATCHED_RULES[rule]
        fixed = fixed | ({"max_k": native_k} if method != "skip" else {"k": native_k})
        config = br.RoutingConfig(f"{rule}_{allocation}_b{budget:.2f}", method, tuple(fixed.items()))
        bounds = (low, 2.0 * native_k if high is None else high)
        values = fit_layer_parameter(config, name, budgets, layer_logits, calibration, bounds, increasing,
                                     num_experts_per_tok=native_k)  # fmt: skip
        configs.append(br.RoutingConfig(config.name, method, tuple((fixed | {name: values}).items())))
    alloct = br.RoutingConfig.of("alloct", budget=budget, allocation=allocation)
    return configs + [alloct]
