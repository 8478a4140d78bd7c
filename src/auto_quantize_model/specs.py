"""What a user writes: one frozen ``*Spec`` class per stage, plus the whole pipeline file.

These classes hold parameters only. Stages hold a spec (``LoadModel(LoadSpec(...))``) so the
Python API and the TOML files share one definition of every knob and its default.
Strict structuring from TOML lives in :mod:`auto_quantize_model.io.pipeline_file`.
"""

from __future__ import annotations

from typing import Literal

import attrs

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


@attrs.frozen
class LoadSpec:
    path: str
    """A Hugging Face checkpoint directory, ``builtin:tiny-qwen3-vl`` or ``config:qwen3-vl-4b``."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not next to the weights."""
    dtype: Dtype = "auto"
    """``auto`` means bfloat16 on CUDA and float32 on CPU."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    device_map: str | None = None
    """Passed to ``from_pretrained`` (e.g. ``auto`` to spread a big model); overrides ``device``."""
    padding_side: Literal["left", "right"] = "right"
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``...; None lets transformers choose."""
    seed: int = 0
    """Seed for the random weights of ``builtin:`` and ``config:`` sources."""


@attrs.frozen
class ExtractSpec:
    scope: Literal["language_model", "full_model"] = "language_model"
    """``language_model``: AutoQuant sees the text decoder and lm_head only.
    ``full_model``: AutoQuant wraps the whole VLM with vision layers disabled."""


@attrs.frozen
class CalibSpec:
    captions: str = "builtin"
    """A UTF-8 text file, one caption per line, or ``builtin`` for the bundled captions."""
    max_samples: int = 512
    seq_len: int = 512
    batch_size: int = 8
    layout: Literal["packed", "padded"] = "packed"
    """``packed`` joins captions into rows of real tokens; ``padded`` pads each caption to
    ``seq_len`` like the previous tool did."""


@attrs.frozen
class AutoQuantSpec:
    formats: tuple[str, ...] = ("INT8_DEFAULT_CFG",)
    """ModelOpt preset names or our own format names (``aqm formats`` lists them)."""
    method: Literal["gradient", "kl_div"] = "gradient"
    effective_bits: float = 8.0
    """Budget over the language model's weights (vision excluded even in ``full_model``)."""
    score_size: int = 128
    """Captions used for scoring; converted to score steps for the layout in use."""
    calib_size: int | None = None
    """Captions used for calibration; None uses every calibration batch."""
    disabled_layers: tuple[str, ...] = ()
    """Extra wildcard patterns (full-model names) kept out of quantization."""
    allow_nonfinite: bool = False
    """Keep going when a score is NaN/inf instead of failing."""
    checkpoint: str | None = None
    """ModelOpt search-state file: saved after scoring, restored (skipping scoring) when present."""


@attrs.frozen
class ManifestSpec:
    scheme: str | None = None
    """Scheme name used in file names; derived from the formats when None."""


@attrs.frozen
class ReportSpec:
    output_dir: str | None = None
    """Where reports go; the CLI fills this in from ``--output``."""
    save_state: bool = False
    """Also copy ModelOpt's search state to ``<scheme>_autoquant_state.pt``."""
    plots: bool = True


@attrs.frozen
class ValidateSpec:
    k: int = 5
    """How many top, bottom and random groups to measure."""
    seed: int = 0
    holdout_captions: str = "builtin-holdout"
    """Held-out text: ``builtin-holdout`` (128 bundled captions never used for calibration by
    default), ``builtin`` (the calibration captions file) or a file; captions used for
    calibration are always skipped."""
    holdout_samples: int = 64
    additivity: bool = True
