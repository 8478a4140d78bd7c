"""RunAutoQuant: pure conversions of ModelOpt's state, then real AutoQuant runs on a tiny Qwen3-VL."""

from __future__ import annotations

import gc
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from auto_quantize_model.artifacts import (
    CalibData,
    CalibStats,
    LanguageModel,
    QuantSearch,
    Scope,
    SensitivityScores,
)
from auto_quantize_model.backend.modelopt import search as search_module
from auto_quantize_model.backend.modelopt.plan import lm_membership, textlm_name_map
from auto_quantize_model.backend.modelopt.state import (
    StateReading,
    nonfinite_message,
    review_search,
    scores_from_state,
)
from auto_quantize_model.core.bits import model_constraint
from auto_quantize_model.core.frontier import modelopt_frontier
from auto_quantize_model.core.frontier_space import fixed_row, space_from_scores, space_from_state
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.spec_values import parse_budgets
from auto_quantize_model.specs import AutoQuantSpec
from auto_quantize_model.stages.run_autoquant import RunAutoQuant
from builders import tiny_qwen3_vl

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.backend.modelopt.search import AutoQuantize


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


class FakeRecipe:
    """Stands in for ModelOpt's QuantRecipe: only its ``str()`` matters."""

    def __init__(self, name: str, bits: float) -> None:
        self.label = f"{name}(effective-bits: {bits})"

    def __str__(self) -> str:
        return self.label


