"""Pre-flight: every check of a pipeline that needs no model, run before anything heavy.

``aqm run`` runs these before it imports torch, and ``aqm validate`` runs exactly the same ones
(both through :func:`~auto_quantize_model.app.sweep.points.expand_sweep`), so validate never says OK to
what run would refuse in its first seconds. A typo costs a second, not a model load.

What is checked here, beyond the ranges the spec classes check themselves:

* formats known and runnable on the device, the bit budget reachable with them;
* the model: a built-in name, or a folder with a ``config.json`` that parses to an object whose
  ``model_type`` transformers loads as a language model, and a tokenizer next to it (or at
  ``model.tokenizer``);
* the captions: readable, UTF-8, not empty, and holding at least ``calib.max_samples`` captions;
  with ``calib.images``, the first ``calib.max_samples`` pairs and every image they name.
  Too few is an error, not a warning: the manifest records ``max_samples`` as what was used, so
  a silent shortfall would make it lie; the held-out file must be readable and not empty;
* something left to measure: held-out text (``validate``, measured ``frontier`` points, an
  ``export`` checkpoint's read-back) that is not all among the calibration captions, which the
  stages skip. Settings that leave nothing to score on their own (``calib.seq_len = 1``) are
  refused by the spec classes' validators;
* names that end up in file names (the scheme) short and safe enough;
* the device spelling and the output folder.

All problems are reported together, one line each.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

from auto_quantize_model.core.image_pairs import pairs_problem, read_pair_source
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.convert import did_you_mean, toml_value
from auto_quantize_model.io.hf_config import read_config_json, supported_model_type
from auto_quantize_model.sources import BUILTIN_SOURCES, PYPI_MODELS, PYPI_PREFIX, TOKENIZER_FILES
from auto_quantize_model.spec_values import scheme_name_problem
from auto_quantize_model.specs import PipelineSpec, ValidateSpec, is_bundled

_DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+")
Report = Callable[..., None]


def preflight(spec: PipelineSpec, *, source: str | None = None) -> None:
    """Raise one error listing every problem of ``spec`` that shows without loading a model."""
    problems: list[tuple[str, type[AqmError]]] = []

    def bad(key: str, message: str, kind: type[AqmError] = ConfigError) -> None:
        problems.append((f"{key}: {message}", kind))

    for key, message in _format_problems(spec):
        bad(key, message)
    _check_model(spec, bad)
    _check_scheme(spec, bad)
    if not _DEVICE.fullmatch(spec.model.device):
        bad("model.device", f"expected auto, cpu, cuda or cuda:N, got {toml_value(spec.model.device)}")
    calib_ok = _check_file(("calib", "captions"), spec.calib.captions, bad) and _check_captions(
        ("calib", "captions"), spec.calib.captions, spec.calib.max_samples, bad
    )
    if spec.calib.images is not None:
        _check_pairs(spec, bad)
    for held_out in _held_out_sources(spec):
        _, setting, value = held_out
        if _check_file(setting, value, bad) and _check_captions(setting, value, None, bad) and calib_ok:
            _check_something_held_out(held_out, spec, bad)
    if spec.reports.compare_to is not None and not Path(spec.reports.compare_to).exists():
        bad(
            "reports.compare_to",
            f"{spec.reports.compare_to} does not exist; give a run folder or a manifest",
            InputError,
        )
    if spec.reports.output_dir is not None:
        out = Path(spec.reports.output_dir)
        if out.exists() and not out.is_dir():
            bad("reports.output_dir", f"{out} exists and is not a directory", InputError)

    if problems:
        prefix = f"{source}: " if source else ""
        kinds = {kind for _, kind in problems}
        kind = kinds.pop() if len(kinds) == 1 else ConfigError
        raise kind("\n".join(f"{prefix}{message}" for message, _ in problems))


def _check_model(spec: PipelineSpec, bad: Report) -> None:
    model_path = spec.model.path
    folder = Path(model_path)
    hint = " (point it at a Hugging Face checkout: --set model.path=DIR)"
    if model_path.startswith("pypi:"):
        known_pypi = [PYPI_PREFIX + name for name in PYPI_MODELS]
        if model_path not in known_pypi:
            hint = did_you_mean(model_path, known_pypi)
            bad("model.path", f"unknown PyPI source {model_path!r}{hint} (known: {', '.join(known_pypi)})")
    elif is_bundled("model", "path", model_path):
        if model_path not in BUILTIN_SOURCES:
            known = ", ".join(BUILTIN_SOURCES)
            hint = did_you_mean(model_path, BUILTIN_SOURCES)
            bad("model.path", f"unknown built-in source {model_path!r}{hint} (known: {known})")
    elif not folder.exists():
        bad("model.path", f"{model_path} does not exist{hint}", InputError)
    elif folder.suffix.lower() == ".gguf":
        if not folder.is_file():
            bad("model.path", f"{model_path} is not a file (a .gguf model file was expected)", InputError)
    elif not folder.is_dir():
        bad("model.path", f"{model_path} is not a directory{hint}", InputError)
    elif not (folder / "config.json").is_file() and any(
        p.suffix.lower() == ".gguf" for p in folder.iterdir()
    ):
        pass  # a folder of GGUF files: LoadModel picks the one file (or names them all)
    elif not (folder / "config.json").is_file():
        bad("model.path", f"{model_path} has no config.json: not a Hugging Face checkout", InputError)
    else:
        try:
            supported_model_type(read_config_json(folder), str(folder / "config.json"))
        except InputError as err:
            bad("model.path", str(err), InputError)
        if spec.model.tokenizer is None:
            _check_tokenizer("model.path", folder, bad, hint="; set model.tokenizer to a tokenizer folder")
    if spec.model.tokenizer is not None:
        _check_tokenizer("model.tokenizer", Path(spec.model.tokenizer), bad)


def _holds_gguf(folder: Path) -> bool:
    if (folder / "config.json").is_file():
        return False
    return any(p.suffix.lower() == ".gguf" for p in folder.iterdir())


def _check_tokenizer(key: str, folder: Path, bad: Report, hint: str = "") -> None:
    if not folder.is_dir():
        bad(key, f"{folder} is not a directory", InputError)
    elif not any((folder / name).is_file() for name in TOKENIZER_FILES):
        bad(key, f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}){hint}", InputError)


def _check_scheme(spec: PipelineSpec, bad: Report) -> None:
    """A derived scheme name goes into file names too: check it now, not after the search."""
    if spec.manifest.scheme is not None:
        return  # checked by ManifestSpec itself
    from auto_quantize_model.core.ranking import scheme_name

    try:
        derived = scheme_name(spec.autoquant.formats)
    except AqmError:
        return  # no quantized format: reported with the formats
    problem = scheme_name_problem(derived)
    if problem is not None:
        bad("manifest.scheme", f"the name derived from autoquant.formats will not do: {problem}")


def _check_file(key: tuple[str, str], value: str, bad: Report) -> bool:
    """Whether ``value`` names a bundled file or an existing file (else the problem is reported)."""
    if is_bundled(*key, value):
        return True
    path = Path(value)
    if not path.exists():
        bad(".".join(key), f"{value} does not exist", InputError)
    elif not path.is_file():
        bad(".".join(key), f"{value} is not a file", InputError)
    else:
        return True
    return False


def _stamp(key: tuple[str, str], value: str) -> tuple[int, int]:
    """What tells one version of a captions file from the next (bundled files never change)."""
    if is_bundled(*key, value):
        return (0, 0)
    stat = Path(value).stat()
    return (stat.st_mtime_ns, stat.st_size)


def _check_captions(key: tuple[str, str], value: str, max_samples: int | None, bad: Report) -> bool:
    """Whether the captions can be read (else the problem is reported)."""
    found = _captions_problem(value, max_samples, _stamp(key, value))
    if found is not None:
        message, kind = found
        bad(".".join(key), message, kind)
    return found is None


HeldOutSource = tuple[str, tuple[str, str], str]
"""(the key problems are reported under, the setting whose bundled names apply, its value)."""


def _check_pairs(spec: PipelineSpec, bad: Report) -> None:
    """The pairs calibration uses, and some left after them when a stage measures on held-out pairs."""
    assert spec.calib.images is not None
    problem = pairs_problem(spec.calib.images, spec.calib.max_samples)
    if problem is not None:
        bad("calib.images", problem.removeprefix("calib.images: "), InputError)
        return
    validate = spec.validate is not None
    frontier = spec.frontier is not None and bool(spec.frontier.measure)
    measuring = [table for table, on in (("validate", validate), ("frontier", frontier)) if on]
    total = len(read_pair_source(spec.calib.images).pairs)
    if measuring and total <= spec.calib.max_samples:
        bad(
            f"{measuring[0]}.holdout_samples",
            f"calib.images holds {total} pairs and calib.max_samples takes all of them, so none is left "
            "to measure on; add pairs or lower calib.max_samples",
        )


def _held_out_sources(spec: PipelineSpec) -> list[HeldOutSource]:
    """Every held-out text the pipeline's stages will measure on.

    ``export.checkpoint`` reads its checkpoint back on the default held-out text (the stage gets
    no ``[validate]`` settings), so that text is checked too, under the key that asks for it.
    """
    sources: list[HeldOutSource] = []
    if spec.validate is not None:
        key = ("validate", "holdout_captions")
        sources.append((".".join(key), key, spec.validate.holdout_captions))
    if spec.frontier is not None and spec.frontier.measure:
        key = ("frontier", "holdout_captions")
        sources.append((".".join(key), key, spec.frontier.holdout_captions))
    if spec.export is not None and spec.export.checkpoint:
        sources.append(
            ("export.checkpoint", ("validate", "holdout_captions"), ValidateSpec().holdout_captions)
        )
    return sources


def _check_something_held_out(source: HeldOutSource, spec: PipelineSpec, bad: Report) -> None:
    """Held-out text that calibration uses in full leaves nothing to measure: the stages skip every
    caption calibration saw, and would say so only after the model is loaded."""
    report, setting, value = source
    calib = spec.calib
    left, total = _fresh_captions(
        value,
        _stamp(setting, value),
        calib.captions,
        calib.max_samples,
        _stamp(("calib", "captions"), calib.captions),
    )
    if left:
        return
    fix = (
        f"point {report} at other text" if report.endswith("holdout_captions") else "calibrate on other text"
    )
    bad(
        report,
        f"no held-out captions left: all {total} of {value} are among the {calib.max_samples} calibration "
        f"captions (calib.captions = {toml_value(calib.captions)}); {fix} or lower calib.max_samples",
    )


@functools.lru_cache(maxsize=64)
def _fresh_captions(
    holdout: str, _holdout_stamp: tuple[int, int], calib: str, max_samples: int, _calib_stamp: tuple[int, int]
) -> tuple[int, int]:
    """(held-out captions calibration does not use, all of them), compared by stripped text as
    the stages compare them (:func:`~auto_quantize_model.backend.measure.holdout_captions`)."""
    from auto_quantize_model.core.captions import read_caption_file, read_captions

    seen = {caption.strip() for caption in read_captions(calib, max_samples)}
    candidates = read_caption_file(holdout)
    return sum(1 for caption in candidates if caption.strip() not in seen), len(candidates)


@functools.lru_cache(maxsize=64)
def _captions_problem(
    value: str, max_samples: int | None, _stamp: tuple[int, int]
) -> tuple[str, type[AqmError]] | None:
    """What reading the captions would fail on; cached per file version (sweeps check each point)."""
    from auto_quantize_model.core.captions import read_caption_file, read_captions

    try:
        if max_samples is None:
            read_caption_file(value)
        else:
            read_captions(value, max_samples)
    except AqmError as err:
        return str(err), type(err)
    return None


def _format_problems(spec: PipelineSpec) -> list[tuple[str, str]]:
    """(key, message) for unknown/unrunnable formats and an unreachable bit budget, deduplicated."""
    from auto_quantize_model.core import formats

    names = spec.autoquant.formats
    bits = spec.autoquant.effective_bits
    found: dict[tuple[str, str], None] = {}
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
    if lowest is not None and bits < lowest:
        reach = f"minimum {lowest:g}"
        found["autoquant.effective_bits", f"{bits:g} is below what these formats can reach ({reach})"] = None
    return list(found)
