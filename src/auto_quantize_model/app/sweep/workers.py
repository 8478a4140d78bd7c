"""A sweep's points spread over GPUs (and hosts) by PyTorch's own launcher, ``torchrun``.

``torchrun --nproc-per-node N -m auto_quantize_model run FILE --output DIR`` starts N copies of
``aqm run``, one per GPU; each is told its place by the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Plain ``aqm run`` sees none of these and runs
as it always did.

Why torchrun and not Ray: it ships with torch, so the GPU machine (torch and NCCL, no Ray; a Ray
wheel cannot be carried there) needs nothing installed; the same command spans hosts
(``--nnodes``, ``--rdzv-endpoint``); and its agent already watches the workers of a host and
stops the others when one dies. No process pool of our own.

**Talking.** The workers need only small control messages (who failed pre-flight, who runs which
point, the results), and they pass them through the key-value store torchrun's rendezvous
already runs (a c10d ``TCPStore``): numbered keys, JSON values, every wait bounded by
:data:`COLLECTIVE_TIMEOUT`. No process group is started, on purpose: once ``torch.distributed``
is initialised, ModelOpt takes the workers for data-parallel replicas of one model, all-reduces
calibration ranges and scores over them and renames its search checkpoint per rank
(``autoquant_search_state0.pt``), which would mix the points of different workers. Waiting for
the other workers' points has no fixed bound (a worker may hold an hour of points), so it is no
timed message: each worker counts a heartbeat in the store every :data:`HEARTBEAT_EVERY` seconds
and says when it is done or failed, and a waiting worker gives up on one whose heartbeat stood
still for :data:`STALE_AFTER` seconds (it died, or its host did), with one line naming the rerun
that finishes its points. On one host torchrun's agent is quicker still: when a worker dies it
stops the others (SIGTERM, which unwinds a point as Ctrl-C does, so its folder is left resumable).

**Trust.** The store is a network service that authenticates nobody (:mod:`.store` says where
it listens and when rank 0 warns about it), so every message is plain JSON of one declared type,
checked on arrival (:mod:`.messages`): a stray or hostile value stops a worker with one line and
can never make it run code.

**GPUs.** Each worker sees only its own GPU: ``CUDA_VISIBLE_DEVICES`` is narrowed to the entry
at ``LOCAL_RANK`` (of the list given, or of all GPUs) before torch starts CUDA. ``auto``,
``cuda`` and ``cuda:0`` then all name the worker's GPU, point specs stay as written (so a rerun
with another number of workers, or none, finds the same settings in every point folder), and
manifests record ``cuda`` the same way on every worker. ``cuda:N`` with N > 0 and a sharded
model (``model.device_map``) are refused before anything runs: a worker has one GPU.

**Points.** :func:`assign_points` gives each worker a contiguous run of the sweep's
:func:`~auto_quantize_model.app.sweep.points.reuse_order`, cut only between searches (points that differ
only in their budget stay together, so the re-solve finds the saved scores in its worker) and
balanced by the number of points still to run. Contiguous runs keep points that share a model
and calibration on as few workers as possible: each worker loads a model once and copies it per
point (:mod:`.session`).

**Folders.** Rank 0 takes the sweep folder's lock, decides fresh, resume or refuse, and writes the
sweep's ``pipeline.toml``, ``run.json`` and, at the end, ``sweep-index.md`` from every worker's
results; the others trust its lock after they have checked that they see the folder it wrote
(the output folder must be on a file system all hosts share). Each point folder is written by
the one worker its point is assigned to, with its own ``run.json``, so a rerun (with any number
of workers, or plain ``aqm run``) skips finished points and resumes an interrupted one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs

from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.sweep.messages import (
    Problem,
    WorkerReport,
    bad_message,
    decode_message,
    encode_message,
    one_line,
    point_report,
)
from auto_quantize_model.app.sweep.store import (
    LOOPBACK,
    Store,
    loopback_listener,
    single_host,
    warn_if_exposed,
)
from auto_quantize_model.errors import AqmError, ConfigError

if TYPE_CHECKING:
    from auto_quantize_model.app.sweep.points import PointResult, SweepPoint

log = logging.getLogger(PACKAGE_LOGGER)

COLLECTIVE_TIMEOUT = 300.0
"""Seconds any one control message between workers may take (they are all small and prompt)."""
HEARTBEAT_EVERY = 5.0
"""Seconds between a worker's heartbeats in the rendezvous store."""
STALE_AFTER = 120.0
"""A worker whose heartbeat stood still this long is taken for dead (GIL-bound stalls are far shorter)."""
POLL_EVERY = 1.0
"""Seconds between looks at the store while waiting for the other workers."""

