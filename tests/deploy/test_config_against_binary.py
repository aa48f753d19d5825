"""The config our deployment files produce, loaded by the real txn-sidecar binary.

`txn-sidecar config` loads file + TXN_SIDECAR_* env exactly as `run` does,
rejects unknown keys and bad values, and prints the effective config with
secrets redacted. Running it on every config we ship catches drift between
these files and the Rust side. It needs a built binary: TXN_SIDECAR_BIN, or
target/release or target/debug; without one these tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from deploylib import CHART, CONFIG_ENV, MANIFESTS, ROOT, SIDECAR, by_kind, load_docs, one, pod_spec


def _binary() -> Path | None:
    explicit = os.environ.get("TXN_SIDECAR_BIN")
    if explicit:
        return Path(explicit)
    # The newest build: a release binary left from a benchmark may be older than the code.
    built = [
        c for c in (ROOT / "target" / profile / "txn-sidecar" for profile in ("release", "debug"))
        if c.is_file() and os.access(c, os.X_OK)
    ]
    return max(built, key=lambda c: c.stat().st_mtime, default=None)


BIN = _binary()
pytestmark = pytest.mark.skipif(BIN is None, reason="no txn-sidecar binary built (set TXN_SIDECAR_BIN)")

# Stand-ins for what the kubelet would inject from Secrets.
FAKE_SECRETS = {"TXN_SIDECAR_KAFKA_SASL_USERNAME": "orders", "TXN_SIDECAR_KAFKA_SASL_PASSWORD": "hunter2-not-real"}


def _effective(config_text: str | None, env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TXN_SIDECAR_")}
    args = [str(BIN), "config"]
    if config_text is not None:
        path = tmp_path / "txn-sidecar.toml"
        path.write_text(config_text)
        env = {**env, CONFIG_ENV: str(path)}
    proc = subprocess.run(args, env={**clean, **env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"txn-sidecar config rejected it:\n{proc.stderr}"
    assert "hunter2-not-real" not in proc.stdout + proc.stderr, "a secret was printed"
    return tomllib.loads(proc.stdout)


def _sidecar_env(deployment: dict[str, Any]) -> dict[str, str]:
    spec = pod_spec(deployment)
    side = next(c for c in [*(spec.get("initContainers") or []), *spec["containers"]] if c["name"] == SIDECAR)
    env = {}
    for e in side.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["name"] in FAKE_SECRETS:
            env[e["name"]] = FAKE_SECRETS[e["name"]]
    return {k: v for k, v in env.items() if k != CONFIG_ENV}


def _check(effective: dict[str, Any], shipped: dict[str, Any], env: dict[str, str]) -> None:
    """Every value we set is what the binary ended up with."""
    for key, value in shipped.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                if key == "limits":
                    continue  # printed as bytes
                if key == "kafka" and ("password" in sub):
                    assert effective[key][sub] == "<redacted>"
                    continue
                assert effective[key][sub] == v, f"{key}.{sub}"
        else:
            assert effective[key] == value, key
    if "TXN_SIDECAR_ADMIN_ADDR" in env:
        assert effective["admin"]["addr"] == env["TXN_SIDECAR_ADMIN_ADDR"]
    if "TXN_SIDECAR_KAFKA_SASL_PASSWORD" in env:
        assert effective["kafka"]["sasl.password"] == "<redacted>"
        assert effective["kafka"]["sasl.username"] == env["TXN_SIDECAR_KAFKA_SASL_USERNAME"]


def test_kubernetes_example_config_loads(tmp_path: Path) -> None:
    objs = [d for p in sorted(MANIFESTS.glob("*.yaml")) for d in load_docs(p.read_text())]
    text = one(objs, "ConfigMap")["data"]["txn-sidecar.toml"]
    env = _sidecar_env(one(objs, "Deployment"))
    effective = _effective(text, env, tmp_path)
    _check(effective, tomllib.loads(text), env)
    assert effective["limits"]["max_staged_bytes"] == 128 * 2**20


@pytest.mark.parametrize("values_file", sorted((CHART / "ci").glob("*-values.yaml")), ids=lambda p: p.name)
def test_helm_rendered_config_loads(values_file: Path, tmp_path: Path) -> None:
    with helm.Chart.load(CHART) as chart:
        out = chart.render(yaml.safe_load(values_file.read_text()), name="orders", namespace="shop")
    docs = [d for name, text in out.items() if name.endswith(".yaml") for d in load_docs(text)]
    text = one(docs, "ConfigMap")["data"]["txn-sidecar.toml"]
    env = _sidecar_env(one(docs, "Deployment"))
    effective = _effective(text, env, tmp_path)
    _check(effective, tomllib.loads(text), env)


def test_compose_sidecar_env_loads(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = {k: str(v) for k, v in compose["services"]["sidecar"]["environment"].items()}
    effective = _effective(None, env, tmp_path)
    assert effective["brokers"] == env["TXN_SIDECAR_BROKERS"]
    assert effective["topic"] == env["TXN_SIDECAR_TOPIC"]
    assert effective["app"]["url"] == env["TXN_SIDECAR_APP_URL"]
    assert effective["admin"]["addr"] == env["TXN_SIDECAR_ADMIN_ADDR"]
    assert effective["log_format"] == env["TXN_SIDECAR_LOG_FORMAT"]


def test_a_typo_is_rejected(tmp_path: Path) -> None:
    # Guards the premise of this file: the binary does reject unknown keys.
    path = tmp_path / "bad.toml"
    path.write_text('topic = "orders.tx"\ndlq_topik = "x"\n')
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TXN_SIDECAR_")}
    proc = subprocess.run([str(BIN), "config", "--config", str(path)], env=clean, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "dlq_topik" in proc.stderr
