"""An example head for deploy/kubernetes: a pool with no local workers (``size=0``) whose workers
are the pods behind a headless Service, found through DNS (``dns://NAME:PORT``: one slot per
address, re-resolved as pods come and go), reached over mutual TLS with the shared token.

It runs the built-in example (trio_bridge.examples.digits: train a small classifier in one
worker, then classify the held-out images across all of them) in a loop, logging each round,
until SIGTERM: the pool then drains (``Lifecycle.shutdown_timeout``, TRIO_BRIDGE_SHUTDOWN_TIMEOUT)
and the process exits with 143.

Configured by the environment (the manifests set it):
    TRIO_BRIDGE_WORKERS_DNS      dns://trio-bridge-workers.NAMESPACE.svc.cluster.local:7000
    TRIO_BRIDGE_NAMESERVERS      DNS servers to ask, "HOST[:PORT],..." (default: /etc/resolv.conf's)
    TRIO_BRIDGE_TOKEN_FILE       the token shared with the workers (owner-only file)
    TRIO_BRIDGE_TLS_CERT/_KEY    this head's certificate and key (PEM)
    TRIO_BRIDGE_TLS_CA           the CA that signed the workers' certificates
    TRIO_BRIDGE_HEALTH_ADDRESS   where the kubelet's gRPC probes ask (default 0.0.0.0:7001)
    TRIO_BRIDGE_ROUND_PAUSE      seconds between rounds (default 10)
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import trio

from trio_bridge import Monitoring, Pool, RemoteWorkers, TLSConfig, open_pool

ADAPTER = "trio_bridge.examples.digits:Digits"
_log = logging.getLogger("trio-bridge-head")


async def one_round(pool: Pool, round_number: int) -> None:
    """Train in one worker, then classify the held-out images in batches across all workers."""
    started = time.perf_counter()
    model = None
    async with pool.stream("train", {"epochs": 10}) as chunks:
        async for chunk in chunks:
            if "model" in chunk:
                model = chunk["model"]
    if model is None:
        raise RuntimeError("the train tool ended without yielding a model")
    held_out = await pool.execute("held_out")
    images, labels = held_out["images"], held_out["labels"]
    batches = np.array_split(np.arange(len(images)), max(1, pool.statistics().workers_ready))
    predictions: dict[int, np.ndarray] = {}

    async def classify(index: int, rows: np.ndarray) -> None:
        predictions[index] = await pool.execute("predict", {"images": images[rows], "model": model})

    async with trio.open_nursery() as nursery:
        for index, rows in enumerate(batches):
            nursery.start_soon(classify, index, rows)
    predicted = np.concatenate([predictions[i] for i in range(len(batches))])
    accuracy = float(np.mean(predicted == labels))
    _log.info(
        "round %d: held-out accuracy %.3f over %d images, %d worker(s) ready, %.2f s",
        round_number, accuracy, len(labels), pool.statistics().workers_ready, time.perf_counter() - started,
    )


async def main() -> None:
    env = os.environ
    tls = TLSConfig(env["TRIO_BRIDGE_TLS_CERT"], env["TRIO_BRIDGE_TLS_KEY"], env["TRIO_BRIDGE_TLS_CA"])
    with open(env["TRIO_BRIDGE_TOKEN_FILE"], encoding="utf-8") as f:
        token = f.read().strip()
    nameservers = [s for s in env.get("TRIO_BRIDGE_NAMESERVERS", "").split(",") if s]
    remote = RemoteWorkers(addresses=[env["TRIO_BRIDGE_WORKERS_DNS"]], token=token, tls=tls, nameservers=nameservers)
    pause = float(env.get("TRIO_BRIDGE_ROUND_PAUSE", "10"))
    monitoring = Monitoring(health_address=env.get("TRIO_BRIDGE_HEALTH_ADDRESS", "0.0.0.0:7001"))
    async with open_pool(ADAPTER, size=0, remote=remote, monitoring=monitoring) as pool:
        _log.info("pool open: workers at %s; health on %s", env["TRIO_BRIDGE_WORKERS_DNS"], pool.health_address)
        round_number = 0
        while True:  # until SIGTERM: open_pool drains, then raises SystemExit(143)
            round_number += 1
            try:
                await one_round(pool, round_number)
            except Exception as exc:  # a round may fail (a worker went away mid-call): log it, go on
                _log.warning("round %d failed: %s: %s", round_number, type(exc).__name__, exc)
            await trio.sleep(pause)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(main)
