"""The manifest: the one file that says what was measured, on what, and how layers rank.

Ranks are 1-based and descending everywhere: rank 1 is the group whose quantization hurts most.
The manifest is plain data so ``aqm report`` and ``aqm diff`` never need torch.
Manifests converted from the previous tool (``origin == "legacy"``) lack some facts: numbers it
never recorded are None, names it never recorded are ``""`` (reports print ``n/a`` for both).

The file's schema is the records of :mod:`auto_quantize_model.manifest_records` (nouns, so
that pure code can name them without this reader); this module turns them into JSON and back and
refuses what no run can write. Where an artifact carries the same facts
(:class:`~auto_quantize_model.artifacts.CalibStats` ->
:class:`~auto_quantize_model.manifest_records.DatasetInfo`,
:class:`~auto_quantize_model.artifacts.SensitivityScores` ->
:class:`~auto_quantize_model.manifest_records.SchemeInfo`, ...), the manifest record is made from
it by :func:`~auto_quantize_model.io.convert.project`, field by name; stage timings and
validation results are the artifacts themselves.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import os
import platform
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import cattrs

from auto_quantize_model.artifacts import RoutingStats
from auto_quantize_model.core.noise import random_weights_notice
from auto_quantize_model.core.scores import importance
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.convert import JSON_CONVERTER, dumps_json, json_problems, to_strict_json_value
from auto_quantize_model.manifest_records import DatasetInfo, Manifest, RankedGroup, SchemeInfo

SCHEMA_VERSION = 1
"""Bumped whenever a field changes meaning; readers refuse versions they do not know."""

VERSIONED_DISTRIBUTIONS: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("modelopt", "nvidia-modelopt"),
    ("auto_quantize_model", "auto-quantize-model"),
)
"""(name in files, distribution) of the packages that shape the numbers."""


def installed_versions() -> tuple[tuple[str, str], ...]:
    """Versions of Python and the packages that shape the numbers, without importing any of them."""
    found = [("python", platform.python_version())]
    for label, distribution in VERSIONED_DISTRIBUTIONS:
        try:
            found.append((label, importlib.metadata.version(distribution)))
        except importlib.metadata.PackageNotFoundError:
            found.append((label, "not installed"))
    return tuple(found)


def utc_now_iso() -> str:
    """The time files record: UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """Plain data (floats may still be non-finite; :func:`dumps_json` spells those out)."""
    data: dict[str, Any] = JSON_CONVERTER.unstructure(manifest)
    if not data["warnings"]:
        del data["warnings"]  # files of runs without warnings stay as they always were
    for optional in ("search_order", "fixed_groups", "frontier", "format_agreement", "routing"):
        if not data[optional]:
            del data[optional]  # likewise for runs without them
    if data["validation"] is not None:
        _drop_unset(data["validation"], VALIDATION_ADDITIONS)
        for group in data["validation"]["groups"]:
            _drop_unset(group, VALIDATED_GROUP_ADDITIONS)
    measured = (data.get("frontier") or {}).get("measured")
    for point in measured["points"] if measured else ():
        _drop_unset(point, MEASURED_POINT_ADDITIONS)
    notice = random_weights_notice(manifest.model.source)
    if notice:  # derived from the model source, first so that no reader misses it
        data = {"schema_version": data.pop("schema_version"), NOTICE_KEY: notice, **data}
    return data


NOTICE_KEY = "notice"
"""Top-level key of the random-weights sentence (:func:`random_weights_notice`); derived from
``model.source`` when written, dropped when read."""
VALIDATION_ADDITIONS = ("noise", "proxies", "refinement", "unmet", "last_position")
VALIDATED_GROUP_ADDITIONS = ("delta_nll_ci", "kl_ci")
MEASURED_POINT_ADDITIONS = ("last_position",)
"""Validation and measured-frontier fields added after schema 1 was first written: left out when
unset, so a manifest without them reads and writes as it always did."""


