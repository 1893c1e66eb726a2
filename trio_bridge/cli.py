"""The `trio-bridge` command: `run` a tool (or the built-in example), list `tools`, serve them to an agent (`mcp`), serve a remote `worker`, watch a running pool (`top`), check this machine (`doctor`).

Every option that configures a deployment can also come from a `TRIO_BRIDGE_*` environment
variable (named in each command's help); an option given on the command line wins.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.pretty import pprint
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from trio_bridge import _cli_signals
from trio_bridge._errors import TrioBridgeError
from trio_bridge._host._cpus import usable_cpus
from trio_bridge._strict_json import strict_json
from trio_bridge._version import __version__
from trio_bridge._wire.contract import KEEPALIVE


class _FlagsTakeNoValue:
    """Show a flag (`--json`, `--help`) as a flag: typer's help gives every option a type
    column, `<bool>` for flags, as if they took a value."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # typer shows the metavar, when set, instead of the type
        return params


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


# The interface is the `trio-bridge` command, so typer's app and rich's consoles are private here
# (`__main__` runs `main()`; tests invoke `_app`). Help text is Markdown: `code` shows without its
# backticks, paragraphs reflow to the terminal.
_app: typer.Typer = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=False, rich_markup_mode="markdown", help=__doc__)
_console: Console = Console()
_err_console: Console = Console(stderr=True, soft_wrap=True)  # error text stays copy-pasteable

EXAMPLE_ADAPTER = "trio_bridge.examples.digits:Digits"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
EXIT_TERMINATED = 143   # 128 + SIGTERM

ADAPTER_HELP = "package.module:ClassName, importable from the current directory"
JSON_HELP = "print one JSON document on stdout (for jq and scripts) instead of the rich output"


def main() -> None:
    """Run the `trio-bridge` command on this process's command line (what `__main__` runs)."""
    _app()


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"trio-bridge {__version__}")
        raise typer.Exit()


@_app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version, help="print trio-bridge's version and exit")] = False,
) -> None:
    pass  # (the commands' options are their own; --version is handled by its callback)


@_app.command(cls=_Command)
def run(
    adapter: Annotated[str | None, typer.Argument(help=f"{ADAPTER_HELP} (default: the built-in examples)", show_default=False)] = None,
    tool: Annotated[str | None, typer.Argument(help="the tool to run", show_default=False)] = None,
    arg: Annotated[list[str] | None, typer.Option("--arg", "-a", help="an argument as key=value (repeatable); the value is read as JSON where it parses (`3`, `true`, `[1, 2]`), else as text", show_default=False)] = None,
    args_json: Annotated[str | None, typer.Option("--args", help="arguments as one JSON object, e.g. `'{\"b\": 2}'` (`--arg` overrides its keys)", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help=f"{JSON_HELP}: the result (a streaming tool's chunks as a list, at its end); arrays as lists, bytes as base64 text, NaN and infinities as the strings `NaN`, `Infinity`, `-Infinity`")] = False,
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1, envvar="TRIO_BRIDGE_WORKERS", help="worker processes (default: one per usable CPU for the examples, else 1)", show_default=False)] = None,
    example: Annotated[str, typer.Option("--example", "-e", help="the built-in example to run without ADAPTER: digits, sweep, tools or cluster")] = "digits",
    host_tools: Annotated[str | None, typer.Option("--host-tools", envvar="TRIO_BRIDGE_HOST_TOOLS", help="host tools for the workers: module:function,...", show_default=False)] = None,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", min=0.0, envvar="TRIO_BRIDGE_SHUTDOWN_TIMEOUT", help="seconds workers get to finish their calls on exit or Ctrl-C")] = 5.0,
    top: Annotated[bool, typer.Option("--top", help="show the pool live on stderr while the tool runs (as `trio-bridge top`)")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="on an error, print the workers' stderr (a traceback) too")] = False,
) -> None:
    """Run a tool of an adapter and print its result (or its chunks as they arrive).

    `trio-bridge run ADAPTER TOOL --arg a=1 --args '{"b": 2}'`; with `--json` the output is one
    JSON document: `trio-bridge run ADAPTER TOOL --json | jq .`

    With no arguments, run the built-in example: train a digits classifier in a worker, streaming
    its progress, then classify the held-out images across all workers. `--example sweep` runs
    the session-variables example: a Trio optimizer sweeps `temperature` while workers use it.
    `--example tools`: worker tools calling host tools and each other. `--example cluster`: two
    host processes sharing a session on Redis, one of them served by a remote worker over TLS.

    ADAPTER is checked before any worker starts: a path that is not `package.module:ClassName`,
    or whose module cannot be found from the current directory or PYTHONPATH, is a usage error.

    Exit status: 0; 1 when the tool or the pool failed (the error on stderr: one line, and the
    worker's own output with `--verbose`); 2 for a usage error; 130 after Ctrl-C, 143 after
    SIGTERM (once the pool has shut down).
    """

    if adapter is None:
        if as_json or top:
            option = "--json prints a tool's result" if as_json else "--top shows the pool while a tool runs"
            raise typer.BadParameter(f"{option}: give ADAPTER and TOOL (the examples print rich output only)")
        if example not in EXAMPLES:
            raise typer.BadParameter(f"--example must be one of {', '.join(EXAMPLES)}, not {example!r}")
        main: Any = lambda: EXAMPLES[example](workers or usable_cpus())  # noqa: E731
    else:
        _check_adapter(adapter)
        if tool is None:
            raise typer.BadParameter("give the TOOL to run after the ADAPTER (see `trio-bridge tools ADAPTER`)")
        functions = _load_host_tools(host_tools)
        main = lambda: _run_tool(  # noqa: E731
            adapter, tool, arg or [], args_json, workers or 1, functions, shutdown_timeout, as_json=as_json, top=top,
        )
    _run_pool_command(main, verbose=verbose)


