"""Remote workers: ``trio-bridge worker`` processes on other loopback addresses standing for other
machines, reached over TCP with mutual TLS (certificates from trustme) and a token."""

from __future__ import annotations

import gc
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import trio

import trio_bridge
from tests.helpers import marks, wait_for
from trio_bridge import InvalidArgumentError, Lifecycle, RemoteWorkers, TLSConfig, WorkerCrashedError, WorkerStartError
from trio_bridge.testing import Certificates, RemoteWorkerProcess, free_port, write_token_file

ADAPTER = "benchmarks.signal_storm:StormEcho"  # tests.adapters:Echo plus a tool that calls a host tool
TOKEN = "a-token-for-the-tests-0123456789"
ROOT = Path(__file__).resolve().parent.parent


def _remote_worker(
    tmp_path: Path, certs: Certificates, *, adapter: str = ADAPTER, join: str | None = None, options: tuple[str, ...] = (),
) -> RemoteWorkerProcess:
    """``trio-bridge worker`` on 127.0.0.2 (another machine, as far as the host can tell), with
    ``options`` more."""
    token_file = write_token_file(tmp_path / "token", TOKEN)
    address = f"tcp://127.0.0.2:{free_port('127.0.0.2')}"
    options = ("--concurrency", "2", *(["--join", join] if join else []), *options)
    return RemoteWorkerProcess(adapter, address, token_file, certificates=certs, options=options, cwd=str(ROOT))


@pytest.fixture
def certs(tmp_path):
    return Certificates.create(tmp_path)


@pytest.fixture
def remote(tmp_path, certs):
    worker = _remote_worker(tmp_path, certs).start()
    yield worker
    worker.kill()


def _options(certs: Certificates, remote: RemoteWorkerProcess, *, size: int = 1, startup_timeout: float = 60.0, **overrides):
    """``open_pool``'s options for a pool of ``remote`` (``overrides``: of its ``RemoteWorkers``)."""
    return {
        "size": size,
        "remote": RemoteWorkers(**{
            "addresses": [remote.address], "listen": "tcp://127.0.0.1:0", "token": TOKEN, "tls": certs.tls("host"),
        } | overrides),
        "lifecycle": Lifecycle(restart_backoff=(0.1, 0.5), health_check_interval=1.0, startup_timeout=startup_timeout),
    }


async def nap(seconds: float) -> float:
    await trio.sleep(seconds)
    return seconds


@pytest.mark.real_process
async def test_a_remote_worker_over_tls_serves_calls_streams_host_tools_and_variables_and_rejoins(certs, remote):
    async with trio_bridge.open_pool(ADAPTER, **_options(certs, remote)) as pool:
        pool.host_tool(nap, name="host_nap")
        local, far = sorted(pool.workers(), key=lambda w: w.remote)
        assert far.address == remote.address.replace("tcp://", "tcp:") and far.pid == remote.pid and local.pid != remote.pid
        assert far.remote and not local.remote
        async with trio.open_nursery() as nursery:  # the remote one takes 2 at once (its --concurrency)
            for _ in range(3):
                nursery.start_soon(pool.execute, "sleep", {"seconds": 0.3})
            await wait_for(lambda: pool.statistics().in_flight == 3, timeout=5)
        assert pool._plane is None  # shared memory is off: arrays go in-band
        async with trio.open_nursery() as nursery:  # both serve: the burst is spread
            for i in range(20):
                nursery.start_soon(pool.execute, "add", {"a": i})
        assert all(w.calls_served > 0 for w in pool.workers())
        big = np.arange(300_000, dtype=np.float64)
        async with pool.session(affinity="strict") as session:
            await session.register_variable("temperature", "float", 0.5)
            for _ in range(4):  # each call is served where the session lives; both kinds work
                assert np.array_equal(await session.execute("echo", {"value": big}), big)
                assert await session.execute("ask_host", {"seconds": 0.01}) == 0.01
                async with session.stream("count", {"n": 50}) as chunks:
                    assert [c async for c in chunks] == list(range(50))

        # kill -9 of the remote worker mid-call: only that call fails, soon, and says why
        remote_calls: list[tuple[WorkerCrashedError, float]] = []
        stop = trio.Event()

        async def caller() -> None:  # its calls land on either worker
            while not stop.is_set():
                try:
                    await pool.execute("sleep", {"seconds": 0.2})
                except WorkerCrashedError as exc:
                    remote_calls.append((exc, trio.current_time()))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
            await trio.sleep(0.5)
            killed_at = trio.current_time()
            remote.kill()
            await trio.sleep(1.5)  # the calls on it fail at once (the connection resets); a hang would show
            stop.set()
        assert remote_calls and all("lost connection to worker at tcp:127.0.0.2" in str(e) for e, _ in remote_calls)
        assert max(at for _, at in remote_calls) - killed_at < 5
        assert await pool.execute("add", {"a": 1}) == 3  # the local worker was untouched

        remote.start()  # it comes back: its slot dials it again
        with trio.fail_after(15):
            await pool.wait_for_workers(2)
        assert any(w.pid == remote.pid for w in pool.workers())
    assert remote.process is not None and remote.process.poll() is None  # closing the pool detached, did not stop it


