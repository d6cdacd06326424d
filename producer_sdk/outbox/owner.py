"""Who holds a lease, and whether that relay is still alive.

How this works
--------------
A relay in lease mode writes its *owner id* into ``lease_owner``:
``<hostname>:<machine>:<pid>:<random>``. ``<machine>`` names the kernel and the process-id
namespace the relay runs in (Linux: the boot id and the pid namespace's inode), so two
relays with the same ``<machine>`` see the same processes. A relay that finds rows
leased by an owner of its own ``<machine>`` whose process is gone (``kill -9``, a crash)
takes them over at once instead of waiting for the lease to run out; any other owner —
another machine, another container, a process that still exists (even a reused pid) —
keeps its lease until it ends. Where the machine cannot be named (not Linux), nothing is
ever taken over early.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid

__all__ = ["owner_id", "machine_id", "is_dead_local_owner"]


def machine_id() -> str | None:
    """12 hex digits naming this kernel boot and pid namespace, or ``None`` if unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(f"{boot}:{namespace}".encode()).hexdigest()[:12]


def owner_id() -> str:
    """A new owner id for this process (at most 64 characters)."""
    return (f"{socket.gethostname()[:24].replace(':', '_')}:{machine_id() or 'unknown'}:"
            f"{os.getpid()}:{uuid.uuid4().hex[:8]}")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists (another user's)
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")  # a zombie: dead, not reaped yet


def is_dead_local_owner(owner: str, *, me: str) -> bool:
    """Whether ``owner`` is a relay on this machine (see the module docstring) whose process
    no longer exists — never ``me``, never an owner of another or an unknown machine."""
    parts = owner.rsplit(":", 3)
    if owner == me or len(parts) != 4:
        return False
    _host, machine, pid, _rand = parts
    mine = machine_id()
    if mine is None or machine != mine or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and _process_gone(int(pid))
