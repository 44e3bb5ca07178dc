#!/usr/bin/env bash
# Offline checks of the deployment files (deploy/ and k8s/), no cluster, helm, docker
# daemon or network at check time: renders the Helm chart with Helm's own engine
# (helm-python-sdk) for its default values and k8s/tessera/ci/*-values.yaml, validates
# every object against the Kubernetes schemas (kubernetes-validate) and the ServiceMonitor
# against a committed schema, and checks the Grafana dashboard, the Prometheus config and
# rules (promtool), the compose files and the Dockerfiles. tests/tests/deploy_chart.rs runs
# it, so `cargo test` covers it.
#
# The first run installs the tools (idempotent, stamped): the pinned Python packages of
# tests/python/deploy-requirements.txt into the git-ignored .deps/venv-deploy, and
# Debian's prometheus package (promtool) into .deps/prometheus (scripts/setup_tools.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.deps/venv-deploy"
requirements="$root/tests/python/deploy-requirements.txt"
stamp="$venv/.installed-$(sha256sum "$requirements" | cut -c1-16)"
mkdir -p "$root/.deps"
exec 8>"$root/.deps/.venv-deploy.lock"
flock 8
if [ ! -f "$stamp" ]; then
  echo "tessera check_deploy: installing the chart and schema tools into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
  "$venv/bin/python" -c 'import helm_python, kubernetes_validate, jsonschema, yaml'
  touch "$stamp"
fi
flock -u 8
PROMTOOL="$("$root/scripts/setup_tools.sh")"
export PROMTOOL
exec "$venv/bin/python" "$root/tests/python/check_deploy.py"