class FakeScalar:
    """Stands in for a one-element tensor (KL-divergence scores arrive that way)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def item(self) -> float:
        return self.value


INT4, INT8, NONE = (
    FakeRecipe("INT4_AWQ_CFG", 4.0),
    FakeRecipe("INT8_DEFAULT_CFG", 8.0),
    FakeRecipe("NONE", 16.0),
)


def _state(
    prefix: str, extra: dict[str, Any] | None = None, chosen: dict[str, Any] | None = None
) -> dict[str, Any]:
    head = "lm_head"
    stats: dict[str, Any] = {
        f"{prefix}.layers.0.self_attn.q_proj.quant_recipe": {
            "formats": [INT8, NONE],
            "scores": [FakeScalar(2.0), 0],
            "costs": [50.0, 100.0],
            "module_names": [f"{prefix}.layers.0.self_attn.{p}_proj" for p in "qkv"],
            "uncompressed_cost": 100.0,
        },
        f"{prefix}.layers.0.mlp.down_proj.quant_recipe": {  # no uncompressed_cost: older ModelOpt
            "formats": [INT4, INT8, NONE],
            "scores": [3.0, 1.0, 0.0],
            "costs": [25.0, 50.0, 100.0],
            "module_names": [f"{prefix}.layers.0.mlp.down_proj"],
        },
        f"{head}.quant_recipe": {
            "formats": [INT8, NONE],
            "scores": [5.0, 0.0],
            "costs": [100.0, 200.0],
            "module_names": [head],
            "uncompressed_cost": 200.0,
        },
        **(extra or {}),
    }
    best = {
        f"{prefix}.layers.0.self_attn.q_proj.quant_recipe": INT8,
        f"{prefix}.layers.0.mlp.down_proj.quant_recipe": INT4,
        f"{head}.quant_recipe": NONE,
        **(chosen or {}),
    }
    return {
        "method": "gradient",
        "candidate_stats": stats,
        "best": {"recipe": best, "constraints": {"effective_bits": 9.5}, "score": 5.0, "is_satisfied": True},
    }


def _same(name: str) -> str:
    return name


def _read(
    state: dict[str, Any],
    name_map: Callable[[str], str] = _same,
    is_lm: Callable[[str], bool] = lambda name: True,
    raw_scores: dict[str, dict[str, float]] | None = None,
) -> StateReading:
    """``scores_from_state`` with fixed values for what the stage adds (see the first test)."""
    return scores_from_state(
        state,
        name_map,
        is_lm,
        raw_scores,
        formats=("INT4_AWQ_CFG", "INT8_DEFAULT_CFG"),
        method="gradient",
        scope="language_model",
        effective_bits_target=9.0,
        calib_steps=3,
        score_steps=2,
        score_samples=7,
        autoquant_seconds=1.5,
        state_path="state.pt",
        calib_forward_steps=3,
        score_forward_steps=0,
        warnings=("autoquant.score_size 99 exceeds the 7 calibration captions; all 7 were used",),
    )


def test_scores_from_state_textlm() -> None:
    reading = _read(_state("decoder"), textlm_name_map("model.language_model", "lm_head"))
    summary = reading.scores
    names = [g.name for g in summary.groups]
    assert names == [
        "model.language_model.layers.0.self_attn.q_proj",
        "model.language_model.layers.0.mlp.down_proj",
        "lm_head",
    ]
    q, down, head = summary.groups
    assert q.module_names == tuple(f"model.language_model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert q.formats == ("INT8_DEFAULT_CFG", "NONE")
    assert q.bits == (8.0, 16.0)
    assert q.scores == (2.0, 0.0)
    assert all(type(s) is float for s in q.scores)
    assert (q.best_format, down.best_format, head.best_format) == ("INT8_DEFAULT_CFG", "INT4_AWQ_CFG", "NONE")
    assert down.formats == ("INT4_AWQ_CFG", "INT8_DEFAULT_CFG", "NONE")
    assert down.costs == (25.0, 50.0, 100.0)
    # chosen costs 50 + 25 + 200 over weights 100 + 100 + 200
    assert summary.effective_bits_lm == pytest.approx(16 * 275 / 400)
    assert summary.effective_bits_model == 9.5  # ModelOpt's own figure, as reported
    assert (summary.total_score, summary.satisfied, reading.ran_method) == (5.0, True, "gradient")
    assert (reading.lm_weights, reading.other_weights) == (400, 0)
    assert (reading.disabled, reading.other, reading.nonfinite) == ((), (), ())
    # what the stage passes in lands in the scores unchanged
    assert summary.formats == ("INT4_AWQ_CFG", "INT8_DEFAULT_CFG")
    assert (summary.method, summary.scope, summary.effective_bits_target) == (
        "gradient",
        "language_model",
        9.0,
    )
    assert (summary.calib_steps, summary.score_steps, summary.score_samples) == (3, 2, 7)
    assert (summary.autoquant_seconds, summary.state_path) == (1.5, "state.pt")
    assert (summary.calib_forward_steps, summary.score_forward_steps) == (3, 0)
    assert summary.warnings == (
        "autoquant.score_size 99 exceeds the 7 calibration captions; all 7 were used",
    )


def test_review_search_refuses_a_method_other_than_asked() -> None:
    reading = _read(_state("decoder"), textlm_name_map("model.language_model", "lm_head"))
    review_search(reading, allow_nonfinite=False, other_weights=0)  # as asked: no complaint
    with pytest.raises(AqmError, match=r"^ModelOpt ran method 'kl_div', asked for 'gradient'$"):
        review_search(attrs.evolve(reading, ran_method="kl_div"), allow_nonfinite=False, other_weights=0)


def test_scores_from_state_full_model_keeps_vision_out_of_groups_and_lm_bits() -> None:
    prefix = "model.language_model"
    extra = {
        "model.visual.blocks.0.attn.qkv.quant_recipe": {
            "formats": [NONE],
            "scores": [0.0],
            "costs": [300.0],
            "module_names": ["model.visual.blocks.0.attn.qkv"],
            "uncompressed_cost": 300.0,
        },
        f"{prefix}.layers.1.mlp.down_proj.quant_recipe": {  # disabled by the user: NONE only
            "formats": [NONE],
            "scores": [0.0],
            "costs": [100.0],
            "module_names": [f"{prefix}.layers.1.mlp.down_proj"],
            "uncompressed_cost": 100.0,
        },
    }
    chosen = {
        "model.visual.blocks.0.attn.qkv.quant_recipe": NONE,
        f"{prefix}.layers.1.mlp.down_proj.quant_recipe": NONE,
    }
    state = _state(prefix, extra, chosen)
    del state["best"]["constraints"]  # fall back to our own whole-model arithmetic
    reading = _read(state, is_lm=lm_membership(prefix, "lm_head"))
    summary = reading.scores
    assert [g.name for g in summary.groups] == [
        f"{prefix}.layers.0.self_attn.q_proj",
        f"{prefix}.layers.0.mlp.down_proj",
        "lm_head",
    ]
    assert reading.other == ("model.visual.blocks.0.attn.qkv",)
    assert reading.disabled == (f"{prefix}.layers.1.mlp.down_proj",)
    # LM: chosen 50 + 25 + 200 + 100 (disabled, 16 bits) over 500; whole: + 300 vision at 16 bits
    assert summary.effective_bits_lm == pytest.approx(16 * 375 / 500)
    assert summary.effective_bits_model == pytest.approx(16 * 675 / 800)
    assert (reading.lm_weights, reading.other_weights) == (500, 300)
    # the constraint RunAutoQuant would pass for this LM target lands exactly on the whole-model figure
    assert model_constraint(summary.effective_bits_lm, 500, 300) == pytest.approx(
        summary.effective_bits_model
    )


def test_scores_from_state_flags_nonfinite_scores() -> None:
    state = _state("decoder")
    state["candidate_stats"]["lm_head.quant_recipe"]["scores"] = [math.nan, 0.0]
    state["candidate_stats"]["decoder.layers.0.mlp.down_proj.quant_recipe"]["scores"] = [math.inf, 1.0, 0.0]
    reading = _read(state, textlm_name_map("model.language_model", "lm_head"))
    assert reading.nonfinite == ("model.language_model.layers.0.mlp.down_proj", "lm_head")
    message = nonfinite_message(reading.nonfinite)
    assert "2 recipe group(s): model.language_model.layers.0.mlp.down_proj, lm_head" in message
    assert "allow_nonfinite" in message
    assert "\n" not in message
    many = nonfinite_message([f"g{i}" for i in range(8)])
    assert "g0, g1, g2, g3, g4 and 3 more" in many


# --------------------------------------------------------------------------------------------------
# Real AutoQuant on a tiny Qwen3-VL (random weights) on CPU
# --------------------------------------------------------------------------------------------------

PREFIX, HEAD, VISION = "model.language_model", "lm_head", "model.visual"


def _tiny_model() -> nn.Module:
    return tiny_qwen3_vl(vocab_size=512, max_positions=1024, vision_depth=2, first_special_id=500)


def _language_model(model: nn.Module, scope: Scope) -> LanguageModel:
    return LanguageModel(
        module=model.get_submodule(PREFIX),
        lm_head=model.get_submodule(HEAD),
        prefix=PREFIX,
        head_name=HEAD,
        full_model=model,
        vision_modules=(VISION,),
        scope=scope,
        pad_token_id=0,
    )


def _calib(batches: int = 3, rows: int = 2, length: int = 16) -> CalibData:
    """Packed-style rows: two captions per row, positions restarting, no loss across the boundary."""
    import torch

    generator = torch.Generator().manual_seed(1)
    half = length // 2
    data = []
    for _ in range(batches):
        ids = torch.randint(0, 500, (rows, length), generator=generator)
        positions = torch.arange(half).repeat(2).expand(rows, length).clone()
        labels = ids.clone()
        labels[:, 0] = -100
        labels[:, half] = -100
        data.append({"input_ids": ids, "position_ids": positions, "labels": labels})
    captions = 2 * rows
    stats = CalibStats(
        captions_path="hand-built",
        captions_sha256="0" * 64,
        layout="packed",
        seq_len=length,
        batch_size=rows,
        max_samples=captions * batches,
        samples=captions * batches,
        real_tokens=rows * length * batches,
        total_tokens=rows * length * batches,
        batches=batches,
        truncated_samples=0,
    )
    return CalibData(batches=tuple(data), captions_per_batch=(captions,) * batches, stats=stats)


def _linear_names(model: nn.Module, keep: Callable[[str], bool]) -> set[str]:
    from torch import nn

    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and keep(name)}


def _weights(model: nn.Module, keep: Callable[[str], bool]) -> int:
    from torch import nn

    kinds = (nn.Linear, nn.Conv3d)
    return sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, kinds) and keep(n))


@pytest.fixture(scope="module")
def quiet_modelopt() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization  # noqa: F401  (import once, quietly)


def _run(
    scope: Scope, spec: AutoQuantSpec, tmp: Path, auto_quantize: AutoQuantize | None = None
) -> tuple[nn.Module, SensitivityScores]:
    """One RunAutoQuant on a fresh tiny model; the search state goes under ``tmp``, not /tmp."""
    import tempfile

    model = _tiny_model()
    if spec.checkpoint is None:
        spec = attrs.evolve(spec, checkpoint=str(Path(tempfile.mkdtemp(dir=tmp)) / "state.pt"))
    stage = RunAutoQuant(spec, auto_quantize=auto_quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result, search = stage.run(Artifacts.of([_language_model(model, scope), _calib()]))
    assert isinstance(search, QuantSearch)
    assert search.model is model  # the searched model, quantizers inside, handed on
    assert (search.formats, search.method) == (result.formats, result.method)
    return model, result


def _load_state(result: SensitivityScores) -> dict[str, Any]:
    import torch

    assert result.state_path is not None
    state: dict[str, Any] = torch.load(result.state_path, weights_only=False)
    return state


def _assert_sound(
    model: nn.Module,
    result: SensitivityScores,
    scope: Scope,
    disabled: Callable[[str], bool] = lambda n: False,
) -> None:
    """Every LM linear scored (but the disabled), nothing from vision, budget met, model left clean."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    is_lm = lm_membership(PREFIX, HEAD)
    scored = {m for g in result.groups for m in g.module_names}
    assert scored == _linear_names(model, lambda n: is_lm(n) and not disabled(n))
    for name in _linear_names(model, disabled):
        layer: Any = model.get_submodule(name)
        assert not layer.weight_quantizer.is_enabled, name
    assert not any(m.startswith(VISION) for g in result.groups for m in (g.name, *g.module_names))
    for group in result.groups:
        assert all(math.isfinite(s) for s in group.scores), group
        assert group.formats[-1] == "NONE"
        assert group.best_format in group.formats
        assert set(group.formats) == {*result.formats, "NONE"}
        assert any(s != 0.0 for s, f in zip(group.scores, group.formats, strict=True) if f != "NONE"), group
        # the search's choice is what the model now carries
        layer = model.get_submodule(group.module_names[0])
        assert layer.weight_quantizer.is_enabled == (group.best_format != "NONE"), group
    assert result.satisfied
    assert result.effective_bits_lm <= result.effective_bits_target + 1e-9
    lm_weights = _weights(model, is_lm)
    vision_weights = _weights(model, lambda n: not is_lm(n)) if scope == "full_model" else 0
    expected_model = (result.effective_bits_lm * lm_weights + 16.0 * vision_weights) / (
        lm_weights + vision_weights
    )
    assert result.effective_bits_model == pytest.approx(expected_model)
    vision_quantizers = [
        m for n, m in model.named_modules() if n.startswith(VISION) and isinstance(m, TensorQuantizer)
    ]
    assert not any(q.is_enabled for q in vision_quantizers)
    if scope == "language_model":
        assert vision_quantizers == []
    assert not any(m.training for m in model.modules())
    assert not model.is_gradient_checkpointing
    assert not model.get_submodule(PREFIX).is_gradient_checkpointing


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_language_model_scope_gradient_int8_fp8(tmp_path: Path, mocker: Any) -> None:
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    spec = AutoQuantSpec(
        formats=("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"),
        effective_bits=11.0,
        score_size=4,
        disabled_layers=(f"{PREFIX}.layers.1.mlp.*",),  # full-model names, though TextLM is the root
    )
    collect = gc.collect
    frozen_during_collect: list[int] = []

    def registered() -> bool:
        return any(
            entry[0].__name__ == "_is_textlm" for entry in AutoQuantizeGradientSearcher._custom_support
        )

    textlm_registered: list[bool] = []

    def recording_collect(*args: Any) -> int:
        frozen_during_collect.append(gc.get_freeze_count())
        textlm_registered.append(registered())
        return collect(*args)

    mocker.patch("gc.collect", recording_collect)
    model, result = _run("language_model", spec, tmp_path)
    mocker.stopall()
    # ModelOpt's full collections around scoring ran with the older heap frozen, and it was thawed
    assert frozen_during_collect
    assert all(count > 0 for count in frozen_during_collect)
    assert gc.get_freeze_count() == 0
    _assert_sound(model, result, "language_model", lambda n: n.startswith(f"{PREFIX}.layers.1.mlp."))
    assert (result.method, result.scope, result.calib_steps, result.score_steps, result.score_samples) == (
        "gradient",
        "language_model",
        3,
        1,
        4,
    )
    assert _load_state(result)["method"] == "gradient"
    assert result.effective_bits_lm == result.effective_bits_model
    # TextLM is scored like an HF model (embedding-only grads, checkpointed decoder layers) while
    # ModelOpt scores, and ModelOpt's registry is as it was once the stage is done
    assert any(textlm_registered)
    assert not registered()


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_full_model_scope_kl_div_int8_budget_excludes_vision(tmp_path: Path) -> None:
    # 12 bits over the LM alone; over the whole model (vision at 16 bits) INT8 could not even reach 12
    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), method="kl_div", effective_bits=12.0, score_size=2)
    model, result = _run("full_model", spec, tmp_path)
    _assert_sound(model, result, "full_model")
    assert _load_state(result)["method"] == "kl_div"
    assert result.effective_bits_model > result.effective_bits_lm
    assert result.effective_bits_lm > 8.0  # the budget was used, not undercut to pay for vision


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_full_model_scope_gradient_int8_fp8(tmp_path: Path) -> None:
    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"), effective_bits=10.0, score_size=4)
    model, result = _run("full_model", spec, tmp_path)
    _assert_sound(model, result, "full_model")
    assert _load_state(result)["method"] == "gradient"


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_language_model_kl_div_custom_format_and_checkpoint_resume(tmp_path: Path, mocker: Any) -> None:
    from auto_quantize_model.backend import lm_forward

    checkpoint = tmp_path / "search" / "state.pt"
    spec = AutoQuantSpec(
        formats=("INT8_DEFAULT_CFG", "wint4-b64_aint8-token"),
        method="kl_div",
        effective_bits=8.0,
        score_size=4,
        checkpoint=str(checkpoint),
    )
    model, first = _run("language_model", spec, tmp_path)
    _assert_sound(model, first, "language_model")
    assert {g.formats for g in first.groups} == {("wint4-b64_aint8-token", "INT8_DEFAULT_CFG", "NONE")}
    assert first.groups[0].bits == (4.0, 8.0, 16.0)
    assert first.state_path == str(checkpoint)
    assert checkpoint.is_file()
    record = json.loads(checkpoint.with_name("state.pt.settings.json").read_text(encoding="utf-8"))
    assert (record["formats"], record["score_steps"]) == (list(spec.formats), 1)

    # rerun on a fresh model: calibration and scores come from the file, no forward pass at all
    forwards = mocker.spy(lm_forward, "selected_logits")
    model, again = _run("language_model", spec, tmp_path)
    assert forwards.call_count == 0
    assert again.groups == first.groups
    assert (again.calib_forward_steps, again.score_forward_steps) == (0, 0)
    assert first.calib_forward_steps
    assert first.score_forward_steps

    def timeless(result: SensitivityScores) -> SensitivityScores:
        return attrs.evolve(result, autoquant_seconds=0.0, calib_forward_steps=None, score_forward_steps=None)

    assert timeless(again) == timeless(first)

    # other settings with the same file are refused before anything runs
    with pytest.raises(ConfigError, match=r"state\.pt was saved with other settings \(score_steps: 1 -> 2\)"):
        _run("language_model", attrs.evolve(spec, score_size=5), tmp_path)
    assert forwards.call_count == 0


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_nonfinite_scores_fail_unless_allowed(tmp_path: Path) -> None:
    def fake_auto_quantize(model: nn.Module, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
        state = _state("decoder")
        state["candidate_stats"]["lm_head.quant_recipe"]["scores"] = [math.nan, 0.0]
        return model, state

    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=8.0)
    with pytest.raises(
        AqmError, match=r"NaN or infinite sensitivity scores for 1 recipe group\(s\): lm_head;"
    ):
        _run("language_model", spec, tmp_path, fake_auto_quantize)
    _, result = _run("language_model", attrs.evolve(spec, allow_nonfinite=True), tmp_path, fake_auto_quantize)
    assert math.isnan(result.groups[-1].scores[0])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"formats": ("NVFP4_DEFAULT_CFG",), "effective_bits": 4.5}, "needs a CUDA GPU"),
        ({"formats": ("FP8_KV_CFG",)}, "KV-cache preset"),
        ({"formats": ("INT8_DEFAULT_CFG",), "effective_bits": 6.0}, "below the minimum reachable"),
        ({"formats": ("INT8_DEFAULT_CFG",), "effective_bits": 17.0}, r"must be in \(0, 16\]"),
        ({"formats": ("INT8_DEFAULT_CFG",), "score_size": 0}, "score_size:? must be > 0"),
        ({"formats": ("int8_default",)}, "did you mean 'INT8_DEFAULT_CFG'"),
    ],
)
def test_bad_settings_refused_before_modelopt(settings: dict[str, Any], message: str) -> None:
    model = _tiny_model()

    def run() -> None:
        # out-of-range values are refused by the spec itself, the rest by the stage before ModelOpt
        RunAutoQuant(AutoQuantSpec(**settings)).run(
            Artifacts.of([_language_model(model, "language_model"), _calib()])
        )

    with pytest.raises(ConfigError, match=message):
        run()
    assert not any("Quant" in type(m).__name__ for m in model.modules())  # ModelOpt never touched it


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_releasing_output_diffs_keeps_scores_identical(tmp_path: Path, mocker: Any) -> None:
    aq = search_module
    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"), effective_bits=12.0, score_size=8)
    released: list[int] = []
    real_release = aq.release_output_diffs

    def counting_release(model: nn.Module) -> list[Any]:
        hooks = real_release(model)
        released.append(len(hooks))
        return hooks

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mocker.patch.object(aq, "release_output_diffs", counting_release)
    model_a, freed = _run("language_model", spec, tmp_path / "a")
    assert released  # hooks went on every scored linear
    assert released[0] > 0
    assert not any(hasattr(m, "output_diff_dict") for m in model_a.modules())

    mocker.patch.object(aq, "release_output_diffs", return_value=[])
    _, kept = _run("language_model", spec, tmp_path / "b")
    assert [g.scores for g in freed.groups] == [g.scores for g in kept.groups]


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_lm_head_chunking_leaves_scores_unchanged(tmp_path: Path, mocker: Any) -> None:
    import auto_quantize_model.backend.lm_forward as lf

    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, whole = _run("language_model", spec, tmp_path / "a")
    mocker.patch.object(lf, "HEAD_CHUNK_TOKENS", 5)
    _, chunked = _run("language_model", spec, tmp_path / "b")
    for a, b in zip(whole.groups, chunked.groups, strict=True):
        assert a.name == b.name
        assert a.scores == pytest.approx(b.scores, rel=1e-4)


