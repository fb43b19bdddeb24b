#!/usr/bin/env bash
# Run every benchmark, one after another, then refresh docs/benchmarks.md from the latest results.
#
#   scripts/bench/run_all.sh [--smoke | --quick] [--src HEAD] [--out-root DIR] [other options for every benchmark]
#
# Default: full runs (~12 min on 2 cores), results in bench-results/<name>/latest.{json,png,md}.
# --smoke / --quick write smoke.* / quick.* instead and leave docs/benchmarks.md alone.
# --src HEAD measures the committed balancer (exported with git archive), not edits in progress.
# --out-root DIR writes DIR/<name>/ instead of bench-results/<name>/.
# Needs: wrk, haproxy, nginx (Debian packages wrk, haproxy, nginx-light) and matplotlib.
set -euo pipefail
cd "$(dirname "$0")/../.."

out_root=""
full=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out-root) out_root="$2"; shift 2 ;;
    --out-root=*) out_root="${1#--out-root=}"; shift ;;
    --smoke|--quick) full=0; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

status=0
for bench in proxy burst density merged_status; do
  echo "=== ${bench}"
  out=()
  if [ -n "${out_root}" ]; then
    out=(--out "${out_root}/${bench}")
  fi
  if ! python3 -m "scripts.bench.${bench}" ${args[@]+"${args[@]}"} ${out[@]+"${out[@]}"}; then
    echo "!!! ${bench} failed" >&2
    status=1
  fi
done

if [ "${full}" -eq 1 ] && [ -z "${out_root}" ]; then
  python3 -m scripts.bench.report
fi
exit "${status}"
