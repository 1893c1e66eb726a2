"""The standard gRPC services on every trio-bridge server (worker and host): ``grpc.health.v1``
(grpclib's ``Health``) and server reflection (grpclib's ``ServerReflection``, v1 and v1alpha),
so grpc_health_probe, grpcurl and any gRPC stack's tooling see them.

Health answers for the whole server (service ``""``) and for each of its services by name:
``SERVING``, or ``NOT_SERVING`` once it drains (a worker told to shut down, a host closing its
pool). It needs no pool secret: an orchestrator's probe has none, and it tells nothing but that.
Reflection, like every other RPC, does.

Reflection reads our .proto's descriptors from ``generated/bridge.desc`` (a FileDescriptorSet
that ``just proto`` writes), added to protobuf's default pool when a server is made: any
protobuf release grpclib runs with takes them (a generated ``_pb2`` module would pin one).
"""

from __future__ import annotations

import os
import threading
from typing import Any

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_DESCRIPTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated", "bridge.desc")
_added = False
_lock = threading.Lock()


def with_standard_services(services: list[Any]) -> tuple[list[Any], Any]:
    """``services`` plus health and reflection; and the health status to flip
    (``status.set(False)`` when draining): a grpclib ``ServiceStatus``, serving at first."""
    from grpclib.health.check import ServiceStatus
    from grpclib.health.service import Health
    from grpclib.reflection.service import ServerReflection

    _add_descriptors()
    status = ServiceStatus()
    status.set(True)
    health = Health({service: [status] for service in services})
    return ServerReflection.extend([*services, health]), status


def _add_descriptors() -> None:
    global _added
    with _lock:
        if _added:
            return
        from google.protobuf import descriptor_pool
        from google.protobuf.descriptor_pb2 import FileDescriptorSet

        with open(_DESCRIPTORS, "rb") as f:
            files = FileDescriptorSet.FromString(f.read()).file
        pool = descriptor_pool.Default()
        for file in files:
            try:
                pool.FindFileByName(file.name)
            except KeyError:
                pool.Add(file)
        _added = True
