#!/usr/bin/env bash
# Shared by scripts/build_deploy_all.sh and scripts/undeploy_all.sh (sourced, not run): the
# namespace, the deploy record, kubectl, overlays and the device plugins' sources.
# shellcheck disable=SC2034  # NS, RECORD, INTEL_REPO are used by the scripts that source this
ROOT=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../.." && pwd)
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
