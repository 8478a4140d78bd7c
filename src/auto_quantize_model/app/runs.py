"""Run folders: the ``run.json`` record, and deciding whether a folder is fresh, resumable or taken.

A run folder holds ``pipeline.toml`` (the effective spec), ``run.json`` and, once AutoQuant has
calibrated, ModelOpt's search state. ``run.json`` says ``running`` while a run is under way,
``complete`` once every file is written and ``failed: <reason>`` after an error. A process
killed outright leaves ``running``; both that and ``failed`` can be resumed by running the same
pipeline into the same folder (``aqm run FILE --output DIR`` or ``aqm resume DIR``): the saved
calibration and scores are reused. A failure before anything worth keeping was written removes
what the command wrote (and the folder if it made it), so a typo leaves nothing behind.

Only the standard library is imported here: the CLI reads and checks folders before torch.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.errors import AqmError, InputError
from auto_quantize_model.io.atomic import atomic_write_text

if TYPE_CHECKING:
    from auto_quantize_model.io.pipeline_file import PipelineSpec

RUN_FILE = "run.json"
PIPELINE_FILE = "pipeline.toml"
STATE_FILE = "autoquant_search_state.pt"
"""ModelOpt's ``checkpoint=`` file inside the run folder (the CLI always passes one)."""
RUNNING = "running"
COMPLETE = "complete"
FAILED = "failed"
_DISTRIBUTIONS = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("modelopt", "nvidia-modelopt"),
    ("auto_quantize_model", "auto-quantize-model"),
)


class OutOfMemory(AqmError):
    """The accelerator ran out of memory; the message names the stage and the sizes in use."""

    exit_code = 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions from package metadata: no heavy import just to name them."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS:
        try:
            found[key] = version(dist)
        except PackageNotFoundError:
            found[key] = "not installed"
    return found


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


def read_run(folder: Path) -> dict[str, Any] | None:
    """The folder's ``run.json`` record, or None when it has none or it is not one of ours."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        return None
    return data


def write_run(folder: Path, record: Mapping[str, Any]) -> Path:
    return atomic_write_text(folder / RUN_FILE, json.dumps(record, indent=1) + "\n")


def is_resumable(record: Mapping[str, Any] | None) -> bool:
    if record is None:
        return False
    status = str(record.get("status", ""))
    return status == RUNNING or status.startswith(FAILED)


@attrs.frozen
class RunFolder:
    """Where a single run goes and what this command may do there."""

    path: Path
    created: bool
    """The command made the folder (so a useless failure may remove it)."""
    resume: bool
    """The folder holds an interrupted run of the same pipeline; its saved state is reused."""
    started_at: str

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def worth_keeping(self, own: Sequence[Path]) -> bool:
        """Whether anything besides this command's bookkeeping files is there (a checkpoint...)."""
        if not self.path.is_dir():
            return False
        bookkeeping = {p.name for p in own} | {RUN_FILE, PIPELINE_FILE, STATE_FILE + ".settings.json"}
        return any(p.name not in bookkeeping for p in self.path.iterdir())


def open_run_folder(folder: Path, spec: PipelineSpec, force: bool) -> RunFolder:
    """Decide, before any work, whether ``folder`` starts fresh, resumes, or is refused.

    * missing or empty or unrelated: fresh;
    * an interrupted run (``running``/``failed``) of the same effective pipeline: resume;
    * the same with other settings: refused, naming every changed key (``--force`` starts over);
    * a complete run, or another tool's output: refused unless ``--force`` (which starts over,
      dropping the old search state so nothing is mixed).
    """
    from auto_quantize_model.app.cli import check_output_dir

    now = utc_now()
    if not folder.exists():
        return RunFolder(folder, created=True, resume=False, started_at=now)
    if not folder.is_dir():
        raise InputError(f"output {folder} exists and is not a folder")
    record = read_run(folder)
    if force:
        for name in (STATE_FILE, STATE_FILE + ".settings.json"):
            (folder / name).unlink(missing_ok=True)
        return RunFolder(folder, created=False, resume=False, started_at=now)
    if record is not None and record["status"] == COMPLETE:
        raise InputError(
            f"output folder {folder} already holds a run (complete); pass --force to run it again, "
            "or choose another --output"
        )
    if not is_resumable(record):
        check_output_dir(folder, force=False)
        return RunFolder(folder, created=False, resume=False, started_at=now)
    old_file = folder / PIPELINE_FILE
    if not old_file.is_file():
        raise InputError(f"output folder {folder} holds an interrupted run without its {PIPELINE_FILE}")
    from auto_quantize_model.io.pipeline_file import load_pipeline

    changed = changed_settings(load_pipeline(old_file), spec)
    if changed:
        raise InputError(
            f"output folder {folder} holds an interrupted run with other settings "
            f"({'; '.join(changed)}); rerun with the same settings to resume, pass --force to start "
            "over, or choose another --output"
        )
    assert record is not None
    return RunFolder(folder, created=False, resume=True, started_at=now)


def run_record(
    run: RunFolder,
    spec: PipelineSpec,
    status: str,
    *,
    command: Sequence[str],
    device: str | None = None,
    forward_steps: Mapping[str, int] | None = None,
    previous: Mapping[str, Any] | None = None,
    seconds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "status": status,
        "started_at": run.started_at,
        "ended_at": None if status == RUNNING else utc_now(),
        "resumed": run.resume,
        "command": list(command),
        "spec_sha256": spec_hash(spec),
        "versions": versions(),
        "device": device_name(device or spec.model.device),
    }
    if previous is not None and run.resume:
        record["first_started_at"] = previous.get("first_started_at", previous.get("started_at"))
    if forward_steps is not None:
        record["forward_steps"] = dict(forward_steps)
    if seconds is not None:
        record["seconds"] = dict(seconds)
    return record


def failure_reason(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
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