def _print_error(text: str) -> None:
    """``error: text`` on stderr, ``text`` escaped: an error may hold brackets, such as
    ``pip install 'trio-bridge[mcp]'``, which rich would read as markup."""
    _err_console.print(f"[red]error[/]: {escape(text)}", markup=True, highlight=False)


def _check_adapter(adapter: str) -> None:
    """Exit with status 2 and one line if ``adapter`` is not a path whose module can be found
    (its module is not run here: the workers import it)."""
    from trio_bridge.worker._adapter import AdapterLoadError, check_adapter_path

    _import_from_cwd()
    try:
        check_adapter_path(adapter)
    except AdapterLoadError as exc:
        _print_error(str(exc))
        raise typer.Exit(2) from None


def _brief(exc: TrioBridgeError) -> str:
    """A worker's error in brief: its first line, and the last line of the worker's stderr (the
    exception, where a traceback ended) when the first does not say it already."""
    from trio_bridge._errors import WorkerError

    text = str(exc)
    if not isinstance(exc, WorkerError) or not exc.stderr_tail.strip():
        return text
    first = text.splitlines()[0]
    lines = exc.stderr_tail.strip().splitlines()
    last = lines[-1].strip()
    if last.removeprefix("trio-bridge worker: ") in first:
        return first if len(lines) == 1 else f"{first}\n  (--verbose: the worker's stderr)"
    return f"{first}\n  the worker's last line: {last}\n  (--verbose: the worker's stderr)"


def _run_pool_command(main: Any, *, verbose: bool = True) -> None:
    """Run ``main`` (an async function that opens a pool) under Trio, and turn how it ended into
    the exit status: 0; 1 for a trio-bridge error (said on stderr: in brief unless
    ``verbose``); 130 / 143 after SIGINT / SIGTERM, once the pool has shut down."""
    received = _cli_signals.received  # those that came during start-up too (see trio_bridge.__main__)
    previous = _cli_signals.remember_signals()  # until the exit status is decided: see _run_until_signal
    try:
        try:
            _run_until_signal(main, received)
        except KeyboardInterrupt:  # before our handlers were installed (or off the main thread)
            received.append(signal.SIGINT)
        except TrioBridgeError as exc:
            if not received:
                _print_error(f"{type(exc).__name__}: {exc if verbose else _brief(exc)}")
                raise typer.Exit(1) from None
        if received:
            interrupted = received[0] == signal.SIGINT
            _err_console.print(f"[yellow]{'interrupted' if interrupted else 'terminated'}[/]: the pool was shut down")
            raise typer.Exit(EXIT_INTERRUPTED if interrupted else EXIT_TERMINATED)
    finally:
        _restore_signals(previous)


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _run_until_signal(main: Any, received: list[int]) -> None:
    """``trio.run(main)``, with SIGINT and SIGTERM as a clean stop, appending each signal to
    ``received``.

    The first signal cancels ``main``: the pools it opened drain (each worker gets the pool's
    ``shutdown_timeout`` to finish its calls), then stop. A second signal skips the drain: the
    workers are killed, and the pools finish closing at once. Either way every pool closes in
    order -- no worker, socket or shared-memory file is left behind -- and no exception is
    raised at a random point (Trio's default ``KeyboardInterrupt`` can land in any task). An
    error ``main`` raised because it was cancelled is not reported. Off the main thread (where
    Python cannot set signal handlers) this is plain ``trio.run``.
    """
    import trio

    if threading.current_thread() is not threading.main_thread():
        trio.run(main)
        return

    async def supervised() -> None:
        body = trio.CancelScope()
        ended = False
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def listen() -> None:
                if received:  # it came before the receiver was open
                    body.cancel()
                try:
                    async for signum in signals:
                        received.append(signum)
                        if len(received) == 1:
                            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                            _err_console.print(
                                f"[yellow]{name}[/]: shutting the pool down (Ctrl-C again: stop the workers at once)"
                            )
                            body.cancel()
                        else:
                            _kill_workers()
                except RuntimeError:
                    # main() ended and closed the receiver under us (a system task that raised
                    # would turn main()'s own error into a TrioInternalError)
                    if not ended:
                        raise

            # A system task, not a nursery: exceptions from main() reach us unwrapped.
            trio.lowlevel.spawn_system_task(listen, name="trio-bridge signal listener")
            try:
                with body:
                    await main()
            finally:
                ended = True

    if received:  # before we got here: nothing was started
        return
    try:
        trio.run(supervised)
    except BaseException as exc:
        if not (received and _is_cancellation_fallout(exc)):
            raise


