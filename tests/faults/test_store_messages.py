"""Messages from the network (issue 21): the workers' rendezvous store is a TCP service anyone who
reaches its port can write to, so what the workers read from it is plain JSON of one declared
type, a value that is not is one line naming its key and sender, and a store an aqm worker hosts
for a single-host run listens on loopback only."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import pickle
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app.lock import Owner
from auto_quantize_model.app.sweep.messages import (
    BadMessage,
    PointReport,
    Problem,
    WorkerReport,
    decode_message,
    encode_message,
)
from auto_quantize_model.app.sweep.points import PointResult, expand_sweep, reuse_order
from auto_quantize_model.app.sweep.store import listening_addresses, warn_if_exposed
from auto_quantize_model.app.sweep.workers import Worker, WorkerGroup, WorkerLost, wait_for_workers
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.pipeline_file import spec_from_dict

EXPOSED = (
    "the store is open to the network, so someone else may have written it, or that worker runs another "
    "aqm version"
)


@attrs.define
class MemoryStore:
    """The store calls the workers make, on a dict; ``wait`` blocks like torch's TCPStore."""

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
            return count

    def check(self, keys: list[str]) -> bool:
        with self.changed:
            return all(key in self.data for key in keys)

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: all(k in self.data for k in keys), timeout.total_seconds()):
                raise RuntimeError(f"wait timeout for {keys}")


def _group(rank: int, store: MemoryStore, world: int = 2) -> WorkerGroup:
    return WorkerGroup(Worker(rank, world, rank), store, rerun="rerun it", timeout=5.0)


