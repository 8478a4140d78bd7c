"""``autoquant.cost_model = "active"`` in ModelOpt's own search: its ``active_moe`` cost model.

The tiny MoE (``builtin:tiny-qwen3-vl-moe``: 2 layers of 4 fused experts, top-2, so a routed
expert counts at 2 / 4 = 0.5) is planned by hand; the state ModelOpt returns is read back as
storage figures; a changed cost model is refused before a resume; and one real CPU search
(``slow``) shows that ModelOpt got the ratio, that the scores stay storage figures and that the
frontier's run check replays the search it really ran.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from auto_quantize_model.artifacts import BudgetFrontier, LanguageModel, LoadedModel, SensitivityScores
from auto_quantize_model.backend.modelopt.checkpoint import SearchCheckpoint, StateFiles, search_settings
from auto_quantize_model.backend.modelopt.plan import plan_search
from auto_quantize_model.backend.modelopt.state import review_search, scores_from_state
from auto_quantize_model.backend.models import build_builtin
from auto_quantize_model.core.routing import chosen_bits, group_shares
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.sources import TINY_QWEN3_VL, TINY_QWEN3_VL_MOE
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, FrontierSpec
from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
from auto_quantize_model.stages.extract_lm import ExtractLM
from auto_quantize_model.stages.run_autoquant import RunAutoQuant
from auto_quantize_model.stages.solve_budgets import SolveBudgets

LAYERS, EXPERTS, TOP_K = 2, 4, 2
HIDDEN = MLP = 128
EXPERT_WEIGHTS = 3 * HIDDEN * MLP  # gate, up and down of one expert
ALL_EXPERTS = LAYERS * EXPERTS * EXPERT_WEIGHTS
INT8, FP8 = "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"


def tiny(source: str = TINY_QWEN3_VL_MOE) -> LoadedModel:
    return build_builtin(source, seed=0, dtype="float32", device="cpu")


def extracted(loaded: LoadedModel, scope: Any = "language_model") -> LanguageModel:
    lm = ExtractLM(ExtractSpec(scope=scope)).run(Artifacts.of([loaded]))
    assert isinstance(lm, LanguageModel)
    return lm


def linear_weights(root: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> int:
    return sum(m.weight.numel() for n, m in root.named_modules() if isinstance(m, nn.Linear) and keep(n))


# --------------------------------------------------------------------------------------------------
# The plan: ratio, weight counts, constraint
# --------------------------------------------------------------------------------------------------


def test_active_plan_counts_each_routed_expert_at_top_k_over_experts() -> None:
    lm = extracted(tiny())
    plan = plan_search(lm, AutoQuantSpec(formats=(INT8,), effective_bits=10.0, cost_model="active"))
    dense = linear_weights(plan.root)  # attention and lm_head: the fused experts are no nn.Linear
    assert plan.expert_ratio == 0.5
    assert plan.cost_model == "active_moe"
    assert plan.lm_weights == dense + ALL_EXPERTS * 0.5
    assert plan.constraint == 10.0  # language_model scope: nothing outside the LM is costed
    assert plan.constraints == {
        "effective_bits": 10.0,
        "cost_model": "active_moe",
        "cost": {"active_moe_expert_ratio": 0.5},
    }
    storage = plan_search(lm, AutoQuantSpec(formats=(INT8,), effective_bits=10.0))
    assert (storage.expert_ratio, storage.cost_model) == (None, "weight")
    assert storage.lm_weights == dense + ALL_EXPERTS
    assert storage.constraints == {"effective_bits": 10.0}


def test_active_plan_in_full_model_scope_raises_the_constraint_over_active_lm_weights() -> None:
    lm = extracted(tiny(), "full_model")
    plan = plan_search(lm, AutoQuantSpec(formats=(INT8,), effective_bits=10.0, cost_model="active"))
    vision = linear_weights(lm.full_model, lambda n: n.startswith("model.visual")) + sum(
        m.weight.numel() for n, m in lm.full_model.named_modules() if isinstance(m, nn.Conv3d)
    )
    lm_active = linear_weights(lm.full_model, lambda n: not n.startswith("model.visual")) + ALL_EXPERTS * 0.5
    assert plan.other_weights == vision
    assert plan.lm_weights == lm_active
    # the LM at 10 active bits, the vision tower at 16, over both: ModelOpt's whole-model figure
    assert plan.constraint == (10.0 * lm_active + 16.0 * vision) / (lm_active + vision)
    assert plan.constraints["cost"] == {"active_moe_expert_ratio": 0.5}


def test_moe_layers_with_different_ratios_are_refused_naming_them() -> None:
    loaded = tiny()
    model: Any = loaded.model
    model.model.language_model.layers[1].mlp.gate.top_k = 1  # layer 1 routes each token to 1 of 4
    lm = extracted(loaded)
    with pytest.raises(ConfigError) as caught:
        plan_search(lm, AutoQuantSpec(formats=(INT8,), effective_bits=10.0, cost_model="active"))
    assert str(caught.value) == (
        "autoquant.cost_model = 'active': the MoE layers use different top_k / num_experts ratios "
        "(model.language_model.layers.0.mlp.experts: 0.5; model.language_model.layers.1.mlp.experts: 0.25) "
        "and ModelOpt's active_moe cost model takes one; use cost_model = 'storage'"
    )
    # storage needs no ratio
    plan = plan_search(lm, AutoQuantSpec(formats=(INT8,), effective_bits=10.0))
    assert plan.cost_model == "weight"


def test_a_dense_model_keeps_modelopts_weight_cost_model_under_active() -> None:
    lm = extracted(tiny(TINY_QWEN3_VL))
    plan = plan_search(lm, AutoQuantSpec(formats=(INT8,), effective_bits=10.0, cost_model="active"))
    assert plan.constraints == {"effective_bits": 10.0}
    assert plan.expert_ratio is None
    assert plan.lm_weights == linear_weights(plan.root)


# --------------------------------------------------------------------------------------------------
# ModelOpt's state under active_moe read back as storage figures
# --------------------------------------------------------------------------------------------------


class Recipe:
    """Stands in for ModelOpt's QuantRecipe: only its ``str()`` is read."""

    def __init__(self, name: str, bits: float) -> None:
        self.label = f"{name}(effective-bits: {bits})"

    def __str__(self) -> str:
        return self.label