def _is_cancellation_fallout(exc: BaseException) -> bool:
    """After our cancel: errors that are its consequence (a pool closing under a call), not news."""
    from trio_bridge import TrioBridgeError

    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation_fallout(e) for e in exc.exceptions)
    return isinstance(exc, (TrioBridgeError, KeyboardInterrupt))


def _kill_workers() -> None:
    """SIGKILL this process's worker processes (and what their tools started: each worker leads
    its own process group), so pools skip their drain. Linux: children are found in /proc."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"trio_bridge.worker" not in command and b"trio_bridge.worker._forkserver" not in command:
            continue  # (a fork server's workers die with it: their death signal)
        pid = int(entry)
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@_app.command(cls=_Command)
def tools(
    adapter: Annotated[str, typer.Argument(help=ADAPTER_HELP, envvar="TRIO_BRIDGE_ADAPTER", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List an adapter's tools: parameters (with types and defaults), streaming flag, description.

    The adapter is imported here but its `setup()` is not run. With `--json`:
    `{"adapter": ..., "tools": [{"name", "description", "streaming", "parameters": [{"name",
    "type", "required", "default", "description"}]}]}`, tools sorted by name (`type` is `""`
    where the parameter has no annotation, `default` is `null` where it is required).
    """
    from trio_bridge._host._tools import tool_info
    from trio_bridge._wire.tool_spec import tool_spec
    from trio_bridge.worker._adapter import AdapterLoadError, collect_tools, load_adapter_class

    _import_from_cwd()
    try:
        cls = load_adapter_class(adapter)
    except AdapterLoadError as exc:
        _print_error(str(exc))
        raise typer.Exit(1) from None
    infos = [tool_info(tool_spec(d)) for d in sorted(collect_tools(cls()).values(), key=lambda d: d.name)]
    if as_json:
        _print_json({
            "adapter": adapter,
            "tools": [
                {
                    "name": info.name, "description": info.description, "streaming": info.streaming,
                    "parameters": [
                        {"name": p.name, "type": p.type, "required": p.required, "default": p.default, "description": p.description}
                        for p in info.parameters
                    ],
                }
                for info in infos
            ],
        })
        return
    _console.print(Text(f"tools of {adapter}", style="bold"))
    for info in infos:
        _console.print()
        heading = Text(info.name, style="bold")
        heading.append(f"({', '.join(p.name for p in info.parameters)})")
        if info.streaming:
            heading.append("  streaming", style="cyan")
        _console.print(heading)
        if info.description:
            width = max(_console.width - 4, 20)
            _console.print(textwrap.indent(textwrap.fill(_plain(info.description), width), "    "), highlight=False, markup=False, soft_wrap=True)
        if info.parameters:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(no_wrap=True)
            grid.add_column(ratio=1)  # the description wraps to the terminal's width, never cut
            for p in info.parameters:
                kind = p.type or "any"
                grid.add_row(p.name, kind if p.required else f"{kind} = {p.default!r}", _plain(p.description))
            _console.print(Padding(grid, (0, 0, 0, 4), expand=False))


