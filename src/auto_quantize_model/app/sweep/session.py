"""Sweeps that load once: one model in memory, a verified copy per point, shared batches and searches.

The points of a sweep usually differ in a setting or two, and loading a 4B model (or building one
from ``config:`` with random weights) costs more than scoring it. A :class:`SweepSession` runs
every point's pipeline without its LoadModel stage, and without BuildCalibLoader where another
point already built the same batches.

**Model.** The first point that needs a model loads it through the injected loader (tests count
the calls). That model is never given to a pipeline: ModelOpt puts its quantizers into the model
it searches and RunAutoQuant refuses a model that already has them, so every point runs on a
fresh copy (:func:`copy_model`), and the copy is checked against a checksum of the weights taken
at load (:func:`tensors_checksum`: exact byte sums of every parameter and buffer, computed where
the tensor lives). A point therefore never runs on weights an earlier point changed, and a copy
that came out different stops the sweep instead of scoring the wrong model. Where the pristine
model is kept is chosen by memory (:func:`choose_keep`):

* ``device``: beside the working copy, on the model's device, when after a second copy at least
  as much again as the weights (and no less than :data:`RUN_RESERVE_BYTES`) stays free for the
  run. Copies are device to device. Qwen3-VL-4B in bf16 (4.44 billion parameters, 8.9 GB) on a
  139 GiB H200 holds 18 GB of copies and leaves over 100 GiB to AutoQuant; Qwen3-VL-8B (8.77
  billion, 17.5 GB) likewise.
* ``host``: in host memory, copied to the device for every point (host to device: seconds for
  tens of GB), when the device has no room for two copies but the host has for one: Qwen3-VL-32B
  (33.4 billion, 67 GB) or 30B-A3B (31.1 billion, 62 GB) on an H200 with 128 GiB of host memory.
* ``reload``: neither fits, the model spans several devices (``device_map``) or has weights on the
  meta device (offloaded): every point loads it again, as sweeps always did.

**Calibration.** Batches are built once per (model, calibration settings) and handed to the
points that share them; they are CPU tensors no stage changes, which a checksum confirms at
every reuse.

**Searches.** A point whose settings differ from a finished point's only in the budget
(``autoquant.effective_bits``) gets that point's search state (state, settings record, raw
scores) copied into its folder before it runs: ModelOpt restores the calibration and the scores
and only solves the search again (no forward pass), exactly as a resumed run does; the settings
record still refuses the state if anything it depends on differs.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import itertools
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import attrs

from auto_quantize_model.app.sweep.points import SearchKey, calib_key, model_key, search_key
from auto_quantize_model.errors import AqmError, StageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.artifacts import CalibData, LoadedModel
    from auto_quantize_model.pipeline import Artifacts
    from auto_quantize_model.specs import CalibSpec, LoadSpec, PipelineSpec

log = logging.getLogger("auto_quantize_model")

Keep = Literal["device", "host", "reload"]
Loader = Callable[["LoadSpec"], "LoadedModel"]

GIB = 2**30
RUN_RESERVE_BYTES = 2 * GIB
"""Least memory left for a run beside two copies of the weights (the run needs about the weights'
size again at most for its activations, gradients and quantizer state; this floor is for tiny models)."""
HOST_RESERVE_BYTES = 8 * GIB
"""Host memory left free beside a pristine copy kept there."""
CHECKSUM_CHUNK = 1 << 24
"""Bytes summed per step of :func:`tensors_checksum` (bounds its scratch memory to 256 MiB)."""
_POSITION_MODULUS = 65521
"""Positions weigh the bytes modulo this prime, so that moving bytes around changes the checksum."""


# --------------------------------------------------------------------------------------------------
# Copies and their checksum
# --------------------------------------------------------------------------------------------------


def unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (non-persistent ones too) once, by its first name."""
    seen: set[int] = set()
    found: list[tuple[str, torch.Tensor]] = []
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found.append((name, tensor))
    return found


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each tensor's name, shape, dtype and two exact sums of its bytes.

    The sums (of the bytes, and of the bytes weighted by their position modulo 65521) are
    integers computed on the tensor's own device, so equal weights give equal checksums on CPU
    and GPU alike and nothing but two small numbers per tensor crosses to the host. Any changed
    byte changes the first sum; moved bytes change the second. Meta tensors count by name and
    shape only.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        data = tensor.detach()
        digest.update(f"{name} {tuple(data.shape)} {data.dtype}\n".encode())
        if data.device.type == "meta" or data.numel() == 0:
            continue
        raw = data.contiguous().reshape(-1).view(torch.uint8)
        plain = torch.zeros((), dtype=torch.int64, device=raw.device)
        weighted = torch.zeros((), dtype=torch.int64, device=raw.device)
        for start in range(0, raw.numel(), CHECKSUM_CHUNK):
            chunk = raw[start : start + CHECKSUM_CHUNK].to(torch.int64)
            place = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=raw.device)
            place = place.remainder_(_POSITION_MODULUS).add_(1)
            plain += chunk.sum()
            weighted += (chunk * place).sum()
        digest.update(f"{int(plain)} {int(weighted)}\n".encode())
    return digest.hexdigest()


