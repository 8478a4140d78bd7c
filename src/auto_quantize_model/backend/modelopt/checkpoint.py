"""The resume protocol: ModelOpt's search state and the two files that vouch for it.

ModelOpt (0.47) loads its ``checkpoint=`` file at the start of a search when it exists, saves
after calibrating any format not restored from it, and saves again after scoring. A rerun
therefore skips the calibration of every saved format and, once scores are saved, scoring too.
ModelOpt refuses a file whose method, formats or recipe groups differ, but not one made from
another model's weights, other captions or other step counts; and its scores are clamped. So
three files make one unit (:class:`StateFiles`):

* ``<state>`` — ModelOpt's search state, written atomically (:func:`~.patches.atomic_state_save`);
* ``<state>.settings.json`` — what the saved calibration and scores depend on: the settings, the
  captions' sha256 and a fingerprint of the model (source, architecture, dtype, a checksum of
  sampled weights). Written before the search starts; a resume under anything else is refused,
  naming what changed;
* ``<state>.raw-scores.json`` — the unclamped scores, with the sha256 of the exact state file
  they belong to and the sha256 of the scores themselves. Written just before the state that
  holds those scores replaces the old one, so a kill at any moment leaves either a matching pair
  or a record that is recognised as stale. The scores' own checksum, and the clamped scores in the
  state (which must be ModelOpt's clamp of the raw ones), tell a record edited or damaged after
  it was written: such a record is moved aside and the scores are recomputed, so a NaN typed into
  it is never taken for the computation's.

What cannot be read (a truncated state, a garbled settings record) is moved aside as
``*.corrupt`` with a warning naming it, and the search redoes what it lost; a raw-score record
that does not match its state is never mixed in: the scores are recomputed instead. Recomputing
(rather than refusing to resume) is safe because only scoring is redone, on the restored
calibration: the result is the one a fresh search gives.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.artifacts import CalibStats, LoadedModel
from auto_quantize_model.backend.modelopt.patches import temporaries_beside
from auto_quantize_model.backend.modelopt.state import RawScores, collect_raw_scores
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.io.atomic import atomic_write_text
from auto_quantize_model.specs import AutoQuantSpec

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.backend.modelopt.plan import Steps

log = logging.getLogger("auto_quantize_model")

STATE_FILE = "autoquant_search_state.pt"
"""ModelOpt's state file in a run folder (``aqm run`` always sets ``autoquant.checkpoint`` to it)."""
SETTINGS_SUFFIX = ".settings.json"
RAW_SCORES_SUFFIX = ".raw-scores.json"
CORRUPT_SUFFIX = ".corrupt"

WEIGHT_SAMPLES = 256
"""Elements sampled (evenly strided) from every parameter for the weight checksum."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_file(path: str) -> str:
    """The file ModelOpt really uses for ``checkpoint=path`` (a folder gets ``rank0.pth``)."""
    if Path(path).is_dir() or path.endswith(os.sep) or not Path(path).suffix:
        return str(Path(path) / "rank0.pth")
    return path


def _shown(value: Any) -> str:
    """A value for a one-line message; a sha256 is cut to its first 12 digits."""
    if isinstance(value, str) and _SHA256.match(value):
        return repr(value[:12] + "...")
    return repr(value)


def settings_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two settings records, as ``key: old -> new``."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: {_shown(saved.get(k))} -> {_shown(current.get(k))}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def raw_scores_sha256(raw: Mapping[str, Mapping[str, float]]) -> str:
    """sha256 of the scores as canonical JSON: the same numbers give the same digest however the
    file is laid out (floats are written in their shortest exact form, NaN as ``NaN``)."""
    text = json.dumps(raw, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def clamp_disagreement(raw: RawScores, candidate_stats: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The first group whose clamped scores in the state are not ModelOpt's clamp of ``raw``, or None.

    ModelOpt 0.47 stores ``min(score, previous)`` over each group's formats in order, with the
    same float operations repeated here, so a record written with the state agrees exactly.
    Groups the record lacks are not compared (their clamped scores are used as they are).
    """
    for key, entry in candidate_stats.items():
        scores = raw.get(key)
        labels = [str(recipe) for recipe in entry.get("formats", ())]
        if scores is None or not all(label in scores for label in labels):
            continue
        previous = float("inf")
        for label, saved in zip(labels, entry.get("scores", ()), strict=False):
            clamped = min(float(scores[label]), previous)
            if not _same(clamped, _float(saved)):
                return f"{key} {label}"
            previous = clamped
    return None


