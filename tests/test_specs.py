"""The pipeline file's schema (specs.py): ranges, forms and defaults checked when a spec is made."""

from __future__ import annotations

from typing import Any

import pytest

from auto_quantize_model.errors import ConfigError
from auto_quantize_model.io.pipeline_file import spec_from_dict
from auto_quantize_model.spec_values import SpecError, parse_budgets, size_bytes
from auto_quantize_model.specs import AutoQuantSpec, ExportSpec, FrontierSpec, LoadSpec

# --------------------------------------------------------------------------------------------------
# AutoQuantSpec: formats
# --------------------------------------------------------------------------------------------------


def test_a_string_is_not_a_tuple_of_formats() -> None:
    with pytest.raises(
        SpecError, match=r"AutoQuantSpec\.formats: expected a tuple of format names, got the str"
    ):
        AutoQuantSpec(formats="INT8_DEFAULT_CFG")
    with pytest.raises(SpecError, match=r"AutoQuantSpec\.disabled_layers: expected a tuple"):
        AutoQuantSpec(disabled_layers="*lm_head*")
    spec = AutoQuantSpec(formats=["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"], disabled_layers=["*lm_head*"])
    assert spec.formats == ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert spec.disabled_layers == ("*lm_head*",)


# --------------------------------------------------------------------------------------------------
# LoadSpec: device_map and max_memory
# --------------------------------------------------------------------------------------------------


def test_device_map_forms_are_normalised() -> None:
    assert LoadSpec("x", device_map="auto").device_map == "auto"
    assert LoadSpec("x", device_map="cuda:1").device_map == (("", "cuda:1"),)
    assert LoadSpec("x", device_map={"": 0, "lm_head": "cpu"}).device_map == (
        ("", "cuda:0"),
        ("lm_head", "cpu"),
    )
    assert LoadSpec("x", device_map={"": 0}) == LoadSpec("x", device_map={"": "cuda:0"})
    spread = LoadSpec("x", device_map="balanced", max_memory={0: "40GiB", "1": 4096})
    assert spread.max_memory == (("0", "40GiB"), ("1", "4096B"))
    assert len({spread, LoadSpec("x", device_map="balanced", max_memory={"0": "40GiB", "1": "4096B"})}) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_map": "fastest"}, r"LoadSpec\.device_map: unknown strategy 'fastest'"),
        ({"device_map": {"lm_head": "disk"}}, r"LoadSpec\.device_map: lm_head: unknown device 'disk'"),
        ({"device_map": {"a..b": "cpu"}}, r"LoadSpec\.device_map: 'a\.\.b' is not a module name"),
        ({"device_map": {}}, r"LoadSpec\.device_map: empty table"),
        ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, r"unknown device key 'gpu0'"),
        ({"device_map": "auto", "max_memory": {"0": "40Gb"}}, r"LoadSpec\.max_memory: 0: bad size '40Gb'"),
        ({"max_memory": {"0": "40GiB"}}, r"LoadSpec\.max_memory: applies only to a device_map strategy"),
        ({"device_map": {"": "cpu"}, "max_memory": {"0": "1GiB"}}, r"applies only to a device_map strategy"),
    ],
)
def test_bad_placements_name_the_field_and_the_culprit(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        LoadSpec("x", **kwargs)


def test_sizes_are_case_sensitive_units() -> None:
    assert size_bytes("40GiB") == 40 * 2**30
    assert size_bytes("1.5 GB") == 1_500_000_000
    assert size_bytes("40Gb") is None  # accelerate would read gigabits
    assert size_bytes("40") is None


# --------------------------------------------------------------------------------------------------
# AutoQuantSpec: kernels
# --------------------------------------------------------------------------------------------------


def test_kernels_setting_is_checked_and_defaults_to_the_extension() -> None:
    from auto_quantize_model.io.pipeline_file import spec_from_dict

    assert AutoQuantSpec().kernels == "extension"
    parsed = spec_from_dict(
        {"model": {"path": "builtin:tiny-qwen3-vl"}, "autoquant": {"kernels": "pytorch"}}, source="p.toml"
    )
    assert parsed.autoquant.kernels == "pytorch"
    with pytest.raises(ConfigError, match="kernels"):
        spec_from_dict(
            {"model": {"path": "builtin:tiny-qwen3-vl"}, "autoquant": {"kernels": "triton"}}, source="p.toml"
        )


CT = "compressed-tensors"


# --------------------------------------------------------------------------------------------------
# ExportSpec: format
# --------------------------------------------------------------------------------------------------


def test_the_export_table_takes_a_format() -> None:
    assert ExportSpec(format=CT).format == CT
    with pytest.raises(
        SpecError, match=r"^ExportSpec.format: 'ct' is not one of modelopt, compressed-tensors$"
    ):
        ExportSpec(format="ct")


# --------------------------------------------------------------------------------------------------
# Budgets (parse_budgets)
# --------------------------------------------------------------------------------------------------


def test_parse_budgets_range_includes_its_stop_and_stays_on_the_grid() -> None:
    assert parse_budgets("4.5:8:0.25") == tuple(4.5 + 0.25 * i for i in range(15))
    tenths = parse_budgets("4.5:5:0.1")
    assert tenths == (4.5, 4.6, 4.7, 4.8, 4.9, 5.0)  # not 4.800000000000001, and 5.0 is included
    assert parse_budgets("4:5:0.3") == (4.0, 4.3, 4.6, 4.9)  # a stop off the grid is not added
    assert parse_budgets(" 6, 8.5 ,7,6") == (6.0, 7.0, 8.5)  # sorted, duplicates dropped
    assert parse_budgets("7.5") == (7.5,)
    assert parse_budgets("16") == (16.0,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("eight", "'eight' is not a number"),
        ("6,,7", "'' is not a number"),
        ("4:8", "three parts"),
        ("4:8:1:2", "three parts"),
        ("8:4:0.5", "start 8 is above stop 4"),
        ("4:8:0", "step must be a positive number"),
        ("4:8:-1", "step must be a positive number"),
        ("4:8:x", "step 'x' is not a number"),
        ("0", "outside (0, 16]"),
        ("17", "outside (0, 16]"),
        ("nan", "outside (0, 16]"),
        ("1:16:1e-6", "at most 10000"),
    ],
)
def test_parse_budgets_errors_name_the_text_and_the_forms(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_budgets(text)
    assert f"budgets {text!r}" in str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# FrontierSpec
# --------------------------------------------------------------------------------------------------


def test_frontier_spec_checks_its_budgets_and_counts() -> None:
    with pytest.raises(SpecError, match=r"FrontierSpec.bits: budgets '8:4:1': start 8 is above stop 4"):
        FrontierSpec(bits="8:4:1")
    with pytest.raises(SpecError, match=r"FrontierSpec\.measure: must be >= 0"):
        FrontierSpec(bits="8", measure=-1)
    with pytest.raises(ConfigError) as err:
        spec_from_dict(
            {"model": {"path": "builtin:tiny-qwen3-vl"}, "frontier": {"bits": "4.5:x:1", "measure": "3"}},
            source="p.toml",
        )
    lines = str(err.value).splitlines()
    assert any(line.startswith("p.toml: frontier.bits: budgets '4.5:x:1'") for line in lines)
    assert any(line.startswith("p.toml: frontier.measure: expected int") for line in lines)
