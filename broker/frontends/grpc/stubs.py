"""The generated protobuf and gRPC modules of ``apache.rocketmq.v2`` used by the gRPC front end.

How this works
--------------
The stubs are those shipped in the official client package (``rocketmq-python-client``,
``rocketmq.grpc_protocol``): they hold the servicer base and the registration function of
``MessagingService``, so the broker serves exactly the messages that client builds and
nothing has to be generated at build time. Importing ``rocketmq.grpc_protocol`` the usual
way would first run the client package's ``__init__``, which creates ``~/logs/`` and
replaces the process's logging configuration: so when the client is not already imported,
the three generated modules are loaded from their files under their own names, with the
parent packages stood in for only while they load. A process that later imports the
client gets these same module objects (one descriptor pool entry each).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["pb", "svc", "grpc_pb", "StubsMissingError", "load"]


class StubsMissingError(ImportError):
    """The gRPC extra is not installed."""


_PKG = "rocketmq.grpc_protocol"
_MODULES = ("definition_pb2", "service_pb2", "service_pb2_grpc")


def load() -> tuple[Any, Any, Any]:
    """Return ``(definition_pb2, service_pb2, service_pb2_grpc)``.

    Raises ``StubsMissingError`` when ``grpcio`` or ``rocketmq-python-client`` is missing
    (``pip install 'halfmq[grpc]'``).
    """
    try:
        import grpc  # type: ignore[import-untyped]  # noqa: F401
        from google import protobuf  # type: ignore[import-untyped]  # noqa: F401
    except ImportError as exc:
        raise StubsMissingError(f"the gRPC front end needs the grpc extra: pip install 'halfmq[grpc]' ({exc})") from None
    if f"{_PKG}.service_pb2_grpc" in sys.modules or _PKG in sys.modules:
        mods = [importlib.import_module(f"{_PKG}.{name}") for name in _MODULES]
        return mods[0], mods[1], mods[2]
    spec = importlib.util.find_spec("rocketmq")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise StubsMissingError("the gRPC front end needs the grpc extra: pip install 'halfmq[grpc]' "
                                "(rocketmq-python-client, whose generated stubs it serves)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "grpc_protocol"
    standins: list[str] = []
    for name, path in (("rocketmq", folder.parent), (_PKG, folder)):
        if name not in sys.modules:
            stand = types.ModuleType(name)
            stand.__path__ = [str(path)]
            sys.modules[name] = stand
            standins.append(name)
    loaded = []
    try:
        for name in _MODULES:
            full = f"{_PKG}.{name}"
            mod = sys.modules.get(full)
            if mod is None:
                mspec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
                if mspec is None or mspec.loader is None:
                    raise StubsMissingError(f"cannot load {full} from {folder}")
                mod = importlib.util.module_from_spec(mspec)
                sys.modules[full] = mod
                try:
                    mspec.loader.exec_module(mod)
                except BaseException:
                    del sys.modules[full]
                    raise
                setattr(sys.modules[_PKG], name, mod)
            loaded.append(mod)
    finally:
        for name in standins:  # the real packages load normally if the client is imported later
            sys.modules.pop(name, None)
    return loaded[0], loaded[1], loaded[2]


pb, svc, grpc_pb = load()
