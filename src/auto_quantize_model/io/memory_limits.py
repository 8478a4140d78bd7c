"""How much more host memory this process may take: the host's free memory or its cgroup's, the less.

``MemAvailable`` (``/proc/meminfo``) is the whole machine's. In a container, or a batch job with a
memory limit, the process is killed at its control group's limit long before the machine runs out:
a check against ``MemAvailable`` alone would approve what the kernel's OOM killer then ends. So the
limit of every control group from the process's own up to the root (``/proc/self/cgroup``, under
``/sys/fs/cgroup``) counts too, cgroup v2 (``memory.max``, ``memory.current``) and v1
(``memory.limit_in_bytes``, ``memory.usage_in_bytes``) alike. A group's usage includes the page
cache, which the kernel drops before it kills anyone, so its inactive file pages (``memory.stat``)
are counted as free, as ``docker stats`` does.

Torch-free, and every path is a parameter, so tests build a fake ``/proc`` and ``/sys`` tree.
Nothing here raises: what cannot be read is left out (None when nothing can be read).
"""

from __future__ import annotations

from pathlib import Path

import attrs

MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")

UNLIMITED = 2**60
"""A v1 limit at or above this is "no limit" (v1 writes its maximum, 9223372036854771712, then)."""

_V2 = ("memory.max", "memory.current", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
"""Per version: the limit file, the usage file and the ``memory.stat`` line of reclaimable cache."""


@attrs.frozen
class HostMemory:
    """Bytes this process may still allocate on the host, and what sets that figure."""

    available: int
    limited_by: str
    """``MemAvailable`` or the file of the binding cgroup limit (for messages)."""


def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """``MemAvailable`` in bytes; None where the file or the line is missing (not Linux, old kernel)."""
    try:
        text = meminfo.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def _number(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    """One counter of a ``memory.stat`` file; 0 where it cannot be read."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value.strip())
    return 0


def _group_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's (v2 group, v1 memory group) from ``/proc/self/cgroup``; None where absent."""
    try:
        text = proc_cgroup.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None, None
    unified = legacy = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            legacy = path
    return unified, legacy


def _own_folder(mount: Path, group: str) -> Path:
    """The group's folder under ``mount``; the mount itself where it is not there, which is how a
    container without its own cgroup namespace sees its group (mounted at the root)."""
    folder = mount / group.lstrip("/")
    return folder if folder.is_dir() else mount


def _headroom(mount: Path, group: str, files: tuple[str, str, str]) -> HostMemory | None:
    """The least room left under any limit from the group's folder up to ``mount``."""
    limit_name, usage_name, cache_key = files
    folder = _own_folder(mount, group)
    best: HostMemory | None = None
    while True:
        limit = _number(folder / limit_name)  # v2 writes "max" for no limit: not a number
        usage = _number(folder / usage_name)
        if limit is not None and limit < UNLIMITED and usage is not None:
            used = max(0, usage - _stat(folder / "memory.stat", cache_key))
            room = max(0, limit - used)
            if best is None or room < best.available:
                best = HostMemory(room, str(folder / limit_name))
        if folder == mount or mount not in folder.parents:
            return best
        folder = folder.parent


def cgroup_headroom(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> HostMemory | None:
    """Room left under this process's cgroup memory limits (v2 and v1); None when none is set."""
    unified, legacy = _group_paths(proc_cgroup)
    found: list[HostMemory] = []
    if unified is not None:
        for mount in (root, root / "unified"):  # pure v2, or the v2 half of a hybrid layout
            room = _headroom(mount, unified, _V2)
            if room is not None:
                found.append(room)
                break
    if legacy is not None:
        room = _headroom(root / "memory", legacy, _V1)
        if room is not None:
            found.append(room)
    return min(found, key=lambda m: m.available, default=None)


def available_memory(
    meminfo: Path = MEMINFO, proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT
) -> HostMemory | None:
    """The host memory this process may still take: the smaller of ``MemAvailable`` and the room
    under its cgroup limits; None when neither can be read."""
    host = meminfo_available(meminfo)
    found = [] if host is None else [HostMemory(host, "MemAvailable")]
    group = cgroup_headroom(proc_cgroup, root)
    if group is not None:
        found.append(group)
    return min(found, key=lambda m: m.available, default=None)
