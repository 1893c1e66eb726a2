"""The ``trio-bridge`` command, also ``python -m trio_bridge``.

From its very first moment, before the command line's imports, SIGINT and SIGTERM are only
remembered (:mod:`trio_bridge._cli_signals`): Python's default Ctrl-C handler raises
``KeyboardInterrupt`` wherever it lands, and one that lands in a callback during an import
(a weakref callback, say) is swallowed -- the command would then run on as if never interrupted.
The command reads what came and stops in order (exit status 130 / 143).
"""

from __future__ import annotations


def main() -> None:
    from trio_bridge._cli_signals import remember_signals

    remember_signals()
    from trio_bridge import cli

    cli.main()


if __name__ == "__main__":
    main()
