"""Typed values that stages hand to each other.

Artifacts holding modules or tensors are ``eq=False``: comparing two models element-wise is never
what anyone means, and frozen does not deep-freeze a module anyway. Everything from
:class:`SensitivityScores` on is plain data (floats, strings, tuples) so it can be written to
JSON, compared in tests and read back without torch or ModelOpt installed.

Every stage's ``requires``/``produces`` names a class here, so the contract between stages reads
in one file, except for two roots kept beside the records they are made of: BuildManifest's
:class:`~auto_quantize_model.manifest_records.Manifest` and ValidateSensitivity's
:class:`~auto_quantize_model.validation_records.ValidationReport` (its intervals, proxy ratings and
refinement form a tree no other artifact is built from, so the seam cuts no record from its parts,
and keeps both files under the house limit of 600 lines). Records that only one command reads
live apart too (:mod:`~auto_quantize_model.frontier_records`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import attrs

from auto_quantize_model.frontier_records import CostModel, Frontier
from auto_quantize_model.specs import ValidateSpec
from auto_quantize_model.validation_records import LastPosition

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from auto_quantize_model.specs import LoadSpec

Scope = Literal["language_model", "full_model"]
Layout = Literal["packed", "padded"]
Method = Literal["gradient", "kl_div"]


@attrs.frozen(eq=False)
class LoadedModel:
    """A model and its tokenizer, as loaded (weights may sit on a GPU)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    source: str
    """What the user asked for: a directory, ``builtin:...`` or ``config:...``."""
    architecture: str
    """Class name of the loaded model, e.g. ``Qwen3VLForConditionalGeneration``."""
    dtype: str
    device: str
    """Device of the first parameter; with ``device_map`` the model may span several."""
    devices: str = ""
    """Where each part went when the model spans several devices (``cuda:0: model.visual,
    model.language_model.layers.0-31; cuda:1: ...``); empty on one device."""
    load_spec: LoadSpec | None = None
    """The spec it was loaded from (set by :class:`LoadModel`), so a later stage can load a
    pristine copy again (ExportCheckpoint: RunAutoQuant quantizes this one in place)."""


@attrs.frozen(eq=False)
class LanguageModel:
    """The text decoder of a (vision-)language model and the pieces AutoQuant must see.

    ``module`` is mutated in place by :class:`RunAutoQuant` (ModelOpt inserts quantizers into it);
    a pipeline that needs the pristine model afterwards must load it again.
    """

    module: torch.nn.Module
    """The decoder stack returning ``last_hidden_state`` (e.g. ``Qwen3VLTextModel``)."""
    lm_head: torch.nn.Module
    prefix: str
    """Name of ``module`` inside ``full_model`` (``model.language_model``), empty for the root."""
    head_name: str
    """Name of ``lm_head`` inside ``full_model``."""
    full_model: torch.nn.Module
    vision_modules: tuple[str, ...]
    """Names of vision towers/mergers kept out of quantization."""
    scope: Scope
    pad_token_id: int
    experts: tuple[str, ...] = ()
    """Names in ``full_model`` of each MoE layer's experts container (empty for a dense decoder)."""
    expert_grouping: Literal["layer", "expert", "projection"] = "layer"
    """How AutoQuant groups the experts: ``layer`` (each layer's fused experts, ModelOpt's way),
    ``expert`` (split, one group per expert), ``projection`` (split, gate+up and down per expert)."""
    routers: tuple[str, ...] = ()
    """Names in ``full_model`` of the MoE routers (``mlp.gate``): never quantized."""


@attrs.frozen
class ImageMix:
    """What image-conditioned calibration fed the language model (``[calib] images``)."""

    pairs: int
    image_tokens: int
    """Vision placeholders the image features filled, over all pairs."""
    text_tokens: int
    """Every other real token: chat markup, the prompt and the captions."""
    caption_tokens: int
    """The scored part of ``text_tokens``."""
    image_sizes: tuple[tuple[int, int, int], ...]
    """``(width, height, pairs)`` of the pictures as read, most frequent first."""
    prompt: str
    """The user turn's question asked with every image."""
    ranges: tuple[ActivationRange, ...] = ()
    """Per linear layer of the language model, its input's largest magnitude on image tokens and
    on text tokens, unquantized, over the calibration batches: what a static activation scale
    is fitted to (empty when not measured)."""


@attrs.frozen
class ActivationRange:
    """The input range of one linear layer of the language model, split by token kind."""

    name: str
    """Full-model module name (``model.language_model.layers.0.self_attn.q_proj``, ``lm_head``)."""
    image_absmax: float
    text_absmax: float


