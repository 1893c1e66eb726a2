"""Signal storm: SIGINT/SIGTERM a host that holds an open pool, at random moments, many times.

Each run starts a host program as a subprocess (its own session and process group, SIGINT and
SIGTERM reset to their defaults: a shell starts background jobs with SIGINT ignored) with a pool
of 3 workers of :class:`StormEcho` (``tests.adapters:Echo`` plus a tool that calls a host tool),
keeps calls in flight, sends one signal (or two: ``--double``) at a random moment -- during
start-up too -- and records whether and when the host exited, its exit status, any traceback
other than ``KeyboardInterrupt``, any worker process still alive ``--linger`` seconds after the
host exited, and any ``trio-bridge-*`` directory the run left in the temporary directory or on
``/dev/shm``. A host still running ``--hang-after`` seconds after the signal is a hang: its stacks
are dumped (with py-spy, where installed) and it is killed.

Two host programs:

* ``embed``: ``async with trio_bridge.open_pool(...)`` in a plain ``trio.run`` program, with a
  long sync call (``sleep``), two unary-call loops, a sync and an async stream, and host-tool
  calls (a worker tool waiting on a host tool) in flight, plus calls queued for a free worker.
* ``cli``: ``trio-bridge run benchmarks.signal_storm:StormEcho TOOL`` running one of ``sleep``,
  ``count`` (a stream) or ``ask_host`` (a host-tool call) with ``--host-tools``.

Usage (from the repository root)::

    python -m benchmarks.signal_storm --runs 50                  # both programs, both signals
    python -m benchmarks.signal_storm --runs 20 --mode cli --signals TERM --double 0.5
    python -m benchmarks.signal_storm --json storm.json          # every run's record too

Bounded: each run lasts at most start-up + ``--max-delay`` + ``--hang-after`` seconds.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.adapters import Echo
from trio_bridge import Lifecycle
from trio_bridge.worker import SessionContext, tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER = "benchmarks.signal_storm:StormEcho"
POOL_SIZE = 3
SHM_GLOB = "/dev/shm/trio-bridge-*"


# ---- the workers' adapter and the host tool ----------------------------------------------------


class StormEcho(Echo):
    """``tests.adapters:Echo`` plus a tool that waits on a host tool."""

    @tool
    def ask_host(self, ctx: SessionContext, seconds: float) -> object:
        return ctx.call_host_tool("host_nap", seconds=seconds)


async def host_nap(seconds: float) -> float:
    """A host tool that takes its time (on the host's Trio loop)."""
    import trio

    await trio.sleep(seconds)
    return seconds


# ---- the embedding host program ------------------------------------------------------------------


async def _embedded_host(shutdown_timeout: float) -> None:
    import trio

    import trio_bridge

    open_pool = trio_bridge.open_pool  # imported on first use: still Python's imports, not judged
    print(f"HOST {os.getpid()}", flush=True)
    async with open_pool(ADAPTER, size=POOL_SIZE, lifecycle=Lifecycle(shutdown_timeout=shutdown_timeout)) as pool:
        pool.host_tool(host_nap)
        print("WORKERS " + " ".join(str(w.pid) for w in pool.workers()), flush=True)

        async def long_sync() -> None:
            await pool.execute("sleep", {"seconds": 600})

        async def unary(tool: str, arguments: dict[str, Any]) -> None:
            while True:
                await pool.execute(tool, arguments)

        async def stream(tool: str, arguments: dict[str, Any]) -> None:
            while True:
                async with pool.stream(tool, arguments) as chunks:
                    async for _ in chunks:
                        pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_sync)
            nursery.start_soon(stream, "count", {"n": 100_000, "delay": 0.002})
            nursery.start_soon(stream, "async_count", {"n": 200, "delay": 0.001})
            nursery.start_soon(unary, "add", {"a": 1, "b": 2})
            nursery.start_soon(unary, "echo", {"value": {"x": list(range(50))}})
            nursery.start_soon(unary, "ask_host", {"seconds": 0.05})
            await trio.sleep(0.2)
            print("BUSY", flush=True)


def _format_task_tree() -> str:
    """Every Trio task with the stack it is parked on (for a hung host)."""
    import trio

    lines: list[str] = []

    def frames(coro: Any) -> list[str]:
        out = []
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                out.append(f"{frame.f_code.co_name} ({os.path.relpath(frame.f_code.co_filename, ROOT)}:{frame.f_lineno})")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None) or getattr(coro, "ag_await", None)
        return out

    def walk(task: Any, depth: int) -> None:
        lines.append("  " * depth + f"task {task.name}")
        for frame in frames(task.coro):
            lines.append("  " * depth + "    " + frame)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)


