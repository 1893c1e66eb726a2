"""The standard gRPC services on every trio-bridge server (worker and host): ``grpc.health.v1``
and server reflection (v1 and v1alpha), so grpc_health_probe, grpcurl and any gRPC stack's
tooling see them.

Health answers for the whole server (service ``""``) and for each of its services by name:
``SERVING``, or ``NOT_SERVING`` once it drains (a worker told to shut down, a host closing its
pool). It needs no pool secret: an orchestrator's probe has none, and it tells nothing but that.
Reflection, like every other RPC, does.

A health-only listener (``trio-bridge worker --health``, ``Monitoring(health_address=...)``)
serves this health service alone, in plain TCP and without the secret, for an orchestrator's
native probe (Kubernetes' ``grpc:`` probe has neither TLS nor metadata): ``LIVENESS`` (``""``)
and ``READINESS`` (``"ready"``), each with its own status; any other RPC there is UNIMPLEMENTED.

Both are served with our own betterproto2 messages (generated from ``proto/grpc/``), and
reflection answers from ``generated/bridge.desc`` (a FileDescriptorSet that ``just proto``
writes), read into an index of our own. Nothing here registers a file in protobuf's default
descriptor pool: grpcio's ``grpc_health``/``grpc_reflection`` stubs and grpclib's
``grpclib.health``/``grpclib.reflection`` each register the standard files there, under
different file names, and a second copy fails with "duplicate symbol". A program may import
either, before or after opening a pool.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpclib.const
from grpclib.exceptions import GRPCError

from trio_bridge._wire.generated.grpc.health import v1 as health_pb
from trio_bridge._wire.generated.grpc.reflection import v1 as reflection_v1
from trio_bridge._wire.generated.grpc.reflection import v1alpha as reflection_v1alpha

HEALTH_PREFIX = "/grpc.health.v1.Health/"
LIVENESS = ""        # a health-only listener's services: the process runs and is not draining,
READINESS = "ready"  # and it can serve (a worker's adapter is set up; a head has a ready worker)
_DESCRIPTORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated", "bridge.desc")


class ServingStatus:
    """A server's health: serving at first (or ``serving``); ``set(False)`` when it drains.
    Lives on the server's asyncio loop (set it there)."""

    def __init__(self, serving: bool = True) -> None:
        self.serving = serving
        self._changed = asyncio.Event()

    def set(self, serving: bool) -> None:
        if serving != self.serving:
            self.serving = serving
            self._changed.set()
            self._changed = asyncio.Event()

    async def changed(self) -> None:
        """Return at the next change."""
        await self._changed.wait()


def with_standard_services(services: list[Any]) -> tuple[list[Any], ServingStatus]:
    """``services`` plus health and reflection; and the health status to flip
    (``status.set(False)`` when draining), serving at first."""
    status = ServingStatus()
    health = _Health(dict.fromkeys({"", *(_service_name(s) for s in services)}, status))
    served = [*services, health]
    names = [_service_name(s) for s in served]
    index = _descriptor_index()
    reflection = [_reflection_service(pb, index, names) for pb in (reflection_v1, reflection_v1alpha)]
    return [*served, *reflection], status


def _service_name(service: Any) -> str:
    """``"package.Service"`` of a grpclib servable, from its methods' paths."""
    path = next(iter(service.__mapping__()))
    return path.split("/")[1]


def health_service(statuses: Mapping[str, ServingStatus]) -> Any:
    """``grpc.health.v1.Health`` answering for each service name in ``statuses`` (``""``: the
    whole server) with its status, and nothing else: what a health-only listener serves
    (:func:`trio_bridge._wire.transport.new_health_server`)."""
    return _Health(statuses)


class _Health(health_pb.HealthBase):
    """``grpc.health.v1.Health``: each service name (``""``: the whole server) with its status."""

    def __init__(self, statuses: Mapping[str, ServingStatus]) -> None:
        self._statuses = dict(statuses)

    @staticmethod
    def _answer(status: ServingStatus) -> health_pb.HealthCheckResponse:
        serving = health_pb.HealthCheckResponseServingStatus.SERVING
        not_serving = health_pb.HealthCheckResponseServingStatus.NOT_SERVING
        return health_pb.HealthCheckResponse(status=serving if status.serving else not_serving)

    async def check(self, message: health_pb.HealthCheckRequest) -> health_pb.HealthCheckResponse:
        status = self._statuses.get(message.service)
        if status is None:
            raise GRPCError(grpclib.const.Status.NOT_FOUND, f"no service {message.service!r} here")
        return self._answer(status)

    async def watch(self, message: health_pb.HealthCheckRequest) -> AsyncIterator[health_pb.HealthCheckResponse]:
        status = self._statuses.get(message.service)
        if status is None:  # the protocol: say so, and keep the stream open
            yield health_pb.HealthCheckResponse(status=health_pb.HealthCheckResponseServingStatus.SERVICE_UNKNOWN)
            await asyncio.Event().wait()
            return
        while True:
            yield self._answer(status)
            await status.changed()


