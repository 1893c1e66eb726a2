"""The version matrix: the README's test command once per supported CPython, each in a fresh venv.

``just test-all`` (and CI) runs ``nox``. A missing interpreter is an error, never a skip. Under
pyenv, where only one version is selected and the other ``python3.X`` shims refuse to run, the
installed 3.11/3.12/3.13 are selected for this run through ``PYENV_VERSION`` (the machine's
pyenv settings are not changed).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

PYTHONS = ["3.11", "3.12", "3.13"]

nox.options.error_on_missing_interpreters = True
nox.options.reuse_venv = "no"
nox.options.sessions = ["tests"]


def _select_pyenv_versions() -> None:
    if os.environ.get("PYENV_VERSION") or shutil.which("pyenv") is None:
        return
    installed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split()
    chosen = []
    for minor in PYTHONS:
        matching = [v for v in installed if v.startswith(minor + ".") and v.replace(".", "").isdigit()]
        if matching:
            chosen.append(max(matching, key=lambda v: tuple(int(p) for p in v.split("."))))
    if chosen:
        os.environ["PYENV_VERSION"] = ":".join(chosen)


_select_pyenv_versions()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The README's test command: ``pip install -e '.[dev]' && just test``."""
    session.install("-q", "-e", ".[dev]")
    session.run("python", "--version")
    session.run("just", "test", *session.posargs, external=False)