R_INT8, R_NONE = Recipe(INT8, 8.0), Recipe("NONE", 16.0)
EXPERTS_KEY = "decoder.layers.0.mlp.experts.quant_recipe"
ATTN_KEY = "decoder.layers.0.self_attn.q_proj.quant_recipe"


def active_state(expert_weight: float = 0.5) -> dict[str, Any]:
    """1,200 expert weights costed at half, 1,000 attention weights whole; experts INT8 chosen."""
    return {
        "method": "gradient",
        "cost_model": "active_moe",
        "active_moe_expert_ratio": 0.5,
        "candidate_stats": {
            ATTN_KEY: {
                "formats": [R_INT8, R_NONE],
                "scores": [5.0, 0.0],
                "costs": [500.0, 1000.0],
                "module_names": ["decoder.layers.0.self_attn.q_proj"],
                "uncompressed_cost": 1000.0,
                "cost_weight": 1.0,
            },
            EXPERTS_KEY: {
                "formats": [R_INT8, R_NONE],
                "scores": [1.0, 0.0],
                "costs": [600.0 * expert_weight, 1200.0 * expert_weight],
                "module_names": ["decoder.layers.0.mlp.experts"],
                "uncompressed_cost": 1200.0 * expert_weight,
                "cost_weight": expert_weight,
            },
        },
        "best": {
            "recipe": {ATTN_KEY: R_NONE, EXPERTS_KEY: R_INT8},
            "constraints": {"effective_bits": 16.0 * (1000.0 + 300.0) / 1600.0},  # active: 13
            "score": 1.0,
            "is_satisfied": True,
        },
    }


def read(state: dict[str, Any]) -> Any:
    return scores_from_state(
        state,
        formats=(INT8,),
        method="gradient",
        scope="language_model",
        effective_bits_target=13.0,
        calib_steps=1,
        score_steps=1,
        score_samples=4,
        autoquant_seconds=1.0,
    )


def test_active_moe_costs_are_divided_back_to_storage_and_the_bits_count_storage() -> None:
    reading = read(active_state())
    experts = reading.scores.groups[1]
    assert experts.costs == (600.0, 1200.0)
    assert reading.scores.groups[0].costs == (500.0, 1000.0)
    storage_bits = 16.0 * (1000.0 + 600.0) / 2200.0
    assert reading.scores.effective_bits_lm == storage_bits
    assert reading.scores.effective_bits_model == storage_bits  # not ModelOpt's active 13.0
    assert reading.lm_weights == 2200.0
    assert (reading.cost_model, reading.expert_ratio) == ("active_moe", 0.5)
    review_search(reading, False, 0, ("active_moe", 0.5))  # what was asked: accepted
    with pytest.raises(AqmError, match=re.escape("ModelOpt's search counted cost model 'active_moe'")):
        review_search(reading, False, 0)  # a plan for storage gets a state that counted active


def test_a_group_costed_at_nothing_is_refused_naming_it() -> None:
    with pytest.raises(AqmError) as caught:
        read(active_state(expert_weight=0.0))
    assert str(caught.value).startswith(
        "ModelOpt's search state costs recipe group decoder.layers.0.mlp.experts at weight 0: its storage "
        "cost cannot be recovered"
    )


