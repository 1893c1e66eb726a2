from trio_bridge.worker._lifeline import die_with_host

die_with_host()  # first, before the heavy imports and the adapter's code

from trio_bridge.worker._server import main  # noqa: E402

main()