@pytest.mark.real_process
async def test_big_in_band_arrays_cross_tls_intact_and_a_kept_result_survives_the_calls_after_it(certs, remote):
    """Arrays of tens of MB travel in-band over mutual TLS (their receive buffers are reused once
    dropped, see _wire/buffers.py): each arrives intact, a result the caller keeps is not changed
    by the calls after it, and changing an argument after its call does not change the result."""
    async with trio_bridge.open_pool(ADAPTER, **_options(certs, remote, size=0)) as pool:
        pattern = np.arange(6_000_000, dtype=np.float32)  # 24 MB
        kept = []
        for i in range(5):
            value = pattern + i
            result = await pool.execute("echo", {"value": value})
            value += 1000
            assert result.dtype == np.float32 and np.array_equal(result, pattern + i)
            result[:10] = -1  # a result is the caller's to write
            if i % 2 == 0:
                kept.append((i, result))
            del result
        for i, result in kept:
            assert np.array_equal(result[10:], pattern[10:] + i) and (result[:10] == -1).all()


@pytest.mark.real_process
async def test_a_wrong_token_or_a_certificate_of_another_ca_is_refused_and_cancellation_reaches_it(tmp_path, certs, remote):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(WorkerStartError, match="UNAUTHENTICATED"):
            async with trio_bridge.open_pool(ADAPTER, **_options(certs, remote, token="not-the-token-0123456789", size=0)):
                pass
        gc.collect()
    assert not [w for w in caught if "Unclosed connection" in str(w.message)]  # the refused handshake's channel was closed
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    stranger = Certificates.create(stranger_dir)  # a CA the worker does not trust
    with pytest.raises(WorkerStartError, match="cannot reach worker"):
        async with trio_bridge.open_pool(ADAPTER, **_options(certs, remote, tls=stranger.tls("host"), size=0, startup_timeout=5)):
            pass
    async with trio_bridge.open_pool(ADAPTER, **_options(certs, remote, size=0)) as pool:  # and it still serves
        assert await pool.execute("add", {"a": 2}) == 4
        with trio.move_on_after(0.3):  # cancellation reaches the remote worker: it frees the slot at once
            await pool.execute("async_sleep", {"seconds": 30})
        with trio.fail_after(2):
            while pool.statistics().in_flight:
                await trio.sleep(0.02)
        assert pool.statistics().calls_cancelled == 1 and [w.state for w in pool.workers()] == ["ready"]


@pytest.mark.real_process
async def test_workers_that_join_are_dialed_back_and_one_of_another_adapter_is_refused(tmp_path, certs):
    listen = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    remote = RemoteWorkers(listen=listen, token=TOKEN, tls=certs.tls("host"))
    async with trio_bridge.open_pool(ADAPTER, size=1, remote=remote, lifecycle=Lifecycle(health_check_interval=1.0)) as pool:
        joining = _remote_worker(tmp_path, certs, join=listen).start()
        stranger = _remote_worker(tmp_path, certs, adapter="tests.adapters:Echo", join=listen).start()
        try:
            with trio.fail_after(20):
                await pool.wait_for_workers(2)
            joined = [w for w in pool.workers() if w.address == joining.address.replace("tcp://", "tcp:")]
            assert joined and joined[0].pid == joining.pid
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(pool.execute, "sleep", {"seconds": 0.05})
            assert all(w.calls_served > 0 for w in pool.workers())
            assert stranger.process is not None and stranger.process.stderr is not None
            refusal = await trio.to_thread.run_sync(stranger.process.stderr.readline)
            assert b"refused it: this pool serves 'benchmarks.signal_storm:StormEcho', not 'tests.adapters:Echo'" in refusal
            assert len(pool.workers()) == 2
        finally:
            joining.kill()
            stranger.kill()