def test_scores_from_state_prefers_unclamped_raw_scores() -> None:
    # ModelOpt clamped INT8 to INT4's 3.0 (and would hide INT8 > INT4); the raw record has 3.5
    raw = {
        "decoder.layers.0.mlp.down_proj.quant_recipe": {str(INT4): 3.0, str(INT8): 3.5, str(NONE): 0.0},
        # incomplete record: that group keeps candidate_stats' scores
        "decoder.layers.0.self_attn.q_proj.quant_recipe": {str(INT8): 9.0},
    }
    summary = _read(
        _state("decoder"), textlm_name_map("model.language_model", "lm_head"), raw_scores=raw
    ).scores
    q, down, _ = summary.groups
    assert down.scores == (3.0, 3.5, 0.0)
    assert q.scores == (2.0, 0.0)
    assert summary.total_score == 5.0  # the search's own figure is unchanged


@pytest.mark.slow
def test_pytorch_kernels_search_without_modelopts_extensions(quiet_modelopt: None, tmp_path: Path) -> None:
    from modelopt.torch import quantization as mtq
    from modelopt.torch.quantization import extensions

    seen: list[object] = []

    def search(model: nn.Module, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
        seen.extend([extensions.get_cuda_ext(), extensions.get_cuda_ext_fp8()])
        searched: tuple[nn.Module, dict[str, Any]] = mtq.auto_quantize(model, **kwargs)
        return searched

    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8, kernels="pytorch")
    model, result = _run("language_model", spec, tmp_path, auto_quantize=search)
    assert seen == [None, None]
    _assert_sound(model, result, "language_model")


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_keeping_host_memory_during_the_search_keeps_scores_identical(tmp_path: Path, mocker: Any) -> None:
    import contextlib

    import auto_quantize_model.backend.host_memory as hm

    spec = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    entered: list[str] = []
    real_kept = hm.host_memory_kept

    @contextlib.contextmanager
    def counted(device: Any) -> Any:
        entered.append(device.type)
        with real_kept(device):
            yield

    mocker.patch.object(hm, "host_memory_kept", counted)
    _, kept = _run("language_model", spec, tmp_path / "a")
    assert entered == ["cpu"]
    assert hm._kept_depth == [0]  # the allocator's defaults are back
    mocker.patch.object(hm, "host_memory_kept", return_value=contextlib.nullcontext())
    _, plain = _run("language_model", spec, tmp_path / "b")
    assert [g.scores for g in kept.groups] == [g.scores for g in plain.groups]


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_modelopt")
def test_awq_alpha_step_reaches_modelopts_search_under_its_own_name(tmp_path: Path, mocker: Any) -> None:
    """The same AWQ-lite preset twice in one pass, ModelOpt's grid and a coarser one: both scored, each
    labelled by the name the user wrote, and ModelOpt's AWQ-lite got the step each name asked for."""
    from modelopt.torch.quantization import model_calib

    coarse = "INT4_AWQ_CFG:alpha_step=0.5"
    awq = mocker.spy(model_calib, "awq_lite")
    spec = AutoQuantSpec(formats=("INT4_AWQ_CFG", coarse), effective_bits=8.0, score_size=4)
    model, result = _run("language_model", spec, tmp_path)
    _assert_sound(model, result, "language_model")
    assert {g.formats[-1] for g in result.groups} == {"NONE"}
    assert {frozenset(g.formats) for g in result.groups} == {frozenset({"INT4_AWQ_CFG", coarse, "NONE"})}
    steps = sorted(call.kwargs.get("alpha_step", 0.1) for call in awq.call_args_list)
    assert steps == [0.1, 0.5]
    # the two grids choose different scales, so the same layers score differently
    fine = [g.scores[g.formats.index("INT4_AWQ_CFG")] for g in result.groups]
    assert [g.scores[g.formats.index(coarse)] for g in result.groups] != fine
    import modelopt.torch.quantization.config as mtq_config

    assert not hasattr(mtq_config, coarse)  # registered for the search only