async def _dump_tasks_on_sigusr1() -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        async for _ in signals:
            print("TASK TREE\n" + _format_task_tree(), file=sys.stderr, flush=True)


def host_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="signal_storm host")
    parser.add_argument("--shutdown-timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    import trio

    async def main() -> None:
        # A system task: `kill -USR1` prints the task tree, e.g. of a hung shutdown.
        trio.lowlevel.spawn_system_task(_dump_tasks_on_sigusr1)
        await _embedded_host(args.shutdown_timeout)

    trio.run(main)


# ---- the storm -------------------------------------------------------------------------------------

CLI_CALLS = {
    "sleep": ["sleep", "--arg", "seconds=600"],
    "count": ["count", "--arg", "n=100000", "--arg", "delay=0.002"],
    "ask_host": ["ask_host", "--arg", "seconds=600"],
}


@dataclass
class Run:
    index: int
    mode: str
    signal: str
    delay: float
    double: bool
    detail: str = ""
    phase: str = "starting"  # when the signal was sent: importing (embed only), starting, ready, busy
    exited: bool = False
    hang: bool = False
    exit_after: float | None = None  # seconds from the (first) signal to the exit
    returncode: int | None = None
    code_ok: bool = False
    bad_exceptions: list[str] = field(default_factory=list)
    stderr_tail: str = ""
    procs_seen: list[int] = field(default_factory=list)
    procs_left: list[int] = field(default_factory=list)
    files_left: list[str] = field(default_factory=list)
    stacks: str = ""


_EXC_LINE = re.compile(r"^[\s|+\-]*((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Group|Warning|Cancelled))\b(?::|$| \()")


def exception_names(stderr: str) -> list[str]:
    """Names of the exceptions in the tracebacks (and warnings) that ``stderr`` shows."""
    names = []
    for line in stderr.splitlines():
        m = _EXC_LINE.match(line)
        if m:
            names.append(m.group(1))
    return names


def bad_exceptions(stderr: str) -> list[str]:
    """Exceptions other than the interrupt itself (group wrappers that hold only it are fine)."""
    allowed = {"KeyboardInterrupt", "SystemExit", "BaseExceptionGroup", "ExceptionGroup"}
    names = exception_names(stderr)
    bad = [n for n in names if n.rsplit(".", 1)[-1] not in allowed]
    if not bad and any(n.endswith("Group") for n in names) and "KeyboardInterrupt" not in names:
        bad.append("ExceptionGroup without an interrupt")
    return bad


def expected_codes(mode: str, signum: int) -> set[int]:
    # -N: killed by the signal (the shell shows 128+N); 128+N: exited with that status.
    return {-signum, 128 + signum}


class Watcher:
    """Reads a host's stdout and stderr and collects its worker processes while it runs."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        import psutil

        self.process = process
        self.stdout: list[tuple[float, str]] = []
        self.stderr: list[str] = []
        self.workers: dict[int, Any] = {}  # descendant pid -> psutil.Process (kept: pid reuse is detected)
        self.shm_dirs: set[str] = set()
        self._psutil = psutil
        self._threads = [
            threading.Thread(target=self._read, args=(process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(process.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()
        try:
            self._host = psutil.Process(process.pid)
        except psutil.Error:
            self._host = None

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if is_stdout:
                self.stdout.append((time.monotonic(), line))
            else:
                self.stderr.append(line)

    def poll_children(self) -> None:
        if self._host is None:
            return
        try:
            children = self._host.children(recursive=True)
        except self._psutil.Error:
            return
        for child in children:
            if child.pid in self.workers:
                continue
            try:
                # Every descendant counts (workers, the janitor, tools' processes): none may outlive the run.
                self.workers[child.pid] = child
                shm = child.environ().get("TRIO_BRIDGE_SHM_DIR")
                if shm:
                    self.shm_dirs.add(shm)
            except self._psutil.Error:
                continue

    def has_line(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for _, line in self.stdout)

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=2)


def _cmdline(process: Any) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # gone, or a zombie
        return []


def dump_stacks(pid: int) -> str:
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        return "(py-spy not installed: no stacks)"
    try:
        out = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=20)
        return out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy failed: {exc})"


def one_run(run: Run, args: argparse.Namespace, rng: random.Random) -> tuple[Run, dict[str, Any]]:
    signum = signal.SIGINT if run.signal == "INT" else signal.SIGTERM
    tmpdir = tempfile.mkdtemp(prefix=f"storm{run.index}-")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, env.get("PYTHONPATH", "")] if p)
    env["TMPDIR"] = tmpdir  # the pool's socket directory lands here: leftovers are this run's
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("COLUMNS", "200")
    if run.mode == "embed":
        command = [sys.executable, "-m", "benchmarks.signal_storm", "host", "--shutdown-timeout", str(args.shutdown_timeout)]
    else:
        run.detail = rng.choice(sorted(CLI_CALLS))
        command = [
            sys.executable, "-m", "trio_bridge", "run", ADAPTER, *CLI_CALLS[run.detail],
            "--workers", str(POOL_SIZE), "--host-tools", "benchmarks.signal_storm:host_nap",
            "--shutdown-timeout", str(args.shutdown_timeout),
        ]

    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    shm_before = set(glob.glob(SHM_GLOB))
    spawned = time.monotonic()
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, preexec_fn=child_setup,
    )
    watcher = Watcher(process)
    fire_at = spawned + run.delay
    while time.monotonic() < fire_at and process.poll() is None:
        watcher.poll_children()
        time.sleep(0.02)
    watcher.poll_children()
    workers = sum("trio_bridge.worker" in " ".join(_cmdline(p)) for p in watcher.workers.values())
    run.phase = "busy" if watcher.has_line("BUSY") else "ready" if watcher.has_line("WORKERS") or (
        run.mode == "cli" and workers >= POOL_SIZE) else "starting"
    if run.mode == "embed" and not watcher.has_line("HOST"):
        run.phase = "importing"  # still in Python's imports: before any code of ours or the program's
    if process.poll() is not None:
        run.phase = "exited-before-signal"
    sent = time.monotonic()
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        pass
    second_sent = False
    deadline = sent + args.hang_after
    while process.poll() is None and time.monotonic() < deadline:
        watcher.poll_children()
        if run.double and not second_sent and time.monotonic() >= sent + args.double_gap:
            second_sent = True
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    if process.poll() is None:
        run.hang = True
        if run.mode == "embed":
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)  # the host prints its Trio task tree
            time.sleep(1.0)
        run.stacks = dump_stacks(process.pid)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    else:
        run.exited = True
        run.exit_after = round(time.monotonic() - sent, 3)
    run.returncode = process.returncode
    run.code_ok = run.exited and process.returncode in expected_codes(run.mode, signum)
    watcher.join()
    stderr = "\n".join(watcher.stderr)
    # A signal during the program's imports gets Python's own handling (e.g. a RuntimeError
    # "Error calling __set_name__" wrapping the KeyboardInterrupt): not judged.
    run.bad_exceptions = [] if run.phase == "importing" else bad_exceptions(stderr)
    if run.bad_exceptions or run.hang or not run.code_ok:
        run.stderr_tail = "\n".join(watcher.stderr[-400 if run.hang else -40:])
    run.procs_seen = sorted(watcher.workers)
    pending = {
        "run": run, "due": time.monotonic() + args.linger, "workers": watcher.workers, "tmpdir": tmpdir,
        # Only this host's (the name carries its pid): other programs may run pools meanwhile.
        "shm_new": set(watcher.shm_dirs) | {
            d for d in set(glob.glob(SHM_GLOB)) - shm_before if os.path.basename(d).startswith(f"trio-bridge-{process.pid}-")
        },
    }
    return run, pending


def finish_check(pending: dict[str, Any]) -> None:
    """``--linger`` seconds after the host exited: which workers still live, which files remain."""
    import psutil

    run: Run = pending["run"]
    left = []
    for pid, proc in pending["workers"].items():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
                proc.kill()  # clean up after the check so the storm does not pile up processes
        except psutil.Error:
            pass
    run.procs_left = sorted(left)
    files = glob.glob(os.path.join(pending["tmpdir"], "trio-bridge-*"))
    files += [d for d in pending["shm_new"] if os.path.exists(d)]
    run.files_left = sorted(files)
    for path in files:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(pending["tmpdir"], ignore_errors=True)


def summarize(runs: list[Run], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"signal storm: {len(runs)} runs, shutdown_timeout {args.shutdown_timeout:g} s, "
                        f"bound {args.shutdown_timeout + 1:g} s")
    for column in ("program", "signal", "runs", "exited", "hangs", "within bound", "median s", "max s",
                   "exit codes", "wrong code", "tracebacks", "procs left", "dirs left"):
        table.add_column(column, justify="right" if column not in ("program", "signal", "exit codes") else "left")
    groups: dict[tuple[str, str], list[Run]] = collections.defaultdict(list)
    for r in runs:
        groups[(r.mode, r.signal + ("x2" if r.double else ""))].append(r)
    groups[("all", "")] = runs
    bound = args.shutdown_timeout + 1
    for (mode, sig), rs in groups.items():
        times = [r.exit_after for r in rs if r.exit_after is not None]
        codes = collections.Counter(r.returncode for r in rs)
        table.add_row(
            mode, sig, str(len(rs)), str(sum(r.exited for r in rs)), str(sum(r.hang for r in rs)),
            str(sum(r.exited and r.exit_after <= bound for r in rs)),  # type: ignore[operator]
            f"{statistics.median(times):.2f}" if times else "-", f"{max(times):.2f}" if times else "-",
            " ".join(f"{c}x{n}" for c, n in sorted(codes.items(), key=lambda kv: str(kv[0]))),
            str(sum(not r.code_ok for r in rs)), str(sum(bool(r.bad_exceptions) for r in rs)),
            str(sum(len(r.procs_left) for r in rs)), str(sum(len(r.files_left) for r in rs)),
        )
    console.print(table)
    phases = collections.Counter((r.phase, r.hang) for r in runs)
    console.print("signal sent while: " + ", ".join(
        f"{phase}{' (hung)' if hang else ''} {n}" for (phase, hang), n in sorted(phases.items())))
    for r in runs:
        problems = []
        if r.hang:
            problems.append("HANG")
        elif r.exit_after is not None and r.exit_after > bound:
            problems.append(f"slow {r.exit_after:.2f} s")
        if r.exited and not r.code_ok:
            problems.append(f"exit code {r.returncode}")
        if r.bad_exceptions:
            problems.append("traceback: " + ", ".join(sorted(set(r.bad_exceptions))))
        if r.procs_left:
            problems.append(f"processes left {r.procs_left}")
        if r.files_left:
            problems.append(f"files left {r.files_left}")
        if problems:
            console.print(f"[bold]run {r.index}[/] {r.mode} {r.detail} SIG{r.signal}{' x2' if r.double else ''} "
                          f"at {r.delay:.2f} s ({r.phase}): " + "; ".join(problems), highlight=False)
            if args.verbose and (r.stderr_tail or r.stacks):
                console.print(r.stderr_tail, markup=False, highlight=False)
                console.print(r.stacks, markup=False, highlight=False)


def storm(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.signal_storm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--mode", choices=["embed", "cli", "both"], default="both")
    parser.add_argument("--signals", default="INT,TERM", help="INT, TERM or INT,TERM (alternating)")
    parser.add_argument("--min-delay", type=float, default=0.0, help="earliest signal, seconds after the spawn")
    parser.add_argument("--max-delay", type=float, default=4.0, help="latest signal, seconds after the spawn")
    parser.add_argument("--double", type=float, default=0.0, help="fraction of runs that get a second signal")
    parser.add_argument("--double-gap", type=float, default=0.3, help="seconds between the two signals")
    parser.add_argument("--shutdown-timeout", type=float, default=2.0)
    parser.add_argument("--hang-after", type=float, default=15.0, help="seconds after the signal that count as a hang")
    parser.add_argument("--linger", type=float, default=5.0, help="seconds after the exit to look for leftovers")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", default=None, help="write every run's record to this file")
    parser.add_argument("--verbose", "-v", action="store_true", help="print stderr tails and stacks of bad runs")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    modes = ["embed", "cli"] if args.mode == "both" else [args.mode]
    signals = [s.strip().upper().removeprefix("SIG") for s in args.signals.split(",") if s.strip()]
    print(f"seed {seed}: {args.runs} runs of {'+'.join(modes)} with SIG{'/SIG'.join(signals)}", flush=True)
    runs: list[Run] = []
    pending: list[dict[str, Any]] = []
    for i in range(args.runs):
        run = Run(
            index=i, mode=modes[i % len(modes)], signal=signals[(i // len(modes)) % len(signals)],
            delay=round(rng.uniform(args.min_delay, args.max_delay), 3), double=rng.random() < args.double,
        )
        run, check = one_run(run, args, rng)
        runs.append(run)
        pending.append(check)
        now = time.monotonic()
        for check in [c for c in pending if c["due"] <= now]:
            finish_check(check)
            pending.remove(check)
        status = "HANG" if run.hang else f"exit {run.returncode} after {run.exit_after:.2f} s"
        print(f"run {i:3d} {run.mode:5s} {run.detail:8s} SIG{run.signal}{'x2' if run.double else '  '} "
              f"at {run.delay:5.2f} s ({run.phase:8s}): {status}"
              f"{'  traceback ' + ','.join(sorted(set(run.bad_exceptions))) if run.bad_exceptions else ''}", flush=True)
    for check in pending:
        time.sleep(max(0.0, check["due"] - time.monotonic()))
        finish_check(check)
    summarize(runs, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": seed, "args": vars(args), "runs": [asdict(r) for r in runs]}, f, indent=1)
    ok = all(r.exited and r.code_ok and not r.bad_exceptions and not r.procs_left and not r.files_left
             and r.exit_after is not None and r.exit_after <= args.shutdown_timeout + 1 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["host"]:
        host_main(sys.argv[2:])
    else:
        sys.exit(storm(sys.argv[1:]))