T = TypeVar("T")


class WorkerLost(AqmError):
    """Another worker died, hung or failed; this one stops instead of waiting for ever."""

    exit_code = 1


@attrs.frozen
class Worker:
    """This process's place among torchrun's workers."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        """Rank 0 holds the sweep folder's lock and writes its index."""
        return self.rank == 0

    @property
    def name(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def _env_int(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={text!r} is not a whole number (torchrun sets it)"
        ) from None


def worker_from_env(environ: Mapping[str, str]) -> Worker | None:
    """This process's place when torchrun started it with more than one worker; None otherwise.

    One worker is a plain run: nothing to spread, nothing to talk to.
    """
    if "WORLD_SIZE" not in environ:
        return None
    world = _env_int(environ, "WORLD_SIZE")
    if world <= 1:
        return None
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} not: start the workers with torchrun, "
            "or unset WORLD_SIZE for a plain run"
        )
    rank, local = _env_int(environ, "RANK"), _env_int(environ, "LOCAL_RANK")
    if not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank} / LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return Worker(rank=rank, world_size=world, local_rank=local)


def narrow_visible_gpus(worker: Worker, environ: MutableMapping[str, str]) -> str:
    """Let this worker see only the GPU at ``LOCAL_RANK``; returns the ``CUDA_VISIBLE_DEVICES`` set.

    Must run before torch initialises CUDA (``aqm`` starts no CUDA before its first stage). A
    list the user gave (``CUDA_VISIBLE_DEVICES=2,3 torchrun ...``) is indexed by the local rank;
    without one the local rank is the GPU's index. On a host without GPUs this changes nothing.
    """
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is None or not given.strip():
        chosen = str(worker.local_rank)
    else:
        visible = [entry.strip() for entry in given.split(",") if entry.strip()]
        if worker.local_rank >= len(visible):
            raise ConfigError(
                f"{worker.name}: LOCAL_RANK={worker.local_rank} but CUDA_VISIBLE_DEVICES={given!r} names "
                f"{len(visible)} GPU(s): start at most {len(visible)} workers per host (--nproc-per-node)"
            )
        chosen = visible[worker.local_rank]
    environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def point_problems(points: Sequence[SweepPoint], source: str) -> None:
    """Refuse settings a worker with one GPU cannot honour; every rank raises the same line."""
    problems: dict[str, list[str]] = {}
    for point in points:
        device, device_map = point.spec.model.device, point.spec.model.device_map
        if device.startswith("cuda:") and device != "cuda:0":
            problems.setdefault(
                f"model.device = {device!r}: under torchrun each worker sees only its own GPU; "
                'use device = "cuda" (or "auto")',
                [],
            ).append(point.label)
        if device_map is not None:
            problems.setdefault(
                f"model.device_map = {device_map!r}: a sharded model spans GPUs, and under torchrun "
                "each worker has one; run this sweep without torchrun",
                [],
            ).append(point.label)
    if problems:
        lines = []
        for line, labels in problems.items():
            where = "" if len(labels) == len(points) else f"sweep point {'; '.join(labels)}: "
            lines.append(f"{source}: {where}{line}")
        raise ConfigError("\n".join(lines))


