"""The runner: wiring checked before anything runs, stages in order, timings, failures named."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import attrs
import pytest

from auto_quantize_model.artifacts import RunTimings
from auto_quantize_model.errors import ConfigError, StageError, WiringError
from auto_quantize_model.pipeline import Artifacts, Pipeline, check_wiring


@attrs.frozen
class Seed:
    value: int


@attrs.frozen
class Doubled:
    value: int


@attrs.frozen
class Report:
    text: str


@attrs.frozen
class MakeSeed:
    requires: ClassVar[tuple[type, ...]] = ()
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = Seed
    value: int = 3
    calls: list[str] = attrs.field(factory=list, eq=False)

    def run(self, inputs: Artifacts) -> Seed:
        self.calls.append("seed")
        return Seed(self.value)


@attrs.frozen
class Double:
    requires: ClassVar[tuple[type, ...]] = (Seed,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = Doubled
    calls: list[str] = attrs.field(factory=list, eq=False)

    def run(self, inputs: Artifacts) -> Doubled:
        self.calls.append("double")
        return Doubled(2 * inputs.get(Seed).value)


@attrs.frozen
class Describe:
    requires: ClassVar[tuple[type, ...]] = (Doubled,)
    optional: ClassVar[tuple[type, ...]] = (Seed,)
    produces: ClassVar[type] = Report

    def run(self, inputs: Artifacts) -> Report:
        seed = inputs.find(Seed)
        return Report(f"{inputs.get(Doubled).value} from {seed.value if seed else '?'}")


@attrs.frozen
class Explode:
    requires: ClassVar[tuple[type, ...]] = ()
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = Seed
    error: BaseException = attrs.field(factory=lambda: RuntimeError("boom\nsecond line"))

    def run(self, inputs: Artifacts) -> Seed:
        raise self.error


@attrs.frozen
class WrongType:
    requires: ClassVar[tuple[type, ...]] = ()
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = Seed

    def run(self, inputs: Artifacts) -> Any:
        return Doubled(1)


def test_stages_run_in_order_and_pass_artifacts() -> None:
    calls: list[str] = []
    store = Pipeline([MakeSeed(calls=calls), Double(calls=calls), Describe()]).run()
    assert calls == ["seed", "double"]
    assert store.get(Report).text == "6 from 3"
    timings = store.get(RunTimings)
    assert [t.stage for t in timings.stages] == ["MakeSeed", "Double", "Describe"]
    assert all(t.seconds >= 0 for t in timings.stages)


def test_supplied_artifacts_let_a_pipeline_start_mid_way() -> None:
    store = Pipeline([Double(), Describe()], supplied=[Seed(5)]).run()
    assert store.get(Report).text == "10 from 5"


def test_missing_artifact_is_reported_before_any_stage_runs() -> None:
    calls: list[str] = []
    pipeline = Pipeline([MakeSeed(calls=calls), Describe()])
    expected = r"stage Describe needs a Doubled artifact.*earlier stages: MakeSeed"
    with pytest.raises(WiringError, match=expected):
        pipeline.run()
    assert calls == []  # nothing ran


def test_wiring_accepts_supplied_types_and_rejects_non_stages() -> None:
    check_wiring([Double()], [Seed])
    with pytest.raises(WiringError, match="no stages"):
        check_wiring([], [])
    with pytest.raises(WiringError, match="is not a stage"):
        check_wiring([object()], [])  # type: ignore[list-item]


def test_a_failing_stage_is_named_and_keeps_its_cause() -> None:
    with pytest.raises(StageError, match=r"^stage Explode failed: boom$") as info:
        Pipeline([Explode()]).run()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.exit_code == 1


def test_a_user_error_inside_a_stage_keeps_its_exit_code() -> None:
    with pytest.raises(StageError, match=r"stage Explode failed: calib\.seq_len") as info:
        Pipeline([Explode(ConfigError("calib.seq_len: must be > 0"))]).run()
    assert info.value.exit_code == ConfigError.exit_code


def test_a_stage_producing_the_wrong_type_fails() -> None:
    with pytest.raises(StageError, match="produced Doubled, declared Seed"):
        Pipeline([WrongType()]).run()


def test_one_log_line_per_stage_with_wall_time() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("auto_quantize_model")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        Pipeline([MakeSeed(), Double()]).run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    done = [r.getMessage() for r in records if "done in" in r.getMessage()]
    assert len(done) == 2
    assert done[0].startswith("[1/2] MakeSeed done in ")
    assert done[1].endswith(" s")


def test_artifacts_replace_by_type_and_stay_immutable() -> None:
    first = Artifacts.of([Seed(1)])
    second = first.with_(Seed(2))
    assert first.get(Seed).value == 1
    assert second.get(Seed).value == 2
    assert Seed in second
    assert Doubled not in second
    assert second.find(Doubled) is None
    with pytest.raises(KeyError, match="no Doubled artifact"):
        second.get(Doubled)
