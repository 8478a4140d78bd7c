"""Builders of test values: recipe groups, scores, manifests, tiny models and tiny pipeline files.

Tests import what they need (``from builders import group, manifest``). Each builder fills the
fields a test does not care about with fixed, harmless values, so a test states only what it
checks; keyword overrides reach every field that matters to someone. Heavy libraries (torch,
transformers) are imported inside the builders that need them, so pure tests stay torch-free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.artifacts import GroupScore, LayerRouting, RoutingStats, SensitivityScores
from auto_quantize_model.io.manifest import SCHEMA_VERSION
from auto_quantize_model.manifest_records import Manifest, ModelInfo, RankedGroup, SchemeInfo
from auto_quantize_model.validation_records import ValidationReport

if TYPE_CHECKING:
    from transformers import Qwen3VLForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
"""Files the tests read, vendored into the repository (see its README)."""
SEEDS = DATA / "seed-manifests"
"""The previous tool's three real run folders."""
TINY_DEFAULT = REPO / "pipelines" / "tiny-qwen3-vl.toml"
"""The pipeline the README's first command runs."""

INT8 = "INT8_DEFAULT_CFG"
FP8 = "FP8_DEFAULT_CFG"

Entry = tuple[str, float, float]
"""One scored format of a recipe group: ``(format, bits, score)``."""

NONE: Entry = ("NONE", 16.0, 0.0)
"""Leaving a group unquantized: 16 bits, no damage."""


def int8(score: float) -> Entry:
    return (INT8, 8.0, score)


def fp8(score: float) -> Entry:
    return (FP8, 8.0, score)


# --------------------------------------------------------------------------------------------------
# Recipe groups, scores and manifests (plain data)
# --------------------------------------------------------------------------------------------------


def group(
    name: str,
    *entries: Entry,
    best: str | None = None,
    module_names: tuple[str, ...] | None = None,
    costs: tuple[float, ...] | None = None,
) -> GroupScore:
    """A recipe group scored with ``entries`` in the given order (NONE only where listed).

    ``best`` defaults to the first format, ``module_names`` to the group's own name and every cost
    to 1.0: ranking, health and validation read scores and bits, not costs.
    """
    if not entries:
        raise ValueError(f"group {name!r}: give at least one (format, bits, score) entry")
    return GroupScore(
        name=name,
        module_names=(name,) if module_names is None else module_names,
        formats=tuple(fmt for fmt, _, _ in entries),
        bits=tuple(bits for _, bits, _ in entries),
        scores=tuple(score for _, _, score in entries),
        costs=tuple(1.0 for _ in entries) if costs is None else costs,
        best_format=entries[0][0] if best is None else best,
    )


def scores(*groups: GroupScore, **fields: Any) -> SensitivityScores:
    """A finished AutoQuant result over ``groups``: INT8, gradient, language model, budget met.

    ``fields`` override any other field of :class:`SensitivityScores` by name.
    """
    base = SensitivityScores(
        groups=groups,
        formats=(INT8,),
        method="gradient",
        scope="language_model",
        effective_bits_target=8.0,
        effective_bits_lm=8.0,
        effective_bits_model=8.0,
        total_score=1.5,
        satisfied=True,
        calib_steps=4,
        score_steps=2,
        score_samples=16,
        autoquant_seconds=1.0,
    )
    return attrs.evolve(base, **fields)


TEST_MODEL = ModelInfo(source="test", architecture="Test", dtype="fp32", device="cpu")


def ranked_group(name: str, rank: int, importance: float, fmt: str = "INT8") -> RankedGroup:
    """A manifest row scored with ``fmt`` (8 bits, cost 1) and NONE (16 bits, cost 2)."""
    return RankedGroup(
        name=name,
        rank=rank,
        importance=importance,
        best_format=fmt,
        module_names=(name,),
        formats=(fmt, "NONE"),
        bits=(8.0, 16.0),
        scores=(importance, 0.0),
        costs=(1.0, 2.0),
    )


def manifest(
    groups: Sequence[tuple[str, float]],
    *,
    scheme: str = "test_scheme",
    unquantized: Sequence[str] = (),
    fmt: str = "INT8",
    target: float = 8.0,
    bits: float = 8.0,
    total_score: float = 1.0,
    score_samples: int = 8,
    model: ModelInfo = TEST_MODEL,
    validation: ValidationReport | None = None,
) -> Manifest:
    """A manifest ranking ``groups`` (``(name, importance)``, most sensitive first) in the given order.

    Every group is scored with ``fmt`` and NONE; ``unquantized`` groups follow, offering NONE only
    (importance 0, as a vision group in language-model scope). ``bits`` is both the language
    model's and the whole model's effective bits.
    """
    rows = [ranked_group(name, rank, imp, fmt) for rank, (name, imp) in enumerate(groups, start=1)]
    rows += [
        RankedGroup(
            name=name,
            rank=len(rows) + i,
            importance=0.0,
            best_format="NONE",
            module_names=(name,),
            formats=("NONE",),
            bits=(16.0,),
            scores=(0.0,),
            costs=(2.0,),
        )
        for i, name in enumerate(unquantized, start=1)
    ]
    info = SchemeInfo(
        name=scheme,
        formats=(fmt,),
        method="gradient",
        scope="language_model",
        effective_bits_target=target,
        effective_bits_lm=bits,
        effective_bits_model=bits,
        total_score=total_score,
        satisfied=True,
        score_samples=score_samples,
        calib_steps=1,
        score_steps=1,
    )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        scheme=info,
        model=model,
        dataset=None,
        groups=tuple(rows),
        validation=validation,
    )


