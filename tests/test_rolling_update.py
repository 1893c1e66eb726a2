"""Rolling updates of remote workers: a draining ``trio-bridge worker`` (SIGTERM with
``--drain-timeout``) refuses calls it has not started, and the host gives them to another worker
(the caller sees nothing); SIGHUP reloads a worker's code in place (same PID), or, when the new
code does not import, says so once and keeps serving the old."""

from __future__ import annotations

import contextlib
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
import trio
import trio.testing

import trio_bridge
from trio_bridge import Lifecycle, RemoteWorkers, WorkerStartError
from trio_bridge.testing import (
    Certificates,
    FakeContext,
    RemoteWorkerProcess,
    free_port,
    open_fake_pool,
    write_token_file,
)

TOKEN = "a-token-for-the-tests-0123456789"
ROOT = Path(__file__).resolve().parent.parent
ADAPTER_CODE = '''
import subprocess
import time

from trio_bridge.worker import Adapter, tool


class Versioned(Adapter):
    @tool
    def version(self, seconds: float = 0.0) -> str:
        time.sleep(seconds)
        return {version!r}

    @tool
    def spawn(self) -> int:
        """Start a process and leave it running (a tool's background helper)."""
        return subprocess.Popen(["sleep", "600"]).pid

    @tool
    def stubborn(self) -> int:
        """Start a process that ignores SIGTERM and leave it running."""
        return subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 600"]).pid

    @tool
    def versions(self, n: int):
        for _ in range(n):
            time.sleep(0.005)
            yield {version!r}
'''


def whoami(ctx: FakeContext) -> str:
    return ctx.worker_id


def whoami_stream(ctx: FakeContext, n: int):
    for _ in range(n):
        yield ctx.worker_id


FAKE_TOOLS = {"whoami": whoami, "whoami_stream": whoami_stream}


async def test_calls_a_draining_worker_refuses_run_on_another_and_the_caller_sees_nothing(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=2) as (pool, workers):
        draining = workers.drain(0)
        served: list[str] = []

        async def call() -> None:
            served.append(await pool.execute("whoami"))

        async def stream() -> None:
            async with pool.stream("whoami_stream", {"n": 3}) as chunks:
                served.extend([chunk async for chunk in chunks])

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(call)
                nursery.start_soon(stream)
        assert len(served) == 40 and set(served) == {workers.worker(1).id}
        # the first refusal took it out of the dispatch: it was offered one call at most per slot
        assert draining.lifecycle.state.value == "draining" and 1 <= draining.calls_given <= 2
        assert pool.statistics().calls_failed == 0


async def test_a_call_every_worker_refuses_waits_no_worker_timeout_then_fails_as_when_none_is_ready(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=2, lifecycle=Lifecycle(no_worker_timeout=5.0)) as (pool, workers):
        workers.drain(0)
        workers.drain(1)
        started = trio.current_time()
        with pytest.raises(WorkerStartError, match="no worker was ready within 5 s"):
            await pool.execute("whoami")
        assert trio.current_time() - started == pytest.approx(5.0)


