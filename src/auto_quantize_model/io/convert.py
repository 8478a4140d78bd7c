"""The one edge where outside data becomes typed values: pipeline files, manifests, run records.

One cattrs converter, :data:`CONVERTER`, structures everything a user or an earlier run wrote.
Its rules, chosen once:

* no silent coercion. TOML and JSON already have real ints, floats, booleans and strings, so
  ``"8"`` for an int, ``4.8`` for an int or ``"false"`` for a bool is a mistake to report, not a
  value to guess at. An int is a float's only stand-in, and only within 64 bits (TOML's range;
  Python's parsers accept more, which no setting means);
* unknown keys are errors (each one named, with a did-you-mean and the allowed keys), except in
  schemas marked :func:`open_schema` (the previous tool's files carry keys we ignore) and in
  copies made with ``forbid_extra_keys=False`` (records a newer aqm may extend);
* every problem is reported at once: cattrs' detailed validation collects type errors, and the
  range checks that the spec classes run as attrs validators are re-run field by field, so one
  edit fixes a file instead of one run per mistake.

:data:`JSON_CONVERTER` is a copy for JSON files, where a non-finite float is spelled as the
string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (strict JSON has no such tokens), and package
versions are an object of name -> version.

Errors are rendered with :func:`cattrs.transform_error` and one formatter per file kind:
:func:`toml_problems` says ``expected int, got str "8"`` (what a TOML writer reads), and
:func:`json_problems` says ``is not an integer (got str "8")`` (what a JSON key reads).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs
import tomli_w
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

from auto_quantize_model.errors import InputError
from auto_quantize_model.spec_values import DeviceMapSetting, MemoryLimitsSetting, SpecError
from auto_quantize_model.specs import STAGE_TABLES, SweepTable

T = TypeVar("T")
Record = TypeVar("Record", bound=attrs.AttrsInstance)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NONFINITE_TO_STR: dict[float, str] = {math.inf: "Infinity", -math.inf: "-Infinity"}
STR_TO_NONFINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
VersionPairs = tuple[tuple[str, str], ...]

_ROOT = "\x00"
"""Root of :func:`cattrs.transform_error` paths: no TOML or JSON text yields a raw NUL, so the
``message @ path`` lines it returns split back apart unambiguously."""
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_OPEN_SCHEMAS: set[type] = set()


# --------------------------------------------------------------------------- values as users wrote them


def toml_value(value: object) -> str:
    """One value in TOML syntax on one line: str, int, float, bool, lists and inline tables."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    try:
        return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")
    except TypeError:
        raise TypeError(f"cannot write {type(value).__name__} as TOML") from None


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


def describe_value(value: object, *, json_words: bool = False) -> str:
    """A value as a user would recognise it from their file: ``str "512"``, ``float 4.8``."""
    if isinstance(value, bool):
        return f"bool {'true' if value else 'false'}"
    if isinstance(value, str):
        return f"str {toml_value(value)}"
    if isinstance(value, int | float):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object" if json_words else "a table"
    if value is None:
        return "null"
    return type(value).__name__


def did_you_mean(word: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(allowed), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --------------------------------------------------------------------------- problems the hooks raise


class Mismatch(TypeError):
    """A value of the wrong type. ``toml``/``json`` name what was expected in each file's words."""

    def __init__(self, toml: str, json: str, value: object, hint: str = "") -> None:
        super().__init__(f"expected {toml}, got {describe_value(value)}{hint}")
        self.toml = toml
        self.json = json
        self.value = value
        self.hint = hint


class UnknownKey(Exception):
    """A key that the schema does not have."""

    def __init__(self, key: str, allowed: Sequence[str]) -> None:
        super().__init__(f"unknown key {key!r}")
        self.key = key
        self.allowed = tuple(allowed)


class Problem(ValueError):
    """A value of the right type that still cannot be used; ``str()`` is the sentence."""


def _noted(err: Exception, name: str, kind: Any) -> Exception:
    err.add_note(AttributeValidationNote(f"at {name}", name, kind))
    return err


# --------------------------------------------------------------------------- strict hooks


def _check_int64(value: int) -> None:
    if not INT64_MIN <= value <= INT64_MAX:
        raise Problem(f"{value} does not fit in a 64-bit integer (-2**63 .. 2**63-1)")


def _strict_int(value: object, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        _check_int64(value)
        return value
    raise Mismatch("int", "an integer", value)


def _strict_float(value: object, _: type) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        _check_int64(value)
        return float(value)
    if isinstance(value, float):
        return value
    raise Mismatch("float", "a number", value)


def _json_float(value: object, kind: type) -> float:
    if isinstance(value, str) and value in STR_TO_NONFINITE:
        return STR_TO_NONFINITE[value]
    return _strict_float(value, kind)


def _strict_str(value: object, _: type) -> str:
    if isinstance(value, str):
        return value
    raise Mismatch("str", "a string", value)


def _strict_bool(value: object, _: type) -> bool:
    if isinstance(value, bool):
        return value
    raise Mismatch("bool (true or false)", "true or false", value)


def _is_literal(kind: Any) -> bool:
    return typing.get_origin(kind) is Literal


def _structure_literal(value: object, kind: Any) -> object:
    allowed = typing.get_args(kind)
    # ``True == 1`` in Python, so compare types too: a bool must not pass for a choice.
    if any(type(value) is type(choice) and value == choice for choice in allowed):
        return value
    choices = ", ".join(toml_value(choice) for choice in allowed)
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(c) for c in allowed], n=1)
        if close:
            hint = f" (did you mean {toml_value(close[0])}?)"
    raise Mismatch(f"one of {choices}", f"one of {choices}", value, hint)


