from trio_bridge.worker._server import main

main()