@attrs.frozen
class CalibStats:
    """How much text the calibration really saw; padding is counted apart on purpose."""

    captions_path: str
    captions_sha256: str
    layout: Layout
    seq_len: int
    batch_size: int
    max_samples: int
    samples: int
    real_tokens: int
    total_tokens: int
    batches: int
    truncated_samples: int
    """Captions longer than ``seq_len`` that were cut."""
    images: ImageMix | None = None
    """The image + caption mix; None for captions alone."""

    @property
    def padding_fraction(self) -> float:
        return 0.0 if self.total_tokens == 0 else 1.0 - self.real_tokens / self.total_tokens


@attrs.frozen(eq=False)
class CalibData:
    """Tokenised calibration batches.

    Each batch is a dict with ``input_ids``, ``position_ids`` and ``labels`` (all ``[B, L]``
    int64, on CPU), plus ``attention_mask`` for the padded layout. Image batches
    (:mod:`~auto_quantize_model.backend.vision_calib`) add the decoder's ready-made inputs:
    ``inputs_embeds``, ``mrope_position_ids``, ``visual_pos_masks``, ``deepstack_visual_embeds``
    and ``real_mask``. ``labels`` are unshifted
    (Hugging Face convention) and hold -100 wherever no prediction should be scored: padding
    and, in the packed layout, the first token of every caption so nothing is predicted across
    a caption boundary.
    """

    batches: tuple[dict[str, torch.Tensor], ...]
    captions_per_batch: tuple[int, ...]
    stats: CalibStats
    captions: tuple[str, ...] = ()
    """The caption texts calibrated on, in order (``stats.samples`` of them): validation leaves
    them out of its held-out text. Empty when whoever built the batches did not record them;
    validation then refuses to run rather than risk measuring on calibration text."""


@attrs.frozen
class GroupScore:
    """One AutoQuant recipe group: modules that must share a format (e.g. q/k/v)."""

    name: str
    """Full-model module path of the group, without ModelOpt's ``.quant_recipe`` suffix."""
    module_names: tuple[str, ...]
    formats: tuple[str, ...]
    """Format names including ``NONE``, in ModelOpt's order."""
    bits: tuple[float, ...]
    scores: tuple[float, ...]
    costs: tuple[float, ...]
    best_format: str
    """The format the effective-bits search picked for this group."""


@attrs.frozen
class FixedGroup:
    """A recipe group ModelOpt could only leave unquantized: a disabled LM layer or a vision module.

    It has no format to choose, yet it is part of ModelOpt's search: its weights are in the
    budget's denominator and its place among the rows moves CBC's tie-breaks. The budget
    frontier needs both to re-solve the search exactly without the model.
    """

    name: str
    weights: float
    """Its size at 16 bits (ModelOpt's ``uncompressed_cost``)."""
    lm: bool
    """Part of the language model (a disabled layer) rather than of the vision tower."""


@attrs.frozen
class LayerRouting:
    """How one MoE layer's router spread the calibration tokens over its experts."""

    layer: int
    """Decoder layer number (``layers.<L>``)."""
    name: str
    """Full-model name of the layer's experts container (``...layers.<L>.mlp.experts``)."""
    top_k: int
    """Experts each token is sent to."""
    tokens: tuple[int, ...]
    """Real tokens routed to each expert (index = expert number); they sum to ``top_k`` x the
    tokens counted, since every token goes to ``top_k`` distinct experts."""

    @property
    def num_experts(self) -> int:
        return len(self.tokens)


@attrs.frozen
class RoutingStats:
    """Tokens routed to each expert of each MoE layer, over the calibration batches, padding left out.

    Counted once per calibration batch (the first time the batch runs through the decoder,
    before any quantizer acts on the forward), from the router's own top-k choice.
    """

    real_tokens: int
    """Real tokens counted: each reached every MoE layer once."""
    batches: int
    layers: tuple[LayerRouting, ...]


