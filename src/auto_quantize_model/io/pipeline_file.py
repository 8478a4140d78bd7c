"""Pipeline files: TOML in, one frozen :class:`PipelineSpec` out, every mistake reported at once.

This is the only place where user-written data becomes typed specs. One cattrs converter does
it, with unknown keys forbidden and no silent coercion: TOML already has real ints, floats,
booleans and strings, so ``"8"`` for an int or ``4.8`` for an int is a typo to report, not a value
to guess at. A file with three mistakes gets three lines, each naming the file and the key path,
so a user fixes them in one edit instead of three runs.

Nothing here imports torch: ``aqm validate`` and the pre-flight checks run in a second, before
any model is loaded.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.specs import (
    AutoQuantSpec,
    CalibSpec,
    ExtractSpec,
    LoadSpec,
    ManifestSpec,
    ReportSpec,
    ValidateSpec,
)

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Pipeline

SweepTable = dict[str, tuple[Any, ...]]


@attrs.frozen
class PipelineSpec:
    """A whole pipeline file: one table per stage, plus an optional ``[sweep]``.

    ``validate`` is None when the file has no ``[validate]`` table: validation costs extra
    forward passes, so it runs only when asked for.
    """

    model: LoadSpec
    extract: ExtractSpec = attrs.field(factory=ExtractSpec)
    calib: CalibSpec = attrs.field(factory=CalibSpec)
    autoquant: AutoQuantSpec = attrs.field(factory=AutoQuantSpec)
    validate: ValidateSpec | None = None
    manifest: ManifestSpec = attrs.field(factory=ManifestSpec)
    reports: ReportSpec = attrs.field(factory=ReportSpec)
    sweep: SweepTable = attrs.field(factory=dict)
    """Dotted setting (``calib.seq_len``) -> the values to try; empty means a single run."""


STAGE_TABLES: dict[str, type] = {
    "model": LoadSpec,
    "extract": ExtractSpec,
    "calib": CalibSpec,
    "autoquant": AutoQuantSpec,
    "validate": ValidateSpec,
    "manifest": ManifestSpec,
    "reports": ReportSpec,
}
"""Table name in the file -> the spec class it structures into, in pipeline order."""

PATH_KEYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("model", "path"),
        ("model", "tokenizer"),
        ("calib", "captions"),
        ("validate", "holdout_captions"),
        ("reports", "output_dir"),
        ("autoquant", "checkpoint"),
    }
)
"""Settings holding file system paths; relative ones resolve against the pipeline file's folder."""

_NOT_SWEEPABLE = frozenset({("reports", "output_dir")})
"""Every sweep point gets its own folder, so sweeping the output folder would make no sense."""

_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+")


def _is_special_source(key: tuple[str, str], value: str) -> bool:
    """True for values that name something bundled rather than a file (never resolved)."""
    if key == ("model", "path"):
        return value.startswith(("builtin:", "config:"))
    if key == ("validate", "holdout_captions"):
        return value in {"builtin", "builtin-holdout"}
    if key == ("calib", "captions"):
        return value == "builtin"
    return False


# --------------------------------------------------------------------------- strict converter


class _Mismatch(TypeError):
    """A value of the wrong TOML type; ``str(self)`` is the whole user-facing description."""


class _Problems(Exception):
    """Several problems found by one hook, as (relative key path, message) pairs."""

    def __init__(self, problems: list[tuple[list[str], str]]) -> None:
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


