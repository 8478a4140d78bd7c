"""Sweeps spread over torchrun's workers: who runs which point, how workers talk and notice a dead
one, what is refused under torchrun, and (slow) two real workers on this CPU machine against a
one-process sweep, and a killed worker's points finished by a plain rerun."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.app.folders import INDEX_NAME
from auto_quantize_model.app.lock import LOCK_NAME
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.app.runs import read_run
from auto_quantize_model.app.sweep.points import expand_sweep, reuse_order
from auto_quantize_model.app.sweep.workers import (
    Worker,
    WorkerGroup,
    WorkerLost,
    assign_points,
    narrow_visible_gpus,
    point_problems,
    wait_for_workers,
    worker_from_env,
)
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.pipeline_file import spec_from_dict
from builders import comparable_manifest, tiny_pipeline_toml

TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}


# --------------------------------------------------------------------------------------------------
# Where a worker stands (pure)
# --------------------------------------------------------------------------------------------------


def test_a_plain_run_is_no_worker_and_torchrun_env_is_read() -> None:
    assert worker_from_env({}) is None
    assert worker_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None, "one worker is a plain run"
    worker = worker_from_env(TORCHRUN_ENV)
    assert worker == Worker(rank=1, world_size=2, local_rank=1)
    assert (worker.leader, worker.name) == (False, "rank 1/2")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "LOCAL_RANK, MASTER_ADDR, MASTER_PORT not: start the workers"),
        ({**TORCHRUN_ENV, "RANK": "2"}, "RANK=2 / LOCAL_RANK=1 do not fit WORLD_SIZE=2"),
    ],
)
def test_a_broken_torchrun_environment_is_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        worker_from_env(env)


def test_each_worker_sees_only_its_own_gpu() -> None:
    env: dict[str, str] = {}
    assert narrow_visible_gpus(Worker(1, 2, 1), env) == "1"
    assert env == {"CUDA_VISIBLE_DEVICES": "1"}
    env = {"CUDA_VISIBLE_DEVICES": "4, 6"}
    assert narrow_visible_gpus(Worker(3, 4, 1), env) == "6"
    with pytest.raises(ConfigError, match="names 1 GPU\\(s\\): start at most 1 workers per host"):
        narrow_visible_gpus(Worker(1, 2, 1), {"CUDA_VISIBLE_DEVICES": "3"})


def _points(sweep: dict[str, list[Any]], **model: Any) -> Any:
    raw = {"model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu", **model}, "sweep": sweep}
    return expand_sweep(spec_from_dict(raw, source="s.toml"), source="s.toml")


def test_points_go_to_workers_in_contiguous_searches_balanced_by_what_is_left() -> None:
    # four searches (calibration lengths) of two budgets each: eight points
    points = reuse_order(
        _points({"calib.seq_len": [16, 32, 64, 128], "autoquant.effective_bits": [12.0, 10.0]})
    )
    assert len(points) == 8
    owners = assign_points(points, 2, lambda p: True)
    assert owners == (0, 0, 0, 0, 1, 1, 1, 1)
    assert all(owners[i] == owners[i + 1] for i in range(0, 8, 2)), "a budget never leaves its search"
    # a search goes where its middle falls: 2/4/2 points over three workers, never a split search
    assert assign_points(points, 3, lambda p: True) == (0, 0, 1, 1, 1, 1, 2, 2)
    assert assign_points(points, 8, lambda p: True) == (1, 1, 3, 3, 5, 5, 7, 7)
    # the first two searches are finished: the two left are split between the workers
    left = assign_points(points, 2, lambda p: p.spec.calib.seq_len > 32)
    assert left == (0, 0, 0, 0, 0, 0, 1, 1)
    # nothing left: each worker reads back its share
    assert assign_points(points, 2, lambda p: False) == owners


def test_one_gpu_per_worker_refuses_an_explicit_gpu_and_a_sharded_model() -> None:
    point_problems(_points({"model.device": ["cpu", "cuda", "auto", "cuda:0"]}), "s.toml")
    with pytest.raises(ConfigError) as caught:
        point_problems(_points({"model.device": ["cuda", "cuda:1"]}), "s.toml")
    assert str(caught.value) == (
        "s.toml: sweep point model.device=cuda:1: model.device = 'cuda:1': under torchrun each worker "
        'sees only its own GPU; use device = "cuda" (or "auto")'
    )
    with pytest.raises(
        ConfigError, match=r"^s\.toml: model\.device_map = 'auto': a sharded model spans GPUs"
    ):
        point_problems(_points({"calib.seq_len": [16, 32]}, device_map="auto"), "s.toml")


# --------------------------------------------------------------------------------------------------
# Talking through a store (a thread-safe dict in place of torchrun's TCPStore)
# --------------------------------------------------------------------------------------------------


@attrs.define
class DictStore:
    """The store calls the workers make, on a dict; ``wait`` blocks like the real one."""

    data: dict[str, bytes] = attrs.field(factory=dict)
    changed: threading.Condition = attrs.field(factory=threading.Condition)

    def set(self, key: str, value: str | bytes) -> None:
        with self.changed:
            self.data[key] = value.encode() if isinstance(value, str) else value
            self.changed.notify_all()

    def get(self, key: str) -> bytes:
        with self.changed:
            return self.data[key]

    def add(self, key: str, value: int) -> int:
        with self.changed:
            count = int(self.data.get(key, b"0")) + value
            self.data[key] = str(count).encode()
            self.changed.notify_all()
            return count

    def check(self, keys: list[str]) -> bool:
        with self.changed:
            return all(key in self.data for key in keys)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: all(k in self.data for k in keys), timeout.total_seconds()):
                raise RuntimeError(f"wait timeout after {timeout.total_seconds():.0f}s for {keys}")


@attrs.define
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waiting_ends_when_all_are_done() -> None:
    store = DictStore()
    for rank in range(3):
        store.set(f"done/{rank}", "1")
    wait_for_workers(store, 3, rerun="rerun it")


def test_a_failed_worker_is_named_with_its_reason_and_the_rerun() -> None:
    store = DictStore()
    store.set("done/0", "1")
    store.set("failed/1", "stage RunAutoQuant failed: out of memory")
    with pytest.raises(
        WorkerLost, match=r"^worker 1 of 2 failed \(stage RunAutoQuant failed: out of memory\); rerun"
    ):
        wait_for_workers(store, 2, rerun="rerun `aqm run s.toml --output o`")


def test_a_silent_worker_is_given_up_after_its_heartbeat_stood_still() -> None:
    store, clock = DictStore(), FakeClock()
    beats: list[float] = []

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now < 50:  # worker 1 beats for 50 s, then dies
            store.add("beat/1", 1)
            beats.append(clock.now)

    store.set("done/0", "1")
    with pytest.raises(WorkerLost, match=r"^worker 1 of 2 stopped answering 30 s ago \(died, hung"):
        wait_for_workers(store, 2, rerun="rerun it", stale_after=30, poll=1, clock=clock, sleep=sleep)
    assert len(beats) == 49
    assert 79 <= clock.now <= 81, "given up 30 s after the last beat, not before"


def _groups(world: int, timeout: float = 5.0) -> list[WorkerGroup]:
    store = DictStore()
    return [
        WorkerGroup(Worker(rank, world, rank), store, rerun="rerun it", timeout=timeout)
        for rank in range(world)
    ]


def _on_threads(groups: list[WorkerGroup], work: Any) -> list[Any]:
    """``work(group)`` for every group at once; each result, or the exception it raised."""
    results: list[Any] = [None] * len(groups)

    def run(index: int) -> None:
        try:
            results[index] = work(groups[index])
        except Exception as err:
            results[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(groups))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_gather_and_broadcast_hand_every_worker_the_same_values() -> None:
    def work(group: WorkerGroup) -> tuple[Any, Any]:
        rank = group.worker.rank
        return group.gather({"rank": rank}, dict[str, int]), group.broadcast(f"from {rank}", str)

    for gathered, said in _on_threads(_groups(3), work):
        assert gathered == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
        assert said == "from 0"


def test_a_problem_of_one_worker_is_raised_by_every_worker() -> None:
    def work(group: WorkerGroup) -> None:
        mine = InputError("out is in use by aqm process 7") if group.worker.rank == 1 else None
        group.agree(mine, "opening the sweep folder")

    raised = _on_threads(_groups(3), work)
    assert [type(err) for err in raised] == [InputError] * 3
    assert {str(err) for err in raised} == {"out is in use by aqm process 7"}
    assert all(err.exit_code == 2 for err in raised)


def test_a_worker_that_never_answers_is_one_line_not_a_hang() -> None:
    group = _groups(2, timeout=0.2)[0]
    with pytest.raises(
        WorkerLost, match=r"^lost contact with the other workers while assigning points \(wait"
    ):
        group.gather("x", str, "assigning points")


# --------------------------------------------------------------------------------------------------
# What is refused under torchrun (in-process, the environment set; no worker group is joined)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    # empty reads as unset, and unlike delenv of an absent name, setenv is undone: the refused run
    # narrows os.environ itself, which would leak CUDA_VISIBLE_DEVICES=1 into the torchrun tests below
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def _never_joined(worker: Worker) -> WorkerGroup:
    raise AssertionError(f"{worker.name} should have been refused before joining")


@pytest.mark.usefixtures("torchrun_env")
def test_other_commands_and_single_runs_are_refused_on_every_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text(tiny_pipeline_toml(), "utf-8")
    service = RunService(library_importer=lambda: 0.0, worker_group=_never_joined)
    assert cli.main(["validate", str(toml)], service=service) == 2
    err = capsys.readouterr().err
    assert "aqm: error: aqm validate runs in one process; start it without torchrun" in err
    assert cli.main(["run", str(toml), "--output", str(tmp_path / "o")], service=service) == 2
    err = capsys.readouterr().err
    assert f"[rank 1/2] aqm: error: {toml} has no [sweep] table: torchrun spreads a sweep's points" in err
    assert not (tmp_path / "o").exists()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


# --------------------------------------------------------------------------------------------------
# Two real workers on this CPU machine (slow)
# --------------------------------------------------------------------------------------------------

SWEEP = '[sweep]\n"autoquant.effective_bits" = [12.0, 10.0]\n"calib.max_samples" = [8, 12]\n'
POINTS = [
    f"autoquant.effective_bits={bits},calib.max_samples={samples}"
    for samples in (8, 12)
    for bits in (12.0, 10.0)
]

KILLER = """\
import os, signal, sys