def descending(names: Sequence[str], top: float = 9.0) -> list[tuple[str, float]]:
    """``names`` with importances ``top, top - 1, ...``: a ranking in the given order for :func:`manifest`."""
    return [(name, top - i) for i, name in enumerate(names)]


# --------------------------------------------------------------------------------------------------
# Tiny models (transformers, imported lazily)
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


# --------------------------------------------------------------------------------------------------
# Tiny pipelines
# --------------------------------------------------------------------------------------------------


def tiny_pipeline_toml(seed: int | None = None, *, max_samples: int = 12, score_size: int = 8) -> str:
    """A pipeline file for ``builtin:tiny-qwen3-vl`` on CPU that runs in seconds (scheme "t", no plots).

    ``seed`` None leaves the model seed at its default.
    """
    seed_line = "" if seed is None else f"seed = {seed}\n"
    return f"""\
[model]
path = "builtin:tiny-qwen3-vl"
device = "cpu"
{seed_line}[calib]
max_samples = {max_samples}
seq_len = 32
batch_size = 2
[autoquant]
formats = ["INT8_DEFAULT_CFG"]
effective_bits = 12.0
score_size = {score_size}
[manifest]
scheme = "t"
[reports]
plots = false
"""


def comparable_manifest(folder: Path, scheme: str = "t") -> dict[str, Any]:
    """The manifest of a run less what legitimately differs between runs (wall times, creation
    time), which must be there all the same."""
    path = folder / f"{scheme}_quant_manifest.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert data["timings"], f"{path}: no timings"
    assert data["created_at"], f"{path}: no creation time"
    data.pop("timings")
    data.pop("created_at")
    return data


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


# --------------------------------------------------------------------------------------------------
# The command line in a fresh interpreter
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class AqmRun:
    """One finished ``aqm`` process: what it was asked, where it ran, what it printed."""

    argv: tuple[str, ...]
    cwd: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def folder(self) -> Path:
        """The one run folder ``aqm run`` made under ``cwd/runs`` when no ``--output`` was given."""
        found = sorted((self.cwd / "runs").iterdir()) if (self.cwd / "runs").is_dir() else []
        assert len(found) == 1, f"expected one run folder under {self.cwd / 'runs'}, found {found}"
        return found[0]


class AqmProcess:
    """An ``aqm`` process started in the background; :meth:`wait` collects it as an :class:`AqmRun`.

    Its output goes to files in ``cwd`` (``aqm.stdout``, ``aqm.stderr``), not pipes, so a
    chatty run never blocks on a full pipe while nobody reads it.
    """

    def __init__(self, *argv: str, cwd: Path) -> None:
        self.argv = tuple(argv)
        self.cwd = cwd
        self._out = cwd / "aqm.stdout"
        self._err = cwd / "aqm.stderr"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "auto_quantize_model", *argv],
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )

    def wait(self, timeout: float = 600) -> AqmRun:
        try:
            code = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        out = self._out.read_text(encoding="utf-8", errors="replace")
        err = self._err.read_text(encoding="utf-8", errors="replace")
        return AqmRun(self.argv, self.cwd, code, out, err)

    def stop(self) -> None:
        """Kill the process if it still runs (a session that ends without waiting for it)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def run_aqm(*argv: str, cwd: Path, timeout: float = 600) -> AqmRun:
    """``python -m auto_quantize_model ARGV`` in ``cwd``, as a user's shell runs ``aqm``.

    A fresh interpreter is the point: it pays for and reports its own library imports, and
    nothing a test imported or patched leaks into it.
    """
    return AqmProcess(*argv, cwd=cwd).wait(timeout)


def search_text_lm(decoder: Any, head: Any, formats: Sequence[Any], batches: Sequence[Any]) -> dict[str, Any]:
    """ModelOpt's gradient search over a decoder + head, as RunAutoQuant sets it up, on a few batches.

    For tests that need a searched model without the stage around it (measurement, recipe switching):
    two calibration and two scoring steps, budget 8 bits. Returns ModelOpt's search state.
    """
    import modelopt.torch.quantization as mtq

    from auto_quantize_model.backend.lm_forward import TextLM, next_token_loss

    _, state = mtq.auto_quantize(
        TextLM(decoder, head),
        constraints={"effective_bits": 8.0},
        quantization_formats=list(formats),
        data_loader=list(batches),
        forward_step=lambda m, b: m(b),
        loss_func=next_token_loss,
        num_calib_steps=2,
        num_score_steps=2,
        verbose=False,
        method="gradient",
    )
    searched: dict[str, Any] = state
    return searched


def tiny_moe_search(
    loaded: Any,
    experts: Literal["layer", "expert", "projection"] = "layer",
    formats: Sequence[str] = (INT8, FP8),
    fused_experts: Literal["batched", "modelopt"] = "batched",
) -> Any:
    """The three search stages of a real AutoQuant on ``loaded`` (a tiny MoE): 8 captions of 32
    tokens, 12 effective bits, score size 8. Returns the pipeline's store (scores, calibration)."""
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    spec = AutoQuantSpec(
        formats=tuple(formats), effective_bits=12.0, score_size=8, fused_experts=fused_experts
    )
    return Pipeline(
        [
            ExtractLM(ExtractSpec(experts=experts)),
            BuildCalibLoader(CalibSpec(max_samples=8, seq_len=32, batch_size=4)),
            RunAutoQuant(spec),
        ],
        supplied=[loaded],
    ).run()


