"""An adapter that looks for the pool secret wherever its code, and what its tools start, could
find it (tests/test_listener_auth.py)."""

from __future__ import annotations

import os
import subprocess

from trio_bridge.worker import Adapter, SessionContext, tool

SECRET_ENV = "TRIO_BRIDGE_SECRET"
AT_IMPORT = SECRET_ENV in os.environ  # a spawned worker imports this module after main() began


class Snoop(Adapter):
    def setup(self) -> None:
        self.in_setup = SECRET_ENV in os.environ

    @tool
    def snoop(self) -> dict[str, object]:
        """What the adapter's code and a tool's subprocess can see of the worker's environment."""
        with open("/proc/self/environ", "rb") as f:  # what the worker started with, as its user sees it
            started_with = f.read().decode(errors="replace")
        return {
            "at_import": AT_IMPORT,
            "in_setup": self.in_setup,
            "in_tool": SECRET_ENV in os.environ,
            "env_command": subprocess.run(["env"], capture_output=True, text=True, check=True).stdout,
            "proc_environ": started_with,
        }

    @tool
    def ask_host(self, ctx: SessionContext) -> object:
        """A call back to the host: it needs the secret, which the worker still holds."""
        return ctx.call_host_tool("host_answer")
