"""ValidateSensitivity: measure, on held-out captions, the damage AutoQuant only predicted.

AutoQuant's score is a Taylor/Fisher proxy. This stage quantizes a few recipe groups one at a
time (everything else in full precision) and measures the real increase in next-token loss
(ΔNLL) and the KL divergence to the unquantized model, then says how well the predicted ranking
matches the measured one.

It reuses the model :class:`RunAutoQuant` left in memory instead of loading it again: every
recipe group still carries ModelOpt's ``QuantRecipeHparam`` with each candidate format's
quantizers calibrated, and setting ``hparam.active`` swaps a group's quantizers between them.
Everything is put back at the end, bit for bit (the report says whether that check passed).

One ModelOpt detail matters here. At the end of its search ModelOpt folds the weight-side
smoothing scale of the chosen recipe into the weights (``QuantRecipe.fold_pqs_to_weights``): for
SmoothQuant/AWQ-style formats the weights become ``W * s`` and that recipe's input quantizer
multiplies activations by ``1 / s``. Switched to any other recipe, or to no quantization, such a
layer would compute with ``W * s`` and no ``1 / s``: a badly wrong "unquantized" model. So while
a folded layer is not on its chosen recipe, this stage gives it back ``W`` (reconstructed as
``W' * (1 / s)``, exact to the rounding of the weight dtype) and swaps ``W'`` back bit-exactly
whenever the chosen recipe is active again. With tied embeddings a folded lm_head also rescales
the embedding table (same tensor); the reconstruction undoes that too while it is in place.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.artifacts import (
    CalibData,
    GroupScore,
)
from auto_quantize_model.core import stats
from auto_quantize_model.errors import AqmError, InputError
from auto_quantize_model.specs import ValidateSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("auto_quantize_model")

NO_QUANT = "NONE"
BUILTIN = "builtin"
BUILTIN_HOLDOUT = "builtin-holdout"
ROWS_PER_BATCH = 16
"""Held-out captions per forward pass; one caption per row, so the batch is short and cheap."""

Selection = Literal["top", "bottom", "random"]

_BITS_SUFFIX = re.compile(r"\(effective-bits:[^()]*\)\s*$")


# --------------------------------------------------------------------------------------------
# Pure helpers: plain inputs, plain outputs


def recipe_name(recipe: object) -> str:
    """ModelOpt's recipe label without its ``(effective-bits: x)`` suffix, e.g. ``INT8_DEFAULT_CFG``."""
    return _BITS_SUFFIX.sub("", str(recipe)).strip()


def strongest_format(group: GroupScore) -> tuple[str, float] | None:
    """The quantized format the group's importance comes from, and that importance.

    Importance is the largest score over the group's quantized formats (the manifest's
    definition). None when the group has no quantized format (disabled layers). NaN scores are
    skipped; a group whose quantized scores are all NaN gets NaN importance.
    """
    quantized = [
        (fmt, score) for fmt, score in zip(group.formats, group.scores, strict=True) if fmt != NO_QUANT
    ]
    if not quantized:
        return None
    ordered = [pair for pair in quantized if not math.isnan(pair[1])]
    if not ordered:
        return quantized[0][0], math.nan
    return max(ordered, key=lambda pair: pair[1])


@attrs.frozen
class Candidate:
    """A recipe group that can be validated: its name, format to measure, importance and rank."""

    name: str
    format: str
    importance: float
    rank: int
    """1 = most sensitive, over every candidate (the manifest's order, ties broken by name)."""


def rank_candidates(groups: Sequence[GroupScore]) -> tuple[tuple[Candidate, ...], tuple[str, ...]]:
    """Groups ordered most sensitive first, and notes on the groups left out.

    Left out: groups with no quantized format (nothing to measure) and groups whose importance
    is NaN (they have no place in a ranking).
    """
    notes: list[str] = []
    kept: list[tuple[str, str, float]] = []
    unquantizable: list[str] = []
    nan_groups: list[str] = []
    for group in groups:
        picked = strongest_format(group)
        if picked is None:
            unquantizable.append(group.name)
        elif math.isnan(picked[1]):
            nan_groups.append(group.name)
        else:
            kept.append((group.name, picked[0], picked[1]))
    if unquantizable:
        notes.append(f"{len(unquantizable)} group(s) without a quantized format left out")
    if nan_groups:
        shown = ", ".join(nan_groups[:5]) + (" ..." if len(nan_groups) > 5 else "")
        notes.append(f"{len(nan_groups)} group(s) with NaN scores left out: {shown}")
    kept.sort(key=lambda item: (-item[2], item[0]))
    ranked = tuple(
        Candidate(name=name, format=fmt, importance=score, rank=index)
        for index, (name, fmt, score) in enumerate(kept, start=1)
    )
    return ranked, tuple(notes)


