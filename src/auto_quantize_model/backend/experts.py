"""Mixture-of-experts decoders as ModelOpt 0.47 sees them, and the one change that lets it score each expert.

Qwen3-VL-MoE (transformers 5) keeps a layer's experts in one ``Qwen3VLMoeTextExperts``: 3-D
``gate_up_proj`` (experts, 2 x MLP, hidden) and ``down_proj`` (experts, hidden, MLP) parameters,
picked by a ``Qwen3VLMoeTextTopKRouter`` (``mlp.gate``, a bare 2-D weight, not an ``nn.Linear``).
What ModelOpt 0.47 does with that, read from its source:

* ``plugins/huggingface.py`` ``register_fused_experts_on_the_fly`` (l. 1707) registers the class
  as ``_QuantFusedExperts`` (l. 986): one quantized module per layer, a weight quantizer per
  expert and projection, one input quantizer per projection shared by all experts. It quantizes
  by intercepting ``F.linear``, which only the ``eager`` experts implementation calls.
* ``force_eager_experts_impl_on_the_fly`` (l. 1735) switches to ``eager`` only through the
  *quantized root's* ``config``; our root (decoder + lm_head) has none, and transformers picks
  ``grouped_mm`` by default (on CPU too). Then no expert matmul reaches a quantizer: calibration
  leaves the input quantizers empty and every expert group scores exactly 0, so AutoQuant
  quantizes the experts for free. :func:`use_eager_experts` sets ``eager`` on the model itself.
* ``algorithms.py`` ``_is_auto_quantize_module`` (l. 716) accepts the fused module as one search
  unit and no grouping rule splits it (l. 640), so a layer's experts are one recipe group: one
  format for all of them, one score (their summed output perturbation, measured at the experts'
  output), one cost counting every expert's weights (``_auto_quantize_cost.py``
  ``_get_module_weight_numel``, l. 94: ``gate_up_proj.numel() + down_proj.numel()``).
* The router is not a linear layer, so ModelOpt never wraps it: it is neither quantized nor
  costed. (A router that *is* an ``nn.Linear`` would become a group whose quantizers the preset
  formats disable, ``*mlp.gate.*``, while AutoQuant still counts it as quantized;
  :func:`router_names` finds routers so they can be disabled outright.)

Per-expert scores are not reachable on the fused module: one recipe hparam per module, and it
swaps the whole per-expert quantizer list. :func:`unfuse_experts` therefore replaces each fused
module by :class:`UnfusedExperts`, one ``nn.Linear`` per expert and projection holding views of
the same weights (no copy), named ``experts.<i>.gate_proj|up_proj|down_proj``, the layout ModelOpt
knows from Qwen3-MoE in transformers 4. Its default rule (``algorithms.py`` l. 643) would group
those back into one group per layer and score them at the MoE block's output;
``patches.expert_search_rules`` (in the ModelOpt adapter) puts rules in front for one expert per
group (``expert``) or gate+up and down apart per expert (``projection``), each expert projection
scored at its own output like a dense layer (ModelOpt's documented way to customise grouping:
``model_quant.py`` l. 557). ModelOpt then wraps the MoE block as ``_QuantSparseSequentialMoe``
(``huggingface.py`` l. 1635), which gives every expert the same input scale after calibration, as
the fused module's shared input quantizer does.

torch is imported at the top: this module is only imported from inside functions of the stages
that hold a model, never by the command line's ``--help``/``report``/``diff`` paths.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any, Literal

import attrs
import torch
from torch import nn

log = logging.getLogger("auto_quantize_model")

ExpertGrouping = Literal["layer", "expert", "projection"]
EXPERT_GROUPINGS: tuple[ExpertGrouping, ...] = ("layer", "expert", "projection")

EAGER = "eager"

_EXPERT_LINEAR = re.compile(r"^(?P<expert>.*?\.experts\.\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


@attrs.frozen
class ExpertLayer:
    """One layer's routed experts: where they sit and what they weigh (plain data)."""

    name: str
    """Module name of the experts container in the model it was found in."""
    num_experts: int
    top_k: int | None
    """Experts per token, from the router (None when it does not say)."""
    weights: int
    """Every expert's gate, up and down weights: what AutoQuant costs the layer at."""
    fused: bool


