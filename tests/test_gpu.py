"""The whole pipeline on a CUDA device (run on the GPU machine; skipped elsewhere).

CPU tests cover the logic; these prove the GPU path: bf16 weights, CUDA-only formats (NVFP4),
both scoring methods and both scopes through the real stages.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from auto_quantize_model.artifacts import LanguageModel, SensitivityScores
from auto_quantize_model.manifest_records import Manifest
from auto_quantize_model.validation_records import ValidationReport
from builders import six_stages

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(
    ("formats", "method", "scope"),
    [
        (("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"), "gradient", "language_model"),
        (("NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"), "gradient", "language_model"),
        (("INT8_DEFAULT_CFG",), "kl_div", "full_model"),
        (("wint4-b128_aint8-token",), "gradient", "full_model"),
    ],
)
def test_tiny_pipeline_on_cuda(
    tiny_checkpoint: Path, tmp_path: Path, formats: tuple[str, ...], method: str, scope: str
) -> None:
    out = tmp_path / "out"
    store = six_stages(
        tiny_checkpoint,
        out,
        device="cuda",
        formats=formats,
        method=method,
        scope=scope,
        max_samples=96,
        score_size=32,
        validate=True,
    )
    lm = store.get(LanguageModel)
    assert next(lm.module.parameters()).dtype == torch.bfloat16
    scores = store.get(SensitivityScores)
    layers = int(getattr(lm.module, "config").num_hidden_layers)  # noqa: B009
    # per decoder layer: q/k/v, o, gate/up, down; plus lm_head
    assert len(scores.groups) == 4 * layers + 1
    assert all(not name.startswith("model.visual") for g in scores.groups for name in g.module_names)
    assert all(math.isfinite(s) for g in scores.groups for s in g.scores)
    assert scores.effective_bits_lm <= 12.0 + 1e-6
    assert set(scores.formats) == set(formats)
    manifest = store.get(Manifest)
    assert [g.rank for g in manifest.groups] == list(range(1, len(manifest.groups) + 1))
    assert store.get(ValidationReport).restored_exactly
    assert (out / "per-layer-sensitivity.md").is_file()
