"""Adapters for the session and variable tests."""

from __future__ import annotations

import os

from trio_bridge._errors import TrioBridgeError
from trio_bridge.worker import Adapter, SessionContext, tool


class Stateful(Adapter):
    def setup(self) -> None:
        self.ended: list[str] = []
        self.started: list[list] = []

    def on_session_start(self, session_id: str, metadata: dict) -> None:
        self.started.append([session_id, metadata])

    def on_session_end(self, session_id: str) -> None:
        self.ended.append(session_id)

    @tool
    def read(self, ctx: SessionContext, name: str) -> dict:
        variable = ctx.get_variable(name)
        return {"value": ctx.variables[name], "version": variable.version, "refreshes": ctx._session().client.refreshes}

    @tool
    def write(self, ctx: SessionContext, name: str, value: object) -> dict:
        try:
            variable = ctx.set_variable(name, value)
        except TrioBridgeError as exc:
            return {"error": type(exc).__name__, "message": str(exc)}
        return {"version": variable.version, "seen": ctx.variables[name]}

    @tool
    def write_batch(self, ctx: SessionContext, updates: dict) -> list:
        with ctx.batch_updates() as batch:
            batch.update(updates)
        return sorted(ctx.list_variables())

    @tool
    def register(self, ctx: SessionContext, name: str, type: str, value: object, constraints: dict | None = None) -> int:
        return ctx.register_variable(name, type, value, constraints=constraints).version

    @tool
    async def watch(self, ctx: SessionContext, name: str, count: int) -> list:
        seen = []
        async for update in ctx.watch_variables([name]):
            seen.append([update.kind, update.new_value])
            if len(seen) == count:
                return seen
        return seen

    @tool
    async def async_write(self, ctx: SessionContext, name: str, value: object) -> int:
        return (await ctx.aset_variable(name, value)).version

    @tool
    async def blocking_call_in_async_tool(self, ctx: SessionContext) -> str:
        try:
            ctx.set_variable("t", 1.0)
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    @tool
    def started_sessions(self) -> list:
        return list(self.started)

    @tool
    def ended_sessions(self) -> list:
        return list(self.ended)

    @tool
    def pid(self) -> int:
        return os.getpid()

    @tool
    def hold(self, ctx: SessionContext, seconds: float) -> None:
        ctx.wait_cancelled(seconds)

    @tool
    def exit_now(self) -> None:
        os._exit(9)
