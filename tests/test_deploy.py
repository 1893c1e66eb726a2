"""deploy/: the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate,
which bundles them: offline), and what ties them to the code: the probes ask the port the
container's ``--health`` listens on, the grace periods cover the drains, the token reaches the
worker owner-only. The systemd unit with ``systemd-analyze verify``; the Containerfile parsed
(dockerfile-parse), its user and entrypoint checked. No cluster runs here, nor a container
engine: nothing is deployed or built. A missing tool fails the test, saying how to get it."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import require

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES = "1.37.0"  # the newest schemas kubernetes-validate 1.37 bundles
REPLY_FLUSH = 1.0  # seconds a worker's drain waits for replies after its calls end (worker/_server.py)
CLOSE_MARGIN = 0.5  # seconds a pool waits past shutdown_timeout before it kills (_host/_pool.py compose)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    yaml = require("yaml")
    found = []
    for path in MANIFESTS:
        with open(path, encoding="utf-8") as f:
            found += [(path.name, doc) for doc in yaml.safe_load_all(f) if doc is not None]
    return found


def _resource(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for _, doc in _documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    validate = require("kubernetes_validate")
    documents = _documents()
    assert {name for name, _ in documents} == {"head.yaml", "secrets.yaml", "workers.yaml"}
    verdicts = []
    for name, doc in documents:
        assert "namespace" not in doc["metadata"], f"{name}: the manifests are namespace-free"
        validate.validate(doc, KUBERNETES, strict=True)  # raises ValidationError, naming the field
        verdicts.append(f"{doc['kind']}/{doc['metadata']['name']}")
    assert sorted(verdicts) == [
        "Deployment/trio-bridge-head", "Deployment/trio-bridge-worker", "Secret/trio-bridge-head-tls",
        "Secret/trio-bridge-token", "Secret/trio-bridge-worker-tls", "Service/trio-bridge-workers",
    ]


def test_the_validator_refuses_what_kubernetes_would():
    validate = require("kubernetes_validate")
    worker = _resource("Deployment", "trio-bridge-worker")
    worker["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "health"  # by name: no
    with pytest.raises(validate.ValidationError):
        validate.validate(worker, KUBERNETES, strict=True)


def test_the_workers_service_is_headless_and_lists_ready_pods_of_the_worker_deployment():
    service = _resource("Service", "trio-bridge-workers")
    worker = _resource("Deployment", "trio-bridge-worker")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    listen = _option(container["args"], "--listen")
    assert listen == f"tcp://0.0.0.0:{port['port']}"
    assert port["targetPort"] in [p["name"] for p in container["ports"] if p["containerPort"] == port["port"]]
    head = _resource("Deployment", "trio-bridge-head")
    env = {e["name"]: e.get("value") for e in head["spec"]["template"]["spec"]["containers"][0]["env"]}
    name = service["metadata"]["name"]
    assert env["TRIO_BRIDGE_WORKERS_DNS"] == f"dns://{name}.$(POD_NAMESPACE).svc.cluster.local:{port['port']}"


def _probes_and_health_port(container: dict[str, Any], health: str) -> None:
    host, _, port = health.removeprefix("tcp://").rpartition(":")
    assert host == "0.0.0.0"  # the kubelet probes the pod's address
    live, ready = container["livenessProbe"]["grpc"], container["readinessProbe"]["grpc"]
    assert live["port"] == ready["port"] == int(port)
    assert (live.get("service", ""), ready["service"]) == ("", "ready")


def test_the_probes_ask_the_port_the_health_listener_serves():
    (worker,) = _resource("Deployment", "trio-bridge-worker")["spec"]["template"]["spec"]["containers"]
    _probes_and_health_port(worker, _option(worker["args"], "--health"))
    (head,) = _resource("Deployment", "trio-bridge-head")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in head["env"]}
    _probes_and_health_port(head, "tcp://" + env["TRIO_BRIDGE_HEALTH_ADDRESS"])


def test_the_grace_periods_cover_the_drains():
    from trio_bridge import Lifecycle

    worker_spec = _resource("Deployment", "trio-bridge-worker")["spec"]["template"]["spec"]
    drain = float(_option(worker_spec["containers"][0]["args"], "--drain-timeout"))
    assert worker_spec["terminationGracePeriodSeconds"] >= drain + REPLY_FLUSH + 5
    head_spec = _resource("Deployment", "trio-bridge-head")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in head_spec["containers"][0]["env"]}
    shutdown = float(env.get("TRIO_BRIDGE_SHUTDOWN_TIMEOUT") or Lifecycle().shutdown_timeout)
    assert head_spec["terminationGracePeriodSeconds"] >= shutdown + CLOSE_MARGIN + 5


def test_secrets_are_mounted_owner_only_for_the_non_root_user():
    for name in ("trio-bridge-worker", "trio-bridge-head"):
        spec = _resource("Deployment", name)["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == spec["securityContext"]["fsGroup"] == 10001
        secrets = [v["secret"] for v in spec["volumes"] if "secret" in v]
        assert secrets and all(s["defaultMode"] == 0o400 for s in secrets)
    # fsGroup turns them 0440, which the worker refuses for its token: an init container copies
    # them 0400 into a memory volume; the worker reads that copy
    spec = _resource("Deployment", "trio-bridge-worker")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert "install -m 0400 /secrets/token/token" in init["command"][-1]
    token = _option(spec["containers"][0]["args"], "--token-file")
    assert token == "/etc/trio-bridge/token/token"
    (copy,) = [v for v in spec["volumes"] if v["name"] == "owner-only"]
    assert copy["emptyDir"]["medium"] == "Memory"


def test_the_token_check_follows_a_secret_volume_s_symlinks_and_refuses_what_fsgroup_makes(tmp_path):
    """A secret volume's files are symlinks (``token -> ..data/token``, ``..data -> ..2026_...``):
    the worker's check reads the mode of the file they lead to. 0400 passes; 0440, the mode
    fsGroup gives a secret volume's files, does not (hence the init container's copy)."""
    from trio_bridge import InvalidArgumentError
    from trio_bridge._wire.auth import read_token_file

    version = tmp_path / "..2026_12_07_00_00_00.000000001"
    version.mkdir()
    (version / "token").write_text("a-token-for-the-tests-0123456789\n")
    (tmp_path / "..data").symlink_to(version.name)
    (tmp_path / "token").symlink_to("..data/token")
    (version / "token").chmod(0o400)
    assert stat.S_ISLNK(os.lstat(tmp_path / "token").st_mode)
    assert read_token_file(str(tmp_path / "token")) == "a-token-for-the-tests-0123456789"
    (version / "token").chmod(0o440)
    with pytest.raises(InvalidArgumentError, match="chmod 600"):
        read_token_file(str(tmp_path / "token"))


def test_the_systemd_unit_verifies(tmp_path):
    """``systemd-analyze verify``, which also checks that ExecStart's program exists: the unit's
    /opt/trio-bridge/bin/trio-bridge becomes this environment's trio-bridge for the check."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install systemd (apt-get install systemd); .ci/run does")
    unit = (DEPLOY / "systemd" / "trio-bridge-worker.service").read_text()
    program = Path(sys.executable).parent / "trio-bridge"
    assert program.exists(), f"{program} is missing: pip install -e '.[dev]'"
    assert "/opt/trio-bridge/bin/trio-bridge worker " in unit
    path = tmp_path / "trio-bridge-worker.service"
    path.write_text(unit.replace("/opt/trio-bridge/bin/trio-bridge", str(program)))
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, check=False)
    # it exits 0 for unknown keys and unparsable values too, saying so on stderr: any output fails
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    drain = float(_option(settings["ExecStart"].split(), "--drain-timeout"))
    assert float(settings["TimeoutStopSec"]) >= drain + REPLY_FLUSH + 5
    assert settings["KillSignal"] == "SIGTERM" and "143" in settings["SuccessExitStatus"].split()
    assert settings["DynamicUser"] == "yes" and settings["Type"] in ("simple", "exec")  # no sd_notify in the worker


def test_the_containerfile_runs_trio_bridge_worker_as_a_non_root_user():
    parser_module = require("dockerfile_parse")
    with open(DEPLOY / "Containerfile", "rb") as f:  # (its path= wants a file named Dockerfile)
        parser = parser_module.DockerfileParser(fileobj=io.BytesIO(f.read()))
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    assert parser.baseimage.startswith("python:") and parser.baseimage.endswith("-slim")
    users = [value for instruction, value in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [value for instruction, value in instructions if instruction == "ENTRYPOINT"]
    assert entrypoint == '["trio-bridge", "worker"]'
    exposed = {port for instruction, value in instructions if instruction == "EXPOSE" for port in value.split()}
    assert exposed == {"7000", "7001"}
    assert any(i == "RUN" and 'pip install ".[examples]"' in v for i, v in instructions)
    assert ("COPY", "deploy/head.py /opt/trio-bridge/head.py") in instructions


def test_the_example_head_imports():
    import runpy

    names = runpy.run_path(str(DEPLOY / "head.py"))  # not as __main__: it does not run
    assert callable(names["main"])
