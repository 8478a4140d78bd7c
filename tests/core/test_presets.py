"""The preset table as package data: every public answer about a format is what it was before.

``tests/data/preset_facts.json`` was written by :func:`facts` from main at f775419, before the
three preset tables became ``data/presets.toml``; the test compares today's answers with it,
except for the export fixes listed in :data:`FIXED` (each checked for its new value).
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import yaml

from auto_quantize_model.app.cli import main
from auto_quantize_model.core.export_choice import GroupChoice
from auto_quantize_model.core.export_config import (
    SUPPORTED_ALGORITHMS,
    ExportConfig,
    build_export_config,
    json_ready,
    recipe_yaml,
)
from auto_quantize_model.core.export_labels import export_format
from auto_quantize_model.core.format_grammar import CUDA_EXTENSIONS, parse_custom
from auto_quantize_model.core.formats import (
    all_formats,
    check_formats,
    cuda_extensions,
    min_effective_bits,
    resolve_format,
)
from auto_quantize_model.core.presets import Preset, parse_presets, preset, presets
from auto_quantize_model.core.ranking import format_scheme_part, scheme_name
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from builders import DATA

SNAPSHOT = DATA / "preset_facts.json"
PREVIOUS_YAML = DATA / "recipe_previous.yaml"
"""What the hand-written YAML emitter wrote for :func:`sample_config` (main at f775419)."""
AWQ_LITE = ("INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "NVFP4_AWQ_LITE_CFG")


def _outcome(call: Any, *args: Any) -> Any:
    """What a public function answers: its value, or its error's class and message."""
    try:
        return call(*args)
    except AqmError as err:
        return {"error": type(err).__name__, "message": str(err)}


def _checked(name: str, device: str) -> Any:
    def check() -> str:
        check_formats([name], device)
        return "ok"

    return _outcome(check)


def facts() -> dict[str, Any]:
    """Every preset, listed custom name and AWQ-lite option, through every public function."""
    names = [info.name for info in all_formats()]
    names += [f"{name}:alpha_step=0.25" for name in AWQ_LITE]
    table: dict[str, Any] = {}
    for name in names:
        info = resolve_format(name)
        table[name] = {
            "format": {**attrs.asdict(info), "usable": info.usable, "base_name": info.base_name},
            "check_cpu": _checked(name, "cpu"),
            "check_cuda": _checked(name, "cuda"),
            "min_effective_bits": min_effective_bits([name]),
            "export": attrs.asdict(export_format(name)),
            "scheme_part": format_scheme_part(name),
            "scheme_name": _outcome(scheme_name, [name]),
        }
    return {"order": names, "formats": table}


def sample_config() -> ExportConfig:
    """A mix with every value shape a recipe holds: integer and string block keys, tuples, None,
    booleans, floats, glob characters in module names and quotes in the description's neighbours."""
    names = ("wint4-b128_a16", "wfp8-pc_afp8-token", "wfp4_afp8", "wint8_aint8")
    configs: dict[str, Any] = {}
    for name in names:
        spec = parse_custom(name)
        assert spec is not None
        configs[name] = spec.quant_cfg()
    choices = [
        GroupChoice("head", ("lm_head",), names[0]),
        GroupChoice("down", ("m.layers.0.mlp.down_proj",), names[1]),
        GroupChoice("experts", ("m.layers.1.mlp.experts[0]", "m.layers.1.mlp.experts*?"), names[2]),
        GroupChoice("o", ("m.layers.0.self_attn.o_proj",), "NONE"),
        GroupChoice("q", ("m.layers.0.self_attn.q_proj",), names[3]),
    ]
    return build_export_config(choices, configs)


SAMPLE_DESCRIPTION = "it's a 'test': # not a comment, * not an alias, - not a list, {not: a map}"


if __name__ == "__main__":  # how both files were written, at f775419; they are a record, kept as is
    for path in (SNAPSHOT, PREVIOUS_YAML):
        if path.exists():
            raise SystemExit(f"{path} exists: it records main at f775419, so it is never rewritten")
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps(facts(), indent=1, sort_keys=True) + "\n")
    PREVIOUS_YAML.write_text(recipe_yaml(sample_config(), SAMPLE_DESCRIPTION))


