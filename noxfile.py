"""The version matrix: the README's test command once per supported CPython, each in a fresh venv.

``just test-all`` (and CI) runs ``nox``. A missing interpreter is an error, never a skip. Under
pyenv, where only one version is selected and the other ``python3.X`` shims refuse to run, the
installed 3.11/3.12/3.13 are selected for this run through ``PYENV_VERSION`` (the machine's
pyenv settings are not changed). Where no ``python3.14`` is on ``PATH``, the one that
``../shared/tools/make-python314.sh`` makes from Debian's packages is used (in the temporary
directory; nothing on the system changes).

``nox -s lowest`` and ``nox -s newest`` test the ends of the dependency ranges: every run-time
dependency at the lowest release pyproject.toml allows (on the oldest Python), or at the newest
(on the newest), with the suite's fast part and a few real-process smoke tests; each prints the
versions it used (``trio-bridge doctor``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement

PYTHONS = ["3.11", "3.12", "3.13", "3.14"]

nox.options.error_on_missing_interpreters = True
nox.options.reuse_venv = "no"
nox.options.sessions = ["tests", "lowest", "newest"]


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


def _find_python314() -> None:
    """Put a ``python3.14`` on ``PATH`` for this run if there is none: the shared script's (only
    that name: its folder also holds a ``python3``, which must not shadow the others)."""
    if shutil.which("python3.14") is not None:
        return
    script = Path(__file__).resolve().parent.parent / "shared" / "tools" / "make-python314.sh"
    if not script.exists():
        return  # nox then says python3.14 is missing (an error, not a skip)
    build = Path(tempfile.gettempdir()) / "python3.14-for-nox"  # (not trio-bridge-*: those are pools' leftovers)
    wrapper = subprocess.run(["bash", str(script), str(build)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    only = build / "only"
    only.mkdir(exist_ok=True)
    link = only / "python3.14"
    if not link.exists():
        link.symlink_to(wrapper)
    os.environ["PATH"] = f"{only}{os.pathsep}{os.environ['PATH']}"


_find_python314()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The README's test command: ``pip install -e '.[dev]' && just test``."""
    session.install("-q", "-e", ".[dev]")
    session.run("python", "--version")
    session.run("just", "test", *session.posargs, external=False)


#: The suite's fast part, and real-process smoke tests: unary, stream, arrays in-band and through
#: shared memory, cancellation, on our fast wire and on the stock one.
SMOKE = [
    "tests/test_versions.py::test_grpclib_and_betterproto2_imported_before_trio_bridge",
    "tests/test_codec.py::test_big_arrays_echo_in_band_intact_and_writable",
    "tests/test_stock_wire.py::test_unary_stream_arrays_and_cancellation_work_over_the_stock_wire",
]
#: Tests the lowest releases cannot run as they are, and why (the rest of the fast part runs).
LOWEST_DESELECT = {
    # regenerates the code with the dev toolchain and compares: protobuf 4.21's grpcio-tools
    # (1.60) writes other well-known types than the toolchain the code was generated with
    "tests/test_proto.py::test_generated_code_is_up_to_date": "an older code generator",
    # the MCP SDK ([mcp]) needs a newer pydantic than our lowest (as does all of tests/test_mcp.py)
    "tests/test_tool_schemas.py::test_the_mcp_shape_is_the_sdks_tool": "the MCP SDK is not installed",
}
#: What the fast part needs of [dev] beyond the package (linters and docs tools are not needed).
TEST_TOOLS = {
    "pytest", "pytest-trio", "hypothesis", "trio-parallel", "grpcio", "grpcio-tools", "betterproto2-compiler",
    "kubernetes-validate", "dockerfile-parse", "dnslib",  # tests/test_deploy.py, tests/netbed.py
}


def _project() -> dict:
    with open(Path(__file__).parent / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _lowest_constraints() -> list[str]:
    """Each run-time dependency pinned to the lowest release its requirement allows (its ``>=``,
    ``==`` or ``~=`` bound), its environment marker kept."""
    lines = []
    for line in _project()["dependencies"]:
        requirement = Requirement(line)
        lows = [s.version.removesuffix(".*") for s in requirement.specifier if s.operator in (">=", "==", "~=")]
        if not lows:
            raise ValueError(f"{line!r} has no lower bound: give it one (nox -s lowest tests it)")
        marker = f"; {requirement.marker}" if requirement.marker else ""
        lines.append(f"{requirement.name}=={lows[0]}{marker}")
    return lines


def _test_tools() -> list[str]:
    return [line for line in _project()["optional-dependencies"]["dev"] if Requirement(line).name in TEST_TOOLS]


def _fast_part(session: nox.Session, *ignore: str, deselect: dict[str, str] | None = None) -> None:
    session.run("trio-bridge", "doctor")  # the versions used, and whether the wire's fast paths are on
    left_out = [f"--ignore={path}" for path in ignore]
    for test, why in (deselect or {}).items():
        session.log(f"not run: {test} ({why})")
        left_out += ["--deselect", test]
    session.run("python", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not real_process and not netbed", *left_out, *session.posargs)
    session.run("python", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SMOKE)


@nox.session(python=PYTHONS[0])
def lowest(session: nox.Session) -> None:
    """Every run-time dependency at its lowest allowed release (a constraints file made from
    pyproject.toml's lower bounds). Without [mcp]: the MCP SDK needs a newer pydantic than ours."""
    constraints = Path(session.virtualenv.location) / "lowest-constraints.txt"  # (create_tmp would move TMPDIR)
    constraints.write_text("\n".join(_lowest_constraints()) + "\n")
    session.log("constraints:\n" + constraints.read_text())
    # (jsonschema: tests/test_tool_schemas.py's, which [dev] brings with the MCP SDK)
    session.install("-q", "-c", str(constraints), "-e", ".[examples,otel]", *_test_tools(), "jsonschema")
    _fast_part(session, "tests/test_mcp.py", deselect=LOWEST_DESELECT)


@nox.session(python=PYTHONS[-1])
def newest(session: nox.Session) -> None:
    """Every dependency at the newest release its requirement allows."""
    session.install("-q", "--upgrade", "--upgrade-strategy", "eager", "-e", ".[dev]")
    _fast_part(session)
