#!/usr/bin/env bash
# Remove what scripts/build_deploy_all.sh deployed: the namespace pipeline-server
# with MQTT, the workers and the balancer; node-feature-discovery, Intel's node
# labelling rules and the Intel GPU device plugin only if build_deploy_all.sh
# installed them (its record says so).
# Safe to run again, and when nothing is deployed.
#
# Settings (environment variables):
#   KUBECTL   the kubectl command (default "microk8s kubectl")
#   OVERLAY   used only when the deploy record is gone (default real)
set -euo pipefail

# shellcheck source=scripts/lib/k8s-common.sh
. "$(dirname "$(readlink -f "$0")")/lib/k8s-common.sh"

init_kubectl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Read the record first: it lives in the namespace that is about to go.
recorded_overlay=$(record_get overlay)
overlay=$(overlay_dir "${recorded_overlay:-${OVERLAY:-real}}")
nfd=$(record_get nfd)
nfd_rules=$(record_get nfd_rules)
gpu_plugin=$(record_get gpu_plugin)

if [[ -n $gpu_plugin ]]; then
  echo "Removing the Intel GPU device plugin ($gpu_plugin)"
  gpu_plugin_kustomization "$work/gpu-plugin" "$gpu_plugin"
  kc delete -k "$work/gpu-plugin" --ignore-not-found
fi

echo "Removing MQTT, the workers, the balancer and namespace $NS"
kc delete -k "$overlay" --ignore-not-found

if [[ -n $nfd_rules ]]; then
  echo "Removing Intel's node labelling rules ($nfd_rules)"
  kc delete -k "$(nfd_rules_url "$nfd_rules")" --ignore-not-found
fi
if [[ -n $nfd ]]; then
  echo "Removing node-feature-discovery ($nfd)"
  kc delete -k "$(nfd_url "$nfd")" --ignore-not-found
fi

echo "Stopped and removed all services"