def _is_homogeneous_tuple(kind: Any) -> bool:
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis


def _tuple_hook(kind: Any, converter: cattrs.Converter) -> Callable[[Any, Any], tuple[Any, ...]]:
    element = typing.get_args(kind)[0]
    name = getattr(element, "__name__", str(element))

    def structure(value: object, _: Any) -> tuple[Any, ...]:
        # cattrs would happily turn the string "INT8_DEFAULT_CFG" into a tuple of characters.
        if not isinstance(value, list | tuple):
            raise Mismatch(f"a list of {name}", "a list", value)
        hook = converter.get_structure_hook(element)
        items: list[Any] = []
        errors: list[Exception] = []
        for index, item in enumerate(value):
            try:
                items.append(hook(item, element))
            except Exception as err:
                err.add_note(IterableValidationNote(f"at [{index}]", index, element))
                errors.append(err)
        if errors:
            raise IterableValidationError("invalid list items", errors, kind)
        return tuple(items)

    return structure


def open_schema(cls: type[T]) -> type[T]:
    """Mark an attrs class whose files may hold keys it does not declare (they are ignored)."""
    _OPEN_SCHEMAS.add(cls)
    return cls


def _attrs_hook(cls: type, converter: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """cattrs' generated hook plus what it lacks: one error per unknown key, every range problem."""
    attrs.resolve_types(cls)
    fields = attrs.fields(cls)
    names = [field.name for field in fields]
    position = {name: index for index, name in enumerate(names)}
    generated: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, converter, _cattrs_forbid_extra_keys=False
    )
    is_open = cls in _OPEN_SCHEMAS or not converter.forbid_extra_keys

    def order(err: Exception) -> int:
        notes = [n for n in getattr(err, "__notes__", []) if isinstance(n, AttributeValidationNote)]
        return position.get(notes[-1].name, len(names)) if notes else len(names)

    def structure(value: Any, kind: Any) -> Any:
        if not isinstance(value, dict):
            raise Mismatch("a table", "an object", value)
        unknown: list[Exception] = []
        if not is_open:
            unknown = [_noted(UnknownKey(key, names), key, None) for key in value if key not in position]
        try:
            result = generated(value, kind)
        except ClassValidationError as err:
            noted, bare = err.group_exceptions()
            # cattrs hands on what __init__ raised (a validator: the first bad field only) without
            # a field name; each validator runs on its own instead, to name every bad field.
            first_only = [e for e in bare if isinstance(e, SpecError)]
            ranges = _range_problems(cls, value, converter, skip={note.name for _, note in noted})
            errors = [
                *(e for e, _ in noted),
                *(e for e in bare if not isinstance(e, SpecError)),
                *(ranges or [_noted(e, e.field, None) for e in first_only]),
            ]
        else:
            if not unknown:
                return result
            errors = []
        raise ClassValidationError(f"invalid {cls.__name__}", sorted(errors, key=order) + unknown, cls)

    return structure


def _range_problems(
    cls: type, value: Mapping[str, Any], converter: cattrs.Converter, *, skip: set[str]
) -> list[Exception]:
    """Run each field's validator on its own, so every out-of-range field is reported, not the first."""
    problems: list[Exception] = []
    for field in attrs.fields(cls):
        if field.validator is None or field.name in skip:
            continue
        try:
            if field.name in value:
                item = converter.structure(value[field.name], field.type)
                item = field.converter(item) if callable(field.converter) else item
            elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
                item = field.default.factory()
            else:
                item = field.default
        except Exception:
            continue  # a type problem, reported by cattrs already
        try:
            field.validator(None, field, item)
        except SpecError as err:
            problems.append(_noted(err, field.name, field.type))
    return problems