# --------------------------------------------------------------------------------------------------
# The same answers as before the table became data, but for the export fixes
# --------------------------------------------------------------------------------------------------

STATIC_NVFP4 = {
    "NVFP4_FOUR_OVER_SIX_CFG": "mse",
    "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG": "mse",
    "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG": "local_hessian",
}
FIXED = {*STATIC_NVFP4, "W4A8_NVFP4_FP8_CFG"}
"""Presets the snapshot called exportable that export now refuses up front (their export answer only)."""


def test_every_public_answer_is_the_snapshots_but_the_export_fixes() -> None:
    before = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    now = json.loads(json.dumps(facts()))
    assert now["order"] == before["order"]
    changed = []
    for name in before["order"]:
        old, new = before["formats"][name], now["formats"][name]
        assert set(new["format"]) - set(old["format"]) == {"cuda_extensions"}, name  # the one new fact
        new["format"].pop("cuda_extensions")
        if name in FIXED:
            was, exported = old.pop("export"), new.pop("export")
            assert was["label"] is not None, name
            assert was["refused"] is None, name
            assert exported == {**was, "label": None, "group_size": None, "refused": exported["refused"]}
            assert exported["refused"], name
            assert "\n" not in exported["refused"], name
            changed.append(name)
        assert new == old, name
    assert sorted(changed) == sorted(FIXED)


# --------------------------------------------------------------------------------------------------
# The export fixes, on the rows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "algorithm"), sorted(STATIC_NVFP4.items()))
def test_static_nvfp4_presets_are_refused_for_export_up_front_and_keep_their_cost(
    name: str, algorithm: str
) -> None:
    info = resolve_format(name)
    assert (info.usable, info.bits, info.algorithm) == (True, 4.0, algorithm)  # ModelOpt charges 4.0
    row = preset(name)
    assert row is not None
    assert (row.export_label, row.export_group_size) == ("NVFP4", 16)  # what would have been written
    found = export_format(name)
    assert (found.label, found.group_size) == (None, None)
    assert found.refused == (
        f"it calibrates its static NVFP4 weight scales with {algorithm}, which export does not support "
        "yet (export calibrates with max, smoothquant, awq_lite, awq_clip or awq_full); "
        "NVFP4_DEFAULT_CFG exports as NVFP4"
    )
    with pytest.raises(ConfigError, match=rf"^group g: format {name} cannot be exported: it calibrates"):
        build_export_config([GroupChoice("g", ("m",), name)], {})  # refused before any config is read


def test_w4a8_nvfp4_fp8_records_both_block_sizes_and_export_refuses_the_mismatch() -> None:
    row = preset("W4A8_NVFP4_FP8_CFG")
    assert row is not None
    assert (row.export_label, row.export_group_size, row.scored_group_size) == ("W4A8_NVFP4_FP8", 32, 16)
    found = export_format("W4A8_NVFP4_FP8_CFG")
    assert (found.label, found.group_size, found.refused) == (None, None, row.export_refused)
    assert found.refused is not None
    assert found.refused.startswith("ModelOpt 0.47's HF exporter records it with group_size 32, ")
    assert "the search fake-quantizes its weights in blocks of 16" in found.refused
    way_out = export_format("wfp4_afp8")  # the format the reason points to exports with blocks of 16
    assert (way_out.label, way_out.group_size, way_out.refused) == ("W4A8_NVFP4_FP8", 16, None)


def test_aqm_formats_lists_what_export_refuses_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    _, _, section = out.partition("\nUsable for AutoQuant but not exportable (aqm export refuses them):\n")
    assert section, out
    listed = dict(line.strip().split(": ", 1) for line in section.split("\n\n")[0].splitlines())
    for name in FIXED:
        assert listed[name] == export_format(name).refused
    assert "INT8_DEFAULT_CFG" not in listed
    assert "FP8_KV_CFG" not in listed  # refused for AutoQuant already, listed in that section


# --------------------------------------------------------------------------------------------------
# The rows agree with the rules they could drift from
# --------------------------------------------------------------------------------------------------