class Touch:
    """A pickle that, once loaded, creates ``path``: what a stranger could plant under a message key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return Path.touch, (self.path,)


# --------------------------------------------------------------------------------------------------
# What is planted in the store is refused, in one line, and never run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "planted", "receive"),
    [
        (0, "msg/1/1", lambda group: group.agree(None, "opening the sweep folder")),
        (1, "msg/1/0", lambda group: group.broadcast(0, int, "finishing")),
    ],
    ids=["gathered", "broadcast"],
)
def test_a_planted_pickle_is_refused_by_name_and_never_unpickled(
    tmp_path: Path, rank: int, planted: str, receive: Callable[[WorkerGroup], object]
) -> None:
    marker = tmp_path / "the pickle ran"
    payload = pickle.dumps(Touch(marker))
    store = MemoryStore()
    store.set(planted, payload)
    with pytest.raises(BadMessage) as caught:
        receive(_group(rank, store))
    sender = planted.rsplit("/", 1)[1]
    assert str(caught.value) == (
        f"the workers' store holds under {planted!r} (from rank {sender}) no message aqm sends "
        "(not JSON: 'utf-8' codec can't decode byte 0x80 in position 0: invalid start byte): " + EXPOSED
    )
    assert caught.value.exit_code == 2
    assert not marker.exists(), "the planted pickle ran"
    pickle.loads(payload)  # the payload is live: loading it is what makes the marker
    assert marker.exists()


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"kind": "InputError", "message": ', "not JSON: Expecting value: line 1 column 35 (char 34)"),
        (
            b"[[[[" * 20000,
            "not JSON: maximum recursion depth exceeded while decoding a JSON array from a unicode string",
        ),
        (b'{"kind": "InputError"}', "message is missing; exit_code is missing"),
        (
            b'{"kind": "InputError", "message": "m", "exit_code": "2", "pid": 1}',
            'exit_code is not an integer (got str "2"); pid is an unknown key '
            "(allowed: kind, message, exit_code)",
        ),
        (b'"InputError"', 'the top level is not an object (got str "InputError")'),
    ],
    ids=["cut-short", "too-deep", "missing-fields", "wrong-type-and-extra-key", "not-an-object"],
)
def test_a_value_that_is_not_the_expected_message_is_one_line(raw: bytes, detail: str) -> None:
    store = MemoryStore()
    store.set("msg/1/1", raw)
    with pytest.raises(BadMessage) as caught:
        _group(0, store).agree(None, "opening the sweep folder")
    assert str(caught.value) == (
        f"the workers' store holds under 'msg/1/1' (from rank 1) no message aqm sends ({detail}): " + EXPOSED
    )


def test_an_assignment_that_does_not_fit_the_sweep_is_refused() -> None:
    store = MemoryStore()
    store.set("msg/1/0", b"[0,5]")
    with pytest.raises(BadMessage) as caught:
        _group(1, store).share_assignment((), 3)
    assert str(caught.value) == (
        "the workers' store holds under 'msg/1/0' (from rank 0) no message aqm sends (an assignment of 2 "
        "points to ranks [0, 5], not of 3 points to ranks 0..1): " + EXPOSED
    )


def _points() -> Any:
    raw = {
        "model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu"},
        "sweep": {"calib.seq_len": [16, 32], "autoquant.effective_bits": [12.0, 10.0]},
    }
    return reuse_order(expand_sweep(spec_from_dict(raw, source="s.toml"), source="s.toml"))


def test_a_result_for_no_point_of_the_sweep_is_refused() -> None:
    points = _points()
    store = MemoryStore()
    report = WorkerReport((PointReport("../../etc", "ok", 1.0, None, (), "", False, 1),), ())
    store.set("msg/1/1", encode_message(report, WorkerReport))
    with pytest.raises(
        BadMessage,
        match=r"under 'msg/1/1' \(from rank 1\) no message aqm sends "
        r"\(a result for '\.\./\.\./etc', no point of the sweep\)",
    ):
        _group(0, store).gather_results([PointResult(points[0], "ok", 1.0)], [], points)


def test_a_failed_workers_reason_stays_one_line() -> None:
    store = MemoryStore()
    store.set("done/0", "1")
    store.set("failed/1", "out of memory\nTraceback (most recent call last):\n  ...")
    with pytest.raises(WorkerLost) as caught:
        wait_for_workers(store, 2, rerun="rerun it")
    assert str(caught.value) == "worker 1 of 2 failed (out of memory); rerun it"


# --------------------------------------------------------------------------------------------------
# Every message the sweep sends is JSON and comes back equal
# --------------------------------------------------------------------------------------------------

OWNER = Owner(pid=4242, host="gpu-node-1", started_at="2025-01-02T03:04:05Z")
REPORT = WorkerReport(
    results=(
        PointReport("a=1", "ok", 12.5, math.inf, ("layers.0.mlp", "layers.1.attn"), "model copy", True, 1),
        PointReport("a=2", "failed: stage RunAutoQuant failed: boom", 3.0, None, (), "", False, None),
    ),
    notes=("Shared across points: model loaded 1 time(s)",),
)
REPORT_WIRE = (
    b'{"results":[{"folder":"a=1","status":"ok","seconds":12.5,"effective_bits":"Infinity",'
    b'"top_layers":["layers.0.mlp","layers.1.attn"],"reuse":"model copy","earlier":true,"worker":1},'
    b'{"folder":"a=2","status":"failed: stage RunAutoQuant failed: boom","seconds":3.0,'
    b'"effective_bits":null,"top_layers":[],"reuse":"","earlier":false,"worker":null}],'
    b'"notes":["Shared across points: model loaded 1 time(s)"]}'
)
"""Strict JSON: the infinite bit count is the string ``"Infinity"``, not the bare token JSON lacks."""


@pytest.mark.parametrize(
    ("value", "kind", "wire"),
    [
        (None, Problem | None, b"null"),
        (
            Problem("InputError", "out is busy", 2),
            Problem | None,
            b'{"kind":"InputError","message":"out is busy","exit_code":2}',
        ),
        (
            ("2025-01-02T03:04:05Z", OWNER),
            tuple[str, Owner] | None,
            b'["2025-01-02T03:04:05Z",{"pid":4242,"host":"gpu-node-1","started_at":"2025-01-02T03:04:05Z"}]',
        ),
        (None, tuple[str, Owner] | None, b"null"),
        ((0, 0, 1, 1), tuple[int, ...], b"[0,0,1,1]"),
        (REPORT, WorkerReport, REPORT_WIRE),
        (1, int, b"1"),
    ],
    ids=["no-problem", "problem", "folder-token", "no-folder-token", "assignment", "results", "exit-code"],
)
def test_every_message_type_round_trips_through_json(value: object, kind: Any, wire: bytes) -> None:
    assert encode_message(value, kind) == wire
    assert decode_message(wire, kind, key="msg/1/0", sender=0) == value


def test_a_sweep_conversation_between_two_workers_is_json_on_the_wire() -> None:
    """The messages of ``RunService._as_worker``, in its order, between two workers on threads."""
    points = _points()
    store = MemoryStore()
    groups = [_group(rank, store) for rank in (0, 1)]
    owners = (0, 0, 1, 1)

    def opening(group: WorkerGroup) -> object:
        rank = group.worker.rank
        group.agree(None, "opening the sweep folder")
        return group.broadcast(
            ("2025-01-02T03:04:05Z", OWNER) if rank == 0 else None, tuple[str, Owner] | None
        )

    def checking(group: WorkerGroup) -> None:
        group.agree(None if group.worker.rank == 0 else InputError("not shared"), "checking the folder")

    def rest(group: WorkerGroup) -> tuple[Any, ...]:
        rank = group.worker.rank
        got = group.share_assignment(owners if rank == 0 else (), len(points))
        mine = [p for p, owner in zip(points, got, strict=True) if owner == rank]
        results = [
            PointResult(p, "ok", 1.5 + i, math.inf if i else 3.25, ("layers.0",), "model copy", bool(i), rank)
            for i, p in enumerate(mine)
        ]
        gathered = group.gather_results(results, [f"notes of {rank}"], points)
        return got, gathered, results, group.broadcast(1 if rank == 0 else 7, int, "finishing")

    assert _on_threads(groups, opening) == [("2025-01-02T03:04:05Z", OWNER)] * 2
    raised = _on_threads(groups, checking)
    assert [(type(err), str(err)) for err in raised] == [(InputError, "not shared")] * 2
    second = _on_threads(groups, rest)
    sent = {rank: second[rank][2] for rank in (0, 1)}
    for got, gathered, _, code in second:
        assert got == owners
        assert gathered == [(tuple(sent[0]), ("notes of 0",)), (tuple(sent[1]), ("notes of 1",))]
        assert code == 1
    joined = [result.point for found, _ in second[0][1] for result in found]
    assert all(point is points[i] for i, point in enumerate(joined)), "rank 0 joins results to its own points"
    messages = {key: value for key, value in store.data.items() if key.startswith("msg/")}
    assert sorted(messages) == [
        f"msg/{n}/{r}" for n in range(1, 7) for r in (0, 1) if r == 0 or n in (1, 3, 5)
    ]
    assert json.loads(messages["msg/3/1"]) == {"kind": "InputError", "message": "not shared", "exit_code": 2}
    assert json.loads(messages["msg/4/0"]) == [0, 0, 1, 1]
    assert json.loads(messages["msg/5/1"])["results"][0]["folder"] == points[2].folder


def _on_threads(groups: list[WorkerGroup], work: Callable[[WorkerGroup], Any]) -> list[Any]:
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


# --------------------------------------------------------------------------------------------------
# Where the store listens
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_single_host_store_an_aqm_worker_hosts_listens_on_loopback_only() -> None:
    """No torchrun agent (``TORCHELASTIC_USE_AGENT_STORE`` unset): rank 0 hosts the store itself.
    torch's own ``env://`` store would listen on every interface (``::``)."""
    port = _free_port()
    env = {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": socket.gethostname(),
        "MASTER_PORT": str(port),
    }
    joined = _on_threads(
        [_group(0, MemoryStore()), _group(1, MemoryStore())],
        lambda stand_in: WorkerGroup.join(stand_in.worker, timeout=30, environ=env),
    )
    assert all(isinstance(group, WorkerGroup) for group in joined), joined
    listening = listening_addresses(port)
    assert listening == [ipaddress.ip_address("127.0.0.1")]
    codes = _on_threads(joined, lambda group: group.broadcast(group.worker.rank + 3, int, "finishing"))
    assert codes == [3, 3]
    _on_threads(joined, lambda group: group.close(linger=10))


