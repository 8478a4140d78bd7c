"""The rendezvous store the workers talk through, and where it listens.

torchrun's rendezvous already runs a key-value store (a c10d ``TCPStore``); the workers use it
for their small control messages (:mod:`.messages`) and heartbeats. It authenticates nobody:
torch's ``TCPStore`` server listens on every interface (``[::]``, dual-stack) whatever host name
it is given (checked on torch 2.13, both server back-ends). Where it listens:

* an ``aqm`` worker hosts it (no torchrun agent: ``TORCHELASTIC_USE_AGENT_STORE`` is not
  ``True``) for workers on one host (``LOCAL_WORLD_SIZE == WORLD_SIZE``, or a loopback
  ``MASTER_ADDR``): on 127.0.0.1 only, on a socket :func:`loopback_listener` binds (see
  :func:`~auto_quantize_model.app.sweep.workers.open_store`);
* torchrun's agent hosts it (the usual case): on every interface, and no torchrun flag narrows
  it (``--standalone``, ``--rdzv-endpoint localhost:PORT`` and ``--master-addr 127.0.0.1`` only
  choose the address the workers dial). Rank 0 of a single-host run logs one warning when
  ``/proc/net`` shows it open beyond loopback (:func:`warn_if_exposed`). Under the c10d
  rendezvous (``--standalone``, or torchrun's default on one node) the agent's own rendezvous
  store is open the same way and torch unpickles its state from it;
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` moves the workers' store to rank 0 (so onto loopback)
  but not that one. ``--master-addr 127.0.0.1 --master-port PORT`` (the static rendezvous) has
  no such pickle, but its agent's store is open on PORT;
* on several hosts the store must be reachable from all of them: such a run trusts the network
  between its hosts (or firewalls the port to them).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.errors import ConfigError

log = logging.getLogger(PACKAGE_LOGGER)


class Store(Protocol):
    """The part of torch's c10d ``Store`` the workers use (tests hand in a dict-backed fake)."""

    def add(self, key: str, value: int) -> int: ...

    def set(self, key: str, value: str | bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def check(self, keys: list[str]) -> bool: ...

    def wait(self, keys: list[str], timeout: timedelta) -> None: ...


LOOPBACK = "127.0.0.1"


def single_host(environ: Mapping[str, str]) -> bool:
    """All workers run on this host: torchrun's ``LOCAL_WORLD_SIZE`` is the whole world, or the
    workers dial a loopback ``MASTER_ADDR`` (which only reaches this host)."""
    if environ.get("LOCAL_WORLD_SIZE", "") == environ.get("WORLD_SIZE"):
        return True
    return is_loopback(environ.get("MASTER_ADDR", ""))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: not resolved here, so not counted as loopback


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as ``/proc/net/tcp{,6}`` prints it: hex of 32-bit words in host byte order."""
    words = [bytes.fromhex(text[i : i + 8]) for i in range(0, len(text), 8)]
    if sys.byteorder == "little":
        words = [word[::-1] for word in words]
    packed = b"".join(words)
    return ipaddress.IPv4Address(packed) if len(packed) == 4 else ipaddress.IPv6Address(packed)


def listening_addresses(
    port: int, proc_net: Path = Path("/proc/net")
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses this host's TCP sockets listen on at ``port``; None where Linux's
    ``/proc/net`` cannot tell (another system, or no such files)."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    listen = "0A"  # TCP_LISTEN in the kernel's state numbering
    try:
        for name in ("tcp", "tcp6"):
            lines = (proc_net / name).read_text("ascii").splitlines()[1:]
            for line in lines:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] == listen and int(hex_port, 16) == port:
                    found.append(_proc_address(address))
    except (OSError, ValueError, IndexError):
        return None
    return found


def _beyond_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return not (mapped or address).is_loopback


def warn_if_exposed(environ: Mapping[str, str], proc_net: Path = Path("/proc/net")) -> bool:
    """Log one warning when a single-host run's store (hosted by torchrun's agent, out of our
    hands) listens beyond loopback; returns whether it did."""
    port = environ.get("MASTER_PORT", "")
    if not single_host(environ) or not port.isdigit():
        return False
    addresses = listening_addresses(int(port), proc_net)
    if not addresses or not any(_beyond_loopback(address) for address in addresses):
        return False
    shown = ", ".join(sorted({str(address) for address in addresses}))
    log.warning(
        "the workers' store (port %s, opened by torchrun's agent) listens on %s, not only on loopback, "
        "and no torchrun flag narrows it: whoever reaches this host's port %s can rewrite the sweep's "
        "messages (aqm reads them as plain JSON, so at worst it stops); firewall the port, or run on a "
        "trusted network",
        port,
        shown,
        port,
    )
    return True


def loopback_listener(port: int) -> int:
    """The descriptor of a TCP socket listening on 127.0.0.1:``port``, for a store's server to own."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"cannot open the workers' store on {LOOPBACK}:{port} (MASTER_PORT): {err.strerror or err}; "
            "pick a free port"
        ) from None
    # Handed over for good: closing it under a running server aborts the process (torch's
    # non-libuv server) or stops it accepting (libuv), so Python must not close it on collection.
    return sock.detach()