class _DescriptorIndex:
    """Our .proto files (serialized ``FileDescriptorProto``s, by name) and which file defines
    each symbol and extension: what reflection answers."""

    def __init__(self, files: list[Any]) -> None:
        self.files: dict[str, bytes] = {}
        self.symbols: dict[str, str] = {}
        self.extensions: dict[str, dict[int, str]] = {}  # extended message -> number -> file
        for file in files:
            self.files[file.name] = file.SerializeToString()
            prefix = f"{file.package}." if file.package else ""
            self._add_messages(file.name, prefix, file.message_type)
            self._add_enums(file.name, prefix, file.enum_type)
            self._add_extensions(file.name, file.extension)
            for service in file.service:
                self.symbols[prefix + service.name] = file.name
                for method in service.method:
                    self.symbols[f"{prefix}{service.name}.{method.name}"] = file.name

    def _add_messages(self, file: str, prefix: str, messages: Iterable[Any]) -> None:
        for message in messages:
            name = prefix + message.name
            self.symbols[name] = file
            for field in message.field:
                self.symbols[f"{name}.{field.name}"] = file
            self._add_messages(file, f"{name}.", message.nested_type)
            self._add_enums(file, f"{name}.", message.enum_type)
            self._add_extensions(file, message.extension)

    def _add_enums(self, file: str, prefix: str, enums: Iterable[Any]) -> None:
        for enum in enums:
            self.symbols[prefix + enum.name] = file
            for value in enum.value:  # enum values are scoped like the enum itself (C++ rules)
                self.symbols[prefix + value.name] = file

    def _add_extensions(self, file: str, extensions: Iterable[Any]) -> None:
        for extension in extensions:
            self.extensions.setdefault(extension.extendee.lstrip("."), {})[extension.number] = file


_index: _DescriptorIndex | None = None
_index_lock = threading.Lock()


def _descriptor_index() -> _DescriptorIndex:
    global _index
    with _index_lock:
        if _index is None:
            from google.protobuf.descriptor_pb2 import FileDescriptorSet  # protobuf's own file, in every pool

            with open(_DESCRIPTORS, "rb") as f:
                _index = _DescriptorIndex(list(FileDescriptorSet.FromString(f.read()).file))
        return _index


def _reflection_service(pb: Any, index: _DescriptorIndex, services: list[str]) -> Any:
    """Server reflection in the messages of ``pb`` (the v1 or v1alpha module: same messages,
    another package), answered from ``index``; ``services``: the names it lists."""

    def not_found(what: str) -> Any:
        error = pb.ErrorResponse(error_code=grpclib.const.Status.NOT_FOUND.value, error_message=f"not found: {what}")
        return pb.ServerReflectionResponse(error_response=error)

    def file(name: str | None, what: str) -> Any:
        if name is None or name not in index.files:
            return not_found(what)
        return pb.ServerReflectionResponse(
            file_descriptor_response=pb.FileDescriptorResponse(file_descriptor_proto=[index.files[name]])
        )

    def answer(request: Any) -> Any:
        if request.file_by_filename is not None:
            return file(request.file_by_filename, request.file_by_filename)
        if request.file_containing_symbol is not None:
            symbol = request.file_containing_symbol
            return file(index.symbols.get(symbol), symbol)
        if request.file_containing_extension is not None:
            wanted = request.file_containing_extension
            found = index.extensions.get(wanted.containing_type, {}).get(wanted.extension_number)
            return file(found, f"extension {wanted.extension_number} of {wanted.containing_type}")
        if request.all_extension_numbers_of_type is not None:
            type_name = request.all_extension_numbers_of_type
            if type_name not in index.symbols:
                return not_found(type_name)
            numbers = sorted(index.extensions.get(type_name, {}))
            return pb.ServerReflectionResponse(
                all_extension_numbers_response=pb.ExtensionNumberResponse(base_type_name=type_name, extension_number=numbers)
            )
        if request.list_services is not None:
            listed = [pb.ServiceResponse(name=name) for name in services]
            return pb.ServerReflectionResponse(list_services_response=pb.ListServiceResponse(service=listed))
        error = pb.ErrorResponse(error_code=grpclib.const.Status.INVALID_ARGUMENT.value, error_message="no request in the message")
        return pb.ServerReflectionResponse(error_response=error)

    class Reflection(pb.ServerReflectionBase):
        async def server_reflection_info(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in messages:
                response = answer(request)
                response.valid_host = request.host
                response.original_request = request
                yield response

    return Reflection()