def weights_checksum(model: nn.Module) -> str:
    return tensors_checksum(unique_tensors(model))


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in unique_tensors(model) if t.device.type != "meta")


def copy_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on ``device``, tied weights kept tied.

    Each tensor is copied once, straight to ``device``, and handed to ``copy.deepcopy`` through
    its memo, so a pristine model kept in host memory never needs a second host copy, and two
    names for one tensor (tied embeddings) stay one tensor.
    """
    from torch import nn

    memo: dict[int, object] = {}
    for _, tensor in unique_tensors(model):
        copied = tensor.detach().to(device=device, copy=True)
        memo[id(tensor)] = (
            nn.Parameter(copied, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else copied
        )
    return copy.deepcopy(model, memo)


def calib_checksum(calib: CalibData) -> str:
    return tensors_checksum(
        (f"{index}.{key}", tensor)
        for index, batch in enumerate(calib.batches)
        for key, tensor in batch.items()
    )


# --------------------------------------------------------------------------------------------------
# Where the pristine model lives
# --------------------------------------------------------------------------------------------------


def choose_keep(
    weights: int, *, cuda: bool, device_free: int | None, host_free: int, spread: bool = False
) -> Keep:
    """Where to keep the pristine model, from its size and the free memory after it was loaded.

    ``device_free`` is the model device's free memory (None off CUDA), ``host_free`` the host's
    available memory; ``spread``: the model spans devices or is partly on the meta device.
    """
    if spread:
        return "reload"
    reserve = max(weights, RUN_RESERVE_BYTES)
    if cuda:
        if device_free is not None and device_free - weights >= reserve:
            return "device"
        return "host" if host_free - weights >= HOST_RESERVE_BYTES else "reload"
    # on CPU the working copy, the pristine one and the run all live in host memory
    return "device" if host_free - weights >= reserve else "reload"


def host_available() -> int:
    """Available host memory (``MemAvailable``), or free pages where /proc is missing."""
    try:
        with Path("/proc/meminfo").open(encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def _is_spread(model: nn.Module, spec: LoadSpec) -> bool:
    devices = {t.device for _, t in unique_tensors(model)}
    return len(devices) > 1 or any(d.type == "meta" for d in devices) or spec.device_map is not None


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


@attrs.define
class PristineModel:
    """The model as loaded, never run; :meth:`fresh` hands out verified copies of it."""

    loaded: LoadedModel
    checksum: str
    keep: Keep
    device: torch.device
    """Where the copies go: the device the model was loaded on."""
    copies: int = 0

    @classmethod
    def keep_loaded(cls, loaded: LoadedModel, spec: LoadSpec) -> PristineModel:
        """Checksum ``loaded`` and put it where :func:`choose_keep` says (moving it to the host if so)."""
        import torch

        model = loaded.model
        first = next(iter(unique_tensors(model)), None)
        device = first[1].device if first is not None else torch.device("cpu")
        size = weights_bytes(model)
        device_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        keep = choose_keep(
            size,
            cuda=device.type == "cuda",
            device_free=device_free,
            host_free=host_available(),
            spread=_is_spread(model, spec),
        )
        checksum = weights_checksum(model) if keep != "reload" else ""
        if keep == "host":
            model.to("cpu")
        log.info(
            "sweep: %s (%s of weights) is kept %s; every point runs on a copy checked against it",
            loaded.source,
            _gib(size),
            {"device": f"on {device}", "host": "in host memory", "reload": "nowhere (loaded per point)"}[
                keep
            ],
        )
        return cls(loaded, checksum, keep, device)

    def fresh(self) -> LoadedModel:
        """A copy on the model's device whose weights match the load-time checksum, or an error."""
        model = copy_model(self.loaded.model, self.device)
        found = weights_checksum(model)
        if found != self.checksum:
            raise AqmError(
                f"sweep: the copy of {self.loaded.source} for this point differs from the model as loaded "
                f"(weights checksum {found[:12]} != {self.checksum[:12]}); the sweep stops rather than "
                "score other weights"
            )
        self.copies += 1
        return attrs.evolve(self.loaded, model=model)


