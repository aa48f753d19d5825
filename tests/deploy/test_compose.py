"""docker-compose.yml: Compose Specification schema and the stack's wiring.

No Docker daemon here, so the stack is never started: this checks that the
file is valid Compose and that every address, port, topic and dependency
lines up between services.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from deploylib import ROOT

SETTINGS_ENV = {
    # TXN_SIDECAR_<setting key with dots as underscores, upper case>
    "CONFIG", "BROKERS", "TOPIC", "GROUP", "APP_URL", "ADMIN_ADDR", "PROTOCOL", "DLQ_TOPIC",
    "TXN_TIMEOUT", "ON_FAILURE", "SHUTDOWN_GRACE", "LOG_FORMAT",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _flag(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == flag]


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """'PLAINTEXT://kafka:9092,CONTROLLER://:9093' -> {name: (host, port)}."""
    out = {}
    for item in value.split(","):
        m = re.fullmatch(r"([A-Z_]+)://([^:]*):([0-9]+)", item.strip())
        assert m, f"unparsable listener {item!r}"
        out[m.group(1)] = (m.group(2), int(m.group(3)))
    return out


def test_compose_spec_schema(compose) -> None:
    # The Compose Specification schema, as vendored by check-jsonschema.
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(ref.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=str)
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_services_exist(services) -> None:
    assert {"kafka", "create-topics", "sidecar", "app", "producer", "prometheus"} <= set(services)


def test_kafka_is_single_node_kraft(services) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners
    # The single voter is this node, at the controller listener's port.
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:{listeners[controller][1]}"
    protocol_map = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocol_map)
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env["KAFKA_NUM_PARTITIONS"] == "3"
    test = kafka["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert re.search(r"/opt/kafka/bin/kafka-(broker-api-versions|topics)\.sh", " ".join(test[1:]))


def _internal_listener(services) -> tuple[str, int]:
    env = _env(services["kafka"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    internal = [hp for hp in advertised.values() if hp[0] == "kafka"]
    assert len(internal) == 1, "one listener advertised under the service name"
    return internal[0]


def test_sidecar_wiring(services) -> None:
    sidecar = services["sidecar"]
    assert sidecar["build"] in (".", {"context": "."})
    assert sidecar["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert sidecar["depends_on"]["create-topics"]["condition"] == "service_completed_successfully"
    env = _env(sidecar)
    for key in env:
        assert key.startswith("TXN_SIDECAR_"), key
        rest = key.removeprefix("TXN_SIDECAR_")
        assert rest in SETTINGS_ENV or rest.startswith("KAFKA_"), f"{key} is no txn-sidecar setting"

    host, port = _internal_listener(services)
    assert env["TXN_SIDECAR_BROKERS"] == f"{host}:{port}"

    app_cmd = services["app"]["command"]
    assert app_cmd[0] == "sample-app"
    listen_port = int(_flag(app_cmd, "--listen")[0].rsplit(":", 1)[1])
    url = urlsplit(env["TXN_SIDECAR_APP_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("http", "app", listen_port, "/transactions")

    assert env["TXN_SIDECAR_ADMIN_ADDR"] == "0.0.0.0:9464"
    assert "9464:9464" in [str(p) for p in sidecar["ports"]]
    assert env["TXN_SIDECAR_LOG_FORMAT"] == "text"


def test_app_and_producers_use_the_built_image(services) -> None:
    image = services["sidecar"]["image"]
    producers = [name for name, s in services.items() if (s.get("command") or [None])[0] == "produce"]
    assert "producer" in producers
    for name in ["app", *producers]:
        assert services[name]["image"] == image, name
        assert "build" not in services[name], f"{name} reuses the sidecar's build"


def test_topics_line_up(services) -> None:
    topic = _env(services["sidecar"])["TXN_SIDECAR_TOPIC"]
    brokers = _env(services["sidecar"])["TXN_SIDECAR_BROKERS"]
    script = " ".join(services["create-topics"]["command"])
    created = set(re.findall(r"for t in ([^;]+);", script)[0].split()) if "for t in" in script else set(
        re.findall(r"--topic\s+(\S+)", script)
    )
    assert {topic, f"{topic}.dlq"} <= created
    for name, service in services.items():
        command = service.get("command") or []
        if command and command[0] == "produce":
            assert _flag(command, "--topic") == [topic], name
            assert _flag(command, "--brokers") == [brokers], name
            assert len(_flag(command, "--id")) == 1, name
            tasks = _flag(command, "--task")
            assert tasks, name
            for task in tasks:
                json.loads(task)
            assert service["depends_on"]["create-topics"]["condition"] == "service_completed_successfully"


def test_create_topics_waits_for_a_healthy_broker(services) -> None:
    ct = services["create-topics"]
    assert ct["image"] == services["kafka"]["image"]
    assert ct["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "--bootstrap-server kafka:9092" in " ".join(ct["command"])
    assert shlex.split(" ".join(ct["entrypoint"]))[0] == "/bin/sh"


def test_prometheus_scrapes_the_sidecar(services) -> None:
    prom = services["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    assert "9090:9090" in [str(p) for p in prom["ports"]]
    mounts = {}
    for volume in prom["volumes"]:
        src, dst = volume.split(":")[:2]
        mounts[dst] = src
    src = mounts["/etc/prometheus/prometheus.yml"]
    path = (ROOT / src).resolve()
    assert path == (ROOT / "deploy" / "prometheus" / "prometheus.yml").resolve() and path.is_file()

    config = yaml.safe_load(path.read_text())
    admin_port = _env(services["sidecar"])["TXN_SIDECAR_ADMIN_ADDR"].rsplit(":", 1)[1]
    jobs = [
        job
        for job in config["scrape_configs"]
        if f"sidecar:{admin_port}" in [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    ]
    assert len(jobs) == 1
    assert jobs[0].get("metrics_path", "/metrics") == "/metrics"
    assert jobs[0].get("scheme", "http") == "http"


def test_restart_policies(services) -> None:
    # The Compose schema types `restart` as any string; Docker accepts only these.
    for name, service in services.items():
        if "restart" in service:
            assert re.fullmatch(r"no|always|unless-stopped|on-failure(:[0-9]+)?", str(service["restart"])), name
    one_shots = [n for n, s in services.items() if (s.get("command") or [None])[0] == "produce"] + ["create-topics"]
    for name in one_shots:
        assert services[name].get("restart", "no") == "no", f"{name} is one-shot"
