"""Our export labels against ModelOpt's own exporter, for every format name ``aqm formats`` lists
and every name the custom grammar spells.

The exporter's per-layer label (``quant_algo`` and ``group_size`` in ``hf_quant_config.json``)
comes from the quantizers' attributes alone (``get_quantization_format``), so it is read here
off one ``nn.Linear`` quantized on CPU without calibration: FP4 and MX quantizers can be set up
without CUDA, only running them needs it. Calibration results that change the label are
supplied by hand: AWQ leaves a ``pre_quant_scale`` on the input quantizer.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import warnings
from typing import Any

import pytest

from auto_quantize_model.core.export_labels import export_format
from auto_quantize_model.core.format_grammar import parse_custom
from auto_quantize_model.core.formats import all_formats, resolve_format
from auto_quantize_model.core.presets import preset
from auto_quantize_model.core.scores import NO_QUANT

GRAMMAR_NAMES = tuple(
    f"w{weight}-{granularity}_{activation}"
    for weight, granularity, activation in itertools.product(
        ("fp4", "int4", "int8", "fp8"),
        ("pt", "pc", "pic", "b16", "b32", "b64", "b128"),
        (
            "a16",
            *(
                f"a{kind}-{scope}"
                for kind in ("fp4", "fp8", "int8", "int4")
                for scope in ("tensor", "token", "b16")
            ),
        ),
    )
)
LISTED_NAMES = tuple(info.name for info in all_formats())
IN_FEATURES = 256


def exporter_record(name: str) -> dict[str, Any] | str:
    """What ModelOpt 0.47's exporter records for one linear layer on ``name``, or why it raised."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export.quant_utils import get_quant_config

    from auto_quantize_model.backend.modelopt.quant_config import format_configs

    config = copy.deepcopy(format_configs([name])[name])
    algorithm = config.get("algorithm")
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    config["algorithm"] = "max"  # no forward pass: the label reads the quantizers' attributes alone
    model = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, IN_FEATURES))
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, config, forward_loop=None)
        if isinstance(method, str) and method.startswith("awq"):
            quantizer: Any = model[0].input_quantizer
            quantizer.pre_quant_scale = torch.ones(IN_FEATURES)
        try:
            record: dict[str, Any] = get_quant_config(model)["quantization"]
        except (AssertionError, NotImplementedError, TypeError) as err:
            return f"{type(err).__name__}: {err}"
    return record


@pytest.fixture(scope="module", autouse=True)
def _quiet_modelopt() -> Any:
    pytest.importorskip("modelopt")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    yield
    logging.disable(previous)


def check_against_exporter(name: str) -> None:
    ours = export_format(name)
    info = resolve_format(name)
    if info.refused is not None:  # not searchable at all: the export says the same
        assert ours.refused == info.refused
        return
    theirs = exporter_record(name)
    if ours.label is not None:
        assert isinstance(theirs, dict), f"{name}: ours {ours.label}, the exporter raised {theirs}"
        assert (ours.label, ours.group_size) == (theirs["quant_algo"], theirs.get("group_size")), name
        return
    assert ours.refused is not None
    assert ours.refused.count("\n") == 0, ours.refused
    if isinstance(theirs, str):
        assert "exporter" in ours.refused, f"{name}: the exporter raised {theirs}; we say {ours.refused}"
        return
    row = preset(info.base_name)
    if row is not None and row.export_label is not None:
        # refused for another reason than the label (calibration, block size): the row still says
        # what the exporter would have written, and that must be what it writes
        recorded = (row.export_label, row.export_group_size)
        assert recorded == (theirs["quant_algo"], theirs.get("group_size")), name
        return
    label = theirs["quant_algo"]
    # the refusal names what the exporter would write instead (MXINT8 reads as plain INT8)
    assert label in ours.refused, f"{name}: the exporter records {label}; we say {ours.refused}"


@pytest.mark.slow
@pytest.mark.parametrize("name", LISTED_NAMES)
def test_every_listed_format_gets_the_exporters_label_or_a_reason(name: str) -> None:
    check_against_exporter(name)


@pytest.mark.slow
def test_every_grammar_name_gets_the_exporters_label_or_a_reason() -> None:
    for name in GRAMMAR_NAMES:
        check_against_exporter(name)