TCP_HEAD = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)


def _proc_net(tmp_path: Path, tcp: list[str], tcp6: list[str]) -> Path:
    """A ``/proc/net`` with a listening socket at each ``hex address:hex port`` given."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "tcp").write_text(
        TCP_HEAD + "".join(f"   0: {line} 00000000:0000 0A 0 0 0 0 0\n" for line in tcp)
    )
    (tmp_path / "tcp6").write_text(
        TCP_HEAD + "".join(f"   0: {line} {'0' * 32}:0000 0A 0 0 0 0 0\n" for line in tcp6)
    )
    return tmp_path


def test_listening_addresses_are_read_from_proc_net(tmp_path: Path) -> None:
    proc = _proc_net(
        tmp_path,
        ["0100007F:1F90", "0100007F:0016"],
        [
            f"{'0' * 32}:1F90",
            "00000000000000000000000001000000:1F90",
            "0000000000000000FFFF00000100007F:1F90",
        ],
    )
    found = listening_addresses(8080, proc)
    assert found == [ipaddress.ip_address(a) for a in ("127.0.0.1", "::", "::1", "::ffff:127.0.0.1")]
    assert listening_addresses(8080, tmp_path / "absent") is None


AGENT_ENV = {
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "8080",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}


def test_a_single_host_store_open_beyond_loopback_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exposed = _proc_net(tmp_path / "exposed", [], [f"{'0' * 32}:1F90"])
    with caplog.at_level(logging.WARNING, logger="auto_quantize_model"):
        assert warn_if_exposed(AGENT_ENV, exposed)
    assert [record.getMessage() for record in caplog.records] == [
        "the workers' store (port 8080, opened by torchrun's agent) listens on ::, not only on loopback, "
        "and no torchrun flag narrows it: whoever reaches this host's port 8080 can rewrite the sweep's "
        "messages (aqm reads them as plain JSON, so at worst it stops); firewall the port, or run on a "
        "trusted network"
    ]
    caplog.clear()
    loopback = _proc_net(tmp_path / "loopback", ["0100007F:1F90"], ["0000000000000000FFFF00000100007F:1F90"])
    assert not warn_if_exposed(AGENT_ENV, loopback)
    assert not warn_if_exposed({**AGENT_ENV, "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "node-0"}, exposed), (
        "multi-host"
    )
    assert caplog.records == []
