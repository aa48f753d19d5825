#!/usr/bin/env bash
# Offline checks of the deployment files: Helm chart (lint, render, schema),
# deploy/kubernetes manifests, docker-compose.yml wiring, Dockerfile and the
# Grafana dashboard's metric names. No cluster, Docker daemon or network use.
#
#   scripts/check-deploy.sh                 # everything
#   scripts/check-deploy.sh -k helm -x     # extra arguments go to pytest
#   scripts/check-deploy.sh tests/deploy/test_compose.py
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TXN_SIDECAR_VENV:-$HOME/.cache/txn-sidecar/venv}"

"$root/scripts/install-test-deps.sh"

cd "$root"
# No .pytest_cache or __pycache__ left in the work tree.
export PYTHONDONTWRITEBYTECODE=1
# Run all of tests/deploy unless the arguments name test files themselves.
targets=(tests/deploy)
for arg in "$@"; do
  case "$arg" in tests/*) targets=() ;; esac
done
exec "$venv/bin/python" -m pytest -p no:cacheprovider "${targets[@]}" "$@"