@attrs.frozen
class SensitivityScores:
    """AutoQuant's result reduced to plain numbers (no ModelOpt objects)."""

    groups: tuple[GroupScore, ...]
    formats: tuple[str, ...]
    method: Method
    scope: Scope
    effective_bits_target: float
    effective_bits_lm: float
    """Bits reached over the language model's (and lm_head's) weights alone."""
    effective_bits_model: float
    """Bits reached over every weight AutoQuant costed (vision too in ``full_model`` scope)."""
    total_score: float
    satisfied: bool
    calib_steps: int
    score_steps: int
    score_samples: int
    autoquant_seconds: float
    state_path: str | None = None
    """Where ModelOpt's search state (its ``checkpoint=`` file) was saved, if anywhere."""
    calib_forward_steps: int | None = None
    """Forward steps ModelOpt ran to calibrate in this process (0 when all was restored)."""
    score_forward_steps: int | None = None
    """Forward steps ModelOpt ran to score in this process (0 when the scores were restored)."""
    warnings: tuple[str, ...] = ()
    """Settings that could not be honoured as written (e.g. ``score_size`` beyond the data), one
    sentence each: recorded in the manifest so a reader sees them, never a silent clamp."""
    search_order: tuple[str, ...] = ()
    """Every recipe group of ModelOpt's search (the scored :attr:`groups` and the
    :attr:`fixed_groups`), full-model names, in ModelOpt's ``candidate_stats`` order; empty when
    unknown. The budget frontier re-solves in this order so that CBC breaks ties as it did."""
    fixed_groups: tuple[FixedGroup, ...] = ()
    """The groups of the search with no format to choose (see :class:`FixedGroup`)."""
    routing: RoutingStats | None = None
    """Tokens routed to each expert during calibration; None for a dense model (or when they
    could not be counted, which a warning says)."""
    rare_expert_tokens: int = 0
    """``autoquant.rare_expert_tokens`` of the run: the solver's rare-expert rule (0: off)."""
    cost_model: CostModel = "storage"
    """``autoquant.cost_model`` of the run: what the solver's budgets count and, on an MoE model, what
    ModelOpt's budget in the run counted (``active``: its ``active_moe``). Costs and bits here are
    storage figures either way."""


@attrs.frozen(eq=False)
class QuantSearch:
    """The model as RunAutoQuant left it, handed on so that later stages can reuse its search.

    Every recipe group of ``model`` carries ModelOpt's ``QuantRecipeHparam`` with each candidate
    format's quantizers calibrated; ValidateSensitivity switches groups between them. Being an
    artifact (not an implicit property of the mutated model) lets the wiring check refuse a
    pipeline that would need it but only has scores read from disk.
    """

    model: torch.nn.Module
    """The full model (module names as in :attr:`GroupScore.module_names`), quantizers inside."""
    formats: tuple[str, ...]
    method: Method
    kernels: str = "extension"
    """The fake-quantization kernels of the search (``autoquant.kernels``): later stages use them too."""


@attrs.frozen
class StageTiming:
    stage: str
    seconds: float


@attrs.frozen
class RunTimings:
    """Wall time of every stage finished so far; the runner keeps this up to date."""

    stages: tuple[StageTiming, ...] = ()

    def add(self, stage: str, seconds: float) -> RunTimings:
        return RunTimings((*self.stages, StageTiming(stage, seconds)))


@attrs.frozen
class ReportPaths:
    """Every file WriteReports wrote, so callers never have to guess names."""

    directory: str
    files: tuple[str, ...]


@attrs.frozen
class BudgetFrontier:
    """ModelOpt's search re-solved at many effective-bits budgets from one scoring pass, no model.

    The run's own budget is always among the points, so every frontier checks itself against
    the choice ModelOpt made in the run.
    """

    frontier: Frontier
    run_budget: float | None
    """The LM budget the run searched at; None when unknown."""
    run_checked: bool = False
    """Whether the run's choice (every group's ``best_format``) was known and compared."""
    run_mismatches: tuple[str, ...] = ()
    """Groups whose re-solved format at :attr:`run_budget` is not the one ModelOpt chose in the
    run, as ``name: ours != run's``; empty when they agree (or when nothing was compared)."""
    notes: tuple[str, ...] = ()
    """What limits the frontier (inexact group order, budgets added), one sentence each."""


@attrs.frozen
class MeasuredPoint:
    """The mix of one frontier budget applied to the model and measured on held-out captions."""

    budget: float
    effective_bits_lm: float
    predicted_score: float
    """The frontier's predicted total score of the mix (sum of the chosen formats' scores)."""
    delta_nll: float
    """Mean next-token NLL over held-out real tokens minus the unquantized model's."""
    kl_div: float
    """Mean KL(unquantized || mix) of the next-token distributions over the same tokens."""
    quantized_groups: int
    """Groups of the mix on a quantized format."""
    non_monotone: bool = False
    """More bits than the previous measured point, yet a larger measured ΔNLL."""
    last_position: LastPosition | None = None
    """The mix at the held-out captions' last positions; None before aqm measured it."""


@attrs.frozen
class MeasuredFrontier:
    """Predicted vs measured damage at a few frontier budgets, and how well they agree."""

    points: tuple[MeasuredPoint, ...]
    """Budgets ascending."""
    baseline_nll: float
    chosen_delta_nll: float
    """ΔNLL of the run's own choice (the model as AutoQuant left it), for reference."""
    spearman_nll: float
    """Rank correlation of predicted score and measured ΔNLL along the measured points."""
    spearman_kl: float
    holdout_samples: int
    holdout_tokens: int
    holdout_source: str
    restored_exactly: bool
    """Weights, quantizer choices and the chosen model's held-out NLL all came back bit for bit."""
    seconds: float
    notes: tuple[str, ...] = ()


