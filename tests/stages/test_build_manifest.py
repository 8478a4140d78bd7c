"""BuildManifest: the manifest made from the scores, on plain data."""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any, cast

import pytest

from auto_quantize_model.artifacts import (
    CalibData,
    CalibStats,
    GroupScore,
    LoadedModel,
    RunTimings,
)
from auto_quantize_model.errors import AqmError
from auto_quantize_model.io.manifest import SCHEMA_VERSION
from auto_quantize_model.manifest_records import DatasetInfo
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import ManifestSpec
from auto_quantize_model.stages.build_manifest import BuildManifest, dataset_info
from builders import NONE, group, int8
from builders import scores as scores_of

# ---- BuildManifest ------------------------------------------------------------------------------


def test_build_manifest_from_scores_alone() -> None:
    scores = scores_of(group("a", int8(0.1), NONE), group("b", int8(0.9), NONE), group("v", NONE))
    manifest = BuildManifest().run(Artifacts.of([scores]))
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.origin == "aqm"
    assert manifest.scheme.name == "wint8_aint8"
    assert manifest.scheme.total_score == 1.5
    assert manifest.scheme.calib_steps == 4
    assert manifest.dataset is None
    assert manifest.model.source == ""
    assert [(g.rank, g.name) for g in manifest.groups] == [(1, "b"), (2, "a"), (3, "v")]


@pytest.mark.parametrize(
    ("groups", "detail"),
    [
        ((), "AutoQuant reported no recipe group"),
        ((group("nan", int8(math.nan), NONE), group("v", NONE)), "none of the 2 recipe group(s)"),
    ],
)
def test_build_manifest_refuses_an_empty_ranking(groups: tuple[GroupScore, ...], detail: str) -> None:
    """A run whose every score is unusable stops at BuildManifest with the reason, not with empty reports."""
    with pytest.raises(AqmError, match="^empty ranking: " + re.escape(detail)):
        BuildManifest().run(Artifacts.of([scores_of(*groups)]))


def test_build_manifest_records_model_dataset_timings_and_versions() -> None:
    stats = CalibStats(
        captions_path="/data/captions.txt",
        captions_sha256="ab" * 32,
        layout="packed",
        seq_len=64,
        batch_size=2,
        max_samples=10,
        samples=10,
        real_tokens=100,
        total_tokens=128,
        batches=1,
        truncated_samples=0,
    )
    calib = CalibData(batches=(), captions_per_batch=(10,), stats=stats)
    loaded = LoadedModel(
        model=cast(Any, None),
        tokenizer=cast(Any, None),
        source="builtin:tiny-qwen3-vl",
        architecture="Qwen3VLForConditionalGeneration",
        dtype="float32",
        device="cpu",
    )
    timings = RunTimings().add("LoadModel", 1.5).add("RunAutoQuant", 2.0)
    store = Artifacts.of([scores_of(group("a", int8(0.1), NONE)), calib, loaded, timings])
    manifest = BuildManifest(ManifestSpec(scheme="my-run")).run(store)

    assert manifest.scheme.name == "my-run"
    assert manifest.model.architecture == "Qwen3VLForConditionalGeneration"
    assert manifest.dataset is not None
    assert (manifest.dataset.real_tokens, manifest.dataset.total_tokens) == (100, 128)
    assert manifest.dataset.layout == "packed"
    assert [(t.stage, t.seconds) for t in manifest.timings] == [("LoadModel", 1.5), ("RunAutoQuant", 2.0)]
    created = dt.datetime.fromisoformat(manifest.created_at)
    assert created.utcoffset() == dt.timedelta(0)
    versions = dict(manifest.versions)
    assert set(versions) == {"python", "torch", "transformers", "modelopt", "auto_quantize_model"}
    assert versions["python"].count(".") == 2


# ---- manifest JSON ------------------------------------------------------------------------------


def test_dataset_record_is_the_calibration_stats_by_field_name() -> None:
    stats = CalibStats("/c.txt", "f" * 64, "padded", 64, 2, 8, 8, 300, 512, 4, truncated_samples=1)
    info = dataset_info(stats)
    assert info == DatasetInfo("/c.txt", "f" * 64, "padded", 64, 2, 8, 8, 300, 512, 4)
    assert dataset_info(None) is None
