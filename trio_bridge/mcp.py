"""A pool's tools as a Model Context Protocol server, with the official ``mcp`` SDK
(``pip install 'trio-bridge[mcp]'``): what ``trio-bridge mcp ADAPTER`` runs.

An agent (an MCP client) lists the pool's tools -- its worker tools and its global host tools,
each with its arguments' JSON Schema -- and calls them::

    async with trio_bridge.open_pool("my_package.models:Model") as pool:
        await trio_bridge.mcp.serve_stdio(pool)  # until the client closes stdin

The SDK runs on anyio, which runs on Trio: the server runs in the pool's own Trio run, and a
call goes straight to ``pool.execute``. :func:`create_server` gives the SDK's server for other
transports (``server.streamable_http_app()``, say).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import trio

try:
    import mcp.types as types
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel import Server
    from mcp.shared.message import SessionMessage
except ImportError as _missing:  # an optional extra
    raise ImportError(f"trio_bridge.mcp needs the MCP SDK 2.x: pip install 'trio-bridge[mcp]' ({_missing})") from _missing

from trio_bridge._core.failures import exception_text, is_failure
from trio_bridge._errors import ToolError, ToolNotFoundError
from trio_bridge._strict_json import strict_json
from trio_bridge._version import __version__

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from trio_bridge._host._pool import Pool

__all__ = ["create_server", "serve_stdio"]

_READ_SIZE = 65536      # bytes per read of stdin
_WRITE_SIZE = 4096      # bytes per write: no more than PIPE_BUF, so a write after "writable" never blocks


def create_server(pool: Pool, *, name: str = "trio-bridge") -> Server[Any]:
    """The SDK's low-level MCP server for ``pool``'s tools.

    ``tools/list`` gives the pool's worker tools and global host tools as
    ``pool.tools(format="mcp")`` has them: name, description and ``inputSchema`` (the
    arguments' JSON Schema); tools registered later show in the next list. ``tools/call``
    runs a worker tool with ``pool.execute`` (a streaming one with ``pool.stream``, its
    chunks collected into a list) and a host tool with ``pool.call_host_tool``; nested lists
    given for a numpy array parameter become an array (``numpy.asarray``). The result comes
    back as one text content block holding it as JSON (numpy arrays as nested lists, bytes as
    base64 text, NaN and infinities as the strings ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``). Any error -- an unknown tool, arguments that do not fit, the tool's own
    exception, a worker's crash -- comes back as a result with ``isError: true`` and the
    error's type and message as text (``"ToolError: tool 'fit' raised ValueError: ..."``,
    without the worker's traceback): the server goes on.

    Args:
        pool: an open pool; the server is good while it is.
        name: the server's name in the MCP handshake.
    """

    async def list_tools(ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in pool.tools(format="mcp")])

    async def call_tool(ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            result = await _call(pool, params.name, params.arguments or {})
            text = strict_json(result)
        except BaseException as exc:  # the agent reads it and may try again; not a cancel
            if not is_failure(exc, (trio.Cancelled,)):  # (a host tool's own BaseException is its failure)
                raise
            # (a worker's traceback is for the program's author, not for the model)
            message = exc.args[0] if isinstance(exc, ToolError) and exc.args else exception_text(exc)
            return types.CallToolResult(content=[types.TextContent(text=f"{type(exc).__name__}: {message}")], is_error=True)
        return types.CallToolResult(content=[types.TextContent(text=text)])

    return Server(
        name,
        version=__version__,
        instructions=f"The tools of a trio-bridge pool of {pool.adapter}: worker tools run in its worker processes, host tools in its host.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def serve_stdio(pool: Pool, *, name: str = "trio-bridge") -> None:
    """Serve ``pool``'s tools (see :func:`create_server`) over this process's stdin and stdout,
    one JSON-RPC message a line (MCP's stdio transport), until the client closes stdin; then
    return, and the caller's ``open_pool`` closes the pool in order. Cancelling it (Ctrl-C in
    ``trio-bridge mcp``) stops it at once, a read of stdin included.

    While it serves, file descriptor 1 points at stderr and 0 at the null device (stray prints
    cannot corrupt the protocol, and nothing else reads the client's messages); both are put
    back when it returns. Must run in the Trio run that opened the pool, on a POSIX system.

    Raises:
        RuntimeError: another ``serve_stdio`` is serving in this process.
    """
    server = create_server(pool, name=name)
    with _claimed_stdio() as (wire_in, wire_out):
        incoming_send, incoming = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        outgoing, outgoing_receive = anyio.create_memory_object_stream[SessionMessage](0)
        async with trio.open_nursery() as nursery:
            reading = trio.CancelScope()

            async def read() -> None:
                with reading:
                    await _read_messages(wire_in, incoming_send)

            nursery.start_soon(read)
            nursery.start_soon(_write_messages, wire_out, outgoing_receive)
            await server.run(incoming, outgoing, server.create_initialization_options())
            reading.cancel()  # (it has ended: run() returns when stdin does) the writer drains


# ---- tools/call ----
async def _call(pool: Pool, name: str, arguments: dict[str, Any]) -> Any:
    tools = pool.tools()
    worker = next((t for t in tools if t.side == "worker" and t.name == name), None)
    host = next((t for t in tools if t.side == "host" and t.name == name), None)
    if worker is not None:
        arguments = worker.arguments_from_json(arguments)
        if worker.streaming:
            async with pool.stream(name, arguments) as chunks:
                return [chunk async for chunk in chunks]
        return await pool.execute(name, arguments)
    if host is not None:
        return await pool.call_host_tool(name, host.arguments_from_json(arguments))
    raise ToolNotFoundError(name, [t.name for t in tools])


# ---- the stdio transport: Trio reads and writes that a cancel stops at once ----
# (The SDK's stdio_server reads stdin in a thread that no cancel can stop: Ctrl-C would wait for
# the client's next line. Here the descriptors stay blocking -- a terminal's mode is never
# changed -- and are read and written only once Trio says they are ready.)
_serving: list[bool] = []


@contextlib.contextmanager
def _claimed_stdio() -> Iterator[tuple[int, int]]:
    """Private duplicates of fds 0 and 1 for the protocol; fd 1 to stderr, fd 0 to the null
    device meanwhile; all put back on exit."""
    if _serving:
        raise RuntimeError("trio_bridge.mcp.serve_stdio is already serving this process's stdin and stdout")
    _serving.append(True)
    sys.stdout.flush()
    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        yield wire_in, wire_out
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # stray output so far goes to stderr
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        for fd in (null, wire_in, wire_out):
            os.close(fd)
        _serving.clear()


async def _wait(fd: int, writable: bool, pollable: list[bool]) -> None:
    """Wait until ``fd`` is ready; a regular file or /dev/null (epoll refuses them) always is."""
    if pollable[0]:
        try:
            await (trio.lowlevel.wait_writable(fd) if writable else trio.lowlevel.wait_readable(fd))
            return
        except OSError:
            pollable[0] = False
    await trio.lowlevel.checkpoint()


async def _read_messages(fd: int, send: MemoryObjectSendStream[SessionMessage | Exception]) -> None:
    """JSON-RPC messages, one a line, from ``fd`` until end of file (then ``send`` is closed)."""
    pollable = [True]
    buffer = bytearray()
    async with send:
        while True:
            await _wait(fd, False, pollable)
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""  # a broken stdin ends the session as its end does
            if not data:
                break
            start = len(buffer)
            buffer += data
            while (end := buffer.find(b"\n", start)) >= 0:
                line, buffer, start = bytes(buffer[:end]), buffer[end + 1:], 0
                if line.strip():
                    await send.send(_parse(line))
        if buffer.strip():
            await send.send(_parse(bytes(buffer)))


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except Exception as exc:  # the server answers it with a parse error and goes on
        return exc


async def _write_messages(fd: int, receive: MemoryObjectReceiveStream[SessionMessage]) -> None:
    """The server's messages to ``fd``, one a line, until the server is done. If the client
    stops reading (a broken pipe), later messages are dropped."""
    pollable = [True]
    broken = False
    async with receive:
        async for message in receive:
            if broken:
                continue
            data = (message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n").encode()
            try:
                await _write_all(fd, data, pollable)
            except OSError:
                broken = True


async def _write_all(fd: int, data: bytes, pollable: list[bool]) -> None:
    view = memoryview(data)
    while view:
        await _wait(fd, True, pollable)
        try:
            view = view[os.write(fd, view[:_WRITE_SIZE]):]
        except BlockingIOError:
            continue