def is_fused_experts(module: nn.Module) -> bool:
    """The Hugging Face fused layout: ``num_experts`` and 3-D ``gate_up_proj``/``down_proj`` tensors.

    The same structural test ModelOpt uses to claim a module as ``_QuantFusedExperts``.
    """
    if not hasattr(module, "num_experts"):
        return False
    tensors = [getattr(module, attr, None) for attr in ("gate_up_proj", "down_proj")]
    return all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in tensors)


def fused_expert_weights(module: Any) -> int:
    """Weights of a fused experts module as ModelOpt costs them (0 for anything else)."""
    if not is_fused_experts(module):
        return 0
    return int(module.gate_up_proj.numel()) + int(module.down_proj.numel())


def _top_k(block: nn.Module | None) -> int | None:
    router = getattr(block, "gate", None)
    for owner in (router, block):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def expert_layers(model: nn.Module) -> tuple[ExpertLayer, ...]:
    """Every experts container in ``model``, fused or split by :func:`unfuse_experts`, in order."""
    found: list[ExpertLayer] = []
    parents = {id(child): module for module in model.modules() for child in module.children()}
    for name, module in model.named_modules():
        block = parents.get(id(module))
        if is_fused_experts(module):
            found.append(
                ExpertLayer(name, int(module.num_experts), _top_k(block), fused_expert_weights(module), True)
            )
        elif isinstance(module, UnfusedExperts):
            weights = sum(int(p.numel()) for p in module.parameters())
            found.append(ExpertLayer(name, len(module), _top_k(block), weights, False))
    return tuple(found)


def router_names(model: nn.Module) -> tuple[str, ...]:
    """Routers of MoE blocks: the ``gate`` next to an experts container (``mlp.gate``)."""
    names = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        if experts is None or router is None:
            continue
        if is_fused_experts(experts) or isinstance(experts, UnfusedExperts):
            names.append(f"{name}.gate" if name else "gate")
    return tuple(names)


def use_eager_experts(model: nn.Module) -> tuple[str, ...]:
    """Run every fused experts module through ``F.linear`` (``eager``), where ModelOpt quantizes.

    Returns the implementations switched away from (empty when all were eager already).
    Through the model's own ``set_experts_implementation`` when it has one, so its sub-configs
    agree; each experts module's config is then checked, and set directly if still not eager.
    """
    configs = {
        id(cfg): cfg
        for module in model.modules()
        if is_fused_experts(module) and (cfg := getattr(module, "config", None)) is not None
    }
    before = {str(getattr(cfg, "_experts_implementation", None)) for cfg in configs.values()}
    before.discard(EAGER)
    if not before:
        return ()
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            setter(EAGER)  # transformers refuses models it considers not to have experts
    for cfg in configs.values():
        if getattr(cfg, "_experts_implementation", None) != EAGER:
            cfg._experts_implementation = EAGER
    return tuple(sorted(before))


# --------------------------------------------------------------------------------------------------
# Splitting fused experts into one linear layer per expert and projection
# --------------------------------------------------------------------------------------------------


