#!/usr/bin/env bash
# The project's test command (README's second command; .ci/run calls it).
# Installs what the tests need (Python packages, Debian's mosquitto), then runs lint, types and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests start for real: an MQTT broker, curl, and the benchmark smoke's
# load generator, HAProxy (the seed's set-up) and nginx (stub workers).
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
for tool in curl wrk; do command -v "$tool" >/dev/null 2>&1 || need_apt+=("$tool"); done
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff"; python3 -m ruff check balancer tests scripts
echo "== mypy"; python3 -m mypy
echo "== pytest"; python3 -m pytest "$@"