@pytest.mark.parametrize(
    ("name", "label", "group_size"),
    [
        ("wfp4_afp4", "NVFP4", 16),
        ("wfp4_a16", "W4A16_NVFP4", 16),
        ("wfp4_afp8", "W4A8_NVFP4_FP8", 16),
    ],
)
def test_nvfp4_custom_formats_get_the_fp4_labels(name: str, label: str, group_size: int) -> None:
    found = export_format(name)
    assert (found.label, found.group_size, found.refused) == (label, group_size, None)
    assert found.needs_cuda


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("wint4-pic_a16", "packs INT4 weights only in blocks"),  # the exporter asserts
        ("wint4-pt_a16", "packs INT4 weights only in blocks"),
        ("wfp8-pic_afp8", "records it as FP8 "),  # per-input-channel scales read as per tensor
        ("wfp4_afp8-token", "records it as NVFP4 "),  # dynamic FP8 activations read as FP4
        ("wfp4_aint8", "records it as NVFP4 "),
    ],
)
def test_custom_formats_the_exporter_cannot_write_are_refused(name: str, reason: str) -> None:
    found = export_format(name)
    assert found.label is None
    assert found.refused is not None
    assert reason in found.refused
    spec = parse_custom(name)
    assert spec is not None
    assert spec.refused is None


# --------------------------------------------------------------------------------------------------
# What the exporter can write
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label", "group_size"),
    [
        ("INT8_DEFAULT_CFG", "W8A8_SQ_PER_CHANNEL", None),
        ("wint8_aint8", "W8A8_SQ_PER_CHANNEL", None),
        ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", None),
        ("INT8_WEIGHT_ONLY_CFG", "W8A16", None),
        ("FP8_DEFAULT_CFG", "FP8", None),
        ("wfp8-pc_afp8-token", "FP8_PER_CHANNEL_PER_TOKEN", None),
        ("INT4_AWQ_CFG", "W4A16_AWQ", 128),
        ("wint4-b64_a16", "W4A16_AWQ", 64),
        ("NVFP4_DEFAULT_CFG", "NVFP4", 16),
    ],
)
def test_export_format_gives_the_exporters_per_layer_label(
    name: str, label: str, group_size: int | None
) -> None:
    found = export_format(name)
    assert (found.label, found.group_size, found.refused) == (label, group_size, None)
    assert found.needs_cuda == name.startswith("NVFP4")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("wint8-pc_aint8-token", "records it as W8A8_SQ_PER_CHANNEL"),  # dynamic acts labelled static
        ("wfp8_a16", "records it as FP8"),  # weight-only labelled W8A8
        ("wint4-b128_aint8-token", "records it as W4A16_AWQ"),  # activations dropped by the label
        ("wint8-pt_aint8", "records it as W8A8_SQ_PER_CHANNEL"),  # per-tensor weights labelled per channel
        ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_pb_wo"),
        ("MXFP6_DEFAULT_CFG", "6-bit"),
        ("FP8_KV_CFG", "KV-cache preset"),
    ],
)
def test_formats_the_exporter_would_mislabel_are_refused_with_the_label(name: str, reason: str) -> None:
    found = export_format(name)
    assert found.label is None
    assert found.refused is not None
    assert reason in found.refused


def test_checkpoints_the_read_back_cannot_decode_are_refused_by_group_and_label() -> None:
    from auto_quantize_model.core.export_choice import GroupChoice
    from auto_quantize_model.core.export_labels import READABLE_LABELS, check_checkpoint_choices
    from auto_quantize_model.errors import ConfigError

    readable = [
        GroupChoice(f"g{i}", (f"m{i}",), name)
        for i, name in enumerate(
            (
                "INT8_DEFAULT_CFG",
                "FP8_DEFAULT_CFG",
                "INT4_AWQ_CFG",
                "NVFP4_DEFAULT_CFG",
                "wfp4_afp8",
                NO_QUANT,
            )
        )
    ]
    check_checkpoint_choices(readable)
    assert {export_format(c.format).label for c in readable[:-1]} <= set(READABLE_LABELS)
    for name, label in (
        ("W4A8_AWQ_BETA_CFG", "W4A8_AWQ"),
        ("MXFP8_DEFAULT_CFG", "MXFP8"),
        ("NVFP4_AWQ_LITE_CFG", "NVFP4_AWQ"),
    ):
        with pytest.raises(ConfigError) as caught:
            check_checkpoint_choices([*readable, GroupChoice("late", ("x",), name)])
        message = str(caught.value)
        assert message.startswith(f"group late: format {name} is written as {label}, which aqm's read-back")
        assert "\n" not in message
    # a format ModelOpt cannot export at all is left to the export's own refusal (its reason)
    check_checkpoint_choices([GroupChoice("g", ("m",), "W4A8_NVFP4_FP8_CFG")])