# --------------------------------------------------------------------------------------------------
# Exactness against ModelOpt 0.47 (real auto_quantize on the tiny Qwen3-VL, CPU)
# --------------------------------------------------------------------------------------------------


def _modelopt_runs(
    tmp_path: Path, scope: str, method: str, budgets: Sequence[float], disabled: tuple[str, ...] = ()
) -> tuple[list[Any], dict[str, Any]]:
    """RunAutoQuant at each budget on one checkpoint: the first run scores, the others only search."""
    from auto_quantize_model.specs import AutoQuantSpec
    from builders import FP8, INT8

    checkpoint = str(tmp_path / "state.pt")
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bits in budgets:
            spec = AutoQuantSpec(
                formats=(INT8, FP8),
                method=method,  # type: ignore[arg-type]
                effective_bits=bits,
                score_size=4,
                disabled_layers=disabled,
                checkpoint=checkpoint,
            )
            results.append(_run(scope, spec, tmp_path)[1])  # type: ignore[arg-type]
    return results, _load_state(results[0])


def _assert_matches(frontier: Any, results: Sequence[Any]) -> None:
    for result in results:
        point = frontier.point(result.effective_bits_target)
        assert frontier.groups == tuple(g.name for g in result.groups)
        assert point.formats == tuple(g.best_format for g in result.groups), result.effective_bits_target
        assert point.total_score == result.total_score
        assert point.effective_bits_model == result.effective_bits_model
        assert point.effective_bits_lm == result.effective_bits_lm
        assert point.satisfied == result.satisfied


