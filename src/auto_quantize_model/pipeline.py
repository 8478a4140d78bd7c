"""The runner: a short loop over small stages that pass typed artifacts along.

Stages never call each other. Each declares the artifact types it needs and the one it
produces; the runner checks that wiring before anything heavy (a model load) happens, then runs
the stages in order, timing each one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

from auto_quantize_model.artifacts import RunTimings
from auto_quantize_model.errors import AqmError, StageError, WiringError

log = logging.getLogger("auto_quantize_model")

T = TypeVar("T")


@runtime_checkable
class Stage(Protocol):
    """A step of a pipeline: frozen parameters in, one artifact out.

    ``requires`` must all be present before ``run``; ``optional`` are used when present.
    ``produces`` is one type, or a tuple of types when a stage hands on several artifacts (then
    ``run`` returns a tuple in that order): every channel between stages is then visible to the
    wiring check, including the in-memory model state RunAutoQuant leaves for validation.
    """

    @property
    def requires(self) -> tuple[type, ...]: ...

    @property
    def optional(self) -> tuple[type, ...]: ...

    @property
    def produces(self) -> type | tuple[type, ...]: ...

    def run(self, inputs: Artifacts) -> Any: ...


@attrs.frozen
class Artifacts:
    """An immutable bag of artifacts, at most one per type."""

    _items: tuple[Any, ...] = ()

    @classmethod
    def of(cls, items: Iterable[Any]) -> Artifacts:
        store = cls()
        for item in items:
            store = store.with_(item)
        return store

    def with_(self, item: Any) -> Artifacts:
        """A new bag where ``item`` replaces any artifact of the same type."""
        kept = tuple(x for x in self._items if type(x) is not type(item))
        return Artifacts((*kept, item))

    def get(self, kind: type[T]) -> T:
        for item in self._items:
            if isinstance(item, kind):
                return item
        raise KeyError(f"no {kind.__name__} artifact")

    def find(self, kind: type[T]) -> T | None:
        for item in self._items:
            if isinstance(item, kind):
                return item
        return None

    def __contains__(self, kind: type) -> bool:
        return self.find(kind) is not None

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def types(self) -> tuple[type, ...]:
        return tuple(type(x) for x in self._items)


def _stages(items: Iterable[Stage]) -> tuple[Stage, ...]:
    return tuple(items)


def _supplied(items: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(items)


def stage_name(stage: object) -> str:
    return type(stage).__name__


def produced_types(stage: Stage) -> tuple[type, ...]:
    """``stage.produces`` as a tuple, whether the stage declares one artifact type or several."""
    produces = stage.produces
    return produces if isinstance(produces, tuple) else (produces,)


def _as_tuple(produced: Any, stage: Stage) -> tuple[Any, ...]:
    kinds = produced_types(stage)
    items = produced if isinstance(stage.produces, tuple) else (produced,)
    if not isinstance(items, tuple) or len(items) != len(kinds):
        raise TypeError(f"produced {type(produced).__name__}, declared {_names(kinds)}")
    for item, kind in zip(items, kinds, strict=True):
        if not isinstance(item, kind):
            raise TypeError(f"produced {type(item).__name__}, declared {kind.__name__}")
    return items


def _names(kinds: Sequence[type]) -> str:
    return ", ".join(k.__name__ for k in kinds)


def check_wiring(stages: Sequence[Stage], supplied: Iterable[type]) -> None:
    """Fail before any work if a stage needs something nothing earlier provides."""
    available: list[type] = [RunTimings, *supplied]
    if not stages:
        raise WiringError("the pipeline has no stages")
    for index, stage in enumerate(stages):
        if not isinstance(stage, Stage):
            raise WiringError(
                f"pipeline step {index} ({stage!r}) is not a stage: it lacks requires/produces/run"
            )
        for need in stage.requires:
            if not any(issubclass(have, need) for have in available):
                producers = ", ".join(stage_name(s) for s in stages[:index]) or "none"
                raise WiringError(
                    f"stage {stage_name(stage)} needs a {need.__name__} artifact, but no earlier stage "
                    f"produces one (earlier stages: {producers}) and none was supplied"
                )
        available.extend(produced_types(stage))


@attrs.frozen
class Pipeline:
    """Stages run in order; ``supplied`` artifacts let a pipeline start mid-way.

    For example ``Pipeline([ExtractLM(...), ...], supplied=[LoadedModel(...)])`` reuses a model
    already in memory.
    """

    stages: tuple[Stage, ...] = attrs.field(converter=_stages)
    supplied: tuple[Any, ...] = attrs.field(default=(), converter=_supplied)

    def check(self) -> None:
        check_wiring(self.stages, (type(x) for x in self.supplied))

    def run(self) -> Artifacts:
        self.check()
        store = Artifacts.of(self.supplied)
        if RunTimings not in store:
            store = store.with_(RunTimings())
        total = len(self.stages)
        for index, stage in enumerate(self.stages, start=1):
            name = stage_name(stage)
            log.info("[%d/%d] %s ...", index, total, name)
            started = time.perf_counter()
            try:
                produced = stage.run(store)
            except AqmError as err:
                if isinstance(err, StageError):
                    raise
                raise StageError(name, err) from err
            except Exception as err:
                raise StageError(name, err) from err
            seconds = time.perf_counter() - started
            try:
                items = _as_tuple(produced, stage)
            except TypeError as err:
                raise StageError(name, err) from err
            for item in items:
                store = store.with_(item)
            store = store.with_(store.get(RunTimings).add(name, seconds))
            log.info("[%d/%d] %s done in %.2f s", index, total, name, seconds)
        return store
