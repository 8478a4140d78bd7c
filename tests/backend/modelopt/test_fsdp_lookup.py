"""ModelOpt's FSDP lookup answered at once for a root without FSDP: same answers, no name scan."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from auto_quantize_model.artifacts import LoadedModel, SensitivityScores  # noqa: E402
from auto_quantize_model.backend.modelopt import search as search_module  # noqa: E402
from auto_quantize_model.backend.modelopt.fsdp_lookup import LookupCounts, fsdp_lookup_skipped  # noqa: E402
from auto_quantize_model.backend.models import build_builtin  # noqa: E402
from auto_quantize_model.sources import TINY_QWEN3_VL_MOE  # noqa: E402
from builders import tiny_moe_search  # noqa: E402


@pytest.fixture
def core_utils() -> Any:
    """ModelOpt's module holding the lookup, imported when a test runs: importing ModelOpt costs
    seconds, and every xdist worker collects every test file."""
    pytest.importorskip("modelopt")
    from modelopt.torch.quantization.utils import core_utils

    return core_utils


def tiny_moe() -> LoadedModel:
    return build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")


def test_the_roots_modules_get_modelopts_answer_without_a_name_scan(
    monkeypatch: pytest.MonkeyPatch, core_utils: Any
) -> None:
    root = tiny_moe().model
    modules = list(root.modules())
    original = core_utils._get_enclosing_fsdp_module
    expected = [original(module, root) for module in modules]
    assert expected == [None] * len(modules)

    def no_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the module name was looked up by scanning the model")

    monkeypatch.setattr(core_utils, "_get_module_name", no_scan)
    with fsdp_lookup_skipped(root) as counts:
        assert core_utils._get_enclosing_fsdp_module is not original
        got = [core_utils._get_enclosing_fsdp_module(module, root) for module in modules]
        # the context ModelOpt's calibration opens per module still works (no FSDP, no offload)
        with core_utils.enable_weight_access_and_writeback(modules[-1], root, None):
            pass
    assert got == expected
    assert counts == LookupCounts(skipped=len(modules) + 1, passed=0)
    assert core_utils._get_enclosing_fsdp_module is original


def test_another_root_goes_to_modelopts_own_lookup(core_utils: Any) -> None:
    root = tiny_moe().model
    other = root.get_submodule("model.language_model")
    module = other.get_submodule("layers.0.mlp.experts")
    with fsdp_lookup_skipped(root) as counts:
        assert core_utils._get_enclosing_fsdp_module(module, other) is None
        with pytest.raises(ValueError, match="not found in the root model"):
            core_utils._get_enclosing_fsdp_module(torch.nn.Linear(2, 2), other)
    assert counts == LookupCounts(skipped=0, passed=2)


def test_the_lookup_is_put_back_after_an_error(core_utils: Any) -> None:
    original = core_utils._get_enclosing_fsdp_module
    with pytest.raises(RuntimeError, match="boom"), fsdp_lookup_skipped(torch.nn.Linear(2, 2)):
        raise RuntimeError("boom")
    assert core_utils._get_enclosing_fsdp_module is original


def _search(loaded: LoadedModel) -> SensitivityScores:
    scores: SensitivityScores = tiny_moe_search(loaded, experts="expert").get(SensitivityScores)
    return scores


@pytest.mark.slow
def test_a_split_experts_search_scores_as_with_modelopts_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[LookupCounts] = []

    @contextlib.contextmanager
    def recorded(root: Any) -> Iterator[LookupCounts]:
        with fsdp_lookup_skipped(root) as counts:
            seen.append(counts)
            yield counts

    @contextlib.contextmanager
    def modelopts_own(root: Any) -> Iterator[LookupCounts]:
        yield LookupCounts()

    monkeypatch.setattr(search_module, "fsdp_lookup_skipped", recorded)
    fast = _search(tiny_moe())
    monkeypatch.setattr(search_module, "fsdp_lookup_skipped", modelopts_own)
    plain = _search(tiny_moe())

    assert len(seen) == 1
    assert seen[0].skipped > 0  # ModelOpt asked during the search ...
    assert seen[0].passed == 0  # ... and every answer was given at once
    assert [g.name for g in fast.groups] == [g.name for g in plain.groups]
    assert any(".experts." in g.name for g in fast.groups)
    for ours, theirs in zip(fast.groups, plain.groups, strict=True):
        assert ours.scores == theirs.scores, ours.name
        assert ours.best_format == theirs.best_format, ours.name