def _drop_unset(record: dict[str, Any], keys: Sequence[str]) -> None:
    for key in keys:
        if record.get(key) in (None, [], ()):
            record.pop(key, None)


def manifest_to_json(manifest: Manifest) -> str:
    return dumps_json(manifest_to_dict(manifest))


def manifest_from_dict(data: Any, source_path: str | os.PathLike[str]) -> Manifest:
    """Structure one of our manifests, refusing other schema versions and malformed content.

    ``source_path`` only names the file in error messages.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source_path} is not a quant manifest (top level is not a JSON object); {DAMAGED}")
    version = data.get("schema_version")
    if type(version) is not int:
        raise InputError(
            f"{source_path} is not a quant manifest (schema_version is {version!r}, expected an integer); "
            f"{DAMAGED}"
        )
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{source_path}: unknown manifest schema_version {version}; this aqm reads schema_version "
            f"{SCHEMA_VERSION}"
            + (" (the file is newer: upgrade auto-quantize-model)" if version > SCHEMA_VERSION else "")
        )
    if isinstance(data.get(NOTICE_KEY), str):
        data = {key: value for key, value in data.items() if key != NOTICE_KEY}
    try:
        manifest = JSON_CONVERTER.structure(data, Manifest)
    except (cattrs.BaseValidationError, TypeError, ValueError) as err:
        details = "; ".join(json_problems(err))
        raise InputError(f"{source_path} is not a valid quant manifest: {details}; {DAMAGED}") from err
    check_manifest(manifest, source_path)
    return manifest


# --------------------------------------------------------------------------------------------------
# What a manifest must hold before anyone reads it
# --------------------------------------------------------------------------------------------------

DAMAGED = "the file was edited or truncated: restore it, or rerun aqm run to write it again"
"""The fix every refused manifest shares: aqm never writes one that these checks refuse."""

MAX_BITS = 16.0
"""Effective bits of a format lie in (0, 16]: ``NONE`` keeps a weight in 16 bits, the most any
format of ModelOpt's search spends."""


def _number(value: float) -> str:
    """A number as the file spells it (``NaN``, ``Infinity``, ``-Infinity``, ``0.25``)."""
    spelled: Any = to_strict_json_value(value)
    return str(spelled) if isinstance(spelled, str) else repr(value)


def _in_bits_range(value: float) -> bool:
    return 0.0 < value <= MAX_BITS


def _later_ranks_higher(previous: float, current: float) -> bool:
    """Whether ``current`` should have been ranked before ``previous`` (NaN first, then largest)."""
    if math.isnan(previous):
        return False
    return math.isnan(current) or current > previous


def _group_problems(manifest: Manifest) -> Iterator[str]:
    groups = manifest.groups
    seen: dict[str, int] = {}
    for index, group in enumerate(groups):
        where = f"group {group.name!r} (groups[{index}])"
        if not group.name:
            yield f"groups[{index}] has an empty name"
        elif group.name in seen:
            yield f"group {group.name!r} is listed twice (groups[{seen[group.name]}] and groups[{index}])"
        seen.setdefault(group.name, index)
        if group.rank != index + 1:
            yield (
                f"{where} has rank {group.rank}; groups must be listed by rank 1..{len(groups)}, "
                "one rank each"
            )
        lengths = (len(group.formats), len(group.bits), len(group.scores), len(group.costs))
        if not group.formats:
            yield f"{where} lists no format (even an unquantized group lists NONE)"
            continue
        if len(set(lengths)) != 1:
            yield (
                f"{where} has {lengths[0]} formats, {lengths[1]} bits, {lengths[2]} scores and "
                f"{lengths[3]} costs (one of each per format)"
            )
            continue
        yield from _format_problems(group, where)
        recorded, derived = group.importance, importance(group.formats, group.scores)
        if not (recorded == derived or (math.isnan(recorded) and math.isnan(derived))):
            yield (
                f"{where} has importance {_number(recorded)}, but its largest quantized score is "
                f"{_number(derived)}"
            )
        if index and _later_ranks_higher(groups[index - 1].importance, group.importance):
            above = groups[index - 1]
            yield (
                f"{where} has importance {_number(group.importance)}, more than "
                f"{above.name!r} ranked above it ({_number(above.importance)}): ranks follow importance, "
                "largest first"
            )