async def test_a_joined_workers_slot_leaves_when_it_is_gone_and_comes_back_when_it_joins_again(tmp_path, certs):
    """A worker that joined is not dialled for ever once it is gone (a rolling update replaces it
    by one at another address: its slot would be redialled for the pool's life): its slot leaves,
    and the worker, once back, offers itself again and gets a slot again."""
    listen = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    remote = RemoteWorkers(listen=listen, token=TOKEN, tls=certs.tls("host"))
    async with trio_bridge.open_pool(ADAPTER, size=1, remote=remote) as pool:
        joining = _remote_worker(tmp_path, certs, join=listen).start()
        try:
            with trio.fail_after(20):
                await pool.wait_for_workers(2)
            assert pool.size == 2
            joining.kill()
            with trio.fail_after(20):
                while pool.size != 1:
                    await trio.sleep(0.05)
            await trio.sleep(1.0)  # not redialled: the slot stays gone
            assert pool.size == 1 and len(pool.workers()) == 1
            assert await pool.execute("echo", {"value": 1}) == 1  # the local worker serves on
            joining.start()  # back, at the same address: it joins again
            with trio.fail_after(20):
                await pool.wait_for_workers(2)
            assert pool.size == 2
            assert joining.pid in {w.pid for w in pool.workers()}
        finally:
            joining.kill()


async def test_remote_options_are_checked_before_anything_starts(tmp_path, certs):
    cases = [
        ({"addresses": ["tcp://10.1.2.3:7000"], "token": TOKEN}, "plain TCP beyond this machine"),
        ({"addresses": ["tcp://127.0.0.2:7000"]}, "need a token"),
        ({"addresses": ["tcp://127.0.0.2:7000"], "token": "short"}, "at least 16 characters"),
        ({"addresses": ["gpu-3:7000"], "token": TOKEN}, "tcp://HOST:PORT"),
        ({"addresses": "tcp://127.0.0.2:7000", "token": TOKEN}, "a list of"),
        ({"addresses": ["tcp://127.0.0.2:7000"], "token": TOKEN, "tls": "cert.pem"}, "TLSConfig"),
    ]
    for options, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            async with trio_bridge.open_pool(ADAPTER, remote=RemoteWorkers(**options)):
                pass
    with pytest.raises(InvalidArgumentError, match="size must be"):
        async with trio_bridge.open_pool(ADAPTER, size=0):
            pass
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        TLSConfig(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))


def test_tcp_connections_send_small_messages_at_once():
    """Accepted TCP connections have Nagle's algorithm off: without it, each gRPC exchange
    waited ~40 ms for a delayed ACK (a remote worker call took 44 ms instead of 2)."""
    import asyncio
    import socket

    from trio_bridge._wire.transport import tcp_listener

    async def accepted_nodelay() -> int:
        listener = tcp_listener("127.0.0.1", 0)
        connected: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda reader, writer: connected.set_result(writer), sock=listener)
        _, client = await asyncio.open_connection(*listener.getsockname()[:2])
        writer = await asyncio.wait_for(connected, 5)
        nodelay = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        for w in (client, writer):
            w.close()
        server.close()
        return nodelay

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        assert runner.run(accepted_nodelay()) == 1


@pytest.mark.real_process
def test_a_worker_command_ends_on_sigterm(tmp_path, certs):
    worker = _remote_worker(tmp_path, certs).start()
    try:
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        # it used to ignore it (the CLI's start-up handlers); now it drains (no call runs), then exits 128 + 15
        assert worker.process.wait(10) == 128 + signal.SIGTERM
    finally:
        worker.kill()