def describe_value(value: object) -> str:
    """A value as a user would recognise it from their TOML file: ``str "512"``, ``float 4.8``."""
    if isinstance(value, bool):
        return f"bool {'true' if value else 'false'}"
    if isinstance(value, str):
        return f"str {toml_value(value)}"
    if isinstance(value, int | float):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _strict_int(value: object, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Mismatch(f"expected int, got {describe_value(value)}")


def _strict_float(value: object, _: type) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _Mismatch(f"expected float, got {describe_value(value)}")


def _strict_str(value: object, _: type) -> str:
    if isinstance(value, str):
        return value
    raise _Mismatch(f"expected str, got {describe_value(value)}")


def _strict_bool(value: object, _: type) -> bool:
    if isinstance(value, bool):
        return value
    raise _Mismatch(f"expected bool (true or false), got {describe_value(value)}")


def _is_literal(type_: Any) -> bool:
    return typing.get_origin(type_) is Literal


def _structure_literal(value: object, type_: Any) -> object:
    allowed = typing.get_args(type_)
    # ``True == 1`` in Python, so compare types too: a bool must not pass for a choice.
    if any(type(value) is type(choice) and value == choice for choice in allowed):
        return value
    choices = ", ".join(toml_value(choice) for choice in allowed)
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in allowed], n=1)
        if close:
            hint = f" (did you mean {toml_value(close[0])}?)"
    raise _Mismatch(f"expected one of {choices}, got {describe_value(value)}{hint}")


def _is_homogeneous_tuple(type_: Any) -> bool:
    args = typing.get_args(type_)
    return typing.get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook_func(_is_literal, _structure_literal)

    def structure_tuple(value: object, type_: Any) -> tuple[Any, ...]:
        # cattrs would happily turn the string "INT8_DEFAULT_CFG" into a tuple of characters.
        element = typing.get_args(type_)[0]
        if not isinstance(value, list | tuple):
            raise _Mismatch(
                f"expected a list of {getattr(element, '__name__', element)}, got {describe_value(value)}"
            )
        hook = converter.get_structure_hook(element)
        items: list[Any] = []
        errors: list[Exception] = []
        for index, item in enumerate(value):
            try:
                items.append(hook(item, element))
            except Exception as err:
                err.__notes__ = [*getattr(err, "__notes__", []), IterableValidationNote("", index, element)]
                errors.append(err)
        if errors:
            raise IterableValidationError("invalid list items", errors, type_)
        return tuple(items)

    converter.register_structure_hook_func(_is_homogeneous_tuple, structure_tuple)
    converter.register_structure_hook_func(lambda t: t == SweepTable, _structure_sweep)

    def attrs_factory(cl: type) -> Callable[[Any, type], Any]:
        generated: Callable[[Any, type], Any] = make_dict_structure_fn(cl, converter)

        def structure(value: Any, type_: type) -> Any:
            if not isinstance(value, dict):
                raise _Mismatch(f"expected a table, got {describe_value(value)}")
            return generated(value, type_)

        return structure

    converter.register_structure_hook_factory(attrs.has, attrs_factory)
    return converter


def _field_names(cl: type) -> list[str]:
    return [field.name for field in attrs.fields(cl)]


def _sweep_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be swept, or None when it names a real stage setting."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in STAGE_TABLES:
        return f"unknown setting {key!r} (write TABLE.KEY with TABLE one of {', '.join(STAGE_TABLES)})"
    table, name = parts
    allowed = _field_names(STAGE_TABLES[table])
    if name not in allowed:
        hint = _did_you_mean(name, allowed)
        return f"unknown setting {key!r}{hint} (allowed in {table}: {', '.join(allowed)})"
    if (table, name) in _NOT_SWEEPABLE:
        return f"{key} cannot be swept: every sweep point gets its own folder under the run folder"
    return None


