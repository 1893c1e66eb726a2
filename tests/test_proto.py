"""The committed generated code matches proto/ (run `just proto` after editing a .proto)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "trio_bridge" / "_wire" / "generated"


def test_generated_code_is_up_to_date(tmp_path):
    require("grpc_tools")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])  # ruff formats the output
    if shutil.which("ruff", path=env["PATH"]) is None:
        pytest.fail("ruff is not on PATH (it formats the generated code): pip install -e '.[dev]'")
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))  # as `just proto` names them
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", f"--python_betterproto2_out={tmp_path}",
         "--python_betterproto2_opt=client_generation=async,server_generation=async", *protos],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )
    fresh = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.py")}
    committed = {p.relative_to(GENERATED) for p in GENERATED.rglob("*.py")}
    assert fresh == committed, "generated files differ: run `just proto`"
    # Compare syntax trees, not text: the plugin's ruff formatting may vary with ruff's version.
    stale = [str(p) for p in sorted(fresh) if _tree(tmp_path / p) != _tree(GENERATED / p)]
    assert not stale, f"generated code is stale, run `just proto`: {stale}"


def _tree(path: Path) -> str:
    return ast.dump(ast.parse(path.read_text()))