# --------------------------------------------------------------------------- the [sweep] table

NOT_SWEEPABLE = frozenset({"reports.output_dir"})
"""Every sweep point gets its own folder, so sweeping the output folder would make no sense."""


def sweep_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be swept, or None when it names a real stage setting."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in STAGE_TABLES:
        return f"unknown setting {key!r} (write TABLE.KEY with TABLE one of {', '.join(STAGE_TABLES)})"
    table, name = parts
    allowed = [field.name for field in attrs.fields(STAGE_TABLES[table])]
    if name not in allowed:
        return (
            f"unknown setting {key!r}{did_you_mean(name, allowed)} (allowed in {table}: {', '.join(allowed)})"
        )
    if key in NOT_SWEEPABLE:
        return f"{key} cannot be swept: every sweep point gets its own folder under the run folder"
    return None


def flatten_sweep(table: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``[sweep] calib.seq_len = [...]`` (a TOML dotted key) and ``"calib.seq_len" = [...]`` mean the same."""
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_sweep(value, f"{full}.")
        else:
            yield full, value


def _frozen(value: Any) -> Any:
    """Lists inside sweep values become tuples, so a spec stays comparable and hashable data."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _structure_sweep(value: object, _: Any) -> SweepTable:
    if not isinstance(value, dict):
        raise Mismatch("a table", "an object", value)
    errors: list[Exception] = []
    result: SweepTable = {}
    for key, values in flatten_sweep(value):
        problem = sweep_key_problem(key)
        if problem is None and not isinstance(values, list | tuple):
            problem = f"expected a list of values to try, got {describe_value(values)}"
        if problem is None and not values:
            problem = "the list of values to try is empty"
        if problem is not None:
            errors.append(_noted(Problem(problem), key, None))
        else:
            result[key] = tuple(_frozen(v) for v in values)
    if errors:
        raise ClassValidationError("invalid sweep table", errors, dict)
    return result


# --------------------------------------------------------------------------- model.device_map, max_memory


def _string_table(value: Mapping[Any, Any], what: str, *, int_values: bool) -> dict[str, Any]:
    """A TOML table of strings (or GPU numbers where ``int_values``); the attrs converter and
    validator of :class:`~auto_quantize_model.specs.LoadSpec` then check names and devices."""
    errors: list[Exception] = []
    for key, item in value.items():
        number = int_values and isinstance(item, int) and not isinstance(item, bool)
        if not (isinstance(item, str) or number):
            expected = "a device name or GPU number" if int_values else "a size string"
            errors.append(_noted(Mismatch(f"{expected} (e.g. {what})", expected, item), str(key), None))
    if errors:
        raise ClassValidationError("invalid table", errors, dict)
    return dict(value)


def _structure_device_map(value: object, _: Any) -> object:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _string_table(value, '"cuda:0"', int_values=True)
    raise Mismatch("a strategy name or a table of module name -> device", "a string or an object", value)


def _structure_memory(value: object, _: Any) -> object:
    if value is None:
        return value
    if isinstance(value, dict):
        return _string_table(value, '"40GiB"', int_values=False)
    raise Mismatch('a table of device -> size (e.g. {"0" = "40GiB"})', "an object", value)


# --------------------------------------------------------------------------- the converters


def _unstructure_versions(pairs: VersionPairs) -> dict[str, str]:
    return dict(pairs)


def _structure_versions(value: Any, _: Any) -> VersionPairs:
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [tuple(item) if isinstance(item, list) else item for item in value]
    else:
        raise Mismatch("a table of name = version", "an object of name -> version", value)
    pairs: list[tuple[str, str]] = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(part, str) for part in item)):
            raise Mismatch("name/version strings", "name/version strings", item)
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def _is_versions(kind: Any) -> bool:
    return bool(kind == VersionPairs)


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict_int)
    converter.register_structure_hook(float, _strict_float)
    converter.register_structure_hook(str, _strict_str)
    converter.register_structure_hook(bool, _strict_bool)
    converter.register_structure_hook_func(_is_literal, _structure_literal)
    converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_hook)
    converter.register_structure_hook_func(lambda kind: kind == SweepTable, _structure_sweep)
    converter.register_structure_hook_factory(attrs.has, _attrs_hook)
    converter.register_structure_hook_func(lambda kind: kind == DeviceMapSetting, _structure_device_map)
    converter.register_structure_hook_func(lambda kind: kind == MemoryLimitsSetting, _structure_memory)
    return converter


CONVERTER = _make_converter()
"""Strict structuring of pipeline files (and of in-memory records, see :func:`project`)."""