def _float(value: Any) -> float:
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


# --------------------------------------------------------------------------------------------------
# What a saved search depends on
# --------------------------------------------------------------------------------------------------


def weight_checksum(model: nn.Module, samples: int = WEIGHT_SAMPLES) -> str:
    """sha256 over every parameter's name, shape, dtype and ``samples`` evenly strided elements.

    Cheap on any size (one small gather per parameter, one copy to the host) and independent of
    the device the weights sit on: the same weights on CPU and GPU give the same checksum. Any
    other seed, fine-tune or dtype changes nearly every element, so the sample sees it; a change
    confined to elements between samples would not be seen (this is an identity check, not an
    integrity check). Parameters on the meta device (offloaded) count by name and shape only.
    """
    import torch

    digest = hashlib.sha256()
    picked: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        digest.update(f"{name} {tuple(param.shape)} {param.dtype}\n".encode())
        if param.device.type == "meta" or param.numel() == 0:
            continue
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        picked.append(flat[::stride][:samples].contiguous().view(torch.uint8))
    # one copy to the host when every sample sits on one device; the bytes hashed are the same
    one_device = len({t.device for t in picked}) == 1
    host = [torch.cat(picked).cpu()] if one_device else [t.cpu() for t in picked]
    for chunk in host:
        digest.update(chunk.numpy().tobytes())
    return digest.hexdigest()


@attrs.frozen
class ModelFingerprint:
    """Which model a search state was made from."""

    source: str | None
    """What the user loaded (a directory, ``builtin:...``); None when no LoadedModel was at hand."""
    architecture: str
    dtype: str
    weights_sha256: str


def model_fingerprint(model: nn.Module, loaded: LoadedModel | None) -> ModelFingerprint:
    """The fingerprint of ``model`` (the full model), with the source named by ``loaded`` if given."""
    first = next(model.parameters(), None)
    dtype = str(first.dtype).removeprefix("torch.") if first is not None else "none"
    return ModelFingerprint(
        source=None if loaded is None else loaded.source,
        architecture=type(model).__name__ if loaded is None else loaded.architecture,
        dtype=dtype if loaded is None else loaded.dtype,
        weights_sha256=weight_checksum(model),
    )


def search_settings(
    spec: AutoQuantSpec, scope: str, stats: CalibStats, steps: Steps, model: ModelFingerprint
) -> dict[str, Any]:
    """What the saved calibration and scores depend on (the budget is not: it is re-searched)."""
    return {
        "formats": list(spec.formats),
        "method": spec.method,
        "scope": scope,
        "disabled_layers": list(spec.disabled_layers),
        "calib_steps": steps.calib_steps,
        "score_steps": steps.score_steps,
        "captions_sha256": stats.captions_sha256,
        "layout": stats.layout,
        "seq_len": stats.seq_len,
        "batch_size": stats.batch_size,
        "samples": stats.samples,
        "real_tokens": stats.real_tokens,
        "model_source": model.source,
        "model_architecture": model.architecture,
        "model_dtype": model.dtype,
        "model_weights_sha256": model.weights_sha256,
        # the plain-PyTorch fallback rounds differently (scores within ~2%): never mix the two;
        # recorded only when not the default, so records written before the setting still match
        **({"kernels": spec.kernels} if spec.kernels != "extension" else {}),
        # ModelOpt's saved costs are scaled by its cost model and it refuses a state made under
        # another one (with a traceback); recorded only when not the default, like kernels
        **({"cost_model": spec.cost_model} if spec.cost_model != "storage" else {}),
    }


# --------------------------------------------------------------------------------------------------
# The three files
# --------------------------------------------------------------------------------------------------


class _Unreadable(Exception):
    """A file of the unit exists but cannot be parsed; the message says why."""


class _Changed(_Unreadable):
    """A raw-score record whose numbers are not the ones aqm wrote (edited or damaged since)."""