def benchmark_script(name: str) -> Any:
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package), registered in
    ``sys.modules`` so that dataclasses and pickling inside it find their module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_llama(vocab_size: int = 96, layers: int = 3, seed: int = 0) -> Any:
    """A small Llama (SmolLM2's architecture) with tied embeddings and seeded weights, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    return model


# --------------------------------------------------------------------------------------------------
# Run folders
# --------------------------------------------------------------------------------------------------

STATE_KIT = ("autoquant_search_state.pt", "autoquant_search_state.pt.raw-scores.json")
"""The search state and its raw-score record: what a run folder keeps to resume."""


def tree(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("aqm: error:")]


MOE_LAYERS = "model.language_model.layers"


def moe_manifest(layers: int, experts: int, grouping: str) -> Any:
    """A ranked manifest shaped like 30B-A3B scored with ``grouping`` (importances made up).

    Importances fall with the position in network order, so ranks are predictable: each layer's
    attention first, expert ``e`` of layer ``l`` below every expert of earlier layers.
    """
    rows: list[tuple[str, float, tuple[str, ...]]] = []
    for layer in range(layers):
        qkv = f"{MOE_LAYERS}.{layer}.self_attn.q_proj"
        rows.append((qkv, 1.0, (qkv, qkv[:-6] + "k_proj", qkv[:-6] + "v_proj")))
        rows.append(
            (f"{MOE_LAYERS}.{layer}.self_attn.o_proj", 0.5, (f"{MOE_LAYERS}.{layer}.self_attn.o_proj",))
        )
        if grouping == "layer":
            rows.append((f"{MOE_LAYERS}.{layer}.mlp.experts", 0.25, (f"{MOE_LAYERS}.{layer}.mlp.experts",)))
            continue
        for expert in range(experts):
            stem = f"{MOE_LAYERS}.{layer}.mlp.experts.{expert}"
            value = 1e-3 / (1 + layer * experts + expert)
            if grouping == "expert":
                rows.append(
                    (
                        f"{stem}.gate_proj",
                        value,
                        (f"{stem}.gate_proj", f"{stem}.up_proj", f"{stem}.down_proj"),
                    )
                )
            else:
                rows.append((f"{stem}.gate_proj", value, (f"{stem}.gate_proj", f"{stem}.up_proj")))
                rows.append((f"{stem}.down_proj", value / 2, (f"{stem}.down_proj",)))
    rows.append(("lm_head", 2.0, ("lm_head",)))
    ordered = sorted(rows, key=lambda row: -row[1])
    built = manifest([(name, value) for name, value, _ in ordered], scheme=f"moe_{grouping}")
    modules = {name: mods for name, _, mods in rows}
    return attrs.evolve(
        built, groups=tuple(attrs.evolve(g, module_names=modules[g.name]) for g in built.groups)
    )


def routing(*layers: Sequence[int], top_k: int = 2) -> RoutingStats:
    """Routed-token counts, one tuple per layer (layer numbers 0, 1, ...); the tokens counted are
    what the first layer's counts imply (every token goes to ``top_k`` experts)."""
    return RoutingStats(
        real_tokens=sum(layers[0]) // top_k,
        batches=1,
        layers=tuple(
            LayerRouting(index, f"{MOE_LAYERS}.{index}.mlp.experts", top_k, tuple(tokens))
            for index, tokens in enumerate(layers)
        ),
    )