# --------------------------------------------------------------------------------------------------
# A resume under another cost model
# --------------------------------------------------------------------------------------------------


def settings(cost_model: Any) -> dict[str, Any]:
    from types import SimpleNamespace

    from auto_quantize_model.backend.modelopt.checkpoint import ModelFingerprint

    stats: Any = SimpleNamespace(
        captions_sha256="a" * 64, layout="packed", seq_len=32, batch_size=4, samples=8, real_tokens=100
    )
    steps: Any = SimpleNamespace(calib_steps=2, score_steps=2)
    model = ModelFingerprint(source="builtin:x", architecture="X", dtype="float32", weights_sha256="c" * 64)
    return search_settings(AutoQuantSpec(cost_model=cost_model), "language_model", stats, steps, model)


def test_a_resume_under_another_cost_model_is_refused_naming_it(tmp_path: Path) -> None:
    assert "cost_model" not in settings("storage")  # records written before the setting still match
    files = StateFiles(tmp_path / "state.pt")
    files.state.write_bytes(b"modelopt search state")
    files.write_settings(settings("storage"))
    with pytest.raises(ConfigError) as caught:
        SearchCheckpoint.open(str(files.state), lambda: settings("active"))
    assert str(caught.value) == (
        f"autoquant.checkpoint {files.state} was saved with other settings (cost_model: None -> 'active'); "
        "delete it or point autoquant.checkpoint elsewhere"
    )


# --------------------------------------------------------------------------------------------------
# The real search on CPU
# --------------------------------------------------------------------------------------------------


def search(spec: AutoQuantSpec, loaded: LoadedModel, auto_quantize: Any = None) -> Artifacts:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Pipeline(
            [
                ExtractLM(ExtractSpec()),
                BuildCalibLoader(CalibSpec(max_samples=8, seq_len=32, batch_size=4)),
                RunAutoQuant(spec, auto_quantize=auto_quantize),
                SolveBudgets(FrontierSpec(bits="8")),
            ],
            supplied=[loaded],
        ).run()


@pytest.mark.slow
def test_a_real_active_search_counts_active_bits_and_its_run_check_replays_it(tmp_path: Path) -> None:
    import modelopt.torch.quantization as mtq

    given: list[dict[str, Any]] = []

    def recording(model: nn.Module, **kwargs: Any) -> Any:
        given.append(kwargs["constraints"])
        return mtq.auto_quantize(model, **kwargs)

    loaded = tiny()
    checkpoint = str(tmp_path / "state.pt")
    spec = AutoQuantSpec(
        formats=(INT8, FP8), effective_bits=12.0, score_size=8, cost_model="active", checkpoint=checkpoint
    )
    store = search(spec, loaded, recording)
    assert given == [
        {"effective_bits": 12.0, "cost_model": "active_moe", "cost": {"active_moe_expert_ratio": 0.5}}
    ]
    scores = store.get(SensitivityScores)
    # storage figures: every group's costs are its modules' weights x bits / 16, experts whole
    model = loaded.model
    for group in scores.groups:
        weights = sum(
            int(m.weight.numel()) if isinstance(m, nn.Linear) else EXPERTS * EXPERT_WEIGHTS
            for m in (model.get_submodule(name) for name in group.module_names)
        )
        assert group.costs == tuple(weights * bits / 16.0 for bits in group.bits), group.name
    assert [g.name for g in scores.groups if ".experts" in g.name] == [
        f"model.language_model.layers.{i}.mlp.experts" for i in range(LAYERS)
    ]
    assert scores.satisfied
    assert scores.cost_model == "active"
    storage = chosen_bits(scores.groups, 0.0, {})
    assert scores.effective_bits_lm == pytest.approx(storage, rel=1e-12)
    assert scores.effective_bits_model == pytest.approx(storage, rel=1e-12)
    shares = group_shares(scores.groups, scores.routing)
    assert set(shares.values()) == {TOP_K / EXPERTS}
    active = chosen_bits(scores.groups, 0.0, shares)
    assert active <= 12.0 + 1e-9  # the budget counted active weights
    assert active != storage  # and the experts' share changed the count
    frontier = store.get(BudgetFrontier)
    assert frontier.run_checked
    assert frontier.run_mismatches == ()
    assert any("ModelOpt's choice in the run counted them the same way" in n for n in frontier.notes)

    # the saved state was costed under active_moe: a storage search may not resume it
    resumed = AutoQuantSpec(formats=(INT8, FP8), effective_bits=12.0, score_size=8, checkpoint=checkpoint)
    with pytest.raises(AqmError, match=re.escape("saved with other settings (cost_model: 'active' -> None)")):
        search(resumed, tiny())