def test_rows_with_an_equivalent_export_like_that_grammar_name() -> None:
    pairs = [(row, row.equivalent) for row in presets() if row.equivalent is not None]
    assert len(pairs) == 8
    for row, equivalent in pairs:
        grammar = export_format(equivalent)
        assert (row.export_label, row.export_group_size, row.export_refused) == (
            grammar.label,
            grammar.group_size,
            grammar.refused,
        ), row.name
        assert row.cuda_extensions == resolve_format(equivalent).cuda_extensions, row.name


def test_a_calibration_export_cannot_run_is_an_export_refusal_on_the_row() -> None:
    unsupported = [
        row
        for row in presets()
        if row.refused is None and row.algorithm is not None and row.algorithm not in SUPPORTED_ALGORITHMS
    ]
    assert sorted(row.name for row in unsupported) == sorted(STATIC_NVFP4)
    for row in unsupported:
        assert row.export_refused is not None
        assert f"with {row.algorithm}, which export does not support" in row.export_refused


@pytest.mark.parametrize(
    ("name", "extensions"),
    [
        ("wint8_aint8", ("modelopt_cuda_ext",)),
        ("wint4-b128_afp8", ("modelopt_cuda_ext", "modelopt_cuda_ext_fp8")),
        ("wfp8-pc_afp8-token", ("modelopt_cuda_ext_fp8",)),  # per-token is no dynamic block for ModelOpt
        ("wfp4_afp4", ("modelopt_cuda_ext_mx",)),  # the name the substring match missed
        ("wfp4_afp8", ("modelopt_cuda_ext_fp8", "modelopt_cuda_ext_mx")),
        ("wfp4_a16", ("modelopt_cuda_ext_mx",)),
        ("W4A8_AWQ_BETA_CFG", ("modelopt_cuda_ext", "modelopt_cuda_ext_fp8")),  # FP8 with no FP8 in its name
        ("NVFP4_FOUR_OVER_SIX_CFG", ("modelopt_cuda_ext_mx",)),  # static weights: triton; inputs: MX
        ("W4A8_AWQ_BETA_CFG:alpha_step=0.25", ("modelopt_cuda_ext", "modelopt_cuda_ext_fp8")),
        ("FP8_KV_CFG", ()),  # refused: never runs
        ("wfp4-pc_a16", ()),
    ],
)
def test_cuda_extensions_follow_the_element_types(name: str, extensions: tuple[str, ...]) -> None:
    assert resolve_format(name).cuda_extensions == extensions


def test_cuda_extensions_of_a_format_list_are_their_union_in_build_order() -> None:
    assert cuda_extensions(["MXFP8_DEFAULT_CFG", "wfp8_afp8", "INT8_DEFAULT_CFG"]) == CUDA_EXTENSIONS
    assert cuda_extensions(["wint8_aint8", "wint4-b64_a16"]) == ("modelopt_cuda_ext",)
    assert cuda_extensions([]) == ()


# --------------------------------------------------------------------------------------------------
# Reading the file: strict, one line naming the row and the key
# --------------------------------------------------------------------------------------------------

ROW = """\
[[preset]]
name = "X_CFG"
bits = 8.0
weights = "w"
activations = "a"
description = "d"
devices = ["cpu", "cuda"]
scheme = "x"
export_label = "FP8"
"""


def test_the_packaged_file_is_read_from_the_package() -> None:
    rows = presets()
    assert [row.name for row in rows] == [f.name for f in all_formats() if f.kind == "preset"]
    assert len(rows) == 39
    assert parse_presets(ROW, "p.toml") == (
        Preset(
            name="X_CFG",
            bits=8.0,
            weights="w",
            activations="a",
            description="d",
            devices=("cpu", "cuda"),
            scheme="x",
            export_label="FP8",
        ),
    )