def _plain(text: str) -> str:
    """A docstring's reST inline markup as plain text: ``code``, :role:`target` (its last
    part where it starts with ~), `text`, **strong**, *emphasis*."""
    text = re.sub(r":[\w.+-]+(?::[\w.+-]+)*:`(~?)([^`]*)`", lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_?", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)


@_app.command(cls=_Command)
def mcp(
    adapter: Annotated[str, typer.Argument(help=ADAPTER_HELP, envvar="TRIO_BRIDGE_ADAPTER", show_default=False)],
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, envvar="TRIO_BRIDGE_WORKERS", help="worker processes")] = 1,
    host_tools: Annotated[list[str] | None, typer.Option("--host-tools", envvar="TRIO_BRIDGE_HOST_TOOLS", help="host tools to serve too: module:function (repeatable, or comma-separated)", show_default=False)] = None,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout", min=0.0, envvar="TRIO_BRIDGE_SHUTDOWN_TIMEOUT", help="seconds workers get to finish their calls on exit or Ctrl-C")] = 5.0,
) -> None:
    """Serve ADAPTER's tools (and `--host-tools`) to an agent: a Model Context Protocol server on stdio.

    An MCP client starts it (`"command": "trio-bridge", "args": ["mcp", "my_package.models:Model"]`),
    lists the tools with their arguments' JSON Schemas, and calls them; results come back as
    JSON text, a tool's error as an error result. Needs `pip install 'trio-bridge[mcp]'`.
    stdout carries the protocol only; messages go to stderr.

    SIGHUP reloads the adapter's code (`pool.reload()`: each worker replaced in turn, no call
    fails); a reload whose code does not import is reported on stderr, and the old workers serve on.

    Exit status: 0 once the client closed stdin (the pool closed in order); 1 when the pool
    failed to start; 130 after Ctrl-C, 143 after SIGTERM (once the pool has shut down).
    """
    try:
        from trio_bridge.mcp import serve_stdio
    except ImportError as exc:
        _print_error(str(exc))
        raise typer.Exit(1) from None
    _import_from_cwd()
    functions = _load_host_tools(",".join(host_tools or []))

    async def main() -> None:
        import trio

        import trio_bridge

        async with trio_bridge.open_pool(
            adapter, size=workers, lifecycle=trio_bridge.Lifecycle(shutdown_timeout=shutdown_timeout)
        ) as pool:
            for function in functions:
                pool.host_tool(function)
            _err_console.print(f"trio-bridge mcp: serving the tools of {adapter} on stdio ({workers} worker(s))")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_reload_on_sighup, pool, "trio-bridge mcp")
                await serve_stdio(pool)
                nursery.cancel_scope.cancel()
        _err_console.print("trio-bridge mcp: the client closed stdin; the pool is closed")

    _run_pool_command(main)