@pytest.mark.slow
def test_gradient_choice_is_modelopts_at_each_budget(tmp_path: Path) -> None:
    """INT8 and FP8 tie on clamped scores everywhere here, so CBC's tie-breaks are under test too;
    the disabled MLP of layer 1 puts one-format rows in the middle of ModelOpt's order."""
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    from auto_quantize_model.backend.modelopt.plan import textlm_name_map

    budgets = (11.0, 10.0, 13.5)
    results, state = _modelopt_runs(
        tmp_path, "language_model", "gradient", budgets, disabled=(f"{PREFIX}.layers.1.mlp.*",)
    )
    name_map = textlm_name_map(PREFIX, HEAD)
    space = space_from_state(state, name_map)
    assert space.exact_order
    assert any(not r.reported for r in space.rows[:-1])  # fixed rows sit inside the order
    _assert_matches(modelopt_frontier(space, budgets), results)

    # the same space rebuilt from plain scores: raw scores, the fixed rows and the order
    fixed = [fixed_row(r.name, r.weights, lm=r.lm) for r in space.rows if not r.reported]
    rebuilt = space_from_scores(
        results[0].groups, "gradient", fixed=fixed, order=[r.name for r in space.rows]
    )
    assert rebuilt.rows == space.rows
    _assert_matches(modelopt_frontier(rebuilt, budgets), results)

    # ModelOpt's own re-solve (get_auto_quantize_config's) over many more budgets
    many = parse_budgets("10:16:0.5")
    frontier = modelopt_frontier(space, many)
    lm, other = space.lm_weights, space.other_weights
    for point in frontier.points:
        if not point.reachable:
            continue
        chosen = _resolve_best_recipe(state, {"effective_bits": model_constraint(point.budget, lm, other)})
        theirs = {
            name_map(key.removesuffix(".quant_recipe")): str(r).split("(")[0] for key, r in chosen.items()
        }
        assert point.formats == tuple(theirs[g] for g in frontier.groups), point.budget


@pytest.mark.slow
def test_kl_div_choice_is_modelopts_with_vision_rows_first(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt.plan import lm_membership

    budgets = (12.0, 10.0, 14.0)
    results, state = _modelopt_runs(tmp_path, "full_model", "kl_div", budgets)
    space = space_from_state(state, is_lm=lm_membership(PREFIX, HEAD))
    assert not space.rows[0].lm  # the vision tower's rows come first
    _assert_matches(modelopt_frontier(space, budgets), results)
    # without ModelOpt's order (today's SensitivityScores): kl_div's bisection does not depend on it
    plain = space_from_scores(
        results[0].groups, "kl_div", lm_weights=space.lm_weights, other_weights=space.other_weights
    )
    assert not plain.exact_order
    _assert_matches(modelopt_frontier(plain, budgets), results)