def _flatten_sweep(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``[sweep] calib.seq_len = [...]`` (a TOML dotted key) and ``"calib.seq_len" = [...]`` mean the same."""
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten_sweep(value, f"{full}.")
        else:
            yield full, value


def _frozen(value: Any) -> Any:
    """Lists inside sweep values become tuples, so a spec stays comparable and hashable data."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _structure_sweep(value: object, _: type) -> SweepTable:
    if not isinstance(value, dict):
        raise _Mismatch(f"expected a table, got {describe_value(value)}")
    problems: list[tuple[list[str], str]] = []
    result: SweepTable = {}
    for key, values in _flatten_sweep(value):
        problem = _sweep_key_problem(key)
        if problem is None and not isinstance(values, list | tuple):
            problem = f"expected a list of values to try, got {describe_value(values)}"
        if problem is None and not values:
            problem = "the list of values to try is empty"
        if problem is not None:
            problems.append(([key], problem))
        else:
            result[key] = tuple(_frozen(v) for v in values)
    if problems:
        raise _Problems(problems)
    return result


_CONVERTER = _make_converter()


# --------------------------------------------------------------------------- error lines


def _did_you_mean(word: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(allowed), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _join(path: Sequence[str]) -> str:
    text = ""
    for part in path:
        if part.startswith("["):
            text += part
        else:
            text = f"{text}.{part}" if text else part
    return text or "(top level)"


def _leaf_message(err: BaseException, expected: Any) -> str:
    if isinstance(err, _Mismatch):
        return str(err)
    if isinstance(err, KeyError):
        if isinstance(expected, type) and attrs.has(expected):
            required = [f.name for f in attrs.fields(expected) if f.default is attrs.NOTHING]
            return f"required table missing (it needs at least: {', '.join(required)})"
        return "required value missing"
    return f"invalid value ({type(err).__name__}: {err})"


def _problem_lines(
    err: BaseException, path: list[str], cl: type | None = None
) -> list[tuple[list[str], str]]:
    """Walk cattrs' exception tree into (key path, message) pairs, one per problem."""
    lines: list[tuple[list[str], str]] = []
    if isinstance(err, ClassValidationError):
        with_notes, without = err.group_exceptions()
        for sub, note in with_notes:
            lines += _problem_lines_for(sub, [*path, note.name], note)
        for sub in without:
            lines += _problem_lines(sub, path, err.cl)
    elif isinstance(err, IterableValidationError):
        with_items, without_items = err.group_exceptions()
        for sub, item_note in with_items:
            indexed = [*path[:-1], f"{path[-1]}[{item_note.index}]"] if path else [f"[{item_note.index}]"]
            lines += _problem_lines_for(sub, indexed, item_note)
        for sub in without_items:
            lines += _problem_lines(sub, path)
    elif isinstance(err, ForbiddenExtraKeysError):
        allowed = _field_names(err.cl)
        for key in sorted(err.extra_fields):
            lines.append(
                ([*path, key], f"unknown key{_did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})")
            )
    elif isinstance(err, _Problems):
        lines += [([*path, *sub], msg) for sub, msg in err.problems]
    else:
        lines.append((path, _leaf_message(err, cl)))
    return lines


def _problem_lines_for(
    err: BaseException, path: list[str], note: AttributeValidationNote | IterableValidationNote
) -> list[tuple[list[str], str]]:
    if isinstance(err, ClassValidationError | IterableValidationError | _Problems):
        return _problem_lines(err, path)
    return [(path, _leaf_message(err, note.type))]


# --------------------------------------------------------------------------- overrides


@attrs.frozen
class Override:
    """One ``--set KEY=VALUE``: the key path and the value parsed as TOML."""

    text: str
    keys: tuple[str, ...]
    value: Any


def parse_override(text: str) -> Override:
    """Parse ``calib.seq_len=256``; a value that is not TOML but a bare word becomes a string.

    Bare words let ``--set model.path=/ckpt/x`` work without shell-quoting TOML quotes, while a
    broken list or string (``[1, 2``) is an error rather than a surprising string.
    """
    key_text, sep, value_text = text.partition("=")
    key_text = key_text.strip()
    if not sep or not key_text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. --set calib.seq_len=256")
    parts = key_text.split(".")
    bad = [part for part in parts if not _KEY_PART.fullmatch(part)]
    if bad:
        raise ConfigError(
            f"--set {text}: bad key {key_text!r} (write dotted names like calib.seq_len, no spaces or quotes)"
        )
    keys = ("sweep", ".".join(parts[1:])) if parts[0] == "sweep" and len(parts) > 1 else tuple(parts)
    value_text = value_text.strip()
    if not value_text:
        raise ConfigError(f'--set {text}: empty value (write {key_text}="" for an empty string)')
    try:
        parsed = tomllib.loads(f"v = {value_text}")
    except tomllib.TOMLDecodeError as err:
        if value_text[0] in "[{\"'" or "\n" in value_text:
            raise ConfigError(f"--set {text}: {value_text} is not a valid TOML value ({err})") from None
        return Override(text, keys, value_text)
    if set(parsed) != {"v"}:
        raise ConfigError(f"--set {text}: the value must be a single TOML value")
    return Override(text, keys, parsed["v"])


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """A copy of ``raw`` with each override written in, creating tables as needed."""
    result = _deep_copy(raw)
    for override in overrides:
        table: dict[str, Any] = result
        for depth, key in enumerate(override.keys[:-1]):
            child = table.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(override.keys[: depth + 1])
                raise ConfigError(f"--set {override.text}: {where} is a value, not a table")
            table = child
        table[override.keys[-1]] = override.value
    return result


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _deep_copy(value) if isinstance(value, Mapping) else value for key, value in raw.items()}


# --------------------------------------------------------------------------- loading


def read_toml(path: Path) -> dict[str, Any]:
    """The raw table of a pipeline file; a missing or non-TOML file is a one-line error."""
    if not path.exists():
        raise InputError(f"{path}: pipeline file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file (expected a .toml pipeline file)")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 ({err.reason})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None


def _resolve(value: str, base: Path) -> str:
    expanded = Path(value).expanduser()
    return os.path.normpath(expanded if expanded.is_absolute() else (base / expanded).absolute())


def resolve_paths(
    raw: Mapping[str, Any], base_dir: Path, *, cwd: Path | None = None, from_cli: Iterable[str] = ()
) -> dict[str, Any]:
    """Make every relative path in ``raw`` absolute.

    Paths written in the file resolve against the file's folder (so a pipeline file works from
    any working directory); paths given with ``--set`` resolve against ``cwd``, where the shell
    that typed them is. Values of the wrong type are left for the structuring step to report.
    """
    cli_keys = set(from_cli)
    here = cwd if cwd is not None else Path.cwd()
    result = _deep_copy(raw)
    for table, key in PATH_KEYS:
        section = result.get(table)
        if isinstance(section, dict) and isinstance(section.get(key), str):
            value = section[key]
            if value and not _is_special_source((table, key), value):
                base = here if f"{table}.{key}" in cli_keys else base_dir
                section[key] = _resolve(value, base)
    sweep = result.get("sweep")
    if isinstance(sweep, dict):
        flat = dict(_flatten_sweep(sweep))
        for dotted, values in flat.items():
            parts = tuple(dotted.split("."))
            if len(parts) == 2 and parts in PATH_KEYS and isinstance(values, list):
                base = here if f"sweep.{dotted}" in cli_keys else base_dir
                flat[dotted] = [
                    _resolve(v, base) if isinstance(v, str) and v and not _is_special_source(parts, v) else v
                    for v in values
                ]
        result["sweep"] = flat
    return result


def spec_from_dict(
    raw: Mapping[str, Any],
    *,
    source: str,
    overrides: Sequence[Override] = (),
) -> PipelineSpec:
    """Structure an already path-resolved raw table; every problem becomes one line of the error."""
    try:
        return _CONVERTER.structure(dict(raw), PipelineSpec)
    except Exception as err:
        problems = _problem_lines(err, [])
        by_key = {_override_path(o): o.text for o in overrides}
        lines = []
        for path, message in problems:
            where = _join(path)
            origin = _origin(path, by_key)
            lines.append(f"{source}: {where}: {message}{f' (from --set {origin})' if origin else ''}")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def _override_path(override: Override) -> tuple[str, ...]:
    if override.keys[0] == "sweep":
        return ("sweep", *override.keys[1].split("."))
    return override.keys


def _origin(path: Sequence[str], by_key: Mapping[tuple[str, ...], str]) -> str | None:
    plain = tuple(part.split("[", 1)[0] for part in path)
    for length in range(len(plain), 0, -1):
        if plain[:length] in by_key:
            return by_key[plain[:length]]
    return None


def load_pipeline(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, cwd: Path | None = None
) -> PipelineSpec:
    """Read, override and structure a pipeline file (no model, no torch).

    ``overrides`` are ``--set`` strings; they are applied to the raw TOML before structuring, so
    they are typed exactly as strictly as the file.
    """
    file = Path(path)
    raw = read_toml(file)
    parsed = [parse_override(text) for text in overrides]
    merged = apply_overrides(raw, parsed)
    from_cli = {".".join(o.keys) for o in parsed}
    resolved = resolve_paths(merged, file.parent, cwd=cwd, from_cli=from_cli)
    return spec_from_dict(resolved, source=str(path), overrides=parsed)


# --------------------------------------------------------------------------- back to TOML


def spec_to_dict(spec: PipelineSpec, *, with_sweep: bool = True) -> dict[str, Any]:
    """Plain tables (None values dropped, tuples as lists), the shape a TOML file would have."""
    raw: dict[str, Any] = {}
    for table in STAGE_TABLES:
        section = getattr(spec, table)
        if section is None:
            continue
        raw[table] = {
            field.name: _plain(getattr(section, field.name))
            for field in attrs.fields(type(section))
            if getattr(section, field.name) is not None
        }
    if with_sweep and spec.sweep:
        raw["sweep"] = {key: _plain(values) for key, values in spec.sweep.items()}
    return raw


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def toml_value(value: object) -> str:
    """One value in TOML syntax: str, int, float, bool, lists and (inline) tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        out = []
        for char in value:
            if char in _ESCAPES:
                out.append(_ESCAPES[char])
            elif ord(char) < 0x20 or ord(char) == 0x7F:
                out.append(f"\\u{ord(char):04x}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def spec_to_toml(spec: PipelineSpec, *, header: str = "", with_sweep: bool = True) -> str:
    """The effective pipeline as a TOML file that ``aqm run`` accepts as is.

    Paths are written as resolved (absolute), so the file re-runs from any folder.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for table, section in spec_to_dict(spec, with_sweep=with_sweep).items():
        if lines:
            lines.append("")
        lines.append(f"[{table}]")
        lines += [f"{toml_key(key)} = {toml_value(value)}" for key, value in section.items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pre-flight


def preflight(spec: PipelineSpec, *, source: str | None = None) -> None:
    """Checks that need no model: numbers in range, formats known and runnable, files present.

    They run before anything heavy so that a typo costs a second, not a model load. All problems
    are reported together, one line each.
    """
    problems: list[tuple[str, type[AqmError]]] = []

    def bad(key: str, message: str, kind: type[AqmError] = ConfigError) -> None:
        problems.append((f"{key}: {message}", kind))

    def positive(key: str, value: int | float | None) -> None:
        if value is not None and not value > 0:
            bad(key, f"must be > 0, got {value}")

    positive("calib.max_samples", spec.calib.max_samples)
    positive("calib.seq_len", spec.calib.seq_len)
    positive("calib.batch_size", spec.calib.batch_size)
    positive("autoquant.score_size", spec.autoquant.score_size)
    positive("autoquant.calib_size", spec.autoquant.calib_size)
    if spec.validate is not None:
        positive("validate.k", spec.validate.k)
        positive("validate.holdout_samples", spec.validate.holdout_samples)

    for key, message in _format_problems(spec):
        bad(key, message)

    model_path = spec.model.path
    if not _is_special_source(("model", "path"), model_path):
        folder = Path(model_path)
        hint = " (point it at a Hugging Face checkout: --set model.path=DIR)"
        if not folder.exists():
            bad("model.path", f"{model_path} does not exist{hint}", InputError)
        elif not folder.is_dir():
            bad("model.path", f"{model_path} is not a directory{hint}", InputError)
        elif not (folder / "config.json").is_file():
            bad("model.path", f"{model_path} has no config.json: not a Hugging Face checkout", InputError)
    else:
        from auto_quantize_model.backend.models import BUILTIN_SOURCES

        if model_path not in BUILTIN_SOURCES:
            hint = _did_you_mean(model_path, BUILTIN_SOURCES)
            known = ", ".join(BUILTIN_SOURCES)
            bad("model.path", f"unknown built-in source {model_path!r}{hint} (known: {known})")
    if not _DEVICE.fullmatch(spec.model.device):
        bad("model.device", f"expected auto, cpu, cuda or cuda:N, got {toml_value(spec.model.device)}")
    if spec.model.tokenizer is not None and not Path(spec.model.tokenizer).is_dir():
        bad("model.tokenizer", f"{spec.model.tokenizer} is not a directory", InputError)
    _check_text_file("calib.captions", spec.calib.captions, bad)
    if spec.validate is not None:
        _check_text_file("validate.holdout_captions", spec.validate.holdout_captions, bad)
    if spec.reports.output_dir is not None:
        out = Path(spec.reports.output_dir)
        if out.exists() and not out.is_dir():
            bad("reports.output_dir", f"{out} exists and is not a directory", InputError)

    if problems:
        prefix = f"{source}: " if source else ""
        kinds = {kind for _, kind in problems}
        kind = kinds.pop() if len(kinds) == 1 else ConfigError
        raise kind("\n".join(f"{prefix}{message}" for message, _ in problems))


def _check_text_file(key: str, value: str, bad: Callable[..., None]) -> None:
    if value in {"builtin", "builtin-holdout"}:
        return
    path = Path(value)
    if not path.exists():
        bad(key, f"{value} does not exist", InputError)
    elif not path.is_file():
        bad(key, f"{value} is not a file", InputError)


def _format_problems(spec: PipelineSpec) -> list[tuple[str, str]]:
    """(key, message) for unknown/unrunnable formats and an unreachable bit budget, deduplicated."""
    from auto_quantize_model.core import formats

    names = spec.autoquant.formats
    bits = spec.autoquant.effective_bits
    found: dict[tuple[str, str], None] = {}
    if not names:
        found["autoquant.formats", "empty: name at least one format (aqm formats lists them)"] = None
    lowest: float | None = None
    for name in names:
        try:
            formats.check_formats([name], spec.model.device)
        except AqmError as err:
            found["autoquant.formats", str(err).splitlines()[0]] = None
        try:
            bits_of_name = formats.min_effective_bits([name])
        except AqmError:
            continue  # an unknown name, reported just above
        lowest = bits_of_name if lowest is None else min(lowest, bits_of_name)
    if len(names) > 1:
        try:
            formats.check_formats(names, spec.model.device)  # names listed twice, under any spelling
        except AqmError as err:
            found["autoquant.formats", str(err).splitlines()[0]] = None
    if not (0 < bits <= 16):
        found["autoquant.effective_bits", f"must be in (0, 16], got {bits:g}"] = None
    elif lowest is not None and bits < lowest:
        reach = f"minimum {lowest:g}"
        found["autoquant.effective_bits", f"{bits:g} is below what these formats can reach ({reach})"] = None
    return list(found)


# --------------------------------------------------------------------------- assembling


def build_pipeline(spec: PipelineSpec, output_dir: str | os.PathLike[str]) -> Pipeline:
    """The stages of ``spec`` in order, reports going to ``output_dir``.

    Stage modules are imported here, not at the top, so reading and checking a pipeline file
    never pays for torch.
    """
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant
    from auto_quantize_model.stages.write_reports import WriteReports

    reports = attrs.evolve(spec.reports, output_dir=os.fspath(output_dir))
    stages: list[Any] = [
        LoadModel(spec.model),
        ExtractLM(spec.extract),
        BuildCalibLoader(spec.calib),
        RunAutoQuant(spec.autoquant),
    ]
    if spec.validate is not None:
        from auto_quantize_model.stages.validate_sensitivity import ValidateSensitivity

        stages.append(ValidateSensitivity(spec.validate))
    stages += [BuildManifest(spec.manifest), WriteReports(reports)]
    return Pipeline(stages)


def stage_names(spec: PipelineSpec) -> tuple[str, ...]:
    """The stage classes ``build_pipeline`` would assemble, without importing them."""
    middle = ("ValidateSensitivity",) if spec.validate is not None else ()
    return (
        "LoadModel",
        "ExtractLM",
        "BuildCalibLoader",
        "RunAutoQuant",
        *middle,
        "BuildManifest",
        "WriteReports",
    )
