# trio-bridge tasks. `just --list` shows them.

python := env_var_or_default("PYTHON", "python")

# Run the test suite (the README's test command).
test *args:
    {{python}} -m pytest -q {{args}}

# The whole suite once per CPython 3.11 to 3.14, and the fast part at the lowest and newest
# allowed dependencies, each in a fresh venv (nox; CI runs this).
test-all *args:
    {{python}} -m nox {{args}}

# Only the tests that start real worker processes.
test-real *args:
    {{python}} -m pytest -q -m real_process {{args}}

# Regenerate the betterproto2 code and the descriptors (for server reflection) from proto/ (ruff must be on PATH: the plugin formats with it).
proto:
    rm -rf trio_bridge/_wire/generated
    mkdir -p trio_bridge/_wire/generated
    {{python}} -m grpc_tools.protoc -I proto --python_betterproto2_out=trio_bridge/_wire/generated --python_betterproto2_opt=client_generation=async,server_generation=async proto/trio_bridge/v1/bridge.proto proto/google/rpc/status.proto proto/grpc/health/v1/health.proto proto/grpc/reflection/v1/reflection.proto proto/grpc/reflection/v1alpha/reflection.proto
    {{python}} -m grpc_tools.protoc -I proto --include_imports --descriptor_set_out=trio_bridge/_wire/generated/bridge.desc proto/trio_bridge/v1/bridge.proto proto/google/rpc/status.proto proto/grpc/health/v1/health.proto proto/grpc/reflection/v1/reflection.proto proto/grpc/reflection/v1alpha/reflection.proto

# The benchmark harness: prints a table and writes benchmarks/results.json.
bench *args:
    {{python}} -m benchmarks.bench {{args}}

# Lint (ruff), type check (pyright) and the public API's type completeness: every exported
# symbol's own annotations complete (`--ignoreexternal`: 100 %), and at least 95 % of them fully
# known with third parties' types counted too (what is left: numpy's, pytest's and the MCP SDK's
# own incompletely typed classes where our API hands them out; pyright has no threshold flag).
lint:
    ruff check trio_bridge tests benchmarks noxfile.py
    pyright trio_bridge
    pyright --verifytypes trio_bridge --ignoreexternal
    pyright --verifytypes trio_bridge --outputjson | {{python}} -c 'import json, sys; score = json.load(sys.stdin)["typeCompleteness"]["completenessScore"]; print(f"type completeness, third parties included: {score:.1%} (95 % needed)"); sys.exit(score < 0.95)'

# The API reference from the docstrings (mkdocs + mkdocstrings), built strictly into site/:
# a warning (a broken link, a docstring griffe cannot parse) fails it.
docs:
    {{python}} -m mkdocs build --strict --site-dir site