@_app.command(cls=_Command)
def worker(
    adapter: Annotated[str, typer.Argument(help=ADAPTER_HELP, envvar="TRIO_BRIDGE_ADAPTER", show_default=False)],
    listen: Annotated[str, typer.Option("--listen", envvar="TRIO_BRIDGE_LISTEN", help="tcp://HOST:PORT to serve hosts on (port 0: any free port)", show_default=False)],
    token_file: Annotated[str, typer.Option("--token-file", envvar="TRIO_BRIDGE_TOKEN_FILE", help="a file holding the token shared with the hosts (at least 16 characters; owner-only: chmod 600)", show_default=False)],
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", envvar="TRIO_BRIDGE_TLS_CERT", help="this worker's certificate (PEM)", show_default=False)] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", envvar="TRIO_BRIDGE_TLS_KEY", help="its private key (PEM)", show_default=False)] = None,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", envvar="TRIO_BRIDGE_TLS_CA", help="the CA of the hosts' certificates (mutual TLS)", show_default=False)] = None,
    insecure: Annotated[bool, typer.Option("--insecure", envvar="TRIO_BRIDGE_INSECURE", help="allow plain TCP (no TLS) beyond loopback; the token is needed all the same")] = False,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, envvar="TRIO_BRIDGE_CONCURRENCY", help="calls served at once")] = 1,
    join: Annotated[str | None, typer.Option("--join", envvar="TRIO_BRIDGE_JOIN", help="tcp://HOST:PORT of a host's `listen=` to offer this worker to", show_default=False)] = None,
    advertise: Annotated[str | None, typer.Option("--advertise", envvar="TRIO_BRIDGE_ADVERTISE", help="HOST:PORT where hosts reach this worker", show_default=False)] = None,
    keepalive: Annotated[float, typer.Option("--keepalive", min=0.1, envvar="TRIO_BRIDGE_KEEPALIVE", help="seconds between pings to each host with calls open: a host that answers none for as long again (its machine died, a partition) is taken for gone, and its calls are cancelled")] = KEEPALIVE,
    health: Annotated[str | None, typer.Option("--health", envvar="TRIO_BRIDGE_HEALTH", help="tcp://HOST:PORT to serve grpc.health.v1 alone on, in plain TCP without the token, for an orchestrator's probes (service '': alive; 'ready': set up); it reveals only those statuses (default: none)", show_default=False)] = None,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=0.0, envvar="TRIO_BRIDGE_DRAIN_TIMEOUT", help="seconds running calls get to finish after SIGTERM, or before a SIGHUP reload, which refuse new ones (0: no limit); a second SIGTERM ends it at once")] = 5.0,
) -> None:
    """Serve ADAPTER to hosts on other machines.

    Hosts list it in `open_pool(..., remote=RemoteWorkers(addresses=["tcp://THIS-MACHINE:PORT"],
    token=..., tls=...))`. With `--join`, it also offers itself to that host (every few seconds: a restarted
    host finds it again), which dials it back at `--advertise` (default: the `--listen`
    address). A host gone silently has its calls cancelled within twice `--keepalive`, so their
    slots are free when it, or another host, comes back. Runs until Ctrl-C or SIGTERM; a host
    that closes its pool detaches, and the next one may attach. Both directions check the token; with `--tls-cert` and `--tls-key` both are
    TLS (mutual with `--tls-ca`). The token file must be its owner's only (`chmod 600 FILE`),
    as ssh asks of a key; plain TCP beyond loopback needs `--insecure`. `--health` serves the
    Kubernetes `grpc:` probes (see deploy/ in the repository); SIGTERM drains (`--drain-timeout`):
    it refuses calls it has not started, and the hosts run them on other workers.

    SIGHUP reloads the adapter's code without a new process: if the code on disk imports (checked
    in a fresh interpreter first; if not, one line on stderr, and it keeps serving the old), it
    drains as for SIGTERM and executes itself again in place (same PID: systemd's `ExecReload=kill
    -HUP $MAINPID`); the hosts' slots dial it again. A caller sees nothing of either.
    """
    import asyncio

    from trio_bridge._host._options import tcp_address
    from trio_bridge._wire.auth import read_token_file
    from trio_bridge._wire.contract import SECRET_ENV
    from trio_bridge._wire.listeners import MIN_TOKEN, beyond_loopback
    from trio_bridge._wire.tls import TLSConfig
    from trio_bridge.worker._reload import Reload
    from trio_bridge.worker._server import loop_factory, parse_arguments, serve

    _import_from_cwd()
    try:
        token = read_token_file(token_file)
    except TrioBridgeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token-file") from None
    if len(token) < MIN_TOKEN:
        raise typer.BadParameter(
            f"the token in {token_file} has {len(token)} characters, fewer than {MIN_TOKEN}: write a longer one "
            "there and give the hosts the same (RemoteWorkers(token=...)), e.g. secrets.token_urlsafe(32)",
            param_hint="--token-file",
        )
    try:
        if (tls_cert is None) != (tls_key is None):
            raise TrioBridgeError("give both --tls-cert and --tls-key, or neither")
        tls = TLSConfig(tls_cert, tls_key, tls_ca) if tls_cert is not None and tls_key is not None else None
        addresses = [tcp_address("--listen", listen), *([tcp_address("--join", join)] if join else [])]
        health_address = tcp_address("--health", health) if health else None
        exposed = [address for address in addresses if beyond_loopback(address)]
        if tls is None and exposed and not insecure:
            raise TrioBridgeError(
                f"plain TCP beyond this machine ({', '.join(exposed)}), where the token crosses the network in clear: "
                "give --tls-cert and --tls-key, or --insecure"
            )
    except (OSError, TrioBridgeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    options = ["--tls-cert", tls_cert, "--tls-key", tls_key] if tls is not None else []
    options += ["--tls-ca", tls_ca] if tls is not None and tls_ca else []
    args = parse_arguments([
        "--adapter", adapter, "--listen", addresses[0], "--concurrency", str(concurrency), "--keepalive", str(keepalive),
        "--no-lifeline",
        "--standalone", *[str(o) for o in options], *(["--join", addresses[1]] if join else []),
        *(["--advertise", advertise] if advertise else []), *(["--insecure"] if insecure else []),
        *(["--health", health_address] if health_address else []), "--drain-on-sigterm", str(drain_timeout),
    ])

    def announce(address: str) -> None:
        _err_console.print(f"trio-bridge worker: serving {adapter} on {address}{' over TLS' if tls else ''}")

    _end_on_signals()
    # SIGHUP: the new code in place; the new image starts from this environment again
    reload = Reload(adapter, argv=sys.orig_argv, environ=os.environ, path=sys.path)
    reload.ignore_while_starting()
    os.environ.pop(SECRET_ENV, None)  # one the user exported: the adapter's tools' children must not inherit it

    try:
        with asyncio.Runner(loop_factory=loop_factory(os.environ)) as runner:  # uvloop where installed
            code = runner.run(serve(args, {SECRET_ENV: token}, announce, reload=reload))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if reload.due and code == 0:
        reload.execute()
    raise typer.Exit(code)


@_app.command(cls=_Command)
def top(
    address: Annotated[str, typer.Argument(help="where the pool serves its metrics: `Monitoring(address=\"HOST:PORT\")`, as HOST:PORT or an http:// URL", show_default=False)],
    interval: Annotated[float, typer.Option("--interval", "-n", min=0.1, help="seconds between redraws")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (1 if the pool cannot be read)")] = False,
    token_file: Annotated[str | None, typer.Option("--token-file", envvar="TRIO_BRIDGE_TOKEN_FILE", help="a file (owner-only) holding the pool's token, for a pool beyond loopback; default: the token in TRIO_BRIDGE_TOKEN", show_default=False)] = None,
) -> None:
    """A live view of a running pool: its workers (id, pid, where, state, RSS, CPU, calls,
    p50/p99, last recycle reason), its queue, calls, sessions and recent errors.

    It reads the pool's `/status` on its `metrics_address`; Ctrl-C quits. On an address beyond
    loopback the pool asks for its token (`Monitoring(token=...)`): give `--token-file` or set
    TRIO_BRIDGE_TOKEN. `trio-bridge run ADAPTER TOOL --top` shows the same while a tool runs.
    """
    from trio_bridge._top import run_top
    from trio_bridge._wire.auth import read_token_file

    try:
        token = read_token_file(token_file) if token_file else os.environ.get("TRIO_BRIDGE_TOKEN", "").strip() or None
    except TrioBridgeError as exc:
        raise typer.BadParameter(str(exc), param_hint="--token-file") from None
    _end_on_signals()
    code = run_top(address, interval=interval, once=once, console=_console, token=token)
    if code:
        raise typer.Exit(code)


@_app.command(cls=_Command)
def doctor(
    redis_url: Annotated[str | None, typer.Option("--redis", envvar="TRIO_BRIDGE_REDIS_URL", help="a Redis URL to reach (`redis://HOST:PORT/DB`, `rediss://` for TLS)", show_default=False)] = None,
    address: Annotated[str | None, typer.Option("--address", envvar="TRIO_BRIDGE_LISTEN", help="an address to bind, as a worker's `--listen` would: tcp://HOST:PORT, HOST:PORT or unix:PATH", show_default=False)] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", envvar="TRIO_BRIDGE_TLS_CERT", help="a certificate (PEM) to check", show_default=False)] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", envvar="TRIO_BRIDGE_TLS_KEY", help="its private key (PEM)", show_default=False)] = None,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", envvar="TRIO_BRIDGE_TLS_CA", help="a CA bundle (PEM) to check", show_default=False)] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="seconds for each network check")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help=f"{JSON_HELP}: `{{\"version\": ..., \"ok\": ..., \"checks\": [{{\"name\", \"status\", \"detail\"}}]}}`")] = False,
) -> None:
    """Check that this machine can run trio-bridge: one verdict per check, ok, warn or fail.

    Always: the Python version, the key dependencies (installed, within trio-bridge's
    requirements, importable), `/dev/shm` (present, writable, free space: big arrays travel
    there) and the fork server (fast worker starts). When given: a Redis server answers
    (`--redis`), an address can be bound (`--address`), TLS files load and are in date
    (`--tls-cert`, `--tls-key`, `--tls-ca`). The environment variables are those `trio-bridge
    worker` reads, so `trio-bridge doctor` checks a worker's configuration before it starts.

    Exit status: 0 when no check failed (warnings included), 1 otherwise.
    """
    from rich import box

    from trio_bridge._doctor import run_checks

    checks = run_checks(redis_url=redis_url, address=address, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, timeout=timeout)
    failed = [c.name for c in checks if c.status == "fail"]
    if as_json:
        _print_json({
            "version": __version__, "ok": not failed,
            "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in checks],
        })
    else:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("check", no_wrap=True)
        table.add_column("verdict", no_wrap=True)
        table.add_column("why")
        styles = {"ok": "green", "warn": "yellow", "fail": "bold red"}
        for c in checks:  # Text: a detail may hold brackets that are not markup
            table.add_row(Text(c.name), Text(c.status, style=styles[c.status]), Text(c.detail))
        _console.print(f"trio-bridge {__version__} doctor")
        _console.print(table)
        warned = sum(c.status == "warn" for c in checks)
        if failed:
            _console.print(f"[bold red]{len(failed)} check(s) failed[/]: {', '.join(failed)}")
        else:
            _console.print(f"[green]no check failed[/] ({warned} warning(s))" if warned else "[green]all checks passed[/]")
    if failed:
        raise typer.Exit(1)