async def test_a_call_a_draining_worker_gives_back_is_not_refused_by_a_full_queue(autojump_clock):
    async def slow(ctx: FakeContext) -> str:
        await trio.sleep(1)
        return ctx.worker_id

    async with open_fake_pool({"slow": slow}, size=2, max_queue=1) as (pool, workers):
        served: list[str] = []

        async def call() -> None:
            served.append(await pool.execute("slow"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)  # on one worker
            await trio.testing.wait_all_tasks_blocked()
            busy = next(slot for slot in (0, 1) if workers.worker(slot).lifecycle.busy)
            workers.drain(1 - busy)
            nursery.start_soon(call)  # the other worker refuses it: it waits again, at the front
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(call)  # the queue's one place is still free for a new call
        assert served == [workers.worker(busy).id] * 3
        assert pool.statistics().calls_refused == 0


async def test_a_stream_no_worker_takes_after_a_drain_is_refused_and_charged_to_no_worker(autojump_clock):
    async with open_fake_pool(FAKE_TOOLS, size=2, lifecycle=Lifecycle(no_worker_timeout=5.0)) as (pool, workers):
        workers.drain(0)
        workers.drain(1)
        with pytest.raises(WorkerStartError, match="no worker was ready within 5 s"):
            async with pool.stream("whoami_stream", {"n": 3}) as chunks:
                [chunk async for chunk in chunks]
        figures = pool.statistics()
        assert (figures.calls_refused, figures.calls_failed) == (1, 0)
        assert [info.calls_failed for info in pool.workers()] == [0, 0]


def _write_adapter(directory: Path, version: str) -> None:
    """The adapter module ``versioned_adapter`` in ``directory``, its tool answering ``version``;
    its mtime moved on, so that a rewrite within the same second is seen as new."""
    path = directory / "versioned_adapter.py"
    path.write_text(textwrap.dedent(ADAPTER_CODE.format(version=version)))
    later = time.time() + 2 * (1 + sum(1 for _ in directory.glob("versioned_adapter.py")))
    os.utime(path, (later, later))


def _worker(
    tmp_path: Path, certs: Certificates, directory: Path, log: Path, *, health: str | None = None,
) -> RemoteWorkerProcess:
    token_file = write_token_file(tmp_path / "token", TOKEN)
    address = f"tcp://127.0.0.2:{free_port('127.0.0.2')}"
    return RemoteWorkerProcess(
        "versioned_adapter:Versioned", address, token_file, certificates=certs, cwd=str(directory), log=log,
        options=("--concurrency", "2", "--drain-timeout", "30", *(("--health", health) if health else ())),
    ).start()


@pytest.fixture
def certs(tmp_path):
    return Certificates.create(tmp_path)


@pytest.fixture
def code_dir(tmp_path):
    directory = tmp_path / "code"
    directory.mkdir()
    _write_adapter(directory, "v1")
    return directory


def _pool(certs: Certificates, *workers: RemoteWorkerProcess):
    remote = RemoteWorkers(addresses=[w.address for w in workers], token=TOKEN, tls=certs.tls("host"))
    lifecycle = Lifecycle(restart_backoff=(0.1, 0.5), health_check_interval=1.0, startup_timeout=60.0, no_worker_timeout=60.0)
    return trio_bridge.open_pool("versioned_adapter:Versioned", size=0, remote=remote, lifecycle=lifecycle)


class _Callers:
    """Four tasks calling in a loop, three ``version``, one the stream ``versions``: the answers
    (a stream's last chunk) and failures, with their times."""

    def __init__(self, pool: trio_bridge.Pool) -> None:
        self.pool = pool
        self.answers: list[tuple[float, str]] = []
        self.failures: list[BaseException] = []
        self.streams = 0
        self.stop = trio.Event()

    async def _call(self) -> None:
        while not self.stop.is_set():
            try:
                self.answers.append((trio.current_time(), await self.pool.execute("version", {"seconds": 0.02})))
            except trio_bridge.TrioBridgeError as exc:
                self.failures.append(exc)

    async def _stream(self) -> None:
        while not self.stop.is_set():
            try:
                async with self.pool.stream("versions", {"n": 4}) as chunks:
                    got = [chunk async for chunk in chunks]
                assert len(got) == 4 and len(set(got)) == 1
                self.answers.append((trio.current_time(), got[-1]))
                self.streams += 1
            except trio_bridge.TrioBridgeError as exc:
                self.failures.append(exc)

    async def run(self, nursery: trio.Nursery) -> None:
        for _ in range(3):
            nursery.start_soon(self._call)
        nursery.start_soon(self._stream)
        with trio.fail_after(60):
            while len(self.answers) < 20:
                await trio.sleep(0.05)


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.real_process
async def test_a_worker_draining_on_sigterm_has_its_calls_served_by_another_and_no_call_fails(tmp_path, certs, code_dir):
    a = _worker(tmp_path, certs, code_dir, tmp_path / "a.log")
    b = _worker(tmp_path, certs, code_dir, tmp_path / "b.log")
    try:
        async with _pool(certs, a, b) as pool:
            await pool.wait_for_workers(2)
            callers = _Callers(pool)
            async with trio.open_nursery() as nursery:
                await callers.run(nursery)
                before = len(callers.answers)
                assert a.process is not None
                a.process.send_signal(signal.SIGTERM)
                with trio.fail_after(60):
                    await trio.to_thread.run_sync(a.process.wait)
                drained_at = trio.current_time()
                while len(callers.answers) < before + 100:
                    await trio.sleep(0.05)
                callers.stop.set()
            kinds = sorted({type(e).__name__ for e in callers.failures})
            print(f"SIGTERM drain: {len(callers.answers) - before} calls during and after the drain, "
                  f"{len(callers.failures)} failed {kinds} ({callers.streams} streams in all); the worker exited with {a.process.returncode}")
            assert callers.failures == []
            assert a.process.returncode == 128 + signal.SIGTERM
            assert any(at > drained_at for at, _ in callers.answers)
    finally:
        a.kill()
        b.kill()


async def _until(predicate, timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


def _health_status(address: str) -> str:
    """The ``"ready"`` status of the grpc.health.v1 listener at ``HOST:PORT``."""
    import asyncio

    from grpclib.client import Channel

    from trio_bridge._wire.generated.grpc.health.v1 import HealthCheckRequest, HealthStub

    async def check() -> str:
        host, port = address.rsplit(":", 1)
        channel = Channel(host, int(port))
        try:
            reply = await HealthStub(channel).check(HealthCheckRequest(service="ready"), timeout=10)
            return reply.status.name
        finally:
            channel.close()

    return asyncio.run(check())


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.real_process
async def test_sighup_reloads_a_worker_in_place_with_the_new_code_and_no_call_fails(tmp_path, certs, code_dir):
    health = f"tcp://127.0.0.2:{free_port('127.0.0.2')}"  # bound again by the new image
    a = _worker(tmp_path, certs, code_dir, tmp_path / "a.log", health=health)
    b = _worker(tmp_path, certs, code_dir, tmp_path / "b.log")
    try:
        async with _pool(certs, a, b) as pool:
            await pool.wait_for_workers(2)
            fds_before = _fds(a.pid)
            callers = _Callers(pool)
            async with trio.open_nursery() as nursery:
                await callers.run(nursery)
                before = len(callers.answers)
                _write_adapter(code_dir, "v2")
                assert a.process is not None
                hup_at = trio.current_time()
                a.process.send_signal(signal.SIGHUP)
                await trio.sleep(0.2)
                a.process.send_signal(signal.SIGHUP)  # while the first is under way: ignored, with a line
                await _until(lambda: any(answer == "v2" for _, answer in callers.answers))
                served_again = min(at for at, answer in callers.answers if answer == "v2") - hup_at
                after = len(callers.answers)
                await _until(lambda: len(callers.answers) >= after + 50)
                callers.stop.set()
            lines = _lines(tmp_path / "a.log")
            print(f"SIGHUP reload: {len(callers.answers) - before} calls during and after it, {len(callers.failures)} "
                  f"failed; the reloaded worker answered with the new code {served_again:.2f} s after the SIGHUP; "
                  f"its fds: {fds_before} before, {_fds(a.pid)} after")
            assert callers.failures == []
            assert a.process.poll() is None  # the same process, in place
            assert [w.pid for w in pool.workers() if w.address == a.address.replace("tcp://", "tcp:")] == [a.pid]
            assert sum("serving versioned_adapter:Versioned" in line for line in lines) == 2
            assert any("the new code imports" in line for line in lines)
            assert any(line.startswith("trio-bridge worker: SIGHUP: ") and "ignored" in line for line in lines)
            assert await pool.execute("version") in ("v1", "v2")  # b still runs the old code: it was not reloaded
            assert _fds(a.pid) <= fds_before + 2  # nothing of the old image crossed the exec
            assert await trio.to_thread.run_sync(_health_status, health.removeprefix("tcp://")) == "SERVING"
    finally:
        a.kill()
        b.kill()


@pytest.mark.real_process
async def test_sighup_with_code_that_does_not_import_says_so_once_and_keeps_serving_the_old(tmp_path, certs, code_dir):
    a = _worker(tmp_path, certs, code_dir, tmp_path / "a.log")
    try:
        async with _pool(certs, a) as pool:
            await pool.wait_for_workers(1)
            (code_dir / "versioned_adapter.py").write_text("def broken(:\n")
            later = time.time() + 10
            os.utime(code_dir / "versioned_adapter.py", (later, later))
            assert a.process is not None
            a.process.send_signal(signal.SIGHUP)
            await _until(lambda: any("does not import" in line for line in _lines(tmp_path / "a.log")))
            a.process.send_signal(signal.SIGHUP)  # the same again: it checks again, and says so again, once
            await _until(lambda: sum("does not import" in line for line in _lines(tmp_path / "a.log")) == 2)
            for _ in range(10):
                assert await pool.execute("version") == "v1"
            lines = [line for line in _lines(tmp_path / "a.log") if "SIGHUP" in line]
            print("SIGHUP with a broken module:", *lines, sep="\n  ")
            assert lines[0].startswith("trio-bridge worker: SIGHUP: the new code does not import, still serving the old: ")
            assert "SyntaxError" in lines[0] and len(lines) == 2
            assert a.process.poll() is None
            assert [w.pid for w in pool.workers()] == [a.pid] and [w.state for w in pool.workers()] == ["ready"]
    finally:
        a.kill()


@pytest.mark.real_process
async def test_a_reload_of_the_only_worker_makes_calls_wait_and_stops_what_its_tools_left_running(tmp_path, certs, code_dir):
    a = _worker(tmp_path, certs, code_dir, tmp_path / "a.log")
    try:
        async with _pool(certs, a) as pool:
            await pool.wait_for_workers(1)
            child = await pool.execute("spawn")
            os.kill(child, 0)  # running, a child of the worker
            _write_adapter(code_dir, "v2")
            assert a.process is not None
            hup_at = trio.current_time()
            a.process.send_signal(signal.SIGHUP)
            await _until(lambda: any("reloading in place" in line for line in _lines(tmp_path / "a.log")))
            assert await pool.execute("version") == "v2"  # made while the only worker reloads: it waits for it
            print(f"SIGHUP reload of the only worker: a call made during it answered "
                  f"{trio.current_time() - hup_at:.2f} s after the SIGHUP")
            with pytest.raises(ProcessLookupError):  # stopped and reaped before the exec
                os.kill(child, 0)
            assert any("stopping 1 process(es) the tools left running" in line for line in _lines(tmp_path / "a.log"))
            assert a.process.poll() is None and [w.pid for w in pool.workers()] == [a.pid]
    finally:
        a.kill()


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.real_process
async def test_a_sighup_while_a_worker_reloads_is_ignored_on_the_asyncio_loop_too(tmp_path, certs, code_dir, monkeypatch):
    # Closing asyncio's loop sets SIGHUP back to its default (which ends the process). A SIGHUP
    # after that and before the exec -- here while a tool's leftover that ignores SIGTERM has its
    # second of grace -- must not end the worker: it reloads, in place.
    monkeypatch.setenv("TRIO_BRIDGE_WORKER_LOOP", "asyncio")
    log = tmp_path / "a.log"
    a = _worker(tmp_path, certs, code_dir, log)
    child = 0
    try:
        async with _pool(certs, a) as pool:
            await pool.wait_for_workers(1)
            child = await pool.execute("stubborn")
            await _until(lambda: _command_name(child) == "sleep")  # (its SIGTERM ignored by then)
            _write_adapter(code_dir, "v2")
            assert a.process is not None
            a.process.send_signal(signal.SIGHUP)
            await _until(lambda: any("stopping 1 process(es) the tools left running" in line for line in _lines(log)))
            a.process.send_signal(signal.SIGHUP)
            await _until(lambda: sum("serving versioned_adapter:Versioned" in line for line in _lines(log)) == 2
                         or a.process.poll() is not None)
            print("a SIGHUP as the worker reloads, on the asyncio loop:", *_lines(log), sep="\n  ")
            assert a.process.poll() is None  # (before: it died of it, -SIGHUP)
            assert await pool.execute("version") == "v2"
            assert [w.pid for w in pool.workers()] == [a.pid]
    finally:
        if child and a.process is not None and a.process.poll() is not None:  # (had it died, its leftover would run on)
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
        a.kill()
