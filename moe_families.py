"""How each transformers Mixture-of-Experts family routes, so that a routing method can replace its router:
the module `bh_routing`'s patcher reads a model through. Imports nothing of the project but the experts check.

1. `RouterSpec`: how one router scores, selects and weights its experts (softmax, softmax over the kept
   logits, sigmoid with a score-correction bias; renormalised, scaled, group-limited), and
   `describe_router`, which finds a router's spec by reproducing its own output on a probe batch.
2. `find_moe_layers`: every MoE block of a model (router, experts, spec, shared experts), as `MoELayer`s.
3. `moe_shape`: a config's experts, native top-k and selectable experts, without loading weights.

Shapes: T tokens, E experts, E' the experts a token may choose from (fewer than E for group-limited
routers), k the router's own top-k, K a routing method's slot width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from variable_k_experts import is_experts_module

__all__ = [
    "ROUTER_SCORES",
    "SHARED_EXPERT_NAMES",
    "RouterSpec",
    "describe_router",
    "MoELayer",
    "find_moe_layers",
    "MoEShape",
    "moe_shape",
]

ROUTER_SCORES = ("softmax", "softmax_kept", "sigmoid")


SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")  # block children always computed


class RouterSpec:
    """How one router turns its logits [T, E] into a top-k routing, so that a routing method can replace it.

    score:
        "softmax": top-k of softmax(logits) (OLMoE, Mixtral, Qwen2/3-MoE, Jamba, DeepSeek-V2);
        "softmax_kept": top-k of the logits, softmax over the kept logits (GraniteMoE, gpt-oss);
        "sigmoid": top-k of sigmoid(logits) + a score-correction bias, weights sigmoid(logits) of the kept
            experts (DeepSeek-V3, GLM4-MoE, Dots1).
    renormalize: the kept weights are divided by their sum (norm_topk_prob); scale: routed_scaling_factor;
    groups: None or (n_group, topk_group, group score "max" | "top2sum"): only experts in the topk_group best
        groups are selectable (DeepSeek-V2 group_limited_greedy, DeepSeek-V3).

    A routing method sees each token's `selection` logits [T, E'] over its E' selectable experts, whose
    softmax is the family's selection distribution (the logits themselves for the softmax families,
    log(sigmoid + bias) for the sigmoid ones), and picks slots; the kept weights then follow the family's own
    weighting (`weights`), so that top-k at the native k gives the native routing.
    """

    def __init__(self, router, score: str, renormalize: bool, scale: float = 1.0, groups: tuple | None = None):
        if score not in ROUTER_SCORES:
            raise ValueError(f"score must be one of {ROUTER_SCORES}, got {score!r}")
        self.router, self.score, self.renormalize, self.scale, self.groups = router, score, renormalize, scale, groups
        self.num_experts, self.top_k = int(router.weight.shape[0]), int(router.top_k)
        self.sorted_output = True  # set by `describe_router` from the router's own output

    @property
    def selectable(self) -> int:
        """Experts a token may choose from: E, or those of the topk_group allowed groups."""
        if self.groups is None:
            return self.num_experts
        num_groups, allowed_groups, _ = self.groups
        return self.num_experts // num_groups * allowed_groups

    @property
    def plain(self) -> bool:
        """A routing method's own weights (softmax probabilities of the kept experts) are the family's."""
        return self.score == "softmax" and self.scale == 1.0 and self.groups is None

    def describe(self) -> str:
        groups = "" if self.groups is None else f", top {self.groups[1]} of {self.groups[0]} groups ({self.groups[2]})"
        scale = "" if self.scale == 1.0 else f", weights x {self.scale:g}"
        norm = ", renormalised" if self.renormalize else ""
        return f"{self.score} top-{self.top_k} of {self.num_experts}{groups}{norm}{scale}"

    def _choice_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 scores the family ranks experts by."""
        if self.score == "sigmoid":
            bias = getattr(self.router, "e_score_correction_bias", None)
            scores = logits.float().sigmoid()
            return scores if bias is None else scores + bias.float()
        return torch.softmax(logits.float(), dim=-1)

    def _allowed(self, choice: torch.Tensor) -> torch.Tensor:
        """[T, E'] ascending ids of each token's selectable experts (its topk_group best groups)."""
        num_groups, allowed_groups, group_score = self.groups
        per_group = self.num_experts // num_groups
        grouped = choice.view(-1, num_groups, per_group)
        best = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        groups = best.topk(allowed_groups, dim=-1).indices.sort(dim=-1).values  # [T, G']
        members = torch.arange(per_group, device=choice.device)
        return (groups[..., None] * per_group + members).flatten(-2)  # [T, G' x per_group]

    def selection(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(selection logits [T, E'] a routing method routes, allowed [T, E'] expert ids or None for all)."""
        if self.score == "sigmoid":
            choice = self._choice_scores(logits)
            selection = choice.clamp_min(torch.finfo(torch.float32).tiny).log()
        else:
            choice, selection = (None, logits)
        if self.groups is None:
            return selection, None
        allowed = self._allowed(self._choice_scores(logits) if choice is None else choice)
        return selection.float().gather(-1, allowed), allowed

    def expand(self, index: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Slots over the selectable experts [T, K] -> expert ids [T, K] (sentinel E' -> E)."""
        if allowed is None:
            return index
        kept = index < allowed.shape[-1]
        experts = allowed.gather(-1, index.clamp_max(allowed.shape[-1] - 1))
        return torch.where(kept, experts, torch.full_like(experts, self.num_experts))

    def weights(self, logits: torch.Tensor, index: torch.Tensor, renormalize: bool) -> torch.Tensor:
        """The family's weights [T, K] of the kept experts `index` [T, K] (0 in sentinel slots)."""
        kept = index < self.num_experts
        safe = index.clamp_max(self.num_experts - 1)
        if self.score == "softmax_kept" and renormalize:  # as the router: softmax over the kept logits
            kept_logits = logits.gather(-1, safe).masked_fill(~kept, float("-inf"))
            weights = torch.softmax(kept_logits, dim=-1).nan_to_num(0.0)  # a token with no kept slot: zeros
        else:
            scores = logits.float().sigmoid() if self.score == "sigmoid" else torch.softmax(logits.float(), dim=-1)
            weights = torch.where(kept, scores.gather(-1, safe), torch.zeros((), device=scores.device))
        if renormalize and self.score == "sigmoid":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # as DeepSeek-V3's router
        elif renormalize and self.score == "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return weights * self.scale if self.scale != 1.0 else weights

    def relative_weights(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[T, K] float32, per token proportional to the family's weights of the kept experts `index` (0 in
        sentinel slots): all that their normalised entropy needs, read from K logits (scaling and
        renormalising change no share). Softmax families: exp of each kept logit less the first slot's (the
        largest where the router sorts its output; the exponent is clamped at 80 so that a router whose kept
        logits spread over more than that cannot overflow float32)."""
        kept = index < self.num_experts
        kept_logits = logits.gather(-1, index.clamp_max(self.num_experts - 1)).float()
        if self.score == "sigmoid":
            scores = kept_logits.sigmoid()  # the score-correction bias ranks experts, it does not weight them
        else:
            scores = (kept_logits - kept_logits[..., :1]).clamp_max(80.0).exp()
        return torch.where(kept, scores, torch.zeros((), device=scores.device))

    def native(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own top-k (weights [T, k], index [T, k]) from its logits: what `describe_router`
        checks against the router's output."""
        selection, allowed = self.selection(logits)
        index = self.expand(selection.float().topk(self.top_k, dim=-1).indices, allowed)
        return self.weights(logits, index, self.renormalize), index


