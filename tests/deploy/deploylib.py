"""Shared helpers for the offline deployment checks (tests/deploy).

Nothing here talks to a cluster, a Docker daemon or the network: Kubernetes
objects are checked against the OpenAPI schemas that kubernetes-validate
ships, Helm runs in-process through helm-python-sdk.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "txn-sidecar"
MANIFESTS = ROOT / "deploy" / "kubernetes"

# Native sidecars (init containers with restartPolicy: Always) are on by
# default from 1.29; also check against the newest schemas the package ships.
K8S_VERSIONS = sorted({"1.29.0", kubernetes_validate.latest_version()})

SIDECAR = "txn-sidecar"
ADMIN_PORT_NAME = "admin"
CONFIG_ENV = "TXN_SIDECAR_CONFIG"
SASL_ENV = ("TXN_SIDECAR_KAFKA_SASL_USERNAME", "TXN_SIDECAR_KAFKA_SASL_PASSWORD")

# Settings of the product contract (docs/DEPLOY.md, BRIEF.md) that our
# deployment files may set. A key outside this set is a typo or a setting the
# product does not have.
TOML_TOP_KEYS = {
    "brokers", "topic", "group", "protocol", "dlq_topic", "txn_timeout",
    "on_failure", "shutdown_grace", "log_format", "app", "admin", "limits", "kafka",
}
TOML_TABLE_KEYS = {"app": {"url"}, "admin": {"addr"}, "limits": {"max_staged_bytes"}}
ENUMS = {
    "protocol": {"headers", "key-prefix"},
    "on_failure": {"dead-letter", "block"},
    "log_format": {"json", "text"},
}

_SIZE = re.compile(r"([0-9]+)(B|KiB|MiB|GiB|KB|MB|GB)?")
_SIZE_SCALE = {None: 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_QUANTITY = re.compile(r"([0-9]+)(Ki|Mi|Gi|k|M|G)?")
_QUANTITY_SCALE = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}

# Product defaults (src/config/build.rs) that bound the sidecar's memory, and the
# README's sizing table ("The memory budget").
DEFAULT_MAX_STAGED_BYTES = 192 * 2**20
DEFAULT_MAX_TXN_BYTES = 16 * 2**20
# queued.max.messages.kbytes (32768) and fetch.max.bytes (16 MiB) as the sidecar sets
# them unless [kafka] gives them.
DEFAULT_QUEUED_MAX_KBYTES = 32768
DEFAULT_FETCH_MAX_BYTES = 16 * 2**20
ALLOCATOR_OVERHEAD = 1.1
# The up to 64 records the poll loop reads between two budget checks, of up to 100 KB.
POLL_SLACK_BYTES = 64 * 100 * 10**3
BODY_PER_TXN_BYTE = 1.4
# The README sizes the defaults for up to 8 partitions per member, one delivery each.
PARTITIONS_PER_MEMBER = 8
PROCESS_BYTES = 15 * 2**20


def memory_need(config: dict[str, Any], env: dict[str, Any]) -> int:
    """Bytes the README's sizing ("The memory budget") asks of the sidecar's memory limit."""
    limits = config.get("limits", {})
    staged_env = env.get("TXN_SIDECAR_LIMITS_MAX_STAGED_BYTES", {}).get("value")
    staged = size_bytes(staged_env or limits.get("max_staged_bytes", DEFAULT_MAX_STAGED_BYTES))
    txn = size_bytes(limits.get("max_txn_bytes", DEFAULT_MAX_TXN_BYTES))
    kafka = config.get("kafka", {})
    prefetch = int(kafka.get("queued.max.messages.kbytes", DEFAULT_QUEUED_MAX_KBYTES)) * 2**10
    fetch = int(kafka.get("fetch.max.bytes", DEFAULT_FETCH_MAX_BYTES))
    bodies = PARTITIONS_PER_MEMBER * BODY_PER_TXN_BYTE * txn
    return int(staged * ALLOCATOR_OVERHEAD + POLL_SLACK_BYTES + prefetch + fetch + bodies + PROCESS_BYTES)


def size_bytes(text: str | int) -> int:
    """Bytes in a txn-sidecar size ("128MiB", "1048576")."""
    m = _SIZE.fullmatch(str(text))
    assert m, f"not a size: {text!r}"
    return int(m.group(1)) * _SIZE_SCALE[m.group(2)]


def quantity_bytes(text: str | int) -> int:
    """Bytes in a Kubernetes memory quantity ("512Mi")."""
    m = _QUANTITY.fullmatch(str(text))
    assert m, f"unsupported quantity: {text!r}"
    return int(m.group(1)) * _QUANTITY_SCALE[m.group(2)]


_DURATION_PART = re.compile(r"([0-9]+)(ns|us|ms|s|m|h|d)")
_DURATION_SCALE = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """Seconds in "20s", "1m 30s", "500ms" (a subset of humantime's syntax)."""
    stripped = text.replace(" ", "")
    parts = _DURATION_PART.findall(stripped)
    assert parts and "".join(n + u for n, u in parts) == stripped, f"not a duration: {text!r}"
    return sum(int(n) * _DURATION_SCALE[u] for n, u in parts)


def load_docs(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a (rendered) manifest stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------
# Schema validation

# The Prometheus Operator's PodMonitor is a CRD, and kubernetes-validate ships
# only built-in kinds. This is the part of monitoring.coreos.com/v1 PodMonitor
# that our manifests use, with unknown fields rejected so a misspelt field
# (podMetricEndpoints, targetPort on a pod endpoint...) fails here rather than
# being pruned silently by the API server.
_PROM_DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
_LABEL_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": _LABEL_MAP,
                "annotations": _LABEL_MAP,
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": _LABEL_MAP,
                        "matchExpressions": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _PROM_DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _PROM_DURATION},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


def validate_k8s(obj: dict[str, Any]) -> None:
    """Validate one object offline; raise with a readable message if invalid.

    Built-in kinds: kubernetes-validate's strict schemas (unknown fields are
    errors) for every version in K8S_VERSIONS. PodMonitor: PODMONITOR_SCHEMA.
    Any other kind fails: a kind we cannot check is not silently accepted.
    """
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion") == "monitoring.coreos.com/v1" and obj.get("kind") == "PodMonitor":
        errors = sorted(jsonschema.Draft7Validator(PODMONITOR_SCHEMA).iter_errors(obj), key=str)
        assert not errors, f"{name}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise AssertionError(f"{name} invalid for Kubernetes {version}: {path}: {e.message}") from None
        except kubernetes_validate.SchemaNotFoundError as e:
            raise AssertionError(f"{name}: no schema to check it against: {e.message}") from None


# --------------------------------------------------------------------------
# Pod checks shared by the Helm renders and deploy/kubernetes


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def sidecar_container(spec: dict[str, Any], native: bool) -> dict[str, Any]:
    """The txn-sidecar container, asserting where it sits for the mode."""
    inits = spec.get("initContainers") or []
    mains = spec.get("containers") or []
    in_init = [c for c in inits if c["name"] == SIDECAR]
    in_main = [c for c in mains if c["name"] == SIDECAR]
    if native:
        assert len(in_init) == 1 and not in_main, "native: the sidecar must be an init container only"
        c = in_init[0]
        assert c.get("restartPolicy") == "Always", "a native sidecar needs restartPolicy: Always"
    else:
        assert len(in_main) == 1 and not in_init, "fallback: the sidecar must be a regular container only"
        c = in_main[0]
        assert "restartPolicy" not in c, "a regular container must not set restartPolicy"
        assert len(mains) == 2, "fallback: app + sidecar"
    return c


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = container.get("env") or []
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env names in {container['name']}: {names}"
    return {e["name"]: e for e in env}


def port_by_name(container: dict[str, Any], name: str) -> int:
    ports = [p for p in container.get("ports") or [] if p.get("name") == name]
    assert len(ports) == 1, f"{container['name']}: expected one port named {name!r}"
    return ports[0]["containerPort"]


def assert_restricted_security(container: dict[str, Any], pod_security: dict[str, Any]) -> None:
    sc = container.get("securityContext") or {}
    who = container["name"]
    assert sc.get("runAsNonRoot") is True or pod_security.get("runAsNonRoot") is True, f"{who}: runAsNonRoot"
    assert sc.get("readOnlyRootFilesystem") is True, f"{who}: readOnlyRootFilesystem"
    assert sc.get("allowPrivilegeEscalation") is False, f"{who}: allowPrivilegeEscalation"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{who}: capabilities.drop [ALL]"
    assert "add" not in sc.get("capabilities", {}), f"{who}: adds capabilities"
    seccomp = sc.get("seccompProfile") or pod_security.get("seccompProfile") or {}
    assert seccomp.get("type") == "RuntimeDefault", f"{who}: seccompProfile RuntimeDefault"
    assert sc.get("privileged") in (None, False), f"{who}: privileged"


def parse_toml_config(text: str) -> dict[str, Any]:
    config = tomllib.loads(text)
    unknown = set(config) - TOML_TOP_KEYS
    assert not unknown, f"unknown txn-sidecar.toml keys: {sorted(unknown)}"
    for table, keys in TOML_TABLE_KEYS.items():
        if table in config:
            extra = set(config[table]) - keys
            assert not extra, f"unknown keys in [{table}]: {sorted(extra)}"
    for key, allowed in ENUMS.items():
        if key in config:
            assert config[key] in allowed, f"{key} = {config[key]!r} not in {sorted(allowed)}"
    for key in ("txn_timeout", "shutdown_grace"):
        if key in config:
            duration_seconds(config[key])
    for key, value in config.get("kafka", {}).items():
        assert re.fullmatch(r"[a-z0-9]+([._][a-z0-9]+)*", key), f"[kafka] key {key!r} is not a librdkafka property name"
        assert isinstance(value, str), f"[kafka] {key} must be a string, got {value!r}"
    return config


def check_sidecar_pod(
    deployment: dict[str, Any],
    configmaps: list[dict[str, Any]],
    native: bool,
    secrets: list[dict[str, Any]] | None = None,
    expect_sasl_secret: bool | None = None,
) -> dict[str, Any]:
    """Everything the product needs from a pod running txn-sidecar.

    Returns the parsed txn-sidecar.toml.
    """
    spec = pod_spec(deployment)
    side = sidecar_container(spec, native)
    env = env_map(side)
    apps = [c for c in spec["containers"] if c["name"] != SIDECAR]
    assert len(apps) == 1, "exactly one app container"
    app = apps[0]

    # Config file: TXN_SIDECAR_CONFIG names a file that a mounted ConfigMap holds.
    config_path = env[CONFIG_ENV]["value"]
    mount_dir, file_name = config_path.rsplit("/", 1)
    mounts = [m for m in side.get("volumeMounts") or [] if m["mountPath"] == mount_dir]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True, f"{mount_dir} mounted read-only"
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    cm_name = volumes[mounts[0]["name"]]["configMap"]["name"]
    cms = [c for c in configmaps if c["metadata"]["name"] == cm_name]
    assert len(cms) == 1, f"ConfigMap {cm_name} is not among the objects"
    assert file_name in cms[0]["data"], f"ConfigMap {cm_name} has no key {file_name}"
    config = parse_toml_config(cms[0]["data"][file_name])
    assert config.get("topic"), "topic is set"

    # Admin address: reachable from the pod IP, on the `admin` port.
    admin_addr = env.get("TXN_SIDECAR_ADMIN_ADDR", {}).get("value") or config["admin"]["addr"]
    host, port = admin_addr.rsplit(":", 1)
    assert host in ("0.0.0.0", "[::]"), f"admin addr {admin_addr} is not reachable by kubelet/Prometheus"
    assert port_by_name(side, ADMIN_PORT_NAME) == int(port)
    if "admin" in config and "TXN_SIDECAR_ADMIN_ADDR" in env:
        assert config["admin"]["addr"] == admin_addr, "config file and env disagree on admin.addr"

    # Probes on the admin port.
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = side[probe]["httpGet"]
        assert get["path"] == path and get["port"] == ADMIN_PORT_NAME, f"{probe}: {get}"

    # The app URL points at the app container on localhost.
    app_url = config.get("app", {}).get("url") or env.get("TXN_SIDECAR_APP_URL", {}).get("value")
    m = re.fullmatch(r"http://(127\.0\.0\.1|localhost):([0-9]+)(/.*)", app_url or "")
    assert m, f"app url {app_url!r} is not on localhost"
    assert int(m.group(2)) in [p["containerPort"] for p in app.get("ports") or []], "app url port is not an app port"

    # Shutdown: the kubelet must not SIGKILL the sidecar inside its grace period.
    grace = duration_seconds(config.get("shutdown_grace", "20s"))
    assert spec["terminationGracePeriodSeconds"] > grace

    # Credentials come from a Secret, never from literal env values.
    has_sasl = [n for n in SASL_ENV if n in env]
    if expect_sasl_secret is not None:
        assert bool(has_sasl) == expect_sasl_secret
    for name in has_sasl:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name]
        if secrets is not None:
            found = [s for s in secrets if s["metadata"]["name"] == ref["name"]]
            assert found, f"{name} references missing Secret {ref['name']}"
            data = {**(found[0].get("data") or {}), **(found[0].get("stringData") or {})}
            assert ref["key"] in data, f"Secret {ref['name']} has no key {ref['key']}"
    assert set(has_sasl) in (set(), set(SASL_ENV)), "username and password come together"

    pod_security = spec.get("securityContext") or {}
    for c in [side, *spec["containers"]]:
        assert_restricted_security(c, pod_security)
    res = side.get("resources") or {}
    assert res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory"), "sidecar memory request+limit"
    assert res.get("requests", {}).get("cpu"), "sidecar cpu request"
    # The staged-bytes budget must fit in the memory limit with room for
    # librdkafka's prefetch and the transaction in delivery, or the kernel
    # kills the sidecar before back-pressure pauses partitions.
    need = memory_need(config, env)
    limit = quantity_bytes(res["limits"]["memory"])
    assert limit > need, f"memory limit {res['limits']['memory']} < {need / 2**20:.0f} MiB that the README's sizing asks"
    assert spec.get("automountServiceAccountToken") is False
    # No service-link variables (TXN_SIDECAR_KAFKA_SERVICE_HOST for a Service named
    # txn-sidecar-kafka, ...): the sidecar ignores them, and nothing should need them.
    assert spec.get("enableServiceLinks") is False, "enableServiceLinks: false"
    return config


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_service(service: dict[str, Any], deployment: dict[str, Any]) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(service["spec"]["selector"], labels), "Service selector does not match the pods"
    spec = pod_spec(deployment)
    names = {p.get("name") for c in spec["containers"] if c["name"] != SIDECAR for p in c.get("ports") or []}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in names, f"Service targetPort {port['targetPort']} is not an app port"


def check_podmonitor(podmonitor: dict[str, Any], deployment: dict[str, Any]) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(podmonitor["spec"]["selector"]["matchLabels"], labels), "PodMonitor selects no pod"
    endpoints = podmonitor["spec"]["podMetricsEndpoints"]
    assert [(e["port"], e.get("path", "/metrics")) for e in endpoints] == [(ADMIN_PORT_NAME, "/metrics")]
    spec = pod_spec(deployment)
    all_ports = {p.get("name") for c in [*(spec.get("initContainers") or []), *spec["containers"]] for p in c.get("ports") or []}
    assert ADMIN_PORT_NAME in all_ports
