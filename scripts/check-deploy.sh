#!/usr/bin/env bash
# Offline checks of the deployment files: Helm chart (lint, render, schema),
# deploy/kubernetes manifests, docker-compose.yml wiring, Dockerfile and the
# Grafana dashboard's metric names. No cluster, Docker daemon or network use.
#
#   scripts/check-deploy.sh            # extra arguments go to pytest
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TXN_SIDECAR_VENV:-$HOME/.cache/txn-sidecar/venv}"

"$root/scripts/install-test-deps.sh"

cd "$root"
# No .pytest_cache or __pycache__ left in the work tree.
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -p no:cacheprovider tests/deploy "$@"
