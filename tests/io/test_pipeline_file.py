"""Pipeline files: strict structuring, one line per problem, overrides, paths, TOML round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.pipeline_file import (
    apply_overrides,
    load_pipeline,
    parse_override,
    resolve_paths,
    spec_from_dict,
    spec_to_toml,
)
from auto_quantize_model.spec_values import SpecError
from auto_quantize_model.specs import (
    AutoQuantSpec,
    CalibSpec,
    LoadSpec,
    ManifestSpec,
    PipelineSpec,
    ReportSpec,
    ValidateSpec,
)
from auto_quantize_model.stages import stage_names

TINY = '[model]\npath = "builtin:tiny-qwen3-vl"\ndevice = "cpu"\n'


def write(tmp_path: Path, text: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, overrides)
    return str(info.value).splitlines()


# --------------------------------------------------------------------------- structuring


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, TINY))
    assert spec.model == LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu")
    assert spec.calib == CalibSpec()
    assert spec.autoquant == AutoQuantSpec()
    assert spec.validate is None
    assert spec.sweep == {}
    assert stage_names(spec) == (
        "LoadModel",
        "ExtractLM",
        "BuildCalibLoader",
        "RunAutoQuant",
        "BuildManifest",
        "WriteReports",
    )


def test_validate_table_turns_the_stage_on(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, TINY + "[validate]\nk = 3\n"))
    assert spec.validate == ValidateSpec(k=3)
    assert "ValidateSensitivity" in stage_names(spec)


def test_lists_become_tuples_and_ints_are_fine_for_floats(tmp_path: Path) -> None:
    text = TINY + '[autoquant]\nformats = ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"]\neffective_bits = 9\n'
    spec = load_pipeline(write(tmp_path, text))
    assert spec.autoquant.formats == ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert spec.autoquant.effective_bits == 9.0
    assert isinstance(spec.autoquant.effective_bits, float)


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, TINY + "[calib]\nnmu_samples = 3\n")
    assert problems(path) == [
        f"{path}: calib.nmu_samples: unknown key (did you mean max_samples?) "
        "(allowed: captions, max_samples, seq_len, batch_size, layout, images)"
    ]


def test_unknown_table(tmp_path: Path) -> None:
    path = write(tmp_path, TINY + "[calbi]\nseq_len = 3\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}: calbi: unknown key (did you mean calib?) (allowed: model, extract,")


@pytest.mark.parametrize(
    ("table", "line", "message"),
    [
        ("calib", 'seq_len = "512"', 'calib.seq_len: expected int, got str "512"'),
        ("calib", "max_samples = 4.8", "calib.max_samples: expected int, got float 4.8"),
        (
            "autoquant",
            'allow_nonfinite = "false"',
            'autoquant.allow_nonfinite: expected bool (true or false), got str "false"',
        ),
        ("calib", "batch_size = true", "calib.batch_size: expected int, got bool true"),
        ("autoquant", "effective_bits = true", "autoquant.effective_bits: expected float, got bool true"),
        ("autoquant", 'effective_bits = "8"', 'autoquant.effective_bits: expected float, got str "8"'),
        ("reports", "plots = 1", "reports.plots: expected bool (true or false), got int 1"),
        ("model", "device = 0", "model.device: expected str, got int 0"),
        (
            "autoquant",
            'formats = "INT8_DEFAULT_CFG"',
            'autoquant.formats: expected a list of str, got str "INT8_DEFAULT_CFG"',
        ),
        ("autoquant", 'formats = ["INT8_DEFAULT_CFG", 8]', "autoquant.formats[1]: expected str, got int 8"),
    ],
)
def test_no_silent_coercion(tmp_path: Path, table: str, line: str, message: str) -> None:
    head = TINY if table != "model" else '[model]\npath = "builtin:tiny-qwen3-vl"\n'
    text = head + f"[{table}]\n{line}\n" if table != "model" else head + f"{line}\n"
    path = write(tmp_path, text)
    assert problems(path) == [f"{path}: {message}"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '[autoquant]\nmethod = "kldiv"',
            'autoquant.method: expected one of "gradient", "kl_div", got str "kldiv" '
            '(did you mean "kl_div"?)',
        ),
        (
            '[calib]\nlayout = "pakced"',
            'calib.layout: expected one of "packed", "padded", got str "pakced" (did you mean "packed"?)',
        ),
        (
            '[extract]\nscope = "vision"',
            'extract.scope: expected one of "language_model", "full_model", got str "vision"',
        ),
    ],
)
def test_bad_choice_lists_allowed_values(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, TINY + line + "\n")
    assert problems(path) == [f"{path}: {message}"]


def test_missing_required_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\ndevice = "cpu"\n')
    assert problems(path) == [f"{path}: model.path: required value missing"]


def test_missing_required_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[calib]\nseq_len = 64\n")
    assert problems(path) == [f"{path}: model: required table missing (it needs at least: path)"]


def test_table_given_as_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, 'validate = 3\n[model]\npath = "builtin:tiny-qwen3-vl"\n')
    assert problems(path) == [f"{path}: validate: expected a table, got int 3"]


def test_every_problem_at_once(tmp_path: Path) -> None:
    text = """