@attrs.frozen
class GroupSelection:
    """Which candidates get measured; the three parts are disjoint and each in rank order."""

    top: tuple[Candidate, ...]
    bottom: tuple[Candidate, ...]
    random: tuple[Candidate, ...]

    def labelled(self) -> tuple[tuple[Candidate, Selection], ...]:
        top: tuple[tuple[Candidate, Selection], ...] = tuple((c, "top") for c in self.top)
        random_: tuple[tuple[Candidate, Selection], ...] = tuple((c, "random") for c in self.random)
        bottom: tuple[tuple[Candidate, Selection], ...] = tuple((c, "bottom") for c in self.bottom)
        return top + random_ + bottom


def select_groups(ranked: Sequence[Candidate], k: int, seed: int) -> GroupSelection:
    """The ``k`` most and ``k`` least important candidates and ``k`` random others.

    ``ranked`` must be most important first. With fewer than ``3 k`` candidates the top is
    filled first, then the bottom, then the random draw from what is left in between. The random
    draw depends only on ``seed`` and the ranking, so a rerun measures the same groups.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    top = tuple(ranked[:k])
    rest = list(ranked[len(top) :])
    n_bottom = min(k, len(rest))
    bottom = tuple(rest[len(rest) - n_bottom :])
    middle = rest[: len(rest) - n_bottom]
    drawn = random.Random(seed).sample(middle, min(k, len(middle)))
    return GroupSelection(top=top, bottom=bottom, random=tuple(sorted(drawn, key=lambda c: c.rank)))


def builtin_captions() -> Path:
    """The captions file shipped with the package (``auto_quantize_model/data/captions.txt``)."""
    return Path(str(resources.files("auto_quantize_model") / "data" / "captions.txt"))


def captions_file(name: str) -> Path:
    if name == BUILTIN_HOLDOUT:
        return Path(str(resources.files("auto_quantize_model") / "data" / "holdout-captions.txt"))
    return builtin_captions() if name == BUILTIN else Path(name)


def read_captions(path: Path) -> tuple[str, ...]:
    """Every caption of a file, parsed exactly as the calibration loader parses it."""
    from auto_quantize_model.core.batching import parse_captions

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: captions file not found") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read captions ({err.strerror or type(err).__name__})") from None
    return tuple(parse_captions(text.removeprefix("\ufeff")))


def holdout_captions(
    candidates: Sequence[str], calibration: Sequence[str], limit: int, source: str
) -> tuple[tuple[str, ...], int]:
    """The first ``limit`` candidate captions never used for calibration, and how many were skipped.

    Captions compare by their stripped text. Raises an :class:`AqmError` naming ``source`` when
    nothing is left: validating on calibration text would only measure memorisation.
    """
    seen = {caption.strip() for caption in calibration}
    fresh = [caption for caption in candidates if caption.strip() not in seen]
    skipped = len(candidates) - len(fresh)
    if not fresh:
        raise AqmError(
            f"{source}: no held-out captions left ({len(candidates)} caption(s), all used for "
            "calibration); point validate.holdout_captions at other text or calibrate on fewer samples"
        )
    return tuple(fresh[:limit]), skipped


def correlation_notes(label: str, xs: Sequence[float], ys: Sequence[float], value: float) -> tuple[str, ...]:
    """Why a correlation came out NaN, in words a report can show."""
    if not math.isnan(value):
        return ()
    if len(xs) < 2:
        why = f"fewer than 2 measured groups ({len(xs)})"
    elif any(math.isnan(v) for v in (*xs, *ys)):
        why = "a NaN among the values"
    elif len(set(xs)) == 1:
        why = "the predicted scores are all equal"
    elif len(set(ys)) == 1:
        why = "the measured values are all equal"
    else:
        why = "no untied pair"
    return (f"{label} is NaN: {why}",)


def rank_overlap(candidates: Sequence[Candidate], measured: Sequence[float], k: int) -> float:
    """Share of the top ``k`` by predicted importance that are also top ``k`` by measured damage."""
    predicted = [c.name for c in sorted(candidates, key=lambda c: (-c.importance, c.name))]
    pairs = sorted(zip(candidates, measured, strict=True), key=lambda p: (-_nan_low(p[1]), p[0].name))
    return stats.top_k_overlap(predicted, [c.name for c, _ in pairs], k)


def _nan_low(value: float) -> float:
    return -math.inf if math.isnan(value) else value


# --------------------------------------------------------------------------------------------
# Held-out batches


def tokenize_captions(tokenizer: Any, captions: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids per caption without special tokens, cut to ``max_len``; captions of < 2 tokens
    predict nothing and are dropped."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    return [list(ids[:max_len]) for ids in encoded if len(ids[:max_len]) >= 2]


def holdout_batches(
    token_lists: Sequence[Sequence[int]], pad_id: int, rows: int = ROWS_PER_BATCH
) -> list[dict[str, torch.Tensor]]:
    """One caption per row, right-padded, in :mod:`lm_forward`'s batch format.

    Padding sits after the caption, so causal attention keeps it out of every real position
    (no attention mask needed) and its ``-100`` labels keep it out of the loss. Captions are
    grouped by length to keep padding small; the mean loss does not depend on the order.
    """
    import torch

    from auto_quantize_model.backend.lm_forward import IGNORE_INDEX

    order = sorted(range(len(token_lists)), key=lambda i: (len(token_lists[i]), i))
    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(order), rows):
        chunk = [token_lists[i] for i in order[start : start + rows]]
        length = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        positions = torch.arange(length, dtype=torch.long).expand(len(chunk), -1).clone()
        batches.append({"input_ids": input_ids, "position_ids": positions, "labels": labels})
    return batches


# --------------------------------------------------------------------------------------------
# Measuring


@attrs.frozen(eq=False)
class PassResult:
    """One forward pass over every held-out batch."""

    nll_sum: float
    kl_sum: float
    """Summed KL(unquantized || this model); NaN when there was no reference yet."""
    tokens: int
    token_nll: torch.Tensor
    """Per-token NLL on CPU, in batch order: the fingerprint for the bit-exact restore checks."""

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens


@attrs.frozen(eq=False)
class HeldOutEval:
    """Runs the decoder and lm_head over the held-out batches.

    Log-probabilities are float64. In float32 the rounding of the softmax normaliser alone shifts
    every log-probability of a position by ~1e-7 * |log-sum-exp|, which is the size of the KL of
    a lightly quantized layer (it even came out negative). The unquantized ones are kept for the
    KL terms: ``[tokens, vocab]`` float64, about 1.9 GB for 1,600 tokens of a 152k vocabulary, on
    the model's device. A KL that rounding pushes below zero (~1e-16) is reported as 0.
    """

    decoder: nn.Module
    lm_head: nn.Module
    batches: tuple[dict[str, torch.Tensor], ...]

    def run(
        self, reference: Sequence[torch.Tensor] | None = None, keep: bool = False
    ) -> tuple[PassResult, list[torch.Tensor]]:
        import torch

        from auto_quantize_model.backend.lm_forward import selected_logits, target_index

        nll_sum = 0.0
        kl_sum = 0.0
        tokens = 0
        token_nll: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                logits = selected_logits(self.decoder, self.lm_head, batch)
                logq = torch.log_softmax(logits.double(), dim=-1)
                _, targets = target_index(batch)
                nll = -logq.gather(1, targets.to(logq.device)[:, None]).squeeze(1)
                nll_sum += nll.sum().item()
                tokens += int(nll.numel())
                token_nll.append(nll.cpu())
                if reference is not None:
                    kl = torch.nn.functional.kl_div(logq, reference[index], log_target=True, reduction="sum")
                    kl_sum += kl.item()
                if keep:
                    kept.append(logq)
        result = PassResult(
            nll_sum=nll_sum,
            kl_sum=max(kl_sum, 0.0) if reference is not None else math.nan,
            tokens=tokens,
            token_nll=torch.cat(token_nll),
        )
        return result, kept


class RecipeSwitch:
    """Puts recipe groups on chosen formats and everything back exactly as it was found.

    Holds the ModelOpt hparams of the model and, for layers whose chosen recipe's smoothing scale
    was folded into the weights, both weight versions (see the module docstring). Not a frozen
    value: it exists to mutate the model, and only inside :meth:`ValidateSensitivity.run`.
    """

    def __init__(self, root: nn.Module) -> None:
        import torch
        from modelopt.torch.opt.utils import named_hparams
        from modelopt.torch.quantization.algorithms import QuantRecipeHparam

        self.by_module: dict[str, Any] = {}
        for name, hparam in named_hparams(root):
            if isinstance(hparam, QuantRecipeHparam):
                self.by_module[name.removesuffix(".quant_recipe")] = hparam
        unique: dict[int, Any] = {}
        for hparam in self.by_module.values():
            unique.setdefault(id(hparam), hparam)
        self.hparams = tuple(unique.values())
        self.chosen = {id(h): h.active for h in self.hparams}
        self.recipes = {id(h): {recipe_name(r): r for r in h.choices} for h in self.hparams}
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
                scale = _input_pre_quant_scale(module)
                if scale is None or _weight_pre_quant_scale(module) is not None:
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

    def hparam_of(self, group: GroupScore) -> Any:
        """The one hparam every module of ``group`` carries; AqmError when the model lacks it."""
        found = {id(self.by_module[m]): self.by_module[m] for m in group.module_names if m in self.by_module}
        missing = [m for m in group.module_names if m not in self.by_module]
        if missing or len(found) != 1:
            what = f"module {missing[0]} carries no AutoQuant recipe" if missing else "modules span groups"
            raise AqmError(
                f"recipe group {group.name}: {what}; ValidateSensitivity needs the model RunAutoQuant "
                "left in memory in this same pipeline"
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


def _input_pre_quant_scale(module: nn.Module) -> torch.Tensor | None:
    quantizer = getattr(module, "input_quantizer", None)
    scale = getattr(quantizer, "pre_quant_scale", None)
    return scale if scale is not None and hasattr(scale, "numel") else None


def _weight_pre_quant_scale(module: nn.Module) -> torch.Tensor | None:
    quantizer = getattr(module, "weight_quantizer", None)
    scale = getattr(quantizer, "pre_quant_scale", None)
    return scale if scale is not None and hasattr(scale, "numel") else None


# --------------------------------------------------------------------------------------------
# The stage


def load_holdout(spec: ValidateSpec, calib: CalibData) -> tuple[tuple[str, ...], int, str, tuple[str, ...]]:
    """Held-out captions, how many were skipped as calibration text, their source, and notes.

    The calibration captions are read again as the loader read them: the first ``stats.samples``
    captions of ``stats.captions_path``. Their hash must match the one recorded at calibration,
    otherwise the file changed since and calibration text could leak into the held-out set.
    """
    from auto_quantize_model.core import batching as calib_loader

    stats_ = calib.stats
    calibration = calib_loader.read_captions(stats_.captions_path, stats_.samples)
    if stats_.captions_sha256 and calib_loader.captions_sha256(calibration) != stats_.captions_sha256:
        raise AqmError(
            f"{captions_file(stats_.captions_path)}: its first {stats_.samples} captions changed since "
            "calibration (sha256 differs), so held-out text cannot be told from calibration text; "
            "rerun the pipeline from calibration"
        )
    holdout_path = captions_file(spec.holdout_captions)
    texts, skipped = holdout_captions(
        read_captions(holdout_path), calibration, spec.holdout_samples, str(holdout_path)
    )
    notes: tuple[str, ...] = ()
    if len(texts) < spec.holdout_samples:
        notes = (f"{holdout_path}: only {len(texts)} held-out caption(s), {spec.holdout_samples} asked",)
    return texts, skipped, str(holdout_path), notes


def _device_of(module: nn.Module) -> torch.device:
    import torch

    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