def _free_memory() -> None:
    """Collect what the last point left (its model copy) before the next one is made."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------------


def _default_loader(spec: LoadSpec) -> LoadedModel:
    from auto_quantize_model.backend.models import load

    return load(spec)


@attrs.define
class _CachedCalib:
    data: CalibData
    checksum: str
    built_by: str
    """The point folder that built the batches."""


@attrs.define
class SweepSession:
    """Runs a sweep's points with what they share done once; one session per sweep run."""

    loader: Loader = _default_loader
    """Loads a model for a :class:`LoadSpec` (``backend.models.load``; tests count the calls)."""
    loads: int = 0
    calib_builds: int = 0
    calib_reuses: int = 0
    search_reuses: int = 0
    checksums: list[str] = attrs.field(factory=list)
    """The verified weights checksum of every copy handed to a point, in order."""
    _model: tuple[LoadSpec, PristineModel] | None = None
    _calib: dict[tuple[LoadSpec, CalibSpec], _CachedCalib] = attrs.field(factory=dict)
    _searches: dict[SearchKey, Path] = attrs.field(factory=dict)
    _reuse: dict[Path, str] = attrs.field(factory=dict)

    # ------------------------------------------------------------- what the service calls

    def __call__(self, spec: PipelineSpec, folder: Path) -> Artifacts:
        """Run ``spec`` (already pointed at ``folder``'s search state) into ``folder``."""
        from auto_quantize_model.artifacts import RunTimings, StageTiming

        _free_memory()
        notes: list[str] = []
        started = time.perf_counter()
        loaded = self._loaded(spec, notes)
        timings = [StageTiming("LoadModel", time.perf_counter() - started)]
        supplied: list[object] = [loaded]
        cached = self._calib.get(calib_key(spec))
        if cached is not None:
            if calib_checksum(cached.data) != cached.checksum:
                raise AqmError(f"sweep: the calibration batches built for {cached.built_by} changed since")
            supplied.append(cached.data)
            self.calib_reuses += 1
            notes.append(f"calibration of {cached.built_by}")
        source = self._reuse_search(spec, folder)
        if source is not None:
            notes.append(f"scores of {source}")
        self._reuse[folder] = "; ".join(notes)
        store = self._run(spec, folder, [*supplied, RunTimings(tuple(timings))])
        self._after(spec, folder, store)
        return _without_models(store)

    def remember(self, spec: PipelineSpec) -> None:
        """A point finished by an earlier run: its saved search can serve points of another budget."""
        state = _state_file(spec)
        if state is not None and state.is_file():
            self._searches.setdefault(search_key(spec), state)

    def reuse_of(self, folder: Path) -> str:
        """What the point run into ``folder`` took over (``model copy; calibration of ...``)."""
        return self._reuse.get(folder, "")

    def notes(self) -> list[str]:
        """A line for the sweep's index: loads, copies, batches and searches shared so far."""
        copies = 0 if self._model is None else self._model[1].copies
        return [
            f"Shared across points: model loaded {self.loads} time(s), {copies} verified copies; "
            f"calibration built {self.calib_builds} time(s), reused {self.calib_reuses}; "
            f"{self.search_reuses} search(es) re-solved from another point's saved scores."
        ]

    def close(self) -> None:
        """Drop the pristine model and the cached batches."""
        self._model = None
        self._calib.clear()
        _free_memory()

    # ------------------------------------------------------------- the parts

    def _loaded(self, spec: PipelineSpec, notes: list[str]) -> LoadedModel:
        key = model_key(spec)
        if self._model is None or self._model[0] != key:
            self._model = None
            _free_memory()
            loaded = self.loader(key)
            self.loads += 1
            pristine = PristineModel.keep_loaded(loaded, key)
            if pristine.keep == "reload":
                return loaded  # not kept: this point runs on it, the next loads again
            self._model = (key, pristine)
        else:
            notes.append("model copy")
        pristine = self._model[1]
        fresh = pristine.fresh()
        self.checksums.append(pristine.checksum)
        return fresh

    def _reuse_search(self, spec: PipelineSpec, folder: Path) -> str | None:
        """Copy a same-search point's saved state into this point's place; the source folder's name."""
        from auto_quantize_model.backend.modelopt.checkpoint import StateFiles

        source = self._searches.get(search_key(spec))
        target = _state_file(spec)
        if source is None or target is None or target.exists() or not source.is_file():
            return None
        for src, dst in zip(StateFiles(source).unit(), StateFiles(target).unit(), strict=True):
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        self.search_reuses += 1
        log.info(
            "sweep: %s differs from %s only in its budget: re-solving its saved scores",
            folder.name,
            source.parent.name,
        )
        return source.parent.name

    def _run(self, spec: PipelineSpec, folder: Path, supplied: list[object]) -> Artifacts:
        from auto_quantize_model.app.runs import is_out_of_memory, out_of_memory_error
        from auto_quantize_model.artifacts import CalibData, LoadedModel
        from auto_quantize_model.pipeline import Pipeline
        from auto_quantize_model.stages import build_pipeline

        given = {type(item) for item in supplied}
        skip = {"LoadModel"} | ({"BuildCalibLoader"} if CalibData in given else set())
        assert LoadedModel in given
        stages = [stage for stage in build_pipeline(spec, folder).stages if type(stage).__name__ not in skip]
        try:
            with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout is for results
                return Pipeline(stages, supplied=supplied).run()
        except StageError as err:
            if is_out_of_memory(err.cause):
                raise out_of_memory_error(err.stage, spec) from err
            raise

    def _after(self, spec: PipelineSpec, folder: Path, store: Artifacts) -> None:
        from auto_quantize_model.artifacts import CalibData

        key = calib_key(spec)
        calib = store.find(CalibData)
        if calib is not None and key not in self._calib:
            self._calib[key] = _CachedCalib(calib, calib_checksum(calib), folder.name)
            self.calib_builds += 1
        self.remember(spec)


def _state_file(spec: PipelineSpec) -> Path | None:
    from auto_quantize_model.backend.modelopt.checkpoint import checkpoint_file

    checkpoint = spec.autoquant.checkpoint
    return None if checkpoint is None else Path(checkpoint_file(checkpoint))


def _without_models(store: Artifacts) -> Artifacts:
    """The plain results of a point: what holds the model copy is let go before the next point."""
    from auto_quantize_model.artifacts import CalibData, LanguageModel, LoadedModel, QuantSearch
    from auto_quantize_model.pipeline import Artifacts

    heavy = (LoadedModel, LanguageModel, QuantSearch, CalibData)
    return Artifacts.of(item for item in store if not isinstance(item, heavy))