def _parse_arguments(pairs: list[str], args_json: str | None, parameters: dict[str, str]) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    if args_json:
        try:
            loaded = json.loads(args_json)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"--args is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise typer.BadParameter("--args must be a JSON object")
        arguments.update(loaded)
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--arg must be key=value, got {pair!r}")
        arguments[key] = _coerce(text, parameters.get(key, ""))
    return arguments


def _coerce(text: str, annotation: str) -> Any:
    """Read ``text`` as the parameter's type: a str parameter keeps the text, others parse it as
    JSON (so ``3``, ``1.5``, ``true``, ``[1, 2]`` work), falling back to the text."""
    if annotation == "str":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_host_tools(spec: str | None) -> list[Any]:
    """``"module:function,module:function"`` -> the functions."""
    import importlib

    functions = []
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        module_name, sep, name = item.partition(":")
        if not sep:
            raise typer.BadParameter(f"--host-tools takes module:function items, got {item!r}")
        try:
            functions.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError) as exc:
            raise typer.BadParameter(f"--host-tools: cannot load {item!r}: {type(exc).__name__}: {exc}") from None
    return functions


async def _run_tool(
    adapter: str, tool: str, pairs: list[str], args_json: str | None, workers: int, host_tools: list[Any],
    shutdown_timeout: float = 5.0, *, as_json: bool = False, top: bool = False,
) -> None:
    import trio

    import trio_bridge
    from trio_bridge._host._groups import UserErrorTracker
    from trio_bridge._top import live_view

    async with trio_bridge.open_pool(
        adapter, size=workers, lifecycle=trio_bridge.Lifecycle(shutdown_timeout=shutdown_timeout),
        monitoring=trio_bridge.Monitoring(address="127.0.0.1:0") if top else None,
    ) as pool:
        if pool.metrics_address is None:
            await _call_tool(pool, tool, pairs, args_json, host_tools, as_json=as_json)
            return
        tracker = UserErrorTracker()  # the tool's error leaves as itself, not in the nursery's group
        with tracker.resolve_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(live_view, pool.metrics_address, console=_err_console))
                try:
                    with tracker.user_block():
                        await _call_tool(pool, tool, pairs, args_json, host_tools, as_json=as_json)
                finally:
                    nursery.cancel_scope.cancel()