def _router_candidates(router) -> list[RouterSpec]:
    """The specs a router's attributes allow, most specific first."""
    scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
    num_groups, allowed_groups = getattr(router, "num_group", None), getattr(router, "topk_group", None)
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3's router and its descendants
        groups = (num_groups, allowed_groups, "top2sum") if num_groups and allowed_groups < num_groups else None
        return [RouterSpec(router, "sigmoid", bool(getattr(router, "norm_topk_prob", True)), scale, groups)]
    if hasattr(router, "topk_method"):  # DeepSeek-V2: greedy or group-limited greedy, never renormalised
        limited = router.topk_method == "group_limited_greedy" and allowed_groups < num_groups
        return [RouterSpec(router, "softmax", False, scale, (num_groups, allowed_groups, "max") if limited else None)]
    norms = [bool(router.norm_topk_prob)] if hasattr(router, "norm_topk_prob") else [False, True]
    return [RouterSpec(router, "softmax", norm, scale) for norm in norms] + [RouterSpec(router, "softmax_kept", True)]


@torch.no_grad()
def _matches(spec: RouterSpec, logits, weights, index) -> str | None:
    """ "exact", "close" or None: how the spec's top-k reproduces the router's (weights, index) on rows whose
    k-th and (k+1)-th choices are not tied."""
    selection, _ = spec.selection(logits)
    decided = torch.ones(selection.shape[0], dtype=torch.bool, device=selection.device)
    if selection.shape[-1] > spec.top_k:
        ranked = selection.float().topk(spec.top_k + 1, dim=-1).values
        decided = ranked[:, spec.top_k] < ranked[:, spec.top_k - 1]
    if not bool(decided.any()):
        return None
    own_weights, own_index = spec.native(logits)
    order, own_order = index.argsort(-1), own_index.argsort(-1)
    same_index = torch.equal(index.gather(-1, order)[decided], own_index.gather(-1, own_order)[decided])
    ours = own_weights.to(weights.dtype).gather(-1, own_order)[decided]
    theirs = weights.gather(-1, order)[decided]
    if not same_index or not torch.allclose(ours.float(), theirs.float(), rtol=2e-2, atol=1e-4):
        return None
    return "exact" if torch.equal(ours, theirs) else "close"


