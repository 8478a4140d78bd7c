"""The pipeline file's schema (specs.py): ranges, forms and defaults checked when a spec is made."""

from __future__ import annotations

from typing import Any

import pytest

from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import AutoQuantSpec, ExportSpec, LoadSpec, SpecError, size_bytes

# --------------------------------------------------------------------------- structuring


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
# (a) what a user writes
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
# Patches of ModelOpt itself (imports ModelOpt: slow)
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
# The flag
# --------------------------------------------------------------------------------------------------


def test_the_export_table_takes_a_format() -> None:
    assert ExportSpec(format=CT).format == CT
    with pytest.raises(
        SpecError, match=r"^ExportSpec.format: 'ct' is not one of modelopt, compressed-tensors$"
    ):
        ExportSpec(format="ct")