async def _call_tool(
    pool: Any, tool: str, pairs: list[str], args_json: str | None, host_tools: list[Any], *, as_json: bool,
) -> None:
    import trio_bridge

    for function in host_tools:
        pool.host_tool(function)
    specs = {t.name: t for t in pool.tools() if t.side == "worker"}
    spec = specs.get(tool)
    if spec is None:
        raise trio_bridge.ToolNotFoundError(tool, list(specs))
    arguments = _parse_arguments(pairs, args_json, {p.name: p.type for p in spec.parameters})
    if spec.streaming:
        async with pool.stream(tool, arguments) as chunks:
            if as_json:
                _print_json([chunk async for chunk in chunks])
                return
            async for chunk in chunks:
                pprint(chunk, console=_console, expand_all=False)
    elif as_json:
        _print_json(await pool.execute(tool, arguments))
    else:
        pprint(await pool.execute(tool, arguments), console=_console)


async def _reload_on_sighup(pool: Any, command: str) -> None:
    """Until cancelled: each SIGHUP reloads ``pool``'s code (``pool.reload()``; signals that come
    during a reload make one more). A failed reload is logged by the pool (once, on stderr: the
    import error) and the old workers serve on. Off the main thread (no signal handlers): nothing."""
    import trio

    from trio_bridge import TrioBridgeError

    if threading.current_thread() is not threading.main_thread():
        return
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                replaced = await pool.reload()
            except TrioBridgeError:
                continue  # said by the pool's log
            _err_console.print(f"{command}: SIGHUP: reloaded {pool.adapter} ({replaced} worker(s) replaced)")


