"""The previous tool's manifests: conversion rules on crafted input, and its three real outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.errors import InputError
from auto_quantize_model.io.legacy import legacy_manifest_from_dict, looks_like_legacy, parse_format
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_json
from auto_quantize_model.io.manifest_file import read_manifest
from auto_quantize_model.render.reports import LAYER_JSON, LAYER_MD, regenerate_reports
from builders import SEEDS

SEED_FOLDERS = ("wint8_aint8", "wfp8_afp8", "int8_lm_default_legacy")
LEGACY_KEYS = ("layer", "num_bits", "sensitivity", "size_cost")


def entry(scores: list[float], formats: tuple[str, ...] = ("INT8_DEFAULT_CFG", "NONE")) -> dict[str, Any]:
    bits = {"INT8_DEFAULT_CFG": 8.0, "FP8_DEFAULT_CFG": 8.0, "NONE": 16.0}
    return {
        "formats": [f"{name}(effective-bits: {bits[name]})" for name in formats],
        "scores": scores,
        "costs": [100.0 * (i + 1) for i in range(len(formats))],
        "importance": 123.0,  # theirs; we recompute
        "rank": 99,  # theirs, ascending; ignored
    }


def legacy_dict() -> dict[str, Any]:
    return {
        "scheme": {
            "name": "int8_autoquant_lm_default",
            "auto_quantize_bits": 8.0,
            "auto_quantize_method": "gradient",
            "auto_quantize_score_size": 128,
            "coverage_mode": "lm_default",
            "coverage_fraction": 1.0,
            "quant_formats": ["INT8_LM_DEFAULT_CFG"],
        },
        "model": {"id": "/ckpt/Qwen3-VL-4B-Instruct"},
        "num_quantized_layers": 4,
        "layers": {},
        "autoquant_state": {
            "keys": ["candidate_stats", "best", "constraints"],
            "constraints": {"effective_bits": 8.25},
            "score": 3.5,
            "is_satisfied": False,
        },
        "layer_sensitivity": {
            "visual.blocks.0.attn.qkv.quant_recipe": entry([0.0], ("NONE",)),
            "language_model.layers.0.mlp.down_proj.quant_recipe": entry([0.5, 0.0]),
            "visual.blocks.1.attn.qkv.quant_recipe": entry([0.0, 0.0]),
            "language_model.layers.1.mlp.down_proj.quant_recipe": entry([2.5, 0.0]),
            "lm_head.quant_recipe": entry([0.75, 0.0]),
        },
        "sensitivity_ranking": [],
    }


def test_parse_format() -> None:
    assert parse_format("INT8_DEFAULT_CFG(effective-bits: 8.0)") == ("INT8_DEFAULT_CFG", 8.0)
    assert parse_format("NONE(effective-bits: 16.0)") == ("NONE", 16.0)
    assert parse_format("W4A8_AWQ_BETA_CFG(effective-bits: 4.5)") == ("W4A8_AWQ_BETA_CFG", 4.5)
    with pytest.raises(ValueError, match="is not NAME"):
        parse_format("INT8_DEFAULT_CFG")


def test_shape_detection() -> None:
    assert looks_like_legacy(legacy_dict())
    assert not looks_like_legacy({**legacy_dict(), "schema_version": 1})
    assert not looks_like_legacy({**legacy_dict(), "layer_sensitivity": []})
    assert not looks_like_legacy([legacy_dict()])


def test_conversion_keeps_their_numbers_and_ranks_descending() -> None:
    manifest = legacy_manifest_from_dict(legacy_dict(), "old.json")
    assert manifest.origin == "legacy"
    assert [(g.rank, g.name, g.importance) for g in manifest.groups] == [
        (1, "language_model.layers.1.mlp.down_proj", 2.5),
        (2, "lm_head", 0.75),
        (3, "language_model.layers.0.mlp.down_proj", 0.5),
        (4, "visual.blocks.0.attn.qkv", 0.0),  # zero ties stay in file order
        (5, "visual.blocks.1.attn.qkv", 0.0),
    ]
    head = manifest.groups[0]
    assert head.formats == ("INT8_DEFAULT_CFG", "NONE")
    assert head.bits == (8.0, 16.0)
    assert head.scores == (2.5, 0.0)
    assert head.costs == (100.0, 200.0)
    assert head.best_format == ""  # never recorded
    scheme = manifest.scheme
    assert (scheme.name, scheme.formats, scheme.scope) == (
        "int8_autoquant_lm_default",
        ("INT8_LM_DEFAULT_CFG",),
        "lm_default",
    )
    assert (scheme.effective_bits_target, scheme.effective_bits_model, scheme.effective_bits_lm) == (
        8.0,
        8.25,
        None,
    )
    assert (scheme.total_score, scheme.satisfied, scheme.score_samples) == (3.5, False, 128)
    assert manifest.dataset is None
    assert manifest.model.source == "/ckpt/Qwen3-VL-4B-Instruct"


def test_converted_manifest_round_trips_through_our_json() -> None:
    manifest = legacy_manifest_from_dict(legacy_dict(), "old.json")
    assert manifest_from_dict(json.loads(manifest_to_json(manifest)), "x.json") == manifest


@pytest.mark.parametrize(
    ("break_it", "needle"),
    [
        (lambda d: d["layer_sensitivity"]["lm_head.quant_recipe"].update(scores=[1.0]), "1 scores"),
        (lambda d: d["layer_sensitivity"]["lm_head.quant_recipe"].update(formats=["INT8"]), "is not NAME"),
        (lambda d: d["scheme"].pop("name"), "scheme.name is missing"),
        (lambda d: d["autoquant_state"].update(is_satisfied="yes"), "autoquant_state.is_satisfied"),
        (lambda d: d["layer_sensitivity"].update(x=[1]), "layer_sensitivity['x'] is not an object"),
    ],
)
def test_broken_legacy_manifest_names_the_key(break_it: Any, needle: str) -> None:
    data = legacy_dict()
    break_it(data)
    with pytest.raises(InputError, match=r"old\.json: legacy manifest key") as caught:
        legacy_manifest_from_dict(data, "old.json")
    assert needle in str(caught.value)


# ---- the previous tool's real outputs -----------------------------------------------------------


@pytest.mark.parametrize("folder", SEED_FOLDERS)
def test_ranking_matches_their_own_report(folder: str, tmp_path: Path) -> None:
    directory = SEEDS / folder
    (manifest_path,) = directory.glob("*_quant_manifest.json")
    theirs = json.loads((directory / LAYER_JSON).read_text(encoding="utf-8"))["layer_sensitivity"]

    manifest = read_manifest(manifest_path)
    assert manifest.origin == "legacy"
    assert [g.name for g in manifest.groups] == [row["layer"] for row in theirs]
    assert [g.rank for g in manifest.groups] == list(range(1, len(theirs) + 1))

    regenerate_reports(manifest_path, tmp_path, plots=False)
    ours = json.loads((tmp_path / LAYER_JSON).read_text(encoding="utf-8"))["layer_sensitivity"]
    assert [{key: row[key] for key in LEGACY_KEYS} for row in ours] == theirs
    assert [row["rank"] for row in ours] == list(range(1, len(theirs) + 1))
    assert (tmp_path / LAYER_MD).is_file()


def test_their_manifests_carry_what_they_recorded() -> None:
    (wint8,) = (SEEDS / "wint8_aint8").glob("*_quant_manifest.json")
    manifest = read_manifest(wint8)
    assert manifest.scheme.name == "wint8_aint8_autoquant_lm"
    assert manifest.scheme.formats == ("INT8_DEFAULT_CFG",)
    assert math.isclose(manifest.scheme.effective_bits_model, 8.744307014821711)
    assert manifest.dataset is not None
    assert (manifest.dataset.samples, manifest.dataset.seq_len, manifest.dataset.layout) == (
        128,
        512,
        "padded",
    )
    assert manifest.dataset.real_tokens is None
    # 105 vision groups kept in 16 bits: no quantized format, importance 0, at the bottom.
    vision = [g for g in manifest.groups if g.name.startswith("model.visual.")]
    assert len(vision) == 105
    assert {g.formats for g in vision} == {("NONE",)}
    assert [g.rank for g in vision] == list(range(len(manifest.groups) - 104, len(manifest.groups) + 1))

    (old,) = (SEEDS / "int8_lm_default_legacy").glob("*_quant_manifest.json")
    older = read_manifest(old)
    assert not any(g.name.startswith("model.") for g in older.groups)  # kept verbatim, no prefix guessed
    assert older.dataset is None