@attrs.frozen
class StateFiles:
    """ModelOpt's state file and the two records beside it, handled as one unit."""

    state: Path

    @classmethod
    def for_checkpoint(cls, checkpoint: str) -> StateFiles:
        return cls(Path(checkpoint_file(checkpoint)))

    @property
    def settings(self) -> Path:
        return self.state.with_name(self.state.name + SETTINGS_SUFFIX)

    @property
    def raw_scores(self) -> Path:
        return self.state.with_name(self.state.name + RAW_SCORES_SUFFIX)

    def unit(self) -> tuple[Path, Path, Path]:
        return self.state, self.settings, self.raw_scores

    def all_files(self) -> tuple[Path, ...]:
        """Every file aqm may have written for this state: set-aside copies and a killed save's
        temporary included (what ``--force`` must remove)."""
        aside = (p.with_name(p.name + CORRUPT_SUFFIX) for p in self.unit())
        return (*self.unit(), *aside, *temporaries_beside(self.state))

    def remove_dead_temporaries(self) -> None:
        """Temporary states left by killed processes (a live one may still be writing its own)."""
        for path in temporaries_beside(self.state):
            pid = path.name.removeprefix(f".{self.state.name}.").removesuffix(".tmp.pt")
            if not (pid.isdigit() and _alive(int(pid))):
                path.unlink(missing_ok=True)

    def move_aside(self, *paths: Path) -> list[Path]:
        """Rename the existing ``paths`` to ``*.corrupt`` (replacing older ones); the new names."""
        moved: list[Path] = []
        for path in paths:
            if path.exists():
                aside = path.with_name(path.name + CORRUPT_SUFFIX)
                path.replace(aside)
                moved.append(aside)
        return moved

    def read_settings(self) -> dict[str, Any] | None:
        """The settings record, None when there is none; :class:`_Unreadable` when it is garbled."""
        try:
            text = self.settings.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise _Unreadable(f"{type(err).__name__}: {err}") from err
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise _Unreadable(f"not JSON: {err}") from err
        if not isinstance(record, dict):
            raise _Unreadable(f"a JSON {type(record).__name__}, not an object")
        return record

    def write_settings(self, settings: Mapping[str, Any]) -> None:
        self.settings.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.settings, json.dumps(settings, indent=1, sort_keys=True) + "\n")

    def read_raw_scores(self, state: Path) -> RawScores:
        """The raw scores recorded for exactly the file ``state``; :class:`_Unreadable` otherwise."""
        try:
            record = json.loads(self.raw_scores.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise _Unreadable("it is missing") from err
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _Unreadable(f"it cannot be read ({type(err).__name__}: {err})") from err
        if not isinstance(record, dict) or record.get("state_sha256") != file_sha256(state):
            raise _Unreadable("it was written for another state file (its state_sha256 differs)")
        scores = record.get("raw_scores")
        if not isinstance(scores, dict) or not all(
            isinstance(entry, dict)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in entry.values())
            for entry in scores.values()
        ):
            raise _Changed("its raw_scores are not a mapping of groups to format scores")
        digest = record.get("raw_scores_sha256")
        if digest is None:
            raise _Unreadable("it has no checksum of its scores (written by an older aqm)")
        if digest != raw_scores_sha256(scores):
            raise _Changed("its scores do not match their checksum (raw_scores_sha256)")
        return scores

    def write_raw_scores(self, raw: RawScores, state: Path) -> None:
        record = {
            "state_sha256": file_sha256(state),
            "raw_scores_sha256": raw_scores_sha256(raw),
            "raw_scores": raw,
        }
        atomic_write_text(self.raw_scores, json.dumps(record, sort_keys=True) + "\n")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no save under way while it opens the checkpoint
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# One search's side of the protocol
# --------------------------------------------------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


