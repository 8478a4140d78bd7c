"""Run folders: the ``run.json`` record, and deciding whether a folder is fresh, resumable or taken.

A run folder holds ``pipeline.toml`` (the effective spec), ``run.json`` and, once AutoQuant has
calibrated, ModelOpt's search state. ``run.json`` says ``running`` while a run is under way,
``complete`` once every file is written and ``failed: <reason>`` after an error; it names the
process that owns the run and lists every file the run wrote (relative paths), which is how
``--force`` knows what to remove. A process killed outright leaves ``running``; the next run or
``aqm resume`` sees that the owner is gone (the folder's lock is free, the pid no longer that
process), says the run was interrupted, and resumes it like a ``failed`` one: the saved
calibration and scores are reused.

Only the standard library, attrs and cattrs are imported here: folders are read before torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import cattrs

from auto_quantize_model.app.folders import (
    PIPELINE_FILE,
    RUN_FILE,
    check_output_dir,
    export_scratch_files,
    foreign_run_files,
    is_aqm_pipeline,
    recorded_own_files,
    remove_files,
)
from auto_quantize_model.app.lock import FolderBusy, Holder, Owner, is_alive
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.signals import what_stopped
from auto_quantize_model.errors import AqmError, InputError
from auto_quantize_model.io.convert import JSON_CONVERTER, json_problems

if TYPE_CHECKING:
    from auto_quantize_model.specs import PipelineSpec

log = logging.getLogger(PACKAGE_LOGGER)

RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"
_DISTRIBUTIONS = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("modelopt", "nvidia-modelopt"),
    ("auto_quantize_model", "auto-quantize-model"),
)

Pairs = tuple[tuple[str, str], ...]
Seconds = tuple[tuple[str, float], ...]


class OutOfMemory(AqmError):
    """The accelerator ran out of memory; the message names the stage and the sizes in use."""

    exit_code = 1


@attrs.frozen
class ForwardSteps:
    """AutoQuant forward passes this process ran; 0 calibration steps means it resumed them."""

    calibration: int
    scoring: int


@attrs.frozen
class RunRecord:
    """``run.json``: the state of the run in a folder, who runs it and what it wrote."""

    status: str
    """``running``, ``complete`` or ``failed: <first line of the error>``."""
    started_at: str
    ended_at: str | None
    resumed: bool
    command: tuple[str, ...]
    spec_sha256: str
    versions: Pairs
    device: str
    owner: Owner | None = None
    """The process running (or that ran) the run; absent in records of aqm before 0.2."""
    first_started_at: str | None = None
    """For a resumed run: when the first attempt started."""
    forward_steps: ForwardSteps | None = None
    seconds: Seconds | None = None
    """Library imports and each stage, in run order."""
    files: tuple[str, ...] = ()
    """Every file the run wrote, relative to the folder (``run.json`` included)."""
    sweep: bool = False
    """The folder holds a sweep (its points in subfolders, each with its own ``run.json``)."""

    @property
    def is_resumable(self) -> bool:
        """Interrupted (``running`` with its owner gone) or failed: the same command goes on with it.

        A run resumes from its saved search state; a sweep (rerun of its pipeline, or ``aqm resume``)
        skips its finished points and resumes the interrupted one. Whether the owner is really gone
        is the lock's question (:func:`refuse_live_owner`), not this record's.
        """
        return self.status == RUNNING or self.status.startswith(FAILED)


_OMITTED_WHEN_NONE = ("owner", "first_started_at", "forward_steps", "seconds")


def _make_converter() -> cattrs.Converter:
    """The shared JSON converter, tolerant of keys a newer aqm may add; name -> value pairs as objects."""
    converter = JSON_CONVERTER.copy(forbid_extra_keys=False)

    def is_pairs(kind: Any) -> bool:
        return kind in (Pairs, Seconds)

    def structure_pairs(value: Any, kind: Any) -> tuple[tuple[str, Any], ...]:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {value!r}")
        item = str if kind == Pairs else float
        return tuple((str(key), converter.structure(v, item)) for key, v in value.items())

    converter.register_unstructure_hook_func(is_pairs, dict)
    converter.register_structure_hook_func(is_pairs, structure_pairs)
    return converter


_CONVERTER = _make_converter()


def record_to_json(record: RunRecord) -> str:
    data: dict[str, Any] = _CONVERTER.unstructure(record)
    for key in _OMITTED_WHEN_NONE:
        if data[key] is None:
            del data[key]
    if not data["sweep"]:
        del data["sweep"]
    return json.dumps(data, indent=1) + "\n"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> Pairs:
    """Versions from package metadata: no heavy import just to name them."""
    from importlib.metadata import PackageNotFoundError, version

    found = [("python", platform.python_version())]
    for key, dist in _DISTRIBUTIONS:
        try:
            found.append((key, version(dist)))
        except PackageNotFoundError:
            found.append((key, "not installed"))
    return tuple(found)


def device_name(requested: str) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 ...)`` when torch is loaded and CUDA was used."""
    torch = sys.modules.get("torch")
    if torch is None or not requested.startswith("cuda"):
        return requested
    try:
        if torch.cuda.is_available():
            index = int(requested.partition(":")[2] or 0)
            return f"{requested} ({torch.cuda.get_device_name(index)})"
    except Exception:  # a name is nice to have, never worth failing the run
        pass
    return requested


