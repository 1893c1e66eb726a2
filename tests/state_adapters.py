"""Adapters for the session and variable tests."""

from __future__ import annotations

import asyncio
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


class Variables(Adapter):
    """The worker's variable API: every operation, from sync and from async tools."""

    @tool
    def tour(self, ctx: SessionContext) -> dict:
        """Lists, reads history, rolls back, adds a dependency and deletes; reads its own writes."""
        seen: dict = {"listed": ctx.list_variables(fresh=True), "listed_temp": ctx.list_variables("temp*", fresh=True)}
        ctx.set_variable("temperature", 0.9)
        ctx.set_variable("temperature", 1.1)
        seen["history"] = [[e.version, e.value] for e in ctx.variable_history("temperature")]
        seen["history_2"] = [[e.version, e.value] for e in ctx.variable_history("temperature", limit=2)]
        rolled = ctx.rollback_variable("temperature", 1)
        seen["rolled"] = [rolled.version, rolled.value, ctx.variables["temperature"], ctx.get_variable("temperature").version]
        seen["depends_on"] = list(ctx.add_dependency("temperature", "model").depends_on)
        seen["cached_depends_on"] = list(ctx.get_variable("temperature").depends_on)
        ctx.delete_variable("model")
        seen["after_delete"] = [ctx.list_variables(), "model" in ctx.variables, list(ctx.get_variable("temperature").depends_on)]
        info = ctx.session_info()
        seen["info"] = [info.id, info.ttl, info.metadata, info.variable_count, info.state_version, type(info).__qualname__, info.created_at]
        return seen

    @tool
    async def atour(self, ctx: SessionContext) -> dict:
        seen: dict = {"listed": await ctx.alist_variables(), "listed_temp": await ctx.alist_variables("temp*")}
        await ctx.aset_variable("temperature", 0.9)
        await ctx.aset_variable("temperature", 1.1)
        seen["history"] = [[e.version, e.value] for e in await ctx.avariable_history("temperature")]
        seen["history_2"] = [[e.version, e.value] for e in await ctx.avariable_history("temperature", limit=2)]
        rolled = await ctx.arollback_variable("temperature", 1)
        seen["rolled"] = [rolled.version, rolled.value, ctx.variables["temperature"], ctx.get_variable("temperature").version]
        seen["depends_on"] = list((await ctx.aadd_dependency("temperature", "model")).depends_on)
        seen["cached_depends_on"] = list(ctx.get_variable("temperature").depends_on)
        await ctx.adelete_variable("model")
        seen["after_delete"] = [ctx.list_variables(), "model" in ctx.variables, list(ctx.get_variable("temperature").depends_on)]
        info = await ctx.asession_info()
        seen["info"] = [info.id, info.ttl, info.metadata, info.variable_count, info.state_version, type(info).__qualname__, info.created_at]
        return seen

    @tool
    def refused(self, ctx: SessionContext) -> list:
        """The host's refusals, raised in the worker as the same errors."""
        errors = []
        for attempt in (
            lambda: ctx.rollback_variable("temperature", 99),
            lambda: ctx.add_dependency("model", "temperature"),  # a cycle once temperature -> model
            lambda: ctx.delete_variable("nope"),
            lambda: ctx.variable_history("nope"),
        ):
            try:
                attempt()
            except TrioBridgeError as exc:
                errors.append(type(exc).__name__)
        return errors

    @tool
    def read(self, ctx: SessionContext, name: str) -> dict:
        variable = ctx.get_variable(name)
        return {"value": variable.value, "version": variable.version, "optimizer_id": variable.optimizer_id,
                "depends_on": list(variable.depends_on)}

    @tool
    def optimize(self, ctx: SessionContext, name: str, values: list, hold: float = 0.0, fail: bool = False) -> dict:
        """Holds the lock while it writes ``values``, then for ``hold`` seconds (or until
        cancelled); raises inside the block with ``fail``."""
        with ctx.optimizing(name, optimizer_id="worker-grid") as opt:
            for value in values:
                opt.set(value)
            holder = ctx.get_variable(name).optimizer_id
            ctx.wait_cancelled(hold)
            if fail:
                raise ValueError("the optimizer failed")
        return {"holder": holder, "after": ctx.get_variable(name).optimizer_id, "value": ctx.variables[name]}

    @tool
    async def aoptimize(self, ctx: SessionContext, name: str, values: list, hold: float = 0.0, fail: bool = False) -> dict:
        async with ctx.aoptimizing(name, optimizer_id="worker-agrid") as opt:
            for value in values:
                await opt.aset(value)
            holder = ctx.get_variable(name).optimizer_id
            await asyncio.sleep(hold)
            if fail:
                raise ValueError("the optimizer failed")
        return {"holder": holder, "after": ctx.get_variable(name).optimizer_id, "value": ctx.variables[name]}

    @tool
    def write(self, ctx: SessionContext, name: str, value: object) -> str:
        try:
            ctx.set_variable(name, value)
        except TrioBridgeError as exc:
            return type(exc).__name__
        return "ok"

    @tool
    async def watch_burst(self, ctx: SessionContext, name: str, count: int, buffer_size: int, pause: float) -> list:
        """Watches ``name``, writes it ``count`` times itself, pauses (not reading) for
        ``pause`` seconds, then reads until its last write."""
        updates = ctx.watch_variables([name], buffer_size=buffer_size)
        seen = [await anext(updates)]
        for i in range(1, count + 1):
            await ctx.aset_variable(name, i)
        await asyncio.sleep(pause)
        async for update in updates:
            seen.append(update)
            if update.new_value == count:
                break
        return [[u.kind, u.old_value, u.new_value, u.coalesced] for u in seen]
