"""Pipeline files: TOML in, one frozen :class:`PipelineSpec` out, every mistake reported at once.

This is the only place where user-written TOML becomes typed specs, through the strict converter
of :mod:`auto_quantize_model.io.convert`: unknown keys are refused and nothing is coerced, so a
file with three mistakes gets three lines, each naming the file and the key path (and the
``--set`` it came from), and a user fixes them in one edit instead of three runs. ``--set``
overrides are applied to the raw TOML first, so they are typed exactly as strictly as the file.

Nothing here imports torch: ``aqm validate`` and the pre-flight checks
(:mod:`auto_quantize_model.io.preflight`) run in a second, before any model is loaded.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.convert import CONVERTER, flatten_sweep, toml_problems
from auto_quantize_model.specs import STAGE_TABLES, TABLE_METADATA, PipelineSpec, is_bundled

__all__ = [
    "PATH_KEYS",
    "Override",
    "apply_overrides",
    "load_pipeline",
    "parse_override",
    "read_toml",
    "resolve_paths",
    "spec_from_dict",
    "spec_to_dict",
    "spec_to_toml",
]

PATH_KEYS: frozenset[tuple[str, str]] = frozenset(
    {
        ("model", "path"),
        ("model", "tokenizer"),
        ("calib", "captions"),
        ("calib", "images"),
        ("validate", "holdout_captions"),
        ("frontier", "holdout_captions"),
        ("reports", "output_dir"),
        ("reports", "compare_to"),
        ("autoquant", "checkpoint"),
    }
)
"""Settings holding file system paths; relative ones resolve against the pipeline file's folder."""

_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_INDEX = re.compile(r"\[[^\]]*\]")


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
            if value and not is_bundled(table, key, value):
                base = here if f"{table}.{key}" in cli_keys else base_dir
                section[key] = _resolve(value, base)
    sweep = result.get("sweep")
    if isinstance(sweep, dict):
        flat = dict(flatten_sweep(sweep))
        for dotted, values in flat.items():
            parts = tuple(dotted.split("."))
            if len(parts) == 2 and parts in PATH_KEYS and isinstance(values, list):
                base = here if f"sweep.{dotted}" in cli_keys else base_dir
                flat[dotted] = [
                    _resolve(v, base) if isinstance(v, str) and v and not is_bundled(*parts, v) else v
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
        return CONVERTER.structure(dict(raw), PipelineSpec)
    except Exception as err:
        by_key = {".".join(_override_path(o)): o.text for o in overrides}
        lines = []
        for where, message in toml_problems(err):
            origin = _origin(where, by_key)
            lines.append(f"{source}: {where}: {message}{f' (from --set {origin})' if origin else ''}")
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def _override_path(override: Override) -> tuple[str, ...]:
    if override.keys[0] == "sweep":
        return ("sweep", *override.keys[1].split("."))
    return override.keys


def _origin(where: str, by_key: Mapping[str, str]) -> str | None:
    """The ``--set`` that wrote the value at ``where`` (or a table above it), if one did."""
    path = _INDEX.sub("", where)
    while path:
        if path in by_key:
            return by_key[path]
        path = path.rpartition(".")[0]
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
            field.name: _plain_field(field, getattr(section, field.name))
            for field in attrs.fields(type(section))
            if getattr(section, field.name) is not None
        }
    if with_sweep and spec.sweep:
        raw["sweep"] = {key: _plain(values) for key, values in spec.sweep.items()}
    return raw


def _plain_field(field: attrs.Attribute[Any], value: Any) -> Any:
    """Pairs that a file writes as a table (``model.device_map``) go back to being a table."""
    if field.metadata.get(TABLE_METADATA) and isinstance(value, tuple):
        return dict(value)
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def spec_to_toml(spec: PipelineSpec, *, header: str = "", with_sweep: bool = True) -> str:
    """The effective pipeline as a TOML file that ``aqm run`` accepts as is.

    Paths are written as resolved (absolute), so the file re-runs from any folder. ``header``
    becomes the comment lines at the top.
    """
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    body = tomli_w.dumps(spec_to_dict(spec, with_sweep=with_sweep))
    return f"{comment}\n{body}" if comment else body