def spec_dict(spec: PipelineSpec) -> dict[str, Any]:
    from auto_quantize_model.io.pipeline_file import spec_to_dict

    return spec_to_dict(spec)


def spec_hash(spec: PipelineSpec) -> str:
    text = json.dumps(spec_dict(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def changed_settings(old: PipelineSpec, new: PipelineSpec) -> list[str]:
    """``key: old -> new`` for every setting that differs (``(absent)`` for a missing table/key)."""
    a, b = _flat(spec_dict(old)), _flat(spec_dict(new))
    missing = "(absent)"
    return [
        f"{key}: {json.dumps(a.get(key, missing))} -> {json.dumps(b.get(key, missing))}"
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    ]


def read_run(folder: Path) -> RunRecord | None:
    """The folder's ``run.json`` record; None when it has none or it is not one of ours.

    A file that is ours (it has a ``status``) but does not structure is an error naming it: the
    folder's state is unknown, and guessing could resume the wrong run.
    """
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InputError(
            f"{path} is not a readable run record ({_first_line(err)}): it was cut short or edited, so aqm "
            f"cannot tell which files in {folder} are its own; restore it, or choose another --output"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        return None
    try:
        record: RunRecord = _CONVERTER.structure(data, RunRecord)
    except Exception as err:  # ClassValidationError (an ExceptionGroup) or a plain TypeError
        is_tree = isinstance(err, cattrs.BaseValidationError)
        details = "; ".join(json_problems(err)) if is_tree else str(err)
        raise InputError(
            f"{path} is not a valid run record ({details}): aqm cannot tell which files in {folder} are "
            "its own; restore it, or choose another --output"
        ) from err
    return record


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


Writer = Callable[[Path, str], Path]
"""Writes text to a file atomically (injected so that tests can make the disk full)."""


def write_run(folder: Path, record: RunRecord, writer: Writer) -> Path:
    return writer(folder / RUN_FILE, record_to_json(record))


@attrs.frozen
class RunFolder:
    """Where a single run goes and what this command may do there."""

    path: Path
    created: bool
    """The command made the folder (so a useless failure may remove it)."""
    resume: bool
    """The folder holds an interrupted run of the same pipeline; its saved state is reused."""
    started_at: str
    previous: RunRecord | None = None
    """The record of the interrupted run being resumed."""


def refuse_live_owner(folder: Path, record: RunRecord) -> None:
    """Belt and braces beside the lock: a ``running`` record whose owner runs on this host."""
    if record.status == RUNNING and record.owner is not None and is_alive(record.owner):
        raise FolderBusy(folder, Holder(record.owner, record.command))


def remove_previous_run(folder: Path, record: RunRecord | None) -> list[Path]:
    """``--force``: remove exactly the files the previous run listed in its ``run.json`` (and what a
    killed export left in its scratch folders, which only aqm makes).

    Without a record nothing is known to be aqm's: a folder holding run files anyway (another
    tool's manifest, a copied report) is refused, naming them, rather than guessed at.
    """
    if record is None:
        foreign = foreign_run_files(folder)
        if foreign:
            raise InputError(
                f"--force replaces only a run that aqm recorded, and {folder} holds {foreign[0]} without a "
                f"{RUN_FILE} of aqm's: choose another --output, or remove those files yourself"
            )
        return []
    files = [*recorded_own_files(folder, record.files), *export_scratch_files(folder)]
    stuck = remove_files(folder, files)
    if stuck:
        raise InputError(f"--force: cannot remove {stuck[0]} left by the previous run in {folder}")
    if files:
        log.info("--force: removed the %d files the previous run recorded in %s", len(files), folder)
    return files


def open_run_folder(folder: Path, spec: PipelineSpec, *, force: bool, created: bool) -> RunFolder:
    """Decide, before any work and while holding the folder's lock, whether ``folder`` starts fresh,
    resumes, or is refused.

    * just made, empty or unrelated: fresh;
    * an interrupted run (``running`` with its owner gone, or ``failed``) of the same effective
      pipeline: resume;
    * the same with other settings: refused, naming every changed key (``--force`` starts over);
    * a complete run: refused unless ``--force``, which first removes every file the previous run
      recorded, so nothing of it is mixed into or left beside the new one;
    * another tool's output, or a ``run.json`` that does not read: refused, ``--force`` or not.
    """
    now = utc_now()
    if created:
        return RunFolder(folder, created=True, resume=False, started_at=now)
    record = read_run(folder)  # a corrupt record is refused, --force or not: it alone says what is ours
    if record is not None:
        refuse_live_owner(folder, record)
    if force:
        remove_previous_run(folder, record)
        check_output_dir(folder, force=True)
        return RunFolder(folder, created=False, resume=False, started_at=now)
    if record is not None and record.sweep:
        again = f"aqm resume {folder} goes on with it" if record.is_resumable else "--force replaces it"
        raise InputError(
            f"output folder {folder} already holds a sweep ({record.status}), not a run of this pipeline; "
            f"{again}, or choose another --output"
        )
    if record is not None and record.status == COMPLETE:
        raise InputError(
            f"output folder {folder} already holds a run ({record.status}); pass --force to run it again, "
            "or choose another --output"
        )
    if record is None or not record.is_resumable:
        check_output_dir(folder, force=False)
        return RunFolder(folder, created=False, resume=False, started_at=now)
    if record.status == RUNNING:
        who = f"its {record.owner.describe()}" if record.owner is not None else "its process"
        log.info("the run in %s was interrupted (%s is gone)", folder, who)
    old_file = folder / PIPELINE_FILE
    if not old_file.is_file() or not is_aqm_pipeline(old_file):
        raise InputError(
            f"output folder {folder} holds an interrupted run without its {PIPELINE_FILE}; "
            "pass --force to start over"
        )
    from auto_quantize_model.io.pipeline_file import load_pipeline

    changed = changed_settings(load_pipeline(old_file), spec)
    if changed:
        raise InputError(
            f"output folder {folder} holds an interrupted run with other settings "
            f"({'; '.join(changed)}); rerun with the same settings to resume, pass --force to start "
            "over, or choose another --output"
        )
    return RunFolder(folder, created=False, resume=True, started_at=now, previous=record)


def run_record(
    run: RunFolder,
    spec: PipelineSpec,
    status: str,
    *,
    command: Sequence[str],
    files: Sequence[str],
    device: str | None = None,
    forward_steps: ForwardSteps | None = None,
    seconds: Seconds | None = None,
) -> RunRecord:
    previous = run.previous
    first = None
    if previous is not None and run.resume:
        first = previous.first_started_at or previous.started_at
    return RunRecord(
        status=status,
        started_at=run.started_at,
        ended_at=None if status == RUNNING else utc_now(),
        resumed=run.resume,
        command=tuple(command),
        spec_sha256=spec_hash(spec),
        versions=versions(),
        device=device_name(device or spec.model.device),
        owner=Owner.me(),
        first_started_at=first,
        forward_steps=forward_steps,
        seconds=seconds,
        files=tuple(files),
    )


def failure_reason(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return what_stopped(err)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    kind = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return isinstance(kind, type) and isinstance(err, kind)


def out_of_memory_error(stage: str, spec: PipelineSpec) -> OutOfMemory:
    batch, seq_len = spec.calib.batch_size, spec.calib.seq_len
    smaller, shorter = max(1, batch // 2), max(1, seq_len // 2)
    return OutOfMemory(
        f"out of GPU memory in stage {stage} (calib.batch_size {batch}, calib.seq_len {seq_len}); "
        f"try smaller ones, e.g. --set calib.batch_size={smaller} or --set calib.seq_len={shorter}"
    )