@attrs.frozen
class FrontierSummary:
    """What the manifest keeps of a budget frontier: its range, its flags, the measured points."""

    method: str
    budgets: int
    lowest_budget: float
    highest_budget: float
    min_bits_lm: float
    """The fewest LM effective bits any mix reaches."""
    unreachable: tuple[float, ...]
    """Budgets below the cheapest mix."""
    non_monotone: tuple[float, ...]
    """Budgets whose predicted score is worse than the previous (smaller) budget's."""
    run_budget: float | None
    run_matches: bool | None
    """The re-solved choice at the run's budget equals ModelOpt's; None when not compared."""
    measured: MeasuredFrontier | None = None


@attrs.frozen
class ExportedMix:
    """The mix of one budget written out by ExportCheckpoint, and how its read-back went."""

    directory: str
    budget: float
    effective_bits_lm: float
    """LM bits of the exported mix (at most :attr:`budget`)."""
    groups: int
    quantized_layers: int
    formats: tuple[tuple[str, int], ...]
    """Each chosen format and how many groups carry it."""
    files: tuple[str, ...]
    checkpoint: bool
    quant_algo: str = ""
    """``MIXED_PRECISION`` or the one format's label; empty without a checkpoint."""
    in_memory_nll: float = math.nan
    """Held-out NLL of the quantized, calibrated model (nats per token); NaN without a checkpoint."""
    exported_nll: float = math.nan
    """The quantized model computing with the weights the checkpoint holds (after the exporter's
    sibling fusion and rounding): what the read-back must reproduce."""
    read_back_nll: float = math.nan
    """The checkpoint loaded back as its README says."""
    tolerance: float = math.nan
    ok: bool = True
    """The read-back NLL is within :attr:`tolerance` of :attr:`exported_nll` (True without a checkpoint)."""
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    format: str = "modelopt"
    """The checkpoint format: ``modelopt`` (ModelOpt's HF export) or ``compressed-tensors``."""
    loader: str = ""
    """compressed-tensors: what read it back (transformers' class, quantizer and versions)."""
    weight_worst_layer: str = ""
    """compressed-tensors: the layer whose read-back weight is furthest from the fake-quantized one."""
    weight_max_diff: float = math.nan
    weight_relative: float = math.nan
    """That layer's max |read back - fake-quantized| over its largest |weight|."""
    weight_tolerance: float = math.nan
    weight_per_format: tuple[tuple[str, str, float, float], ...] = ()
    """compressed-tensors: each format's worst layer, max |difference| and relative difference."""
    fused_nll: float = math.nan
    """The fake-quantized model after the fusion; differs from :attr:`exported_nll` where ModelOpt's
    exporter arithmetic rounds weights the other way (NVFP4 codes; 16-bit weight scales)."""
    flipped_weights: int = 0
    """Read-back weights off the fake-quantized ones by a rounding flip (compressed-tensors: all
    NVFP4 layers; modelopt: the :attr:`flip_layers` sampled layers, a diagnostic)."""
    flip_weights: int = 0
    """Weights of the layers compared."""
    flip_relative: float = 0.0
    """The largest flip over its layer's largest |weight|."""
    flip_layers: int = 0
    """modelopt: how many quantized layers were compared (``SAMPLE_LAYERS``)."""
    held_out: str = ""
    """What the read-back NLL was measured on: ``pairs`` (an image run's held-out image + caption
    turns) or ``captions``; empty without a checkpoint."""
    held_out_samples: int = 0
    held_out_tokens: int = 0
    """Tokens scored (caption tokens only, for pairs)."""
    held_out_image_tokens: int = 0
    """Image tokens the held-out pairs fed each model (0 for captions)."""

    @property
    def difference(self) -> float:
        """Read back minus exported NLL; NaN without a checkpoint."""
        return self.read_back_nll - self.exported_nll


@attrs.frozen(eq=False)
class CheckpointInputs:
    """What a checkpoint export needs: a pristine model and the run's calibration and held-out text."""

    fresh: LoadedModel
    """A freshly loaded, unquantized model (the run's own one carries AutoQuant's quantizers)."""
    lm: LanguageModel
    """The run's language model: only its names (decoder, head, vision towers, pad id) are used."""
    calib: CalibData
    holdout: ValidateSpec = attrs.field(factory=ValidateSpec)
    kernels: str = "extension"
    """The run's ``autoquant.kernels``: the export quantizes and measures with the same arithmetic."""