from auto_quantize_model.stages.build_manifest import BuildManifest

original = BuildManifest.run

def run(self, inputs):
    # rank 1 dies (SIGKILL) once its first point's scores are saved
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, inputs)

BuildManifest.run = run

from auto_quantize_model.app.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    # torchrun gives each worker one OpenMP thread; the one-process reference gets the same, so
    # float sums run in the same order and manifests compare exactly
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def torchrun(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TORCHRUN, *argv], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600
    )


def torchrun_losing_a_worker(*argv: str, cwd: Path, sweep: Path) -> tuple[int, str]:
    """torchrun ARGV, whose rank 1 dies: torchrun's exit code and its output.

    torchrun SIGTERMs rank 0 once rank 1 is gone; rank 0 records the sweep stopped, lets go of the
    folder, then waits up to 30 s for the dead rank to leave the group (``WorkerGroup.close``), and
    torchrun gives it 30 s before its SIGKILL (``--shutdown-timeout`` does not reach that path).
    Once the record says so and the lock is gone, this sends rank 0 (the record's owner) that
    SIGKILL itself: the folder is then as torchrun leaves it, 30 s sooner.
    """
    with (cwd / "torchrun.log").open("wb") as log:
        process = subprocess.Popen(
            [*TORCHRUN, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=_env()
        )
    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            record = read_run(sweep)
            if (
                record is not None
                and record.status.startswith("failed")
                and record.owner is not None
                and not (sweep / LOCK_NAME).exists()
            ):
                with contextlib.suppress(ProcessLookupError):  # it left on its own meanwhile
                    os.kill(record.owner.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, (cwd / "torchrun.log").read_text("utf-8", errors="replace")


def aqm(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "auto_quantize_model", *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep run by one plain process: this one, through the command's entry point.

    Computing the same scores needs no process of its own (a fresh interpreter would add ~13 s of
    library imports). It runs on one thread, as the workers do (``_env``), whatever this session
    uses, so float sums run in the same order.
    """
    import torch

    root = tmp_path_factory.mktemp("dsweep")
    (root / "sweep.toml").write_text(tiny_pipeline_toml(max_samples=12) + SWEEP, "utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["run", str(root / "sweep.toml"), "--output", str(root / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "one"


def _index_rows(folder: Path) -> list[str]:
    index = (folder / INDEX_NAME).read_text("utf-8")
    return [line for line in index.splitlines() if line.startswith("| ") and line[2].isdigit()]


@pytest.mark.slow
def test_two_workers_write_the_manifests_one_process_writes(reference: Path) -> None:
    root = reference.parent
    done = torchrun("-m", "auto_quantize_model", "run", "sweep.toml", "--output", "two", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    two = root / "two"
    for point in POINTS:
        assert comparable_manifest(two / point) == comparable_manifest(reference / point), point
    index = (two / INDEX_NAME).read_text("utf-8")
    assert "4 of 4 points run, 0 failed." in index
    assert "Spread over 2 torchrun workers." in index
    for rank in (0, 1):  # each worker loaded the model once and re-solved its second budget
        assert f"Worker {rank}: Shared across points: model loaded 1 time(s), 2 verified copies" in index
    workers = [row.split(" | ")[-2] for row in _index_rows(two)]
    assert workers == ["0", "0", "1", "1"]
    record = read_run(two)
    assert record is not None
    assert (record.status, record.sweep) == ("complete", True)
    assert "[rank 0/2] " in done.stderr
    assert "[rank 1/2] " in done.stderr


@pytest.mark.slow
def test_a_killed_workers_points_are_finished_by_a_plain_rerun(reference: Path) -> None:
    root = reference.parent
    (root / "killer.py").write_text(KILLER, "utf-8")
    out = root / "killed"
    code, said = torchrun_losing_a_worker(
        "killer.py", "run", "sweep.toml", "--output", "killed", cwd=root, sweep=out
    )
    assert code != 0, said[-3000:]
    first_of_rank_1 = out / POINTS[2]
    stopped = read_run(first_of_rank_1)
    assert stopped is not None
    assert stopped.status == "running", "SIGKILL left the point mid-run"
    record = read_run(out)
    assert record is not None
    assert record.status.startswith("failed"), "rank 0 recorded the sweep stopped"

    # a fresh interpreter, as after a real kill: it resumes a point a fresh worker saved, which this
    # session's ModelOpt registrations (test_resume says which) would not match
    rerun = aqm("run", "sweep.toml", "--output", "killed", cwd=root)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for point in POINTS:
        assert comparable_manifest(out / point) == comparable_manifest(reference / point), point
    finished = read_run(first_of_rank_1)
    assert finished is not None
    assert (finished.status, finished.resumed) == ("complete", True)
    assert finished.forward_steps is not None
    assert finished.forward_steps.scoring == 0, "its scores were kept"
    rows = _index_rows(out)
    assert len(rows) == 4
    assert "(an earlier run)" not in rows[2], "the killed point ran again"
    assert "4 of 4 points run, 0 failed" in (out / INDEX_NAME).read_text("utf-8")
