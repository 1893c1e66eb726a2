"""A program that uses grpcio's standard services (grpcio-health-checking, grpcio-reflection) and
a pool: it imports their stubs before or after opening the pool (``first`` or ``last``), then
checks a worker's health with grpcio's own stub. Prints the status's name.

    python -m tests.grpcio_user_program first|last
"""

from __future__ import annotations

import importlib
import sys

import trio

import trio_bridge

STUBS = ("grpc_health.v1.health_pb2", "grpc_health.v1.health_pb2_grpc", "grpc_reflection.v1alpha.reflection_pb2")


def check_health(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = "unix-abstract:" + address.removeprefix("unix:@") if address.startswith("unix:@") else address.removeprefix("tcp:")
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def main(order: str) -> None:
    if order == "first":
        for name in STUBS:
            importlib.import_module(name)
    async with trio_bridge.open_pool("tests.adapters:Echo", size=1) as pool:
        if order == "last":
            for name in STUBS:
                importlib.import_module(name)
        (worker,) = pool.workers()
        print(await trio.to_thread.run_sync(check_health, worker.address))


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