[model]
device = "cpu"
[calib]
seq_len = "512"
nmu_samples = 3
[autoquant]
method = "fast"
allow_nonfinite = "false"
"""
    path = write(tmp_path, text)
    lines = problems(path)
    assert len(lines) == 5
    assert all(line.startswith(f"{path}: ") for line in lines)
    keys = sorted(line.split(": ")[1] for line in lines)
    assert keys == [
        "autoquant.allow_nonfinite",
        "autoquant.method",
        "calib.nmu_samples",
        "calib.seq_len",
        "model.path",
    ]


RANGE_CASES: list[tuple[Any, str, str, str]] = [
    # (the Python call, the same value as --set, the spec class, the problem)
    (lambda: CalibSpec(max_samples=0), "calib.max_samples=0", "CalibSpec", "must be > 0, got 0"),
    (lambda: CalibSpec(seq_len=-3), "calib.seq_len=-3", "CalibSpec", "must be > 0, got -3"),
    (lambda: AutoQuantSpec(score_size=0), "autoquant.score_size=0", "AutoQuantSpec", "must be > 0, got 0"),
    (lambda: AutoQuantSpec(calib_size=0), "autoquant.calib_size=0", "AutoQuantSpec", "must be > 0, got 0"),
    (
        lambda: AutoQuantSpec(effective_bits=16.5),
        "autoquant.effective_bits=16.5",
        "AutoQuantSpec",
        "must be in (0, 16], got 16.5",
    ),
    (
        lambda: AutoQuantSpec(formats=()),
        "autoquant.formats=[]",
        "AutoQuantSpec",
        "empty: name at least one format (aqm formats lists them)",
    ),
    (lambda: ValidateSpec(k=0), "validate.k=0", "ValidateSpec", "must be > 0, got 0"),
    (
        lambda: ValidateSpec(holdout_samples=0),
        "validate.holdout_samples=0",
        "ValidateSpec",
        "must be > 0, got 0",
    ),
    (
        lambda: ManifestSpec(scheme="../x"),
        "manifest.scheme='../x'",
        "ManifestSpec",
        "scheme name '../x' cannot be used in file names "
        "(use letters, digits and . _ + -, starting with a letter or digit)",
    ),
]


@pytest.mark.parametrize(
    ("make", "setting", "owner", "problem"), RANGE_CASES, ids=[c[1] for c in RANGE_CASES]
)
def test_python_and_toml_users_get_the_same_range_error(
    make: Any, setting: str, owner: str, problem: str, tmp_path: Path
) -> None:
    key = setting.partition("=")[0]
    with pytest.raises(SpecError) as info:
        make()
    assert str(info.value) == f"{owner}.{key.partition('.')[2]}: {problem}"
    path = write(tmp_path, TINY)
    assert problems(path, (setting,)) == [f"{path}: {key}: {problem} (from --set {setting})"]


@pytest.mark.parametrize("value", ["9223372036854775808", "-9223372036854775809", "99999999999999999999"])
def test_integers_beyond_64_bits_are_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, TINY + f"[model]\nseed = {value}\n".replace("[model]\n", "", 1))
    assert problems(path) == [
        f"{path}: model.seed: {value} does not fit in a 64-bit integer (-2**63 .. 2**63-1)"
    ]
    assert problems(write(tmp_path, TINY, "q.toml"), (f"autoquant.effective_bits={value}",)) == [
        f"{tmp_path / 'q.toml'}: autoquant.effective_bits: {value} does not fit in a 64-bit integer "
        f"(-2**63 .. 2**63-1) (from --set autoquant.effective_bits={value})"
    ]


def test_the_edges_of_64_bits_are_fine(tmp_path: Path) -> None:
    text = TINY + "seed = 9223372036854775807\n[validate]\nseed = -9223372036854775808\n"
    spec = load_pipeline(write(tmp_path, text))
    assert spec.model.seed == 2**63 - 1
    assert spec.validate is not None
    assert spec.validate.seed == -(2**63)


def test_type_and_range_problems_of_one_table_come_together_in_field_order(tmp_path: Path) -> None:
    path = write(tmp_path, TINY + '[calib]\nbatch_size = 0\nseq_len = "64"\nmax_samples = 0\nbogus = 1\n')
    assert problems(path) == [
        f"{path}: calib.max_samples: must be > 0, got 0",
        f'{path}: calib.seq_len: expected int, got str "64"',
        f"{path}: calib.batch_size: must be > 0, got 0",
        f"{path}: calib.bogus: unknown key "
        "(allowed: captions, max_samples, seq_len, batch_size, layout, images)",
    ]


def test_missing_file_and_not_toml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.toml: pipeline file not found"):
        load_pipeline(tmp_path / "nope.toml")
    path = write(tmp_path, "[model\npath = 1\n")
    with pytest.raises(ConfigError, match=r"p\.toml: not valid TOML: .*line 1") as info:
        load_pipeline(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- --set


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("calib.seq_len=256", ("calib", "seq_len"), 256),
        ('autoquant.formats=["FP8_DEFAULT_CFG"]', ("autoquant", "formats"), ["FP8_DEFAULT_CFG"]),
        ("model.path=/ckpt/x", ("model", "path"), "/ckpt/x"),
        ('manifest.scheme="8"', ("manifest", "scheme"), "8"),
        ("reports.plots=false", ("reports", "plots"), False),
        ("autoquant.effective_bits = 4.5", ("autoquant", "effective_bits"), 4.5),
        ("sweep.calib.seq_len=[64, 128]", ("sweep", "calib.seq_len"), [64, 128]),
    ],
)
def test_parse_override(text: str, keys: tuple[str, ...], value: object) -> None:
    override = parse_override(text)
    assert override.keys == keys
    assert override.value == value
    assert type(override.value) is type(value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("calib.seq_len", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("calib..seq_len=3", "bad key"),
        ("calib.seq len=3", "bad key"),
        ("calib.seq_len=", "empty value"),
        ("autoquant.formats=[1, 2", "is not a valid TOML value"),
        ('manifest.scheme="abc', "is not a valid TOML value"),
    ],
)
def test_bad_override_syntax_is_one_line_naming_it(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    message = str(info.value)
    assert message.startswith(f"--set {text}: ")
    assert fragment in message
    assert "\n" not in message


def test_override_types_are_as_strict_as_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, TINY)
    assert problems(path, ("calib.seq_len=abc",)) == [
        f'{path}: calib.seq_len: expected int, got str "abc" (from --set calib.seq_len=abc)'
    ]
    assert problems(path, ("calib.seq_lne=5",))[0].startswith(f"{path}: calib.seq_lne: unknown key")


def test_override_applies_and_creates_tables(tmp_path: Path) -> None:
    spec = load_pipeline(
        write(tmp_path, TINY),
        ("calib.seq_len=256", 'autoquant.formats=["FP8_DEFAULT_CFG"]', "validate.k=2"),
    )
    assert spec.calib.seq_len == 256
    assert spec.autoquant.formats == ("FP8_DEFAULT_CFG",)
    assert spec.validate == ValidateSpec(k=2)


def test_override_through_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"--set calib.seq_len.x=1: calib.seq_len is a value, not a table"):
        apply_overrides({"calib": {"seq_len": 3}}, [parse_override("calib.seq_len.x=1")])


def test_override_does_not_touch_the_input() -> None:
    raw = {"calib": {"seq_len": 3}}
    out = apply_overrides(raw, [parse_override("calib.seq_len=4")])
    assert raw == {"calib": {"seq_len": 3}}
    assert out == {"calib": {"seq_len": 4}}


# --------------------------------------------------------------------------- sweep table


def test_sweep_table_dotted_and_quoted_keys(tmp_path: Path) -> None:
    text = TINY + '[sweep]\ncalib.seq_len = [32, 64]\n"autoquant.method" = ["gradient", "kl_div"]\n'
    spec = load_pipeline(write(tmp_path, text))
    assert spec.sweep == {"calib.seq_len": (32, 64), "autoquant.method": ("gradient", "kl_div")}


def test_sweep_problems(tmp_path: Path) -> None:
    text = TINY + '[sweep]\n"calib.seq_lne" = [1]\n"calib.seq_len" = 3\n"calib.batch_size" = []\n'
    path = write(tmp_path, text)
    lines = problems(path)
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}: sweep.calib.seq_lne: unknown setting 'calib.seq_lne' (did you mean")
    assert lines[1] == f"{path}: sweep.calib.seq_len: expected a list of values to try, got int 3"
    assert lines[2] == f"{path}: sweep.calib.batch_size: the list of values to try is empty"


def test_sweep_override(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, TINY), ("sweep.calib.seq_len=[16, 32]",))
    assert spec.sweep == {"calib.seq_len": (16, 32)}


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_the_file_folder(tmp_path: Path) -> None:
    text = """
