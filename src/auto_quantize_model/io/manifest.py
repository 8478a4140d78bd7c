"""The manifest: the one file that says what was measured, on what, and how layers rank.

Ranks are 1-based and descending everywhere: rank 1 is the group whose quantization hurts most.
The manifest is plain data so ``aqm report`` and ``aqm diff`` never need torch.
Manifests converted from the previous tool (``origin == "legacy"``) lack some facts: numbers it
never recorded are None, names it never recorded are ``""`` (reports print ``n/a`` for both).
"""

from __future__ import annotations

import attrs

from auto_quantize_model.artifacts import ValidationReport

SCHEMA_VERSION = 1
"""Bumped whenever a field changes meaning; readers refuse versions they do not know."""


@attrs.frozen
class SchemeInfo:
    name: str
    formats: tuple[str, ...]
    method: str
    scope: str
    effective_bits_target: float
    effective_bits_lm: float | None
    effective_bits_model: float
    total_score: float
    satisfied: bool
    score_samples: int
    calib_steps: int | None
    score_steps: int | None


@attrs.frozen
class ModelInfo:
    source: str
    architecture: str
    dtype: str
    device: str


@attrs.frozen
class DatasetInfo:
    captions_path: str
    captions_sha256: str | None
    layout: str
    seq_len: int
    batch_size: int
    max_samples: int
    samples: int
    real_tokens: int | None
    total_tokens: int
    batches: int


@attrs.frozen
class RankedGroup:
    """One recipe group with its scores and its place in the ranking."""

    name: str
    """Module path of the group (ModelOpt's ``.quant_recipe`` suffix stripped)."""
    rank: int
    importance: float
    """Max score over the group's quantized (non-NONE) formats: the damage of the worst choice."""
    best_format: str
    """The format the effective-bits search picked; ``""`` when unknown (legacy manifests)."""
    module_names: tuple[str, ...]
    formats: tuple[str, ...]
    bits: tuple[float, ...]
    scores: tuple[float, ...]
    costs: tuple[float, ...]


@attrs.frozen
class Timing:
    stage: str
    seconds: float


@attrs.frozen
class Manifest:
    schema_version: int
    scheme: SchemeInfo
    model: ModelInfo
    dataset: DatasetInfo | None
    groups: tuple[RankedGroup, ...]
    """Sorted by rank (most sensitive first)."""
    timings: tuple[Timing, ...] = ()
    created_at: str = ""
    versions: tuple[tuple[str, str], ...] = ()
    validation: ValidationReport | None = None
    origin: str = "aqm"
    """``aqm`` for our runs, ``legacy`` for manifests of the previous script-based tool."""