class SearchCheckpoint:
    """Checks, loads and saves one search's state; its hooks go into :mod:`.patches`' wrappers.

    Mutable on purpose and short-lived: it follows one ``mtq.auto_quantize`` call (what was
    restored, whether scoring ran here) so that the files written describe what really happened.
    """

    def __init__(self, files: StateFiles | None) -> None:
        self.files = files
        self.raw: RawScores | None = None
        """Raw scores of a restored search (validated against the state file), else None."""
        self.scored_here = False

    @classmethod
    def open(cls, checkpoint: str | None, settings: Callable[[], dict[str, Any]]) -> SearchCheckpoint:
        """Refuse a saved state made under other settings; record the settings for a new one.

        ``settings`` is only called when there is a checkpoint (the model fingerprint costs a pass
        over the weights). A garbled settings record makes the state beside it unverifiable: the
        whole unit is moved aside and the search starts fresh.
        """
        if checkpoint is None:
            log.info(
                "AutoQuant: autoquant.checkpoint is not set, so the search state is not saved (no resume)"
            )
            return cls(None)
        files = StateFiles.for_checkpoint(checkpoint)
        files.remove_dead_temporaries()
        current = settings()
        if files.state.exists() and _resumable(files, current):
            return cls(files)
        files.raw_scores.unlink(missing_ok=True)  # belonged to a state that is gone
        files.write_settings(current)
        return cls(files)

    @property
    def modelopt_path(self) -> str | None:
        """The ``checkpoint=`` argument for ModelOpt (None: nothing saved, nothing restored)."""
        return None if self.files is None else str(self.files.state)

    def scoring_started(self) -> None:
        self.scored_here = True

    def loaded(self, searcher: Any, loaded: bool) -> None:
        """After ModelOpt's load: say what is reused; drop restored scores that lack their raw record."""
        files = self.files
        if files is None:
            return
        if not loaded:
            log.info("AutoQuant: no saved search state at %s, starting fresh", files.state)
            return
        formats = _plural(len(searcher.quantizer_states), "format")
        if not searcher.candidate_stats:
            log.info("AutoQuant: resuming from %s (calibration of %s is reused)", files.state, formats)
            return
        try:
            raw = files.read_raw_scores(files.state)
            disagreeing = clamp_disagreement(raw, searcher.candidate_stats)
            if disagreeing is not None:
                raise _Changed(
                    f"its score of {disagreeing} disagrees with the clamped one saved in the state"
                )
        except _Unreadable as err:
            aside = files.move_aside(files.raw_scores) if isinstance(err, _Changed) else []
            log.warning(
                "AutoQuant: the raw-score record %s is not usable with %s: %s%s; the scores are recomputed "
                "(calibration of %s is reused)",
                files.raw_scores,
                files.state,
                err,
                f"; it was changed after aqm wrote it, so none of its numbers are used (moved aside as "
                f"{aside[0].name})"
                if aside
                else "",
                formats,
            )
            searcher.candidate_stats = collections.defaultdict(dict)
            return
        self.raw = raw
        log.info(
            "AutoQuant: resuming from %s (calibration of %s and the scores are reused)", files.state, formats
        )

    def unreadable(self, path: Path, err: BaseException) -> None:
        """ModelOpt could not load ``path``: move it (and its raw scores) aside and start fresh."""
        files = self.files if self.files is not None else StateFiles(path)
        moved = files.move_aside(path, files.raw_scores)
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
        log.warning(
            "AutoQuant: the saved search state %s cannot be read (%s: %s); moved aside (%s), calibration and "
            "scoring are redone",
            path,
            type(err).__name__,
            detail,
            ", ".join(p.name for p in moved),
        )

    def before_replace(self, searcher: Any, real: Path, temporary: Path) -> None:
        """The raw-score record for the state about to replace ``real`` (none if it holds no scores)."""
        files = StateFiles(real)
        if not searcher.candidate_stats:
            files.raw_scores.unlink(missing_ok=True)
            return
        raw = collect_raw_scores(searcher.model) if self.scored_here else self.raw
        if raw is None:
            files.raw_scores.unlink(missing_ok=True)
            return
        files.write_raw_scores(raw, temporary)


def _resumable(files: StateFiles, current: Mapping[str, Any]) -> bool:
    """Whether the existing state may be resumed (False: its unit was unreadable and moved aside).

    Raises when it was saved under other settings, or without a record to check it against.
    """
    try:
        saved = files.read_settings()
    except _Unreadable as err:
        moved = files.move_aside(*files.unit())
        log.warning(
            "AutoQuant: the settings record %s cannot be read (%s), so the search state beside it cannot be "
            "checked; moved aside (%s) and starting over",
            files.settings,
            err,
            ", ".join(p.name for p in moved),
        )
        return False
    if saved is None:
        raise ConfigError(
            f"autoquant.checkpoint {files.state} has no settings record ({files.settings.name}), so it "
            "cannot be told apart from a run with another model or other data; delete it or point "
            "autoquant.checkpoint elsewhere"
        )
    _refuse_other_settings(files.state, saved, current)
    return True


def _refuse_other_settings(state: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    if "model_weights_sha256" not in saved:
        raise ConfigError(
            f"autoquant.checkpoint {state} was saved without a model fingerprint (by an older aqm), so it "
            "cannot be matched to this model; delete it or point autoquant.checkpoint elsewhere"
        )
    changed = settings_mismatch(saved, current)
    if changed:
        raise ConfigError(
            f"autoquant.checkpoint {state} was saved with other settings ({'; '.join(changed)}); "
            "delete it or point autoquant.checkpoint elsewhere"
        )