JSON_CONVERTER = CONVERTER.copy()
"""The same rules for JSON files: non-finite floats as strings, versions as an object."""
JSON_CONVERTER.register_structure_hook(float, _json_float)
JSON_CONVERTER.register_structure_hook_func(_is_versions, _structure_versions)
JSON_CONVERTER.register_unstructure_hook_func(_is_versions, _unstructure_versions)


def project(source: attrs.AttrsInstance, target: type[Record], **extra: Any) -> Record:
    """``source``'s fields that ``target`` declares, plus ``extra``, structured as a ``target``.

    Converts between parallel record types (an artifact and its file-schema record) by field
    name instead of copying each field by hand; a field that changes type or goes missing on
    one side fails here, not silently.
    """
    wanted = {field.name for field in attrs.fields(target)}
    data = {
        field.name: getattr(source, field.name)
        for field in attrs.fields(type(source))
        if field.name in wanted
    }
    return CONVERTER.structure({**data, **extra}, target)


# --------------------------------------------------------------------------- error lines


def _lines(
    err: BaseException, format_exception: Callable[[BaseException, Any], str]
) -> list[tuple[str, str]]:
    """(key path, message) pairs; the path is dotted, with ``[i]``/``['key']`` for items."""
    pairs = []
    for line in cattrs.transform_error(err, path=_ROOT, format_exception=format_exception):
        message, _, path = line.partition(f" @ {_ROOT}")
        pairs.append((path.removeprefix("."), message))
    return pairs


def _required(kind: Any) -> list[str]:
    if isinstance(kind, type) and attrs.has(kind):
        return [field.name for field in attrs.fields(kind) if field.default is attrs.NOTHING]
    return []


def _toml_message(err: BaseException, kind: Any) -> str:
    if isinstance(err, Mismatch):
        return f"expected {err.toml}, got {describe_value(err.value)}{err.hint}"
    if isinstance(err, UnknownKey):
        return f"unknown key{did_you_mean(err.key, err.allowed)} (allowed: {', '.join(err.allowed)})"
    if isinstance(err, SpecError):
        return err.problem
    if isinstance(err, Problem):
        return str(err)
    if isinstance(err, KeyError):
        required = _required(kind)
        if required:
            return f"required table missing (it needs at least: {', '.join(required)})"
        return "required value missing"
    return f"invalid value ({type(err).__name__}: {err})"


def _json_message(err: BaseException, kind: Any) -> str:
    if isinstance(err, Mismatch):
        return f"is not {err.json} (got {describe_value(err.value, json_words=True)}){err.hint}"
    if isinstance(err, UnknownKey):
        return f"is an unknown key{did_you_mean(err.key, err.allowed)} (allowed: {', '.join(err.allowed)})"
    if isinstance(err, KeyError):
        return "is missing"
    if isinstance(err, SpecError):
        return err.problem
    if isinstance(err, Problem):
        return f"is invalid: {err}"
    return f"is invalid ({type(err).__name__}: {err})"


def toml_problems(err: BaseException) -> list[tuple[str, str]]:
    """What is wrong in a TOML file, as (``calib.seq_len``, ``expected int, got str "8"``) pairs."""
    return [(path or "(top level)", message) for path, message in _lines(err, _toml_message)]


def json_problems(err: BaseException) -> list[str]:
    """What is wrong in a JSON file, one ``groups[0].rank is not an integer (got ...)`` per problem."""
    return [f"{path or 'the top level'} {message}" for path, message in _lines(err, _json_message)]


# --------------------------------------------------------------------------- JSON text


def to_strict_json_value(value: Any) -> Any:
    """Plain JSON data with every non-finite float replaced by its string spelling."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return NONFINITE_TO_STR.get(value, value)
    if isinstance(value, dict):
        return {key: to_strict_json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_strict_json_value(item) for item in value]
    return value


def dumps_json(value: Any) -> str:
    """Strict, human-readable JSON (indented, UTF-8 kept as is, trailing newline)."""
    return json.dumps(to_strict_json_value(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def read_json(path: str | os.PathLike[str], what: str = "a quant manifest") -> Any:
    """Parse a JSON file; missing files and broken JSON become one-line user errors about ``what``."""
    source = Path(path)
    if not source.is_file():
        state = "is a folder" if source.is_dir() else "does not exist"
        raise InputError(f"{source} {state}: expected {what} (a JSON file)")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{source} is not {what} (not UTF-8 text: {err.reason})") from err
    except OSError as err:
        raise InputError(f"{source} cannot be read: {err.strerror or err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{source} is not {what} (not JSON: {err.msg} at line {err.lineno})") from err