def assign_points(
    points: Sequence[SweepPoint], world_size: int, to_run: Callable[[SweepPoint], bool]
) -> tuple[int, ...]:
    """The worker of each point (in the given order, normally :func:`reuse_order`'s).

    The points are cut into searches (neighbours with one :func:`search_key`), and the searches
    into ``world_size`` contiguous runs: a search goes to the worker whose share of the sweep
    holds its middle, counting only the points ``to_run`` (finished ones ride along with their
    search at no cost). So the shares differ by at most one search, and the same points and
    finished set give the same assignment on every host. With nothing to run, points count one
    each (a worker only reads finished ones back).
    """
    from auto_quantize_model.app.sweep.points import search_key

    searches: list[list[int]] = []
    for index, point in enumerate(points):
        if searches and search_key(points[searches[-1][-1]].spec) == search_key(point.spec):
            searches[-1].append(index)
        else:
            searches.append([index])
    weights = [sum(to_run(points[i]) for i in search) for search in searches]
    if not any(weights):
        weights = [len(search) for search in searches]
    total = sum(weights)
    owner = [0] * len(points)
    done = 0
    for search, weight in zip(searches, weights, strict=True):
        middle = done + weight / 2
        worker = min(world_size - 1, int(middle * world_size / total)) if total else 0
        for index in search:
            owner[index] = worker
        done += weight
    return tuple(owner)


# --------------------------------------------------------------------------------------------------
# Waiting for the others through the rendezvous store
# --------------------------------------------------------------------------------------------------


def _beat(rank: int) -> str:
    return f"beat/{rank}"


def _done(rank: int) -> str:
    return f"done/{rank}"


def _failed(rank: int) -> str:
    return f"failed/{rank}"