[model]
path = "ckpt/qwen"
tokenizer = "../tok"
[calib]
captions = "data/captions.txt"
[validate]
holdout_captions = "builtin"
[reports]
output_dir = "out"
[sweep]
"calib.captions" = ["a.txt", "/abs/b.txt", "builtin"]
"""
    folder = tmp_path / "pipes"
    spec = load_pipeline(write(folder, text), cwd=tmp_path / "elsewhere")
    assert spec.model.path == str(folder / "ckpt" / "qwen")
    assert spec.model.tokenizer == str(tmp_path / "tok")
    assert spec.calib.captions == str(folder / "data" / "captions.txt")
    assert spec.validate is not None
    assert spec.validate.holdout_captions == "builtin"
    assert spec.reports.output_dir == str(folder / "out")
    assert spec.sweep["calib.captions"] == (str(folder / "a.txt"), "/abs/b.txt", "builtin")


def test_builtin_sources_are_not_paths(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path / "sub", TINY + '[calib]\ncaptions = "builtin"\n'))
    assert spec.model.path == "builtin:tiny-qwen3-vl"
    assert spec.calib.captions == "builtin"


def test_override_paths_resolve_against_the_working_directory(tmp_path: Path) -> None:
    cwd = tmp_path / "shell"
    spec = load_pipeline(
        write(tmp_path / "pipes", TINY + '[calib]\ncaptions = "file.txt"\n'),
        ("model.path=ckpt", "model.tokenizer=~/tok"),
        cwd=cwd,
    )
    assert spec.model.path == str(cwd / "ckpt")
    assert spec.model.tokenizer == str(Path("~/tok").expanduser())
    assert spec.calib.captions == str(tmp_path / "pipes" / "file.txt")


def test_resolve_paths_leaves_wrong_types_for_the_structuring_step(tmp_path: Path) -> None:
    raw = {"model": {"path": 5}, "calib": {"captions": "x.txt"}}
    out = resolve_paths(raw, tmp_path)
    assert out["model"]["path"] == 5
    assert out["calib"]["captions"] == str(tmp_path / "x.txt")


# --------------------------------------------------------------------------- back to TOML


def test_spec_to_toml_round_trip() -> None:
    spec = PipelineSpec(
        model=LoadSpec(path='/ckpt/wei"rd\\name ü', tokenizer="/tok", device="cuda:1", seed=3),
        calib=CalibSpec(captions="/data/c\taps.txt", max_samples=10, layout="padded"),
        autoquant=AutoQuantSpec(
            formats=("INT8_DEFAULT_CFG", "wint4-b128_aint8-token"),
            method="kl_div",
            effective_bits=6.25,
            calib_size=4,
            disabled_layers=("*lm_head*",),
        ),
        validate=ValidateSpec(k=2, additivity=False),
        reports=ReportSpec(output_dir="/out", save_state=True, plots=False),
        sweep={
            "calib.seq_len": (64, 128),
            "autoquant.formats": (("INT8_DEFAULT_CFG",), ("FP8_DEFAULT_CFG",)),
        },
    )
    text = spec_to_toml(spec, header="line one\n\nline three")
    assert text.startswith("# line one\n#\n# line three\n")
    back = spec_from_dict(tomllib.loads(text), source="round trip")
    assert back == spec


def test_spec_to_toml_omits_absent_values_and_tables() -> None:
    text = spec_to_toml(PipelineSpec(model=LoadSpec(path="builtin:tiny-qwen3-vl")), with_sweep=False)
    data = tomllib.loads(text)
    assert "validate" not in data
    assert "sweep" not in data
    assert "tokenizer" not in data["model"]
    assert "checkpoint" not in data["autoquant"]


# --------------------------------------------------------------------------------------------------
# device_map and max_memory tables
# --------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, model_table: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(f'[model]\npath = "builtin:tiny-qwen3-vl"\n{model_table}', encoding="utf-8")
    return path


def test_pipeline_file_takes_tables_and_round_trips(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'device_map = "balanced"\n[model.max_memory]\n0 = "40GiB"\n1 = "40GiB"\ncpu = "100GB"\n',
    )
    spec = load_pipeline(path)
    assert spec.model.device_map == "balanced"
    assert spec.model.max_memory == (("0", "40GiB"), ("1", "40GiB"), ("cpu", "100GB"))
    assert spec_from_dict(tomllib.loads(spec_to_toml(spec)), source="again") == spec

    table = load_pipeline(_write(tmp_path, '[model.device_map]\n"" = "cpu"\n"model.visual" = 0\n'))
    assert table.model.device_map == (("", "cpu"), ("model.visual", "cuda:0"))
    text = spec_to_toml(table)
    assert '[model.device_map]\n"" = "cpu"\n"model.visual" = "cuda:0"' in text
    assert spec_from_dict(tomllib.loads(text), source="again") == table


def test_pipeline_file_reports_every_bad_entry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_pipeline(_write(tmp_path, '[model.device_map]\n"model.visual" = true\nlm_head = 1.5\n'))
    text = str(info.value)
    assert "model.device_map.model.visual: expected a device name or GPU number" in text
    assert "model.device_map.lm_head: expected a device name or GPU number" in text
    with pytest.raises(ConfigError, match=r"p\.toml: model\.max_memory: unknown device key 'x'.*bad size"):
        load_pipeline(_write(tmp_path, 'device_map = "auto"\nmax_memory = {x = "1GiB", 0 = "lots"}\n'))
    with pytest.raises(ConfigError, match=r"model\.max_memory: expected a table of device -> size"):
        load_pipeline(_write(tmp_path, 'device_map = "auto"\nmax_memory = "40GiB"\n'))


def test_set_override_reaches_device_map(tmp_path: Path) -> None:
    spec = load_pipeline(_write(tmp_path, ""), ["model.device_map=sequential"])
    assert spec.model.device_map == "sequential"


# --------------------------------------------------------------------------------------------------
# The experts setting
# --------------------------------------------------------------------------------------------------


def test_pipeline_file_accepts_the_experts_setting(tmp_path: Any) -> None:
    from auto_quantize_model.errors import ConfigError
    from auto_quantize_model.io.pipeline_file import load_pipeline

    good = tmp_path / "good.toml"
    good.write_text(
        '[model]\npath = "builtin:tiny-qwen3-vl-moe"\n[extract]\nexperts = "expert"\n'
        '[autoquant]\nformats = ["INT8_DEFAULT_CFG"]\n[manifest]\nscheme = "t"\n',
        encoding="utf-8",
    )
    assert load_pipeline(good).extract.experts == "expert"
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text(encoding="utf-8").replace('"expert"', '"experts"'), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_pipeline(bad)
    assert "experts" in str(err.value)
    assert "projection" in str(err.value)
