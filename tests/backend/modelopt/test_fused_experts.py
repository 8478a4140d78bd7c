"""The per-expert quantizer lists and reason tallies both fused-experts patches read alike."""

from __future__ import annotations

import collections
from types import SimpleNamespace

from auto_quantize_model.backend.modelopt.batched_experts import ExpertPathCounts
from auto_quantize_model.backend.modelopt.fused_experts import GATED_LISTS, by_reason, quantizer_lists
from auto_quantize_model.backend.modelopt.quantizer_setup import SetupCounts


def test_quantizer_lists_yields_the_lists_a_module_holds_in_declared_order() -> None:
    down, up = ["d0", "d1"], ["u0"]
    module = SimpleNamespace(down_proj_weight_quantizers=down, up_proj_weight_quantizers=up, other=[1])
    assert list(quantizer_lists(module)) == [
        ("up_proj_weight_quantizers", up),
        ("down_proj_weight_quantizers", down),
    ]
    assert list(quantizer_lists(module, GATED_LISTS)) == [("down_proj_weight_quantizers", down)]
    assert list(quantizer_lists(SimpleNamespace())) == []


def test_by_reason_sorts_reasons_and_says_nothing_for_an_empty_tally() -> None:
    tally = collections.Counter({"shape": 1, "arguments passed by name": 3})
    assert by_reason(tally) == "arguments passed by name: 3, shape: 1"
    assert by_reason(tally, " ({})") == " (arguments passed by name: 3, shape: 1)"
    assert by_reason(collections.Counter(), " ({})") == ""


def test_both_patch_summaries_word_their_reasons_alike() -> None:
    paths = ExpertPathCounts(batched=5, fallback=collections.Counter({"b": 1, "a": 2}))
    assert paths.summary() == "batched 5, ModelOpt's loop 3 (a: 2, b: 1)"
    assert ExpertPathCounts(batched=2).summary() == "batched 2, ModelOpt's loop 0"
    setup = SetupCounts(copied=6, declined=collections.Counter({"quantizers configured differently": 2}))
    declined = "lists left to ModelOpt: quantizers configured differently: 2"
    assert setup.summary() == f"6 quantizers copied; {declined}"
    assert SetupCounts(copied=6).summary() == "6 quantizers copied"
