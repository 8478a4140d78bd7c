"""MeasureFrontier on the tiny model: measuring the frontier leaves the model exactly as it was."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.artifacts import BudgetFrontier
from auto_quantize_model.pipeline import Pipeline
from auto_quantize_model.specs import FrontierSpec
from auto_quantize_model.stages.solve_budgets import SolveBudgets

# --------------------------------------------------------------------------------------------------
# The model restored after measuring (real ModelOpt)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_measuring_the_frontier_restores_the_model_exactly(tmp_path: Path) -> None:
    import torch
    from modelopt.torch.opt.utils import named_hparams

    from auto_quantize_model.artifacts import CalibData, LanguageModel, LoadedModel, QuantSearch
    from auto_quantize_model.backend.measure import HeldOutEval
    from auto_quantize_model.core.validation import held_out_set
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec, ValidateSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.measure_frontier import MeasureFrontier
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    spec = FrontierSpec(bits="8:16:1", measure=3, holdout_samples=12, workers=1)
    store = Pipeline(
        [
            LoadModel(LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu")),
            ExtractLM(ExtractSpec()),
            BuildCalibLoader(CalibSpec(max_samples=16, seq_len=64, batch_size=4)),
            RunAutoQuant(AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8)),
            SolveBudgets(spec),
        ]
    ).run()
    model = store.get(QuantSearch).model
    held_out = held_out_set(
        ValidateSpec(holdout_samples=12), store.get(CalibData), store.get(LoadedModel).tokenizer
    )
    evaluator = HeldOutEval.on(store.get(LanguageModel), held_out.token_lists)

    def snapshot() -> tuple[dict[str, torch.Tensor], dict[str, str], Any]:
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        recipes = {name: str(h.active) for name, h in named_hparams(model) if name.endswith(".quant_recipe")}
        return state, recipes, evaluator.run()[0]

    state_before, recipes_before, chosen_before = snapshot()
    measured = MeasureFrontier(spec).run(store)
    state_after, recipes_after, chosen_after = snapshot()

    assert measured.restored_exactly
    assert recipes_after == recipes_before
    assert recipes_before
    assert state_after.keys() == state_before.keys()
    assert any("amax" in name for name in state_before)  # the quantizers' calibrated state is compared too
    assert all(torch.equal(state_before[name], value) for name, value in state_after.items())
    assert chosen_after.same_as(chosen_before)  # the chosen model's held-out NLL, to the last bit

    points = measured.points
    assert len(points) == 3
    assert [p.budget for p in points] == sorted(p.budget for p in points)
    assert all(p.quantized_groups > 0 and math.isfinite(p.delta_nll) and p.kl_div > 0.0 for p in points)
    # each mix at the captions' last positions, and 8 greedy tokens after each of the 12 (fewer than 16)
    checked = [p.last_position for p in points]
    assert all(
        c is not None and (c.captions, c.greedy_tokens, c.greedy_captions) == (12, 8, 12) for c in checked
    )
    assert all(c is not None and 0.0 <= c.top1 <= 1.0 and 0.0 <= c.greedy_agreement <= 1.0 for c in checked)
    assert all(c is not None and math.isfinite(c.kl) and c.kl > 0.0 for c in checked)
    frontier = store.get(BudgetFrontier).frontier
    assert all(p.predicted_score == frontier.point(p.budget).total_score for p in points)
    assert measured.chosen_delta_nll == pytest.approx(
        (chosen_before.nll_sum / chosen_before.tokens) - measured.baseline_nll, abs=1e-9
    )
