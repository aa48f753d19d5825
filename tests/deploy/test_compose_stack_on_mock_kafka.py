"""docker-compose.yml's commands, run for real without Docker.

No Docker engine or Apache Kafka runs here, so this runs the compose stack's
own command lines and sidecar environment with the built binary on loopback,
with `txn-sidecar mock-kafka` (librdkafka's mock cluster) standing in for the
kafka service. Only addresses change: kafka:9092, app:8080 and 0.0.0.0:9464
become loopback ports. It then checks what a user of the stack sees: the
sample app prints each produced transaction whole and in order, and the
sidecar's /metrics serves every metric the Grafana dashboard uses.
Skipped without a built binary (see test_config_against_binary.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploylib import ROOT
from test_config_against_binary import BIN

pytestmark = pytest.mark.skipif(BIN is None, reason="no txn-sidecar binary built (set TXN_SIDECAR_BIN)")

DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, timeout: float = DEADLINE):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def _flag(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == flag]


def _replace_flag(command: list[str], flag: str, value: str) -> list[str]:
    out = list(command)
    out[out.index(flag) + 1] = value
    return out


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.terminate()
    for p in started:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_compose_stack_delivers_the_producers_transactions(procs, tmp_path: Path) -> None:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXN_SIDECAR_")}

    # kafka + create-topics -> one mock cluster with the topics the stack creates.
    script = " ".join(services["create-topics"]["command"])
    topics = re.findall(r"for t in ([^;]+);", script)[0].split()
    bootstrap_file = tmp_path / "bootstrap"
    args = [str(BIN), "mock-kafka", *[a for t in topics for a in ("--topic", f"{t}:3")], "--bootstrap-file", str(bootstrap_file)]
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    brokers = _wait(lambda: bootstrap_file.exists() and bootstrap_file.read_text().strip(), "mock kafka")

    # app: the compose command with its listen address moved to loopback.
    app_cmd = services["app"]["command"]
    app_port = _free_port()
    app_out = open(tmp_path / "app.out", "w+")
    procs.append(subprocess.Popen(
        [str(BIN), *_replace_flag(app_cmd, "--listen", f"127.0.0.1:{app_port}")],
        env=env, stdout=app_out, stderr=subprocess.DEVNULL,
    ))

    # sidecar: the compose environment with service addresses moved to loopback.
    side_env = {k: str(v) for k, v in services["sidecar"]["environment"].items()}
    app_url = side_env["TXN_SIDECAR_APP_URL"].replace(
        f"//app:{_flag(app_cmd, '--listen')[0].rsplit(':', 1)[1]}/", f"//127.0.0.1:{app_port}/"
    )
    assert app_url != side_env["TXN_SIDECAR_APP_URL"]
    admin_port = _free_port()
    side_env.update(
        TXN_SIDECAR_BROKERS=brokers,
        TXN_SIDECAR_APP_URL=app_url,
        TXN_SIDECAR_ADMIN_ADDR=f"127.0.0.1:{admin_port}",
    )
    side_log = open(tmp_path / "sidecar.log", "w+")
    sidecar = subprocess.Popen(
        [str(BIN), *services["sidecar"]["command"]], env={**env, **side_env}, stdout=side_log, stderr=subprocess.STDOUT
    )
    procs.append(sidecar)
    admin = f"http://127.0.0.1:{admin_port}"
    _wait(lambda: _get(f"{admin}/readyz"), "sidecar /readyz")

    # producers: exactly their compose commands, brokers moved.
    expected = {}
    for name, service in services.items():
        command = service.get("command") or []
        if command[:1] == ["produce"]:
            run = subprocess.run(
                [str(BIN), *_replace_flag(command, "--brokers", brokers)],
                env=env, capture_output=True, text=True, timeout=DEADLINE,
            )
            assert run.returncode == 0, f"{name}: {run.stderr}"
            expected[_flag(command, "--id")[0]] = [json.loads(t) for t in _flag(command, "--task")]
    assert len(expected) >= 1

    def received() -> dict[str, Any] | None:
        app_out.seek(0)
        lines = [json.loads(line) for line in app_out.read().splitlines() if line.strip()]
        got = {line["transaction"]["id"]: line for line in lines}
        return got if len(got) >= len(expected) else None

    got = _wait(received, "the app to print every produced transaction")
    assert set(got) == set(expected)
    for txn_id, tasks in expected.items():
        line = got[txn_id]
        txn = line["transaction"]
        assert [t["value"] for t in txn["tasks"]] == tasks, txn_id
        assert txn["topic"] == side_env["TXN_SIDECAR_TOPIC"]
        offsets = [t["offset"] for t in txn["tasks"]]
        assert offsets == sorted(offsets) and txn["commit_offset"] > offsets[-1]
        assert line["idempotency_key"] == f"{txn['topic']}/{txn['partition']}/{txn['commit_offset']}"

    # What Prometheus scrapes: every metric of the dashboard's contract.
    metrics = _wait(lambda: _get(f"{admin}/metrics"), "/metrics")
    # A labelled family (dead letters by reason, lag per partition) has no
    # series before its first event, so its `# TYPE` line is what proves it
    # is exported. OpenMetrics names a counter without its _total suffix.
    exported = set()
    for name, kind in re.findall(r"^# TYPE (txn_sidecar_[a-z0-9_]+) ([a-z]+)$", metrics, re.M):
        exported.add(f"{name}_total" if kind == "counter" else name)
    contract = set((ROOT / "tests" / "deploy" / "metric_names.txt").read_text().split())
    assert contract <= exported, f"not exported: {sorted(contract - exported)}"
    delivered = re.search(r'^txn_sidecar_transactions_total\{outcome="delivered"\} ([0-9.]+)', metrics, re.M)
    assert delivered and float(delivered.group(1)) == len(expected)

    # docker compose stop: SIGTERM, then a clean exit well inside the 45 s
    # the Kubernetes manifests allow.
    sidecar.send_signal(signal.SIGTERM)
    assert sidecar.wait(timeout=30) == 0
