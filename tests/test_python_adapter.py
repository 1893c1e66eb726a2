"""PythonAdapter: call any (allowed) Python in the workers, keep objects per session (workers in
threads, except where a worker's death or shared memory is the point)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import trio

import trio_bridge
from trio_bridge import EncodeError, InvalidArgumentError, Lifecycle, StoredObjectLostError
from trio_bridge.testing import open_pool_in_threads

PYTHON = "trio_bridge.adapters:PythonAdapter"
ALLOW = {"allow": ["numpy", "sklearn"]}


async def test_nothing_is_allowed_until_configured():
    async with open_pool_in_threads(PYTHON, size=1) as pool:
        with pytest.raises(InvalidArgumentError, match=r"outside the allowed modules \(none yet\).*adapter_options="):
            await pool.call("numpy.linalg.norm", [3, 4])


async def test_calls_inside_the_allowlist_and_refusals_outside():
    async with open_pool_in_threads(PYTHON, size=1, adapter_options=ALLOW) as pool:
        assert await pool.call("numpy.linalg.norm", [3, 4]) == 5.0
        assert (await pool.call("numpy.arange", 4)).tolist() == [0, 1, 2, 3]
        assert await pool.call("numpy.pi") == np.pi  # a plain attribute is read, not called
        for target in ("os.system", "numpyx.thing", "subprocess.run", "numpy.f2py.os.system"):
            with pytest.raises(InvalidArgumentError, match="outside the allowed modules"):
                await pool.call(target, "true")
        with pytest.raises(InvalidArgumentError, match="public identifier"):
            await pool.call("numpy.__loader__")
        with pytest.raises(InvalidArgumentError, match="has no attribute 'nope'"):
            await pool.call("numpy.linalg.nope")
        with pytest.raises(InvalidArgumentError, match="store_as keeps objects per session"):
            await pool.execute("call", {"target": "numpy.arange", "args": [3], "store_as": "a"})


async def test_a_fit_predict_pipeline_on_the_digits_data():
    async with open_pool_in_threads(PYTHON, size=2, adapter_options=ALLOW) as pool:
        async with pool.session() as session:
            assert await session.call("sklearn.datasets.load_digits", store_as="digits") == {
                "stored": "digits", "type": "sklearn.utils._bunch.Bunch"
            }
            images = await session.call("stored.digits.data")
            labels = await session.call("stored.digits.target")
            assert images.shape == (1797, 64) and labels.shape == (1797,)
            train, test = slice(0, 1400), slice(1400, None)
            steps = [
                {"call": "sklearn.preprocessing.StandardScaler", "store_as": "scaler"},
                {"call": "stored.scaler.fit_transform", "args": [images[train]], "store_as": "x_train"},
                {"call": "stored.scaler.transform", "args": [images[test]], "store_as": "x_test"},
                {"call": "sklearn.linear_model.LogisticRegression", "kwargs": {"max_iter": 2000}, "store_as": "clf"},
                {"call": "stored.clf.fit", "args": [{"$stored": "x_train"}, labels[train]], "store_as": "clf"},
                {"call": "stored.clf.score", "args": [{"$stored": "x_test"}, labels[test]]},
                {"call": "stored.clf.predict", "args": [{"$stored": "x_test"}]},
            ]
            *_, accuracy, predictions = await session.pipeline(steps)
            assert accuracy > 0.9
            assert predictions.shape == (397,) and (predictions == labels[test]).mean() == pytest.approx(accuracy)
            stored = await session.list_stored()
            assert stored["clf"] == "sklearn.linear_model._logistic.LogisticRegression"
            assert (await session.retrieve("x_test")).shape == (397, 64)
            with pytest.raises(EncodeError, match="store_as"):
                await session.retrieve("clf")
            assert await session.delete_stored("x_train") is True
            assert "x_train" not in await session.list_stored()


@pytest.mark.real_process
async def test_a_stored_object_lost_with_its_worker_is_reported_as_lost():
    async with trio_bridge.open_pool(PYTHON, size=2, adapter_options=ALLOW, lifecycle=Lifecycle(restart_backoff=(0.05, 0.5))) as pool:
        async with pool.session() as session:
            await session.call("numpy.arange", 5, store_as="numbers")
            keeper = next(w for w in pool.workers() if w.id == session.worker_id)
            os.kill(keeper.pid, signal.SIGKILL)
            with trio.fail_after(10):
                while any(w.id == keeper.id for w in pool.workers()):
                    await trio.sleep(0.02)
            with pytest.raises(StoredObjectLostError, match=rf"'numbers' .* kept by worker {keeper.id}, which is gone \(killed by SIGKILL\)"):
                await session.call("stored.numbers.sum")
            await session.call("numpy.arange", 3, store_as="numbers")  # create it again: works
            assert await session.call("stored.numbers.sum") == 3


@pytest.mark.real_process
async def test_large_results_reuse_their_shared_memory_segment_and_leave_no_file():
    async with trio_bridge.open_pool(PYTHON, size=1, adapter_options=ALLOW) as pool:
        directory = pool._plane.directory
        for _ in range(3):  # each result dies before the next: the worker reuses its segment
            ones = await pool.call("numpy.ones", 400_000)  # 3.2 MB: through shared memory
            assert ones.shape == (400_000,) and ones.sum() == 400_000
            del ones
        assert len(os.listdir(directory)) == 1
    assert not os.path.exists(directory)
