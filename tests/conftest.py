"""Shared fixtures. torch/transformers are imported inside fixtures so pure tests stay fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from auto_quantize_model.data import builtin_captions_path
from auto_quantize_model.io.manifest import SCHEMA_VERSION, Manifest, ModelInfo, RankedGroup, SchemeInfo

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import Qwen3VLForConditionalGeneration

    from auto_quantize_model.artifacts import LoadedModel

TINY_SEED = 0
"""Seed of the weights in ``tiny_checkpoint``; ``build_builtin(..., seed=TINY_SEED)`` rebuilds them."""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``builtin:tiny-qwen3-vl`` saved by ``save_pretrained`` (weights + tokenizer); treat as read-only.

    Integration tests load it back through ``from_pretrained`` so they exercise the same path as
    a real checkpoint directory. Do not write into it: it is shared by the whole session.
    """
    from auto_quantize_model.backend.models import TINY_QWEN3_VL, build_builtin

    directory = tmp_path_factory.mktemp("tiny-qwen3-vl")
    loaded = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, dtype="float32", device="cpu")
    model: Any = loaded.model
    model.save_pretrained(str(directory))
    loaded.tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiny_loaded() -> LoadedModel:
    """A fresh in-memory ``builtin:tiny-qwen3-vl`` (CPU, fp32); fresh per test since stages mutate it."""
    from auto_quantize_model.backend.models import TINY_QWEN3_VL, build_builtin

    return build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, dtype="float32", device="cpu")


@pytest.fixture
def captions_file(tmp_path: Path) -> Path:
    """The first 40 bundled captions in a temporary UTF-8 file, one per line."""
    lines = builtin_captions_path().read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Plain helpers, imported by the tests that need them (``from conftest import ...``)
# --------------------------------------------------------------------------------------------------

TINY_HIDDEN = 64
"""Hidden size of ``tiny_qwen3_vl_text``; a separate LM head over that decoder takes this many inputs."""


def tiny_qwen3_vl_text(vocab_size: int, max_positions: int) -> dict[str, Any]:
    """Text settings of the hand-built tiny Qwen3-VL: 2 layers, GQA 4/2, head_dim 16, mrope [2, 3, 3].

    Smaller than ``builtin:tiny-qwen3-vl`` and free of any tokenizer, so tests with their own
    token ids (vocabulary, special ids) build it directly; the vocabulary and the context length
    stay with the test because its data depends on them.
    """
    return {
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": max_positions,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    }


def tiny_qwen3_vl(
    vocab_size: int, max_positions: int, vision_depth: int, first_special_id: int
) -> Qwen3VLForConditionalGeneration:
    """The whole tiny Qwen3-VL (tied embeddings, weights from seed 0) in eval mode.

    The image, video and vision start/end ids are ``first_special_id`` and the three after it,
    so a test can keep them out of the random captions it draws.
    """
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config={**tiny_qwen3_vl_text(vocab_size, max_positions), "tie_word_embeddings": True},
        vision_config={
            "depth": vision_depth,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TINY_HIDDEN,
            "patch_size": 16,
            "deepstack_visual_indexes": [0],
        },
        tie_word_embeddings=True,
        image_token_id=first_special_id,
        video_token_id=first_special_id + 1,
        vision_start_token_id=first_special_id + 2,
        vision_end_token_id=first_special_id + 3,
    )
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    return model


def tiny_pipeline_toml(seed: int | None = None) -> str:
    """A pipeline file for ``builtin:tiny-qwen3-vl`` on CPU that runs in seconds (scheme "t", no plots).

    ``seed`` None leaves the model seed at its default.
    """
    seed_line = "" if seed is None else f"seed = {seed}\n"
    return f"""\
[model]
path = "builtin:tiny-qwen3-vl"
device = "cpu"
{seed_line}[calib]
max_samples = 12
seq_len = 32
batch_size = 2
[autoquant]
formats = ["INT8_DEFAULT_CFG"]
effective_bits = 12.0
score_size = 8
[manifest]
scheme = "t"
[reports]
plots = false
"""


def comparable_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a ``tiny_pipeline_toml`` run less what legitimately differs between runs
    (wall times, creation time), which must be there all the same."""
    data: dict[str, Any] = json.loads((folder / "t_quant_manifest.json").read_text(encoding="utf-8"))
    assert data["timings"]
    assert data["created_at"]
    data.pop("timings")
    data.pop("created_at")
    return data


def ranked_manifest(
    names: Sequence[str], *, scheme: str, target: float, bits: float, total_score: float, model: ModelInfo
) -> Manifest:
    """A manifest ranking ``names`` in order (importance 9, 8, ...), each group INT8 or NONE.

    ``bits`` is both the language model's and the whole model's effective bits.
    """
    groups = tuple(
        RankedGroup(
            name=name,
            rank=rank,
            importance=float(10 - rank),
            best_format="INT8_DEFAULT_CFG",
            module_names=(name,),
            formats=("INT8_DEFAULT_CFG", "NONE"),
            bits=(8.0, 16.0),
            scores=(float(10 - rank), 0.0),
            costs=(1.0, 2.0),
        )
        for rank, name in enumerate(names, start=1)
    )
    info = SchemeInfo(
        name=scheme,
        formats=("INT8_DEFAULT_CFG",),
        method="gradient",
        scope="language_model",
        effective_bits_target=target,
        effective_bits_lm=bits,
        effective_bits_model=bits,
        total_score=total_score,
        satisfied=True,
        score_samples=4,
        calib_steps=1,
        score_steps=1,
    )
    return Manifest(schema_version=SCHEMA_VERSION, scheme=info, model=model, dataset=None, groups=groups)


def six_stages(
    checkpoint: Path,
    out: Path,
    *,
    device: str,
    formats: tuple[str, ...],
    method: str,
    scope: str,
    max_samples: int,
    score_size: int,
    validate: bool = False,
    scheme: str | None = None,
    state: Path | None = None,
) -> Any:
    """The full pipeline (optionally with validation) on a saved tiny checkpoint; returns the store.

    Shared by the CPU integration tests and the GPU tests so both exercise the same composition.
    """
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import (
        AutoQuantSpec,
        CalibSpec,
        ExtractSpec,
        LoadSpec,
        ManifestSpec,
        ReportSpec,
        ValidateSpec,
    )
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant
    from auto_quantize_model.stages.validate_sensitivity import ValidateSensitivity
    from auto_quantize_model.stages.write_reports import WriteReports

    stages: list[Any] = [
        LoadModel(LoadSpec(path=str(checkpoint), device=device)),
        ExtractLM(ExtractSpec(scope=scope)),  # type: ignore[arg-type]
        BuildCalibLoader(CalibSpec(max_samples=max_samples, seq_len=64, batch_size=4)),
        RunAutoQuant(
            AutoQuantSpec(
                formats=formats,
                method=method,  # type: ignore[arg-type]
                effective_bits=12.0,
                score_size=score_size,
                checkpoint=None if state is None else str(state),
            )
        ),
    ]
    if validate:
        stages.append(ValidateSensitivity(ValidateSpec(k=2, holdout_samples=16)))
    stages += [
        BuildManifest(ManifestSpec(scheme=scheme)),
        WriteReports(ReportSpec(output_dir=str(out), save_state=state is not None, plots=False)),
    ]
    return Pipeline(stages).run()
