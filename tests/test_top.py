"""``trio-bridge top`` and ``run --top``: the live view of a pool, read from its endpoint's
``/status``; driven in a real terminal (tmux: keys sent, the pane captured)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import trio

from trio_bridge import Lifecycle, Monitoring, ToolError, open_pool
from trio_bridge._top import fetch_status, render

pytestmark = pytest.mark.real_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tmux_path() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.fail("tmux is needed to drive `trio-bridge top` in a terminal: install it (Debian: apt-get install tmux)")
    return path


class Terminal:
    """A detached tmux session of 160x40 running ``command``."""

    def __init__(self, command: list[str]) -> None:
        self.tmux = tmux_path()
        self.name = f"trio-bridge-test-{uuid.uuid4().hex[:8]}"
        env = {**os.environ, "PYTHONPATH": ROOT}
        subprocess.run(
            [self.tmux, "new-session", "-d", "-s", self.name, "-x", "160", "-y", "40", "-c", ROOT, *command],
            check=True, env=env,
        )

    def screen(self) -> str:
        return subprocess.run(
            [self.tmux, "capture-pane", "-p", "-t", self.name], capture_output=True, text=True, check=False,
        ).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run([self.tmux, "send-keys", "-t", self.name, *keys], check=True)

    def alive(self) -> bool:
        return subprocess.run([self.tmux, "has-session", "-t", self.name], capture_output=True, check=False).returncode == 0

    def close(self) -> None:
        subprocess.run([self.tmux, "kill-session", "-t", self.name], capture_output=True, check=False)


async def wait_for_screen(terminal: Terminal, *texts: str, timeout: float = 30.0) -> str:
    with trio.fail_after(timeout):
        while True:
            screen = await trio.to_thread.run_sync(terminal.screen)
            if all(t in screen for t in texts):
                return screen
            await trio.sleep(0.2)


async def test_status_shows_workers_calls_and_recent_errors():
    async with open_pool("tests.adapters:Echo", size=2, monitoring=Monitoring(address="127.0.0.1:0"), lifecycle=Lifecycle(heartbeat_interval=0.2)) as pool:
        assert pool.metrics_address is not None
        assert await pool.execute("add", {"a": 1}) == 3
        with pytest.raises(ToolError):
            await pool.execute("fail", {"message": "the disk is full"})
        status = await trio.to_thread.run_sync(fetch_status, pool.metrics_address)
        assert status["adapter"] == "tests.adapters:Echo"
        assert {w["id"] for w in status["workers"]} == {w.id for w in pool.workers()}
        assert status["statistics"]["calls_completed"] == 1 and status["statistics"]["calls_failed"] == 1
        (error,) = status["recent_errors"]
        assert error["tool"] == "fail" and "the disk is full" in error["error"]
        once = await trio.run_process(
            [sys.executable, "-m", "trio_bridge", "top", pool.metrics_address, "--once"],
            capture_stdout=True, env={**os.environ, "COLUMNS": "200"},
        )
        text = once.stdout.decode()
        assert "tests.adapters:Echo" in text and "workers 2/2 ready" in text
        for w in pool.workers():
            assert w.id in text and str(w.pid) in text
        assert "the disk is full" in text
        # the metrics text is there too, on the same endpoint
        metrics = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(f"http://{pool.metrics_address}/metrics", timeout=5).read().decode()
        )
        assert 'trio_bridge_calls_total{outcome="failed",pool="tests.adapters:Echo",tool="fail"} 1.0' in metrics
    assert "cannot read the pool" in str(render(None, "127.0.0.1:1", "refused"))


async def test_top_cannot_read_a_pool_that_is_not_there():
    result = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", "top", "127.0.0.1:1", "--once"], capture_stdout=True, check=False,
    )
    assert result.returncode == 1
    assert "cannot read the pool" in result.stdout.decode()


async def test_top_reads_a_pool_beyond_loopback_with_its_token(tmp_path):
    token = "a-pool-token-of-32-characters-00"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("TRIO_BRIDGE_TOKEN", "TRIO_BRIDGE_TOKEN_FILE")}
    env["COLUMNS"] = "400"

    async def top(*options: str, extra: dict[str, str] | None = None) -> tuple[int, str]:
        result = await trio.run_process(
            [sys.executable, "-m", "trio_bridge", "top", here, "--once", *options],
            capture_stdout=True, capture_stderr=True, check=False, env={**env, **(extra or {})},
        )
        return result.returncode, (result.stdout + result.stderr).decode()

    # bound on every interface (not loopback), reached through 127.0.0.1
    async with open_pool("tests.adapters:Echo", size=1, monitoring=Monitoring(address="0.0.0.0:0", token=token)) as pool:
        assert pool.metrics_address is not None
        here = f"127.0.0.1:{pool.metrics_address.rpartition(':')[2]}"
        (worker,) = pool.workers()
        code, text = await top("--token-file", str(token_file))
        assert code == 0 and "workers 1/1 ready" in text and str(worker.pid) in text
        code, text = await top(extra={"TRIO_BRIDGE_TOKEN": token})
        assert code == 0 and "workers 1/1 ready" in text
        code, text = await top()
        assert code == 1 and "401 Unauthorized" in text and "--token-file" in text and "TRIO_BRIDGE_TOKEN" in text
        assert str(worker.pid) not in text
        code, text = await top(extra={"TRIO_BRIDGE_TOKEN": "a-wrong-token-of-32-characters-0"})
        assert code == 1 and "refused this token" in text
        token_file.chmod(0o640)  # like ssh with a key: a token others may read is refused
        code, text = await top("--token-file", str(token_file))
        assert code == 2 and "chmod 600" in text and str(worker.pid) not in text


async def test_top_draws_a_live_pool_in_a_terminal_and_quits_on_ctrl_c():
    async with open_pool("tests.adapters:Echo", size=2, monitoring=Monitoring(address="127.0.0.1:0")) as pool:
        assert pool.metrics_address is not None
        terminal = Terminal([sys.executable, "-m", "trio_bridge", "top", pool.metrics_address, "--interval", "0.2"])
        try:
            screen = await wait_for_screen(terminal, "workers 2/2 ready", *(w.id for w in pool.workers()))
            assert "calls 0" in screen
            for _ in range(3):
                await pool.execute("add", {"a": 1})
            await wait_for_screen(terminal, "calls 3 (ok 3")  # it redraws as the pool works
            terminal.keys("C-c")
            with trio.fail_after(10):
                while await trio.to_thread.run_sync(terminal.alive):
                    await trio.sleep(0.1)
        finally:
            terminal.close()


async def test_run_with_top_shows_the_pool_while_the_tool_runs():
    out = f"/tmp/trio-bridge-top-{uuid.uuid4().hex[:8]}.json"
    terminal = Terminal([
        "sh", "-c",
        f"{sys.executable} -m trio_bridge run tests.adapters:Echo sleep --arg seconds=4 --top --json > {out}; sleep 30",
    ])
    try:
        screen = await wait_for_screen(terminal, "trio-bridge top", "in flight 1", "w0")
        assert "tests.adapters:Echo" in screen
        with trio.fail_after(30):
            while not (os.path.exists(out) and os.path.getsize(out)):
                await trio.sleep(0.2)
        time.sleep(0.2)
        with open(out) as f:
            assert json.load(f) == 4.0  # stdout keeps the result alone; the view went to stderr
    finally:
        terminal.close()
        if os.path.exists(out):
            os.remove(out)