def _with(**changes: str | None) -> str:
    """:data:`ROW` with keys replaced (a TOML value as text), added, or dropped (None)."""
    lines = [line for line in ROW.splitlines() if line.split(" = ")[0] not in changes]
    lines += [f"{key} = {value}" for key, value in changes.items() if value is not None]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_with(bitz="3"), "extra fields found (bitz) @ preset X_CFG"),
        (_with(bits='"8"'), "expected float, got str '8' @ preset X_CFG.bits"),
        (_with(bits="true"), "expected float, got bool True @ preset X_CFG.bits"),
        (_with(export_group_size="1.5"), "expected int, got float 1.5 @ preset X_CFG.export_group_size"),
        (_with(scheme="3"), "expected str, got int 3 @ preset X_CFG.scheme"),
        (_with(devices='"cuda"'), "expected a list, got str 'cuda' @ preset X_CFG.devices"),
        (
            _with(devices='["cuda", "gpu"]'),
            "expected one of 'cpu', 'cuda', got 'gpu' @ preset X_CFG.devices[1]",
        ),
        (
            _with(cuda_extensions='["modelopt_cuda_ext_fp4"]'),
            "expected one of 'modelopt_cuda_ext', 'modelopt_cuda_ext_fp8', 'modelopt_cuda_ext_mx', got "
            "'modelopt_cuda_ext_fp4' @ preset X_CFG.cuda_extensions[0]",
        ),
        (_with(scheme=None), "required field missing @ preset X_CFG.scheme"),
        (_with(name=None), "required field missing @ preset #1.name"),
        ("", "required field missing @ $.preset"),
        (
            "[[preset]\n",
            "not valid TOML (Expected ']]' at the end of an array declaration (at line 1, column 9))",
        ),
        (ROW + "\n" + ROW, "preset X_CFG is listed twice"),
        (_with(devices="[]"), "preset X_CFG: devices must list cpu and/or cuda once each"),
        (
            _with(export_label=None),
            "say what the exporter records (export_label) or why it is refused (export_refused)",
        ),
        (_with(export_group_size="16", export_label=None, export_refused='"r"'), "export_group_size without"),
        (
            _with(refused='"r"'),
            "preset X_CFG: a refused preset never runs: drop its cuda_extensions and export_* keys",
        ),
        (_with(export_group_size="32", scored_group_size="32"), "only for a block size unlike export_group"),
        (
            _with(export_group_size="32", scored_group_size="16"),
            "preset X_CFG: scored and exported block sizes differ, so export_refused must say why",
        ),
    ],
)
def test_a_broken_preset_file_is_one_line_naming_the_row_and_key(text: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_presets(text, "p.toml")
    assert str(caught.value).startswith("p.toml: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_problems_are_counted_when_several() -> None:
    with pytest.raises(
        InputError, match=r"^p.toml: expected float, got str '8' @ preset X_CFG.bits \(and 1 more\)$"
    ):
        parse_presets(_with(bits='"8"', scheme="3"), "p.toml")


# --------------------------------------------------------------------------------------------------
# quant_recipe.yaml through yaml.safe_dump
# --------------------------------------------------------------------------------------------------


def test_recipe_yaml_parses_back_to_the_recipe() -> None:
    config = sample_config()
    text = recipe_yaml(config, SAMPLE_DESCRIPTION)
    assert text.startswith("# ModelOpt PTQ recipe written by auto-quantize-model")
    assert yaml.safe_load(text) == {
        "metadata": {"recipe_type": "ptq", "description": SAMPLE_DESCRIPTION},
        "quantize": {
            "algorithm": "max",
            "quant_cfg": json_ready(config.quant_config["quant_cfg"]),
        },
    }
    head = yaml.safe_load(text)["quantize"]["quant_cfg"][1]
    assert head == {
        "quantizer_name": "lm_head.weight_quantizer",
        "cfg": {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}},  # the integer key kept
    }


def test_recipe_yaml_reads_as_the_hand_written_emitter_did() -> None:
    previous = yaml.safe_load(PREVIOUS_YAML.read_text(encoding="utf-8"))
    assert yaml.safe_load(recipe_yaml(sample_config(), SAMPLE_DESCRIPTION)) == previous
    # deny-all, lm_head's weight, two quantizers of each other chosen module, o_proj disabled
    assert len(previous["quantize"]["quant_cfg"]) == 11