def wait_for_workers(
    store: Store,
    world_size: int,
    *,
    rerun: str,
    stale_after: float = STALE_AFTER,
    poll: float = POLL_EVERY,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once every worker said it is done; raise :class:`WorkerLost` for one that failed or
    whose heartbeat stood still ``stale_after`` seconds (by this host's clock: hosts' clocks
    need not agree, only each worker's counter must move)."""
    seen: dict[int, tuple[int, float]] = {}
    while True:
        now = clock()
        waiting = []
        for rank in range(world_size):
            if store.check([_failed(rank)]):
                reason = one_line(store.get(_failed(rank)).decode("utf-8", errors="replace"))
                raise WorkerLost(f"worker {rank} of {world_size} failed ({reason}); {rerun}")
            if store.check([_done(rank)]):
                continue
            waiting.append(rank)
            count = store.add(_beat(rank), 0)
            last = seen.get(rank)
            if last is None or last[0] != count:
                seen[rank] = (count, now)
            elif now - last[1] >= stale_after:
                raise WorkerLost(
                    f"worker {rank} of {world_size} stopped answering {now - last[1]:.0f} s ago (died, "
                    f"hung, or its host went away); {rerun}"
                )
        if not waiting:
            return
        sleep(poll)


@attrs.define
class Heartbeat:
    """A daemon thread counting this worker's heartbeat in the store until stopped."""

    store: Store
    rank: int
    every: float = HEARTBEAT_EVERY
    _stop: threading.Event = attrs.field(factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self.store.add(_beat(self.rank), 1)
        self._thread = threading.Thread(target=self._run, name=f"aqm-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.store.add(_beat(self.rank), 1)
            except Exception as err:  # the store is gone: the others will notice our silence
                log.debug("heartbeat stopped: %s", err)
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every + 1)


# --------------------------------------------------------------------------------------------------
# Joining the store
# --------------------------------------------------------------------------------------------------


def open_store(worker: Worker, environ: Mapping[str, str], timeout: timedelta) -> Store:
    """This worker's connection to the store, which listens on loopback where an ``aqm`` worker
    hosts it for a single-host run.

    Under torchrun's agent (``TORCHELASTIC_USE_AGENT_STORE=True``) the agent hosts the store, and
    on several hosts rank 0 must be reachable by the others: both are torch's own ``env://``
    rendezvous, as before. Otherwise rank 0 hosts the store here, on a socket it bound to
    127.0.0.1 (torch's ``TCPStore`` would bind every interface), and every worker dials 127.0.0.1.
    """
    from torch.distributed import TCPStore  # type: ignore[attr-defined]  # re-exported, not in __all__
    from torch.distributed.rendezvous import rendezvous

    agent = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    if agent or not single_host(environ):
        store, _, _ = next(iter(rendezvous("env://", worker.rank, worker.world_size, timeout=timeout)))
        if agent and worker.leader:  # one line for the run, not one per worker
            warn_if_exposed(environ)
        return store  # type: ignore[no-any-return]
    port = _env_int(environ, "MASTER_PORT")
    listener = loopback_listener(port) if worker.leader else None
    store = TCPStore(LOOPBACK, port, worker.world_size, worker.leader, timeout, master_listen_fd=listener)
    return cast(Store, store)


# --------------------------------------------------------------------------------------------------
# The group of workers
# --------------------------------------------------------------------------------------------------


class WorkerGroup:
    """torchrun's workers talking through its rendezvous store: small messages, heartbeats, exit.

    Messages are JSON values (:func:`~.messages.encode_message`) under numbered keys, each structured as the
    type its receiver expects; every worker sends and receives them in the same order, so the
    numbers agree. A peer that does not answer within :data:`COLLECTIVE_TIMEOUT` becomes one line
    (:class:`WorkerLost`) instead of a store traceback; a value that is not the expected message
    becomes one line too (:class:`~.messages.BadMessage`).
    """

    def __init__(
        self, worker: Worker, store: Store, rerun: str = "", timeout: float = COLLECTIVE_TIMEOUT
    ) -> None:
        self.worker = worker
        self.store = store
        self.rerun = rerun
        self.timeout = timeout
        self._sent = 0
        self._heartbeat: Heartbeat | None = None

    @classmethod
    def join(
        cls, worker: Worker, timeout: float = COLLECTIVE_TIMEOUT, environ: Mapping[str, str] | None = None
    ) -> WorkerGroup:
        """Connect to the store torchrun's agent hosts (rank 0 hosts it without the agent)."""
        env = os.environ if environ is None else environ
        try:
            store = open_store(worker, env, timedelta(seconds=timeout))
        except AqmError:
            raise
        except Exception as err:  # torch's store errors carry C++ frames; one line is enough
            where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
            raise WorkerLost(
                f"{worker.name}: cannot reach the other workers' store at {where} ({one_line(str(err))})"
            ) from err
        log.info("joined %d workers through the rendezvous store", worker.world_size)
        return cls(worker, store, timeout=timeout)

    # ------------------------------------------------------------- messages

    def _lost(self, what: str, err: BaseException) -> WorkerLost:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        rerun = f"; {self.rerun}" if self.rerun else ""
        return WorkerLost(f"lost contact with the other workers while {what} ({first}){rerun}")

    @staticmethod
    def _key(number: int, rank: int) -> str:
        return f"msg/{number}/{rank}"

    def _send(self, key: str, value: object, kind: Any, what: str) -> None:
        data = encode_message(value, kind)
        try:
            self.store.set(key, data)
        except Exception as err:
            raise self._lost(what, err) from err

    def _receive(self, number: int, sender: int, kind: Any, what: str) -> Any:
        key = self._key(number, sender)
        try:
            self.store.wait([key], timedelta(seconds=self.timeout))
            raw = self.store.get(key)
        except Exception as err:
            raise self._lost(what, err) from err
        return decode_message(raw, kind, key=key, sender=sender)

    def _next(self) -> int:
        self._sent += 1
        return self._sent

    def gather(self, value: T, kind: Any, what: str = "gathering results") -> list[T]:
        """Every worker's ``value``, by rank; ``kind`` is its type (``Problem | None``, ``int``)."""
        number = self._next()
        self._send(self._key(number, self.worker.rank), value, kind, what)
        return [self._receive(number, rank, kind, what) for rank in range(self.worker.world_size)]

    def broadcast(self, value: T, kind: Any, what: str = "hearing from rank 0") -> T:
        """Rank 0's ``value`` on every worker (the others' ``value`` is ignored)."""
        number = self._next()
        if self.worker.leader:
            self._send(self._key(number, 0), value, kind, what)
        result: T = self._receive(number, 0, kind, what)
        return result

    def agree(self, problem: AqmError | None, what: str) -> None:
        """Raise on every worker the first (lowest-rank) problem any worker had; else go on."""
        sent = None if problem is None else Problem.of(problem)
        problems = self.gather(sent, Problem | None, what)
        first = next((p for p in problems if p is not None), None)
        if first is None:
            return
        if problem is not None and sent == first:
            raise problem
        raise first.error()

    def share_assignment(self, owners: tuple[int, ...], count: int) -> tuple[int, ...]:
        """Rank 0's worker for each of the ``count`` points (:func:`assign_points`) on every worker."""
        result = self.broadcast(owners, tuple[int, ...], "assigning points")
        world = self.worker.world_size
        if len(result) != count or not all(0 <= owner < world for owner in result):
            raise bad_message(
                self._key(self._sent, 0),
                0,
                f"an assignment of {len(result)} points to ranks {sorted(set(result))}, "
                f"not of {count} points to ranks 0..{world - 1}",
            )
        return result

    def gather_results(
        self, results: Sequence[PointResult], notes: Sequence[str], points: Sequence[SweepPoint]
    ) -> list[tuple[tuple[PointResult, ...], tuple[str, ...]]]:
        """Every worker's results and notes, by rank, each result joined again to its point
        (of ``points``, the whole sweep); a result for no point of the sweep is refused."""
        from auto_quantize_model.app.sweep.points import PointResult

        report = WorkerReport(tuple(point_report(result) for result in results), tuple(notes))
        reports = self.gather(report, WorkerReport)
        by_folder = {point.folder: point for point in points}
        gathered = []
        for rank, got in enumerate(reports):
            joined = []
            for found in got.results:
                if found.folder not in by_folder:
                    raise bad_message(
                        self._key(self._sent, rank),
                        rank,
                        f"a result for {found.folder!r}, no point of the sweep",
                    )
                fields = attrs.asdict(found, recurse=False)
                joined.append(PointResult(point=by_folder[fields.pop("folder")], **fields))
            gathered.append((tuple(joined), got.notes))
        return gathered

    # ------------------------------------------------------------- liveness

    def start_heartbeat(self) -> None:
        self._heartbeat = Heartbeat(self.store, self.worker.rank)
        self._heartbeat.start()

    def done(self) -> None:
        self.store.set(_done(self.worker.rank), "1")

    def failed(self, reason: str) -> None:
        """Tell the others at once (best effort: the store may be gone with the failure)."""
        try:
            self.store.set(_failed(self.worker.rank), reason)
        except Exception as err:
            log.debug("could not tell the other workers: %s", err)

    def wait_for_others(self) -> None:
        wait_for_workers(self.store, self.worker.world_size, rerun=self.rerun)

    def close(self, linger: float = 30.0) -> None:
        """Stop the heartbeat and leave; rank 0 waits (``linger`` s at most) until the others left,
        since without torchrun's agent its process hosts the store they read last."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        try:
            self.store.add("left", 1)
            if self.worker.leader:
                deadline = time.monotonic() + linger
                while self.store.add("left", 0) < self.worker.world_size and time.monotonic() < deadline:
                    time.sleep(0.05)
        except Exception as err:
            log.debug("leaving the worker group: %s", err)