def _end_on_signals() -> None:
    """The CLI's start-up handlers only record signals (for `run`): a command that serves until
    stopped ends on them instead (and at once if one came already)."""
    if _cli_signals.received:
        raise typer.Exit(EXIT_INTERRUPTED if _cli_signals.received[0] == signal.SIGINT else EXIT_TERMINATED)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _import_from_cwd() -> None:
    """Import adapters and host-tool modules as the workers of `run` do: the current directory first."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _print_json(value: Any) -> None:
    """``value`` on stdout as one JSON document (see :func:`strict_json`), plain text for pipes:
    rich would wrap long lines and colour them."""
    typer.echo(strict_json(value, indent=2))


async def _run_example(workers: int) -> None:
    import numpy as np
    import trio

    import trio_bridge

    _console.print(f"[bold]trio-bridge example[/]: handwritten digits, {workers} worker(s)")
    started = time.perf_counter()
    async with trio_bridge.open_pool(EXAMPLE_ADAPTER, size=workers) as pool:
        _console.print(f"pool ready in {time.perf_counter() - started:.2f} s (each worker loaded the data set in setup())")
        model = None
        with Progress(
            TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=_console,
        ) as progress:
            task = progress.add_task("train", total=None, status="")
            async with pool.stream("train", {}) as chunks:
                async for chunk in chunks:
                    if "model" in chunk:
                        model = chunk["model"]
                        continue
                    progress.update(
                        task, total=chunk["epochs"], completed=chunk["epoch"],
                        status=f"loss {chunk['loss']:.4f}  validation accuracy {chunk['val_accuracy']:.3f}",
                    )
        assert model is not None, "the train tool ended without yielding a model"

        held_out = await pool.execute("held_out")
        images, labels = held_out["images"], held_out["labels"]
        batch_size = max(1, -(-len(images) // (4 * workers)))  # about four batches per worker
        batches = [(start, images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
        predictions = np.empty(len(images), np.int64)

        async def classify(start: int, batch: np.ndarray) -> None:
            predictions[start:start + len(batch)] = await pool.execute("predict", {"images": batch, "model": model})

        before = {w.id: w.calls_served for w in pool.workers()}
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for start, batch in batches:
                nursery.start_soon(classify, start, batch)
        elapsed = time.perf_counter() - t0

        accuracy = float((predictions == labels).mean())
        _console.print(
            f"classified {len(images)} held-out images in {len(batches)} batches: "
            f"[bold]accuracy {accuracy:.4f}[/], {len(images) / elapsed:,.0f} images/s ({elapsed * 1e3:.1f} ms)"
        )
        table = Table(title="calls served per worker")
        for column in ("worker", "pid", "predict calls", "calls served in all"):
            table.add_column(column)
        for w in pool.workers():
            table.add_row(w.id, str(w.pid), str(w.calls_served - before.get(w.id, 0)), str(w.calls_served))
        _console.print(table)
        stats = pool.statistics()
        _console.print(
            f"pool: {stats.calls_completed} calls, {stats.restarts} restarts, "
            f"latency p50 {_ms(stats.latency_p50)} p99 {_ms(stats.latency_p99)}"
        )
        if accuracy < 0.9:
            _console.print("[red]accuracy below 0.90[/]")
            sys.exit(1)


async def _run_sweep(workers: int) -> None:
    from trio_bridge.examples import sweep

    if not await sweep.run(_console, workers):
        _console.print("[red]some calls did not see the value current at their start[/]")
        sys.exit(1)


async def _run_tools_example(workers: int) -> None:
    from trio_bridge.examples import agent

    if not await agent.run(_console, workers):
        _console.print("[red]a research call came back incomplete[/]")
        sys.exit(1)


async def _run_cluster_example(workers: int) -> None:
    from trio_bridge.examples import cluster

    if not await cluster.run(_console):
        sys.exit(1)


EXAMPLES: dict[str, Callable[[int], Awaitable[None]]] = {
    "digits": lambda workers: _run_example(workers),
    "sweep": lambda workers: _run_sweep(workers),
    "tools": lambda workers: _run_tools_example(workers),
    "cluster": lambda workers: _run_cluster_example(workers),
}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


if __name__ == "__main__":
    _app()