def _linear_over(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight *is* ``weight`` (a view: no copy, same storage)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    return linear


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, the computation of one slice of the fused module."""

    def __init__(
        self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module
    ) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(
            self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        )
        return out


class UnfusedExperts(nn.ModuleList):
    """A fused experts module split into :class:`ExpertMLP` children ``0..n-1``; same call, same result.

    Called like the fused module (``hidden_states, top_k_index, top_k_weights``) and computing
    what its eager implementation computes: each routed token through its experts, weighted by
    the router. Weights are views of the fused parameters, so splitting costs no memory.
    """

    def __init__(self, fused: Any) -> None:
        if not is_fused_experts(fused):
            raise TypeError(f"{type(fused).__name__} is not a fused experts module")
        if getattr(fused, "is_transposed", False) or not getattr(fused, "is_concatenated", True):
            raise TypeError(
                f"{type(fused).__name__} stores its experts transposed or interleaved; only the "
                "concatenated (experts, 2 x MLP, hidden) layout can be split"
            )
        gate_up, down = fused.gate_up_proj, fused.down_proj
        width = gate_up.shape[1] // 2
        experts = [
            ExpertMLP(
                _linear_over(gate_up[index, :width]),
                _linear_over(gate_up[index, width:]),
                _linear_over(down[index]),
                fused.act_fn,
            )
            for index in range(int(fused.num_experts))
        ]
        super().__init__(experts)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for index, tokens, slot in routed_pairs(top_k_index, len(self)):
            out = self[index](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final


def routed_pairs(top_k_index: torch.Tensor, experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Each routed expert with its tokens and top-k slots, in the eager loop's order.

    Grouped with one sort and one transfer, not one ``nonzero`` per expert (each a GPU sync: 6,144
    a forward on Qwen3-VL-30B-A3B). A stable sort of the slot-major indices keeps eager's order
    within an expert (slot, then token); experts come in index order, unrouted ones skipped.
    """
    with torch.no_grad():
        slot_major = top_k_index.t().reshape(-1)
        order = torch.argsort(slot_major, stable=True)
        counts = torch.bincount(slot_major, minlength=experts).tolist()
        count_tokens = top_k_index.shape[0]
        all_tokens, all_slots = order % count_tokens, order // count_tokens
    start = 0
    for index, count in enumerate(counts):
        if count:
            yield index, all_tokens[start : start + count], all_slots[start : start + count]
            start += count


def unfuse_experts(model: nn.Module) -> tuple[str, ...]:
    """Replace every fused experts module in ``model`` by :class:`UnfusedExperts`, in place.

    Returns the names replaced. The model's weights are untouched (the new layers are views),
    but its module tree, hence its ``state_dict`` keys, change: this is a model for scoring, not
    for saving.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if not is_fused_experts(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, UnfusedExperts(module))
        replaced.append(name)
    return tuple(replaced)


# --------------------------------------------------------------------------------------------------
# How ModelOpt groups and scores split experts
# --------------------------------------------------------------------------------------------------


def expert_group_key(grouping: ExpertGrouping, name: str) -> str | None:
    """The recipe group of a split expert projection (None for any other module name).

    ``expert``: ``...experts.<i>`` for all three projections of expert ``i``; ``projection``:
    ``...experts.<i>.gate_up_proj`` for gate and up (one fused GEMM when deployed) and
    ``...experts.<i>.down_proj``; ``layer`` leaves ModelOpt's own rule in charge.
    """
    match = _EXPERT_LINEAR.match(name)
    if match is None or grouping == "layer":
        return None
    if grouping == "expert":
        return match["expert"]
    return f"{match['expert']}.{'down_proj' if match['proj'] == 'down_proj' else 'gate_up_proj'}"


def prepare_experts(model: nn.Module, grouping: ExpertGrouping) -> tuple[ExpertLayer, ...]:
    """Make ``model``'s experts quantizable and scorable as ``grouping`` asks; returns the layers found.

    Always switches fused experts to ``eager`` (without it ModelOpt quantizes nothing in them);
    ``expert``/``projection`` also split them (:func:`unfuse_experts`). A model without experts
    is left alone and gives an empty tuple.
    """
    before = expert_layers(model)
    if not before:
        return ()
    switched = use_eager_experts(model)
    if switched:
        log.info(
            "MoE experts: implementation %s -> eager, so that ModelOpt's quantizers see each expert's "
            "matmuls (with %s they would score 0 and be quantized for free)",
            "/".join(switched),
            "/".join(switched),
        )
    if grouping != "layer" and any(layer.fused for layer in before):
        unfuse_experts(model)
        return expert_layers(model)
    return before
