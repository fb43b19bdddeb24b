#!/usr/bin/env bash
# The README's first command: install the project, then run the balancer on :31000 in front of
# three simulated workers (capacities 130, 130 and 700 fps, like the seed's examples).
# Options go to `pipeline-balancer demo` (e.g. --workers 4 --max-running-pipelines 2 --target-fps 30).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv   # the project's virtualenv, shared with scripts/test.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/python -m balancer demo "$@"
