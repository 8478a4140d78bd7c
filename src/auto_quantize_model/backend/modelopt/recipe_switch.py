"""Switching recipe groups of a searched model between formats, and back bit for bit.

After :class:`~auto_quantize_model.stages.run_autoquant.RunAutoQuant`, every recipe group of the
model still carries ModelOpt's ``QuantRecipeHparam`` with each candidate format's quantizers
calibrated; setting ``hparam.active`` swaps the group's quantizers between them. Validation uses
that to quantize one group at a time without calibrating again.

One ModelOpt detail matters here. At the end of its search ModelOpt folds the weight-side
smoothing scale of the chosen recipe into the weights (``QuantRecipe.fold_pqs_to_weights``): for
SmoothQuant/AWQ-style formats the weights become ``W * s`` and that recipe's input quantizer
multiplies activations by ``1 / s``. Switched to any other recipe, or to no quantization, such a
layer would compute with ``W * s`` and no ``1 / s``: a badly wrong "unquantized" model. So while
a folded layer is not on its chosen recipe, it gets back ``W`` (reconstructed as
``W' * (1 / s)``, exact to the rounding of the weight dtype), and ``W'`` is swapped back
bit-exactly whenever the chosen recipe is active again. With tied embeddings a folded lm_head
also rescales the embedding table (same tensor); the reconstruction undoes that too while it is
in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.core.scores import NO_QUANT, group_name, recipe_name
from auto_quantize_model.errors import AqmError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.artifacts import GroupScore
    from auto_quantize_model.core.proxies import WeightStats


class RecipeSwitch:
    """Puts recipe groups on chosen formats and everything back exactly as it was found.

    Holds the ModelOpt hparams of the model and, for layers whose chosen recipe's smoothing scale
    was folded into the weights, both weight versions (see the module docstring). Not a frozen
    value: it exists to mutate the model, and only while validation runs.
    """

    def __init__(self, root: nn.Module) -> None:
        import torch

        named_hparams = import_modelopt("modelopt.torch.opt.utils").named_hparams
        recipe_hparam = import_modelopt("modelopt.torch.quantization.algorithms").QuantRecipeHparam

        self.root = root
        self.by_module: dict[str, Any] = {
            group_name(name): hparam
            for name, hparam in named_hparams(root)
            if isinstance(hparam, recipe_hparam)
        }
        if not self.by_module:
            raise AqmError(
                "the searched model carries no AutoQuant recipe: QuantSearch must come from RunAutoQuant "
                "in this same process (it reuses the quantizers left in memory)"
            )
        unique: dict[int, Any] = {}
        for hparam in self.by_module.values():
            unique.setdefault(id(hparam), hparam)
        self.hparams = tuple(unique.values())
        self.chosen = {id(h): h.active for h in self.hparams}
        self.recipes = {id(h): {recipe_name(str(r)): r for r in h.choices} for h in self.hparams}
        self.stuck = tuple(h for h in self.hparams if NO_QUANT not in self.recipes[id(h)])
        """Groups that cannot be unquantized (a fixed format): they stay on it throughout."""
        self.stuck_ids = {id(h) for h in self.stuck}

        # Layers whose chosen recipe's smoothing was folded into the weights.
        self.folded: dict[str, tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]] = {}
        self.fold_skipped: list[str] = []
        seen_weights: set[int] = set()
        with torch.no_grad():
            for name, hparam in self.by_module.items():
                module = root.get_submodule(name)
                scale = _pre_quant_scale(module, "input_quantizer")
                if scale is None or _pre_quant_scale(module, "weight_quantizer") is not None:
                    continue
                weight = getattr(module, "weight", None)
                if (
                    not isinstance(weight, torch.Tensor)
                    or weight.ndim != 2
                    or scale.numel() != weight.shape[1]
                    or id(weight) in seen_weights
                ):
                    self.fold_skipped.append(name)
                    continue
                seen_weights.add(id(weight))
                folded = weight.detach().clone()
                unfolded = (folded.float() * scale.float().reshape(1, -1).to(folded.device)).to(folded.dtype)
                self.folded[name] = (weight, hparam, folded, unfolded)
        self.state = dict.fromkeys(self.folded, "folded")
        owners: dict[int, list[str]] = {}
        for pname, param in root.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(pname)
        self.shared = tuple(
            f"{name}.weight = {' = '.join(n for n in owners[id(weight)] if n != name + '.weight')}"
            for name, (weight, _, _, _) in self.folded.items()
            if len(owners.get(id(weight), ())) > 1
        )
        """Folded weights that other modules use too (tied embeddings), as ``a.weight = b.weight``."""

    def notes(self) -> tuple[str, ...]:
        """What a report should say about this model's switching: fixed groups, reconstructed weights."""
        notes: list[str] = []
        if self.stuck:
            notes.append(f"{len(self.stuck)} group(s) with a fixed format stay quantized in the baseline")
        if self.folded:
            notes.append(
                f"{len(self.folded)} layer(s) had ModelOpt fold smoothing into their weights; their "
                "unquantized weights were reconstructed to the rounding of the weight dtype"
            )
        if self.shared:
            notes.append(
                f"folded smoothing also rescaled tensors other modules share ({'; '.join(self.shared)}), "
                "e.g. tied input embeddings: AutoQuant's chosen model carries that change"
            )
        if self.fold_skipped:
            notes.append(
                f"{len(self.fold_skipped)} layer(s) with smoothing could not be unfolded "
                f"(first: {self.fold_skipped[0]}); their baseline keeps the smoothed weights"
            )
        return tuple(notes)

    def hparam_of(self, group: GroupScore) -> Any:
        """The one hparam every module of ``group`` carries; AqmError when the model lacks it."""
        found = {id(self.by_module[m]): self.by_module[m] for m in group.module_names if m in self.by_module}
        missing = [m for m in group.module_names if m not in self.by_module]
        if missing or len(found) != 1:
            what = f"module {missing[0]} carries no AutoQuant recipe" if missing else "modules span groups"
            raise AqmError(
                f"recipe group {group.name}: {what}; the scores and the searched model (QuantSearch) "
                "must come from the same RunAutoQuant"
            )
        return next(iter(found.values()))

    def apply(self, formats: Mapping[int, str]) -> None:
        """Every group on NONE except the hparams (by ``id``) in ``formats``, on the named format."""
        import torch

        for hparam in self.hparams:
            key = id(hparam)
            if key in formats:
                hparam.active = self.recipes[key][formats[key]]
            elif key not in self.stuck_ids:
                hparam.active = self.recipes[key][NO_QUANT]
        with torch.no_grad():
            for name, (weight, hparam, folded, unfolded) in self.folded.items():
                want = "folded" if hparam.active == self.chosen[id(hparam)] else "unfolded"
                if self.state[name] != want:
                    weight.data.copy_(folded if want == "folded" else unfolded)
                    self.state[name] = want

    def weight_stats(self, group: GroupScore, fmt: str) -> WeightStats | None:
        """How far ``fmt``'s weight quantizer moves ``group``'s weights, with the group alone on it.

        The quantizer's forward (fake quantization) against the weight the module holds on that
        format, folded smoothing included, in float32 and summed over the group's modules. None
        when a module has no single weight and weight quantizer (e.g. fused experts). Leaves every
        group on NONE except this one: call :meth:`apply` or :meth:`restore` afterwards.
        """
        import torch

        from auto_quantize_model.core.proxies import WeightStats

        self.apply({id(self.hparam_of(group)): fmt})
        error_sq = weight_sq = max_abs = 0.0
        with torch.no_grad():
            for name in group.module_names:
                module = self.root.get_submodule(name)
                weight = getattr(module, "weight", None)
                quantizer = getattr(module, "weight_quantizer", None)
                if not isinstance(weight, torch.Tensor) or not callable(quantizer):
                    return None
                exact = weight.detach().float()
                moved = quantizer(weight.detach()).float() - exact
                error_sq += float(moved.square().sum())
                weight_sq += float(exact.square().sum())
                max_abs = max(max_abs, float(exact.abs().max())) if exact.numel() else max_abs
        return WeightStats(error_sq, weight_sq, max_abs)

    def restore(self) -> bool:
        """Every group back on its chosen recipe and every folded weight back bit for bit."""
        import torch

        for hparam in self.hparams:
            hparam.active = self.chosen[id(hparam)]
        exact = True
        with torch.no_grad():
            for name, (weight, _, folded, _) in self.folded.items():
                if self.state[name] != "folded":
                    weight.data.copy_(folded)
                    self.state[name] = "folded"
                exact = exact and bool(torch.equal(weight, folded))
        return exact and all(h.active == self.chosen[id(h)] for h in self.hparams)


def _pre_quant_scale(module: nn.Module, quantizer_name: str) -> torch.Tensor | None:
    quantizer = getattr(module, quantizer_name, None)
    scale = getattr(quantizer, "pre_quant_scale", None)
    return scale if scale is not None and hasattr(scale, "numel") else None
