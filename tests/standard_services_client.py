"""A grpcio client of the standard services (no trio_bridge import): health Check with and
without the pool secret, reflection with and without it. Prints one JSON document.

    python tests/standard_services_client.py TARGET SECRET
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def main() -> None:
    target, secret = sys.argv[1], sys.argv[2]
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protos")
    out = tempfile.mkdtemp()
    for proto in ("standard/health.proto", "standard/reflection.proto"):  # (a grpc/ folder would shadow grpcio)
        assert protoc.main(["protoc", f"-I{here}", f"--python_out={out}", f"--grpc_python_out={out}", proto]) == 0
    sys.path.insert(0, out)
    from google.protobuf.descriptor_pb2 import FileDescriptorProto
    from standard import health_pb2, health_pb2_grpc, reflection_pb2, reflection_pb2_grpc

    result: dict = {}
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "trio_bridge.v1.WorkerService", "trio_bridge.v1.HostService"):
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)  # no secret
                result[f"health {service}"] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                result[f"health {service}"] = exc.code().name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(request: reflection_pb2.ServerReflectionRequest, metadata: list) -> reflection_pb2.ServerReflectionResponse:
            return next(iter(reflection.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)))

        try:
            ask(reflection_pb2.ServerReflectionRequest(list_services=""), [])
            result["reflection without secret"] = "OK"
        except grpc.RpcError as exc:
            result["reflection without secret"] = exc.code().name
        auth = [("x-trio-bridge-secret", secret)]
        listed = ask(reflection_pb2.ServerReflectionRequest(list_services=""), auth)
        result["services"] = sorted(s.name for s in listed.list_services_response.service)
        found = ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol="trio_bridge.v1.WorkerService"), auth)
        files = [FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto]
        result["files"] = [f.name for f in files]
        result["worker rpcs"] = sorted(
            m.name for f in files for s in f.service if s.name == "WorkerService" for m in s.method
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
