"""The manifest's records: what a run measured, on what, and how its groups rank.

Plain data that every layer passes around: core ranks groups into :class:`RankedGroup` and
compares two manifests, io writes, reads and checks them
(:mod:`auto_quantize_model.io.manifest`), render draws them and the app hands them on. They live
below all of those, beside :mod:`auto_quantize_model.artifacts`, so that pure code never imports
the file reader to name a type. The conventions (1-based descending ranks, None and ``""`` for
what the previous tool never recorded) are described with the file format in
:mod:`auto_quantize_model.io.manifest`.

:class:`FormatAgreement` and its parts are the manifest's ``format_agreement`` section, computed
by :func:`auto_quantize_model.core.format_agreement.format_agreement`.
"""

from __future__ import annotations

import attrs

from auto_quantize_model.artifacts import (
    FixedGroup,
    FrontierSummary,
    GroupScore,
    ImageMix,
    RoutingStats,
    StageTiming,
)
from auto_quantize_model.frontier_records import CostModel
from auto_quantize_model.validation_records import ValidationReport


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
    rare_expert_tokens: int = 0
    """The solver's rare-expert rule (:mod:`auto_quantize_model.core.routing`); 0 (off) in manifests
    written before it existed."""
    cost_model: CostModel = "storage"
    """What the solver's budgets count (``storage`` in manifests written before the choice existed)."""


@attrs.frozen
class ModelInfo:
    source: str
    architecture: str
    dtype: str
    device: str
    devices: str = ""
    """Which modules went to which device when a ``device_map`` spread the model; else empty."""


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
    images: ImageMix | None = None
    """The image + caption mix of image-conditioned calibration; None for captions alone."""


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

    @classmethod
    def from_score(cls, group: GroupScore, *, rank: int, importance: float) -> RankedGroup:
        """``group`` at its place in a ranking, field by field so that mypy sees both sides (numbers
        as floats and lists as tuples, as a manifest read back from JSON has them)."""
        return cls(
            name=group.name,
            rank=rank,
            importance=importance,
            best_format=group.best_format,
            module_names=tuple(group.module_names),
            formats=tuple(group.formats),
            bits=tuple(float(value) for value in group.bits),
            scores=tuple(float(value) for value in group.scores),
            costs=tuple(float(value) for value in group.costs),
        )


@attrs.frozen
class Manifest:
    schema_version: int
    scheme: SchemeInfo
    model: ModelInfo
    dataset: DatasetInfo | None
    groups: tuple[RankedGroup, ...]
    """Sorted by rank (most sensitive first)."""
    timings: tuple[StageTiming, ...] = ()
    created_at: str = ""
    versions: tuple[tuple[str, str], ...] = ()
    validation: ValidationReport | None = None
    origin: str = "aqm"
    """``aqm`` for our runs, ``legacy`` for manifests of the previous script-based tool."""
    warnings: tuple[str, ...] = ()
    """Settings that could not be honoured as written and notes on figures that could not be
    measured, one sentence each (the report shows them first). Left out of the file when empty."""
    search_order: tuple[str, ...] = ()
    """Every recipe group of ModelOpt's search in its order (scored and fixed groups), so that
    ``aqm frontier`` re-solves it exactly from the manifest alone. Left out of the file when empty."""
    fixed_groups: tuple[FixedGroup, ...] = ()
    """Groups of the search with no format to choose, with their weights. Left out when empty."""
    frontier: FrontierSummary | None = None
    """The budget frontier of a pipeline with a ``[frontier]`` table. Left out when absent."""
    format_agreement: FormatAgreement | None = None
    """For runs of two or more formats: each format's top-k groups and which are sensitive under
    every format vs only some. Left out when absent."""
    routing: RoutingStats | None = None
    """Mixture-of-experts runs: tokens routed to each expert of each layer during calibration.
    Left out when absent (dense models, manifests written before aqm counted them)."""


@attrs.frozen
class FormatTop:
    """The top-k groups under one format, most sensitive first."""

    format: str
    groups: tuple[str, ...]
    scored: int
    """Groups scored under this format (the ranking's length)."""


@attrs.frozen
class SharedGroup:
    """A group in the top-k of some formats but not of all."""

    name: str
    formats: tuple[str, ...]
    """The formats whose top-k it is in, in the run's format order."""
    best_rank: int
    """Its best place in any of those lists (1 = the most sensitive group of that format)."""


@attrs.frozen
class FormatPair:
    """How two formats' rankings agree."""

    first: str
    second: str
    shared_top: int
    """Groups in both top-k lists."""
    spearman: float
    """Rank correlation of the two formats' scores over the groups scored (finitely) under both;
    NaN with fewer than two such groups or a constant score."""


@attrs.frozen
class FormatAgreement:
    """The top-k of each format and what the lists share; only for runs of two or more formats."""

    k: int
    formats: tuple[str, ...]
    """The quantized formats compared, in the run's order."""
    top: tuple[FormatTop, ...]
    every: tuple[str, ...]
    """Groups in the top-k of every format, by their mean place in those lists."""
    some: tuple[SharedGroup, ...]
    """Groups in the top-k of at least one format but not all: most formats first, then best rank."""
    pairs: tuple[FormatPair, ...]

    def unique_to(self, name: str) -> tuple[str, ...]:
        """Groups in the top-k of format ``name`` and of no other."""
        return tuple(group.name for group in self.some if group.formats == (name,))