def _format_problems(group: RankedGroup, where: str) -> Iterator[str]:
    listed: set[str] = set()
    for position, (name, bits, cost) in enumerate(zip(group.formats, group.bits, group.costs, strict=True)):
        if name in listed:
            yield f"{where} lists format {name} twice"
        listed.add(name)
        if not _in_bits_range(bits):
            yield (
                f"{where} gives format {name} {_number(bits)} bits (bits[{position}]); effective bits "
                f"lie in (0, {MAX_BITS:g}]"
            )
        if not (math.isfinite(cost) and cost >= 0.0):
            yield (
                f"{where} gives format {name} the cost {_number(cost)} (costs[{position}]); a cost counts "
                "weights and is a finite number >= 0"
            )
    if group.best_format and group.best_format not in listed:
        yield (
            f"{where} chose format {group.best_format} (best_format), which is not among its formats "
            f"{', '.join(group.formats)}"
        )


def _fixed_problems(manifest: Manifest) -> Iterator[str]:
    scored = {group.name for group in manifest.groups}
    seen: set[str] = set()
    for index, fixed in enumerate(manifest.fixed_groups):
        where = f"fixed group {fixed.name!r} (fixed_groups[{index}])"
        if fixed.name in scored:
            yield f"{where} is also a scored group: a group either has formats to choose or none"
        elif fixed.name in seen:
            yield f"{where} is listed twice"
        seen.add(fixed.name)
        if not (math.isfinite(fixed.weights) and fixed.weights >= 0.0):
            yield f"{where} weighs {_number(fixed.weights)}; weights are a finite count >= 0"


def _scheme_problems(scheme: SchemeInfo) -> Iterator[str]:
    target = scheme.effective_bits_target
    # NaN reads as "no budget recorded" (aqm export then asks for --bits); anything else must be one.
    if not (math.isnan(target) or _in_bits_range(target)):
        yield f"scheme.effective_bits_target is {_number(target)}; a budget lies in (0, {MAX_BITS:g}]"
    for key, reached in (
        ("effective_bits_lm", scheme.effective_bits_lm),
        ("effective_bits_model", scheme.effective_bits_model),
    ):
        # NaN: the search found no weights to count (see the search-state reader).
        if reached is not None and not (math.isnan(reached) or _in_bits_range(reached)):
            yield f"scheme.{key} is {_number(reached)}; effective bits lie in (0, {MAX_BITS:g}]"
    for key, count in (
        ("score_samples", scheme.score_samples),
        ("calib_steps", scheme.calib_steps),
        ("score_steps", scheme.score_steps),
    ):
        if count is not None and count < 0:
            yield f"scheme.{key} is {count}; a count is >= 0"


def _dataset_problems(dataset: DatasetInfo | None) -> Iterator[str]:
    if dataset is None:
        return
    for field in attrs.fields(DatasetInfo):
        value = getattr(dataset, field.name)
        if isinstance(value, int) and value < 0:
            yield f"dataset.{field.name} is {value}; a count is >= 0"
    if dataset.real_tokens is not None and dataset.real_tokens > dataset.total_tokens:
        yield (
            f"dataset.real_tokens ({dataset.real_tokens}) is more than dataset.total_tokens "
            f"({dataset.total_tokens}), which count padding too"
        )