@pytest.mark.real_process
async def test_a_head_with_no_local_workers_waits_for_one_to_join_and_says_so_when_none_does(tmp_path, certs):
    listen = f"tcp://127.0.0.1:{free_port('127.0.0.1')}"
    remote = RemoteWorkers(listen=listen, token=TOKEN, tls=certs.tls("host"))
    lifecycle = Lifecycle(health_check_interval=1.0, no_worker_timeout=0.5)
    async with trio_bridge.open_pool(ADAPTER, size=0, remote=remote, lifecycle=lifecycle) as pool:
        assert pool.size == 0 and pool.workers() == []
        with pytest.raises(WorkerStartError, match=r"no worker was ready within 0.5 s \(Lifecycle.no_worker_timeout\).*joined"):
            await pool.execute("echo", {"value": 1})
    lifecycle = Lifecycle(health_check_interval=1.0, no_worker_timeout=30.0)
    async with trio_bridge.open_pool(ADAPTER, size=0, remote=remote, lifecycle=lifecycle) as pool:
        joining = _remote_worker(tmp_path, certs, join=listen)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, joining.start)  # a call made before any worker waits for one
                with trio.fail_after(20):
                    assert await pool.execute("echo", {"value": 7}) == 7
            assert pool.size == 1 and [w.remote for w in pool.workers()] == [True]
        finally:
            joining.kill()


@pytest.mark.real_process
async def test_a_worker_cancels_the_calls_of_a_host_gone_silent_within_twice_its_keepalive(tmp_path, certs, marker_dir):
    """A host whose machine died, or whose link was cut, sends nothing more, not even a reset:
    the worker pings each host with calls open every ``--keepalive`` seconds, and closes the
    connection of one that answers none for as long again, which cancels its calls, so their
    slots are free for the next host. A stopped process (SIGSTOP) is such a host: its kernel still
    acknowledges TCP, but nothing answers the pings. A host that answers keeps its calls, however
    long they run."""
    import asyncio
    import subprocess
    import sys
    import time

    from trio_bridge._wire.contract import SECRET_METADATA
    from trio_bridge._wire.generated.trio_bridge import v1 as pb
    from trio_bridge._wire.transport import open_channel

    keepalive = 1.5
    worker = _remote_worker(tmp_path, certs, options=("--keepalive", str(keepalive)))
    worker.log = tmp_path / "worker.log"
    worker.start()
    host = certs.tls("host")

    def seconds_until_idle() -> float:
        """Seconds until the worker's Ping (from another connection) lists no call (at most 60)."""

        async def poll() -> float:
            started = time.monotonic()
            channel = open_channel(worker.address, host.client_context())
            try:
                stub = pb.WorkerServiceStub(channel, metadata={SECRET_METADATA: TOKEN})
                while (await stub.ping(pb.PingRequest())).active_calls and time.monotonic() - started < 60:
                    await asyncio.sleep(0.02)
            finally:
                channel.close()
            return time.monotonic() - started

        return asyncio.run(poll())

    silent = subprocess.Popen(
        [sys.executable, "-m", "tests.silent_host", worker.address, TOKEN, host.cert, host.key, host.ca, "60",
         "cooperative_sleep:sync", "async_sleep:async"],
        cwd=str(ROOT), stdout=subprocess.PIPE,
    )
    try:
        assert silent.stdout is not None
        with trio.fail_after(30):
            assert (await trio.to_thread.run_sync(silent.stdout.readline, abandon_on_cancel=True)) == b"started\n"
        await trio.sleep(2 * keepalive)  # it answers pings: its calls run on
        assert not marks(marker_dir, "cooperative_sleep") and not marks(marker_dir, "async_sleep")
        silent.send_signal(signal.SIGSTOP)
        idle_after = await trio.to_thread.run_sync(seconds_until_idle)
        # Within 2 * keepalive: the slack is for a loaded machine. Before, the calls ran their 60 s
        # (grpclib's server pinged every 2 hours); a graceful close of the TLS connection alone
        # waited 30 s for the silent host's close_notify.
        assert idle_after < 2 * keepalive + 8
        assert marks(marker_dir, "cooperative_sleep") == ["cancelled"] and marks(marker_dir, "async_sleep") == ["cancelled"]
        with trio.fail_after(10):  # its log says which host it dropped (a thread copies its stderr there)
            while "did not answer a keepalive PING in time: connection dropped" not in worker.log.read_text():
                await trio.sleep(0.05)

        async with trio_bridge.open_pool(ADAPTER, **_options(certs, worker, size=0)) as pool:
            assert await pool.execute("async_sleep", {"seconds": 2.5 * keepalive}) == 2.5 * keepalive  # this host answers
    finally:
        silent.kill()  # SIGKILL ends a stopped process too
        silent.wait()
        if silent.stdout is not None:
            silent.stdout.close()
        worker.kill()