def describe_router(router: torch.nn.Module) -> RouterSpec:
    """The `RouterSpec` of a router of the shared contract, checked against the router's own output on a
    probe batch: the exact reproduction if one exists, else one equal within rounding. TypeError naming the
    router if none reproduces it (e.g. PhiMoE's sparsemixer)."""
    weight = router.weight
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(32, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    own_class = getattr(type(router), "unpatched_class", type(router))  # a patched router's own class
    with torch.no_grad():
        output = own_class.forward(router, probe)  # not __call__: a patch must not answer
    if not (isinstance(output, tuple) and len(output) >= 3):
        raise TypeError(f"{own_class.__name__} does not return (router_logits, top_k_weights, top_k_index)")
    logits, weights, index = output[:3]
    if not (bool(torch.isfinite(logits).all()) and bool(torch.isfinite(weights).all())):
        broken = int((~torch.isfinite(router.weight)).sum())
        raise ValueError(
            f"{own_class.__name__} returned NaN or infinite logits or weights on a probe batch of random inputs "
            f"({broken} of its {router.weight.numel()} weights are NaN or inf): its weights are broken (a failed "
            "load or an overflow), so its routing cannot be read or patched"
        )
    found = [(_matches(spec, logits, weights, index), spec) for spec in _router_candidates(router)]
    chosen = next((s for m, s in found if m == "exact"), None) or next((s for m, s in found if m == "close"), None)
    if chosen is None:
        raise TypeError(
            f"{own_class.__name__}'s routing is none of the supported families ({', '.join(ROUTER_SCORES)} "
            "top-k, optionally renormalised, scaled and group-limited): it cannot be patched"
        )
    chosen.sorted_output = bool((weights.float().diff(dim=-1) <= 0).all()) if chosen.plain else False
    return chosen


@dataclass
class MoELayer:
    """One MoE block of a model: its router, its experts module, how the router routes, and the shared
    experts it always computes besides the routed ones."""

    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    spec: RouterSpec
    shared_experts: int = 0


def _router_of(block, experts) -> torch.nn.Module | None:
    """The block's child that routes to `experts`: a module with a top_k and a [E, H] weight."""
    for child in block.children():
        weight = getattr(child, "weight", None)
        if child is not experts and hasattr(child, "top_k") and isinstance(weight, torch.Tensor):
            if weight.dim() == 2 and weight.shape[0] == experts.num_experts:
                return child
    return None


def _shared_experts(block, config) -> int:
    """How many shared experts the block always computes: n_shared_experts (DeepSeek) or 1 per module."""
    modules = [name for name in SHARED_EXPERT_NAMES if isinstance(getattr(block, name, None), torch.nn.Module)]
    if not modules:
        return 0
    return int(getattr(config, "n_shared_experts", None) or getattr(config, "num_shared_experts", None) or len(modules))


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """Every MoE block of `model` of the shared router/experts contract, in module order.

    TypeError when there is none, naming why: no MoE layer at all, or experts that transformers'
    experts interface does not dispatch (e.g. DBRX's, Llama4's)."""
    layers, other_experts = [], []
    for name, block in model.named_modules():
        experts = getattr(block, "experts", None)
        if not isinstance(experts, torch.nn.Module) or block is experts:
            continue
        router = _router_of(block, experts) if is_experts_module(experts) else None
        if router is None:
            other_experts.append(f"{name} ({type(experts).__name__})")
            continue
        layers.append(MoELayer(block, router, experts, describe_router(router), _shared_experts(block, model.config)))
    if not layers:
        reason = (
            f"its experts modules {other_experts[:2]} are not dispatched by transformers' experts interface "
            "(@use_experts_implementation) with a top-k router beside them"
            if other_experts
            else "it has no mixture-of-experts layer"
        )
        raise TypeError(f"{type(model).__name__} cannot be patched: {reason}")
    return layers


class MoEShape(NamedTuple):
    """A model's routing geometry from its config: experts per layer, native top-k, and the experts a token
    may choose from (fewer than E for group-limited routers)."""

    num_experts: int
    top_k: int
    selectable: int


def moe_shape(config) -> MoEShape:
    """`MoEShape` of a transformers MoE config, whichever names its family gives the fields."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    names = ("num_experts", "num_local_experts", "n_routed_experts")
    num_experts = next((getattr(config, n) for n in names if getattr(config, n, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise TypeError(f"{type(config).__name__} describes no mixture-of-experts model (no experts and top-k fields)")
    groups, allowed = getattr(config, "n_group", None), getattr(config, "topk_group", None)
    limited = groups and allowed and allowed < groups and getattr(config, "topk_method", None) != "greedy"
    return MoEShape(num_experts, top_k, num_experts // groups * allowed if limited else num_experts)
