"""The built-in example: handwritten digits (scikit-learn's bundled 1,797 real 8x8 images).

Each worker loads the data set in ``setup()``. ``train`` is a streaming tool: it trains a small
multilayer perceptron (64 -> 64 -> 10, ReLU, softmax) with mini-batch SGD and momentum in numpy,
yielding per-epoch progress (training loss, accuracy on a validation split held out from the
training data) and, last, the trained model as numpy arrays. ``held_out`` returns the test split,
which training never sees, and ``predict`` classifies a batch of images with a given model, so the
host can fan batches out across all workers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

# At module level, not in setup(): a pool's fork server imports this module once (~1 s for
# scikit-learn), and each worker forked from it starts with it imported.
if importlib.util.find_spec("sklearn") is None:  # an optional dependency: say which extra brings it
    raise ModuleNotFoundError("the digits example needs scikit-learn: pip install 'trio-bridge[examples]'", name="sklearn")

from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from trio_bridge.worker import Adapter, SessionContext, tool

_SEED = 0


class Digits(Adapter):
    """The digits tools: ``train`` (streaming), ``held_out`` and ``predict``; ``setup()`` loads the
    data set and splits it (train, validation, test), the splits kept as private attributes."""

    _x_train: np.ndarray
    _y_train: np.ndarray
    _x_val: np.ndarray
    _y_val: np.ndarray
    _x_test: np.ndarray
    _y_test: np.ndarray

    def setup(self) -> None:
        data: Any = load_digits()  # a Bunch
        images = data.images.astype(np.float32)  # (1797, 8, 8), pixel values 0..16
        labels = data.target.astype(np.int64)
        x_train, self._x_test, y_train, self._y_test = cast("list[np.ndarray]", train_test_split(
            images, labels, test_size=0.2, random_state=_SEED, stratify=labels
        ))
        self._x_train, self._x_val, self._y_train, self._y_val = cast("list[np.ndarray]", train_test_split(
            x_train, y_train, test_size=0.15, random_state=_SEED, stratify=y_train
        ))

    @tool
    def train(
        self, ctx: SessionContext, epochs: int = 30, learning_rate: float = 0.05, hidden: int = 64, batch_size: int = 32
    ) -> Iterator[dict[str, Any]]:
        """Train an MLP on the training split, yielding progress once per epoch.

        Args:
            epochs: passes over the training data.
            learning_rate: SGD step size.
            hidden: width of the hidden layer.
            batch_size: images per SGD step.

        Yields:
            ``{"epoch", "epochs", "loss", "val_accuracy"}`` per epoch, then ``{"model": {...}}``
            with the weights as float32 arrays.
        """
        rng = np.random.default_rng(_SEED)
        x = self._x_train.reshape(len(self._x_train), -1)
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1.0
        x = (x - mean) / scale
        model = {
            "w1": (rng.standard_normal((x.shape[1], hidden)) * np.sqrt(2 / x.shape[1])).astype(np.float32),
            "b1": np.zeros(hidden, np.float32),
            "w2": (rng.standard_normal((hidden, 10)) * np.sqrt(1 / hidden)).astype(np.float32),
            "b2": np.zeros(10, np.float32),
            "mean": mean.astype(np.float32),
            "scale": scale.astype(np.float32),
        }
        velocity = {k: np.zeros_like(model[k]) for k in ("w1", "b1", "w2", "b2")}
        onehot = np.eye(10, dtype=np.float32)[self._y_train]
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(x))
            losses = []
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                grads, loss = _gradients(model, x[idx], onehot[idx])
                losses.append(loss)
                for k, g in grads.items():
                    velocity[k] = 0.9 * velocity[k] - learning_rate * g
                    model[k] += velocity[k]
            val_accuracy = float((_predict(model, self._x_val) == self._y_val).mean())
            yield {"epoch": epoch, "epochs": epochs, "loss": float(np.mean(losses)), "val_accuracy": val_accuracy}
            if ctx.cancelled:
                return
        yield {"model": model}

    @tool
    def held_out(self) -> dict[str, np.ndarray]:
        """The test split, never used in training: ``{"images": (n, 8, 8) float32, "labels": (n,) int64}``."""
        return {"images": self._x_test, "labels": self._y_test}

    @tool
    def predict(self, images: np.ndarray, model: dict[Any, Any]) -> np.ndarray:
        """Classify a batch of 8x8 images.

        Args:
            images: ``(n, 8, 8)`` or ``(n, 64)`` pixel values 0..16.
            model: the ``model`` dict that ``train`` yields last.

        Returns:
            ``(n,)`` int64 predicted digits.
        """
        return _predict(model, images)


def _forward(model: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(x @ model["w1"] + model["b1"], 0)
    logits = hidden @ model["w2"] + model["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return hidden, probabilities


def _gradients(model: dict, x: np.ndarray, onehot: np.ndarray) -> tuple[dict, float]:
    hidden, probabilities = _forward(model, x)
    loss = float(-np.mean(np.sum(onehot * np.log(probabilities + 1e-9), axis=1)))
    d_logits = (probabilities - onehot) / len(x)
    d_hidden = (d_logits @ model["w2"].T) * (hidden > 0)
    grads = {
        "w2": hidden.T @ d_logits, "b2": d_logits.sum(axis=0),
        "w1": x.T @ d_hidden, "b1": d_hidden.sum(axis=0),
    }
    return grads, loss


def _predict(model: dict, images: np.ndarray) -> np.ndarray:
    x = (np.asarray(images, np.float32).reshape(len(images), -1) - model["mean"]) / model["scale"]
    return _forward(model, x)[1].argmax(axis=1).astype(np.int64)