def _routing_problems(routing: RoutingStats | None) -> Iterator[str]:
    if routing is None:
        return
    if routing.real_tokens < 0 or routing.batches < 0:
        yield "routing.real_tokens and routing.batches are counts >= 0"
    seen: set[int] = set()
    for index, layer in enumerate(routing.layers):
        where = f"routing.layers[{index}] (layer {layer.layer})"
        if layer.layer in seen:
            yield f"{where} is listed twice"
        seen.add(layer.layer)
        if not 0 < layer.top_k <= layer.num_experts:
            yield f"{where} has top_k {layer.top_k} for {layer.num_experts} experts"
        if any(count < 0 for count in layer.tokens):
            yield f"{where} gives an expert a negative token count"
        elif sum(layer.tokens) != layer.top_k * routing.real_tokens:
            yield (
                f"{where} routed {sum(layer.tokens)} tokens; {routing.real_tokens} tokens to top-"
                f"{layer.top_k} experts each make {layer.top_k * routing.real_tokens}"
            )


def manifest_problems(manifest: Manifest) -> Iterator[str]:
    """Every value of ``manifest`` that no run can have produced, one sentence each, in file order.

    What *can* be true stays allowed, however bad it looks: NaN, infinite or negative scores
    (``aqm report`` flags them under score health; the frontier refuses them itself, see
    :func:`check_solvable`), NaN effective bits or total score (a search that counted nothing), an
    empty search order (manifests written before aqm kept it).

    A manifest with no group at all is refused here, for every command alike, rather than
    rendered as an empty report: BuildManifest refuses to write an empty ranking and the previous
    tool never wrote one either, so such a file was cut or edited and any report of it would
    be a header over nothing.
    """
    if not manifest.groups:
        yield "it ranks no group (aqm run never writes a manifest without groups)"
        return
    yield from _scheme_problems(manifest.scheme)
    yield from _dataset_problems(manifest.dataset)
    yield from _group_problems(manifest)
    for index, timing in enumerate(manifest.timings):
        if not (math.isfinite(timing.seconds) and timing.seconds >= 0.0):
            yield f"timings[{index}] ({timing.stage}) took {_number(timing.seconds)} s; a time is >= 0"
    yield from _fixed_problems(manifest)
    yield from _routing_problems(manifest.routing)


def check_manifest(manifest: Manifest, source_path: str | os.PathLike[str]) -> None:
    """Refuse a manifest with a value no run can produce (:func:`manifest_problems`), in one line.

    Every reader of manifests calls this (``aqm report``, ``frontier``, ``export``, ``diff``), so
    they all accept the same files. ``source_path`` only names the file.
    """
    problems = list(manifest_problems(manifest))
    if not problems:
        return
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    raise InputError(f"{source_path}: {problems[0]}{more}; {DAMAGED}")


def check_solvable(manifest: Manifest, source_path: str | os.PathLike[str]) -> None:
    """Refuse, before any solver runs, a manifest whose scores a budget search cannot use.

    The search multiplies scores into its objective: one NaN or infinite score makes every
    budget's answer meaningless (CBC refuses outright), and the weights are its budget's
    denominator, so they must not all be 0. ``aqm report`` still renders a manifest with such
    scores and lists the groups; the frontier and the export name the first one. Fixed groups
    score 0 by construction, so only the ranked groups are looked at. The manifest is checked
    first (:func:`check_manifest`): one made in memory has not been through a reader.
    """
    check_manifest(manifest, source_path)
    costs = [cost for group in manifest.groups for cost in group.costs]
    if not any(costs) and not any(fixed.weights for fixed in manifest.fixed_groups):
        raise InputError(
            f"{source_path}: every cost of every group is 0, so the groups weigh nothing and no budget "
            f"can be solved; {DAMAGED}"
        )
    for index, group in enumerate(manifest.groups):
        for name, score in zip(group.formats, group.scores, strict=True):
            if not math.isfinite(score):
                raise InputError(
                    f"{source_path}: group {group.name!r} (groups[{index}]) scored {_number(score)} for "
                    f"{name}: no budget can be solved with a non-finite score (aqm report lists every such "
                    "group under score health); rerun aqm run for finite scores (float32 or bfloat16, fewer "
                    "or shorter captions)"
                )
