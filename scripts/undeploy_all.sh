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

# --- the same in build_deploy_all.sh and undeploy_all.sh (tests/test_deploy.py checks) ---
ROOT=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
NS=pipeline-server                      # the namespace the manifests in k8s/ use
RECORD=pipeline-balancer-deploy-record  # ConfigMap: what build_deploy_all.sh deployed
INTEL_REPO=https://github.com/intel/intel-device-plugins-for-kubernetes

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

kc() { "${KUBECTL_CMD[@]}" "$@"; }

# KUBECTL_CMD: the kubectl command as words ("microk8s kubectl" by default); checks the cluster answers.
init_kubectl() {
  read -r -a KUBECTL_CMD <<<"${KUBECTL:-microk8s kubectl}"
  ((${#KUBECTL_CMD[@]} > 0)) || die "KUBECTL is empty"
  if ! command -v "${KUBECTL_CMD[0]}" >/dev/null 2>&1; then
    [[ -n ${KUBECTL:-} ]] || die "microk8s not found: install MicroK8s (see docs/deploy.md), or set KUBECTL=kubectl to use another cluster"
    die "${KUBECTL_CMD[0]} not found (KUBECTL=$KUBECTL)"
  fi
  kc get --raw=/version >/dev/null 2>&1 \
    || die "no answer from the cluster through '${KUBECTL_CMD[*]}': is it running? (microk8s status --wait-ready)"
}

overlay_dir() {
  local dir="$ROOT/k8s/overlays/$1"
  [[ $1 =~ ^[a-z0-9-]+$ && -f $dir/kustomization.yaml ]] \
    || die "unknown OVERLAY '$1': choose one of: $(cd "$ROOT/k8s/overlays" && echo */ | tr -d /)"
  echo "$dir"
}

# One field of the deploy record; empty when there is none.
record_get() {
  kc -n "$NS" get configmap "$RECORD" --ignore-not-found -o "jsonpath={.data.$1}" 2>/dev/null || true
}

# node-feature-discovery itself from upstream, as the seed did: its default configuration labels
# PCI devices (feature.node.kubernetes.io/pci-0300_8086.present), which the worker DaemonSets use;
# Intel's own NFD deployment turns those labels off. Intel's rules add the label the GPU plugin uses.
nfd_url() { echo "https://github.com/kubernetes-sigs/node-feature-discovery/deployment/overlays/default?ref=$1"; }
nfd_rules_url() { echo "$INTEL_REPO/deployments/nfd/overlays/node-feature-rules?ref=$1"; }

# A kustomization in directory $1 for the Intel GPU plugin of release $2, in our namespace as in the seed.
gpu_plugin_kustomization() {
  mkdir -p "$1"
  cat >"$1/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: $NS
resources:
  - $INTEL_REPO/deployments/gpu_plugin/overlays/nfd_labeled_nodes?ref=$2
YAML
}
# --- end of the shared part ---

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
