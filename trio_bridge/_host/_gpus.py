"""Per-worker environments: ``LocalWorkers(slot_env=...)`` and ``LocalWorkers(gpus_per_worker=...)``.

A slot's environment is worked out once, when the pool opens, and every worker of that slot
(its replacements too) gets it: a model replica stays on its GPUs across restarts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence

from trio_bridge._core.failures import exception_text, is_failure
from trio_bridge._errors import InvalidArgumentError
from trio_bridge._wire.codec import short_repr

#: the variable CUDA (and PyTorch, JAX, TensorFlow on NVIDIA GPUs) reads: which devices a process sees
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """This machine's GPUs as ``CUDA_VISIBLE_DEVICES`` names them: the host's own
    ``CUDA_VISIBLE_DEVICES`` if set (the pool shares out what the host was given), else the
    indices ``nvidia-smi`` lists; ``[]`` if neither finds any."""
    given = os.environ.get(CUDA_VISIBLE_DEVICES)
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def slot_environments(
    size: int, *, worker_env: Callable[[int], Mapping[str, str]] | None, gpus_per_worker: int | None,
    gpus: Sequence[int | str] | None,
) -> list[dict[str, str]]:
    """The extra environment of each local slot ``0 .. size-1``.

    ``gpus_per_worker=N`` gives slot ``i`` the ``N`` GPUs from ``i * N`` on, round the list of
    ``gpus`` (default: :func:`visible_gpus`), in ``CUDA_VISIBLE_DEVICES``; with more slots than
    GPUs, slots share them round-robin. ``worker_env(slot)`` is applied after, so it can
    override.

    The options are checked (``_options``: ``LocalWorkers``); what is checked here is what
    only running them shows.

    Raises:
        InvalidArgumentError: there are no GPUs to give (or fewer than one worker needs), or
            ``worker_env`` raised or returned anything but a mapping of ``str`` to ``str``.
    """
    environments: list[dict[str, str]] = [{} for _ in range(size)]
    if gpus_per_worker is not None:
        devices = [str(d) for d in (gpus if gpus is not None else visible_gpus())]
        if len(devices) < gpus_per_worker:
            found = f"only {len(devices)} ({', '.join(devices)})" if devices else "none"
            raise InvalidArgumentError(
                f"LocalWorkers.gpus_per_worker={gpus_per_worker}, but {found} GPUs are visible "
                "(CUDA_VISIBLE_DEVICES, nvidia-smi; or pass LocalWorkers(gpus=[...]))"
            )
        for slot, env in enumerate(environments):
            start = slot * gpus_per_worker
            env[CUDA_VISIBLE_DEVICES] = ",".join(devices[(start + k) % len(devices)] for k in range(gpus_per_worker))
    if worker_env is not None:
        for slot, env in enumerate(environments):
            try:
                extra = worker_env(slot)
            except BaseException as exc:
                if not is_failure(exc, ()):
                    raise
                raise InvalidArgumentError(f"LocalWorkers.slot_env({slot}) raised {type(exc).__name__}: {exception_text(exc)}") from exc
            if not isinstance(extra, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
                raise InvalidArgumentError(
                    f"LocalWorkers.slot_env({slot}) must return a mapping of str to str, not {short_repr(extra)}"
                )
            env.update(extra)
    return environments
