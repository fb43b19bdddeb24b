#!/usr/bin/env bash
# Build the pipeline-balancer image, push it to the MicroK8s registry and deploy
# MQTT, the Pipeline Server workers and the balancer to namespace pipeline-server
# (docs/deploy.md). Safe to run again: it applies, it never deletes first.
#
# Settings (environment variables):
#   OVERLAY         real: Intel DL Streamer Pipeline Server workers (default);
#                   simulated: `pipeline-balancer worker`, for clusters without Intel hardware
#   IMAGE           deploy this balancer image instead of building one (then docker is not needed)
#   REGISTRY        where a built image is pushed (default localhost:32000, MicroK8s' registry)
#   WORKER_IMAGE    Pipeline Server image (default intel/dlstreamer-pipeline-server:0.7.2, as in k8s/)
#   KUBECTL         the kubectl command (default "microk8s kubectl")
#   DEVICE_PLUGINS  true/false: deploy node-feature-discovery and the Intel GPU device plugin
#                   if the cluster has none (default: true for real, false for simulated)
#   NFD_VERSION     node-feature-discovery release (default v0.17.3)
#   INTEL_DEVICE_PLUGINS_VERSION  intel-device-plugins-for-kubernetes release: GPU plugin and
#                   node labelling rules (default v0.34.0)
#   ROLLOUT_TIMEOUT how long to wait for each workload (default 600s: the real worker image is large)
#   LEADER_IP       address shown in the example requests (default: this host's first address)
set -euo pipefail

# shellcheck source=scripts/lib/k8s-common.sh
. "$(dirname "$(readlink -f "$0")")/lib/k8s-common.sh"

BALANCER_IMAGE=localhost:32000/pipeline-balancer  # image names in k8s/
PIPELINE_SERVER_IMAGE=intel/dlstreamer-pipeline-server
NFD_VERSION=${NFD_VERSION:-v0.17.3}
INTEL_DEVICE_PLUGINS_VERSION=${INTEL_DEVICE_PLUGINS_VERSION:-v0.34.0}
NFD_CRD=nodefeaturerules.nfd.k8s-sigs.io  # node-feature-discovery is there when this is
INTEL_RULES=nodefeaturerules.nfd.k8s-sigs.io/intel-dp-devices

check_image_ref() {
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || die "not an image reference: '$1'"
}

# A kustomize `images:` entry that replaces image $1 (as named in k8s/) by reference $2.
kustomize_image() {
  local ref=$2 name tag
  if [[ $ref == *@* ]]; then
    name=${ref%%@*}
    [[ ${name##*/} != *:* ]] || name=${name%:*}
    printf '  - name: %s\n    newName: "%s"\n    digest: "%s"\n' "$1" "$name" "${ref#*@}"
  else
    if [[ ${ref##*/} == *:* ]]; then
      name=${ref%:*}
      tag=${ref##*:}
    else
      name=$ref
      tag=latest
    fi
    printf '  - name: %s\n    newName: "%s"\n    newTag: "%s"\n' "$1" "$name" "$tag"
  fi
}

OVERLAY=${OVERLAY:-real}
overlay=$(overlay_dir "$OVERLAY")
if [[ -z ${DEVICE_PLUGINS:-} ]]; then
  DEVICE_PLUGINS=false
  [[ $OVERLAY != real ]] || DEVICE_PLUGINS=true
fi
[[ $DEVICE_PLUGINS == true || $DEVICE_PLUGINS == false ]] \
  || die "DEVICE_PLUGINS must be true or false, not '$DEVICE_PLUGINS'"
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-600s}
REGISTRY=${REGISTRY:-localhost:32000}
[[ -z ${IMAGE:-} ]] || check_image_ref "$IMAGE"
[[ -z ${WORKER_IMAGE:-} ]] || check_image_ref "$WORKER_IMAGE"
if [[ -z ${IMAGE:-} ]] && ! command -v docker >/dev/null 2>&1; then
  die "docker not found: install Docker to build the image, or set IMAGE=<registry>/pipeline-balancer:<tag> to deploy one built elsewhere"
fi
init_kubectl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. The balancer image: given, or built and pushed.
if [[ -n ${IMAGE:-} ]]; then
  image=$IMAGE
  echo "Using image $image"
else
  repo="$REGISTRY/pipeline-balancer"
  tag=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo dev)
  echo "Building $repo:$tag"
  # BuildKit: the Dockerfile bind-mounts the builder's wheels (RUN --mount).
  DOCKER_BUILDKIT=1 docker build --build-arg http_proxy --build-arg https_proxy --build-arg no_proxy \
    -t "$repo:$tag" "$ROOT"
  echo "Pushing $repo:$tag"
  docker push "$repo:$tag" \
    || die "could not push to $REGISTRY: enable MicroK8s' registry (microk8s enable registry) or set REGISTRY"
  # Deploy by digest: exactly the image just pushed, and no new rollout when nothing changed.
  image=$(docker image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$repo:$tag" \
    | grep -m1 "^$repo@" || echo "$repo:$tag")
fi

# 2. The namespace, and the host's proxy settings for the workers to fetch media (as in the seed).
echo "Creating namespace $NS"
kc create namespace "$NS" --dry-run=client -o yaml | kc apply -f -
proxy=()
for var in http_proxy https_proxy no_proxy; do
  upper=${var^^}
  value=${!var:-${!upper:-}}
  [[ -z $value ]] || proxy+=("--from-literal=$var=$value" "--from-literal=$upper=$value")
done
kc -n "$NS" create configmap proxy-config ${proxy[@]+"${proxy[@]}"} --dry-run=client -o yaml | kc apply -f -

# 3. node-feature-discovery, Intel's node labelling rules and the Intel GPU device plugin, each
#    only if the cluster has none (or this script installed it before). The record tells
#    undeploy_all.sh what to remove.
nfd=$(record_get nfd)
nfd_rules=$(record_get nfd_rules)
gpu_plugin=$(record_get gpu_plugin)
if [[ $DEVICE_PLUGINS == true ]]; then
  version=$INTEL_DEVICE_PLUGINS_VERSION
  if [[ -n $nfd ]] || ! kc get crd "$NFD_CRD" >/dev/null 2>&1; then
    echo "Deploying node-feature-discovery ($NFD_VERSION)"
    kc apply -k "$(nfd_url "$NFD_VERSION")"
    kc -n node-feature-discovery rollout status deployment/nfd-master --timeout="$ROLLOUT_TIMEOUT"
    nfd=$NFD_VERSION
  else
    echo "node-feature-discovery is already deployed: using it as it is"
  fi
  if [[ -n $nfd_rules ]] || ! kc get "$INTEL_RULES" >/dev/null 2>&1; then
    echo "Deploying Intel's node labelling rules ($version)"
    kc apply -k "$(nfd_rules_url "$version")"
    nfd_rules=$version
  else
    echo "Intel's node labelling rules are already deployed: using them as they are"
  fi
  if [[ -n $gpu_plugin ]] || [[ -z $(kc get daemonsets --all-namespaces -l app=intel-gpu-plugin -o name) ]]; then
    echo "Deploying the Intel GPU device plugin ($version)"
    gpu_plugin_kustomization "$work/gpu-plugin" "$version"
    kc apply -k "$work/gpu-plugin"
    kc -n "$NS" rollout status daemonset/intel-gpu-plugin --timeout="$ROLLOUT_TIMEOUT"
    gpu_plugin=$version
  else
    echo "The Intel GPU device plugin is already deployed: using it as it is"
  fi
fi
kc -n "$NS" create configmap "$RECORD" --from-literal=overlay="$OVERLAY" --from-literal=image="$image" \
  --from-literal=nfd="$nfd" --from-literal=nfd_rules="$nfd_rules" --from-literal=gpu_plugin="$gpu_plugin" \
  --dry-run=client -o yaml \
  | kc apply -f -

# 4. MQTT, the workers and the balancer: the overlay, with the chosen images.
echo "Deploying k8s/overlays/$OVERLAY"
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources:"
  echo "  - $(realpath --relative-to="$work" "$overlay")"  # kustomize takes no absolute paths
  echo "images:"
  kustomize_image "$BALANCER_IMAGE" "$image"
  [[ -z ${WORKER_IMAGE:-} ]] || kustomize_image "$PIPELINE_SERVER_IMAGE" "$WORKER_IMAGE"
} >"$work/kustomization.yaml"
kc apply -k "$work"

# 5. Wait for every workload.
for workload in deployment/mqtt-deployment daemonset/pipeline-server-cpu-worker \
  daemonset/pipeline-server-gpu-worker deployment/pipeline-balancer; do
  echo "Waiting for $workload"
  if [[ $workload == deployment/pipeline-balancer && $OVERLAY == *-ha ]]; then
    # HA: only the lease holder is ready (READY 1/2), so a rollout never "completes".
    kc -n "$NS" wait "$workload" --for=jsonpath='{.status.readyReplicas}'=1 --timeout="$ROLLOUT_TIMEOUT" \
      || die "no balancer replica holds the lease after $ROLLOUT_TIMEOUT: look at '${KUBECTL_CMD[*]} -n $NS logs -l app=pipeline-balancer'"
    continue
  fi
  kc -n "$NS" rollout status "$workload" --timeout="$ROLLOUT_TIMEOUT" \
    || die "$workload is not ready after $ROLLOUT_TIMEOUT: look at '${KUBECTL_CMD[*]} -n $NS get pods' and 'describe pod'"
done

kc -n "$NS" get pods -o wide
ip=${LEADER_IP:-$(hostname -I 2>/dev/null | awk '{print $1}' || true)}
ip=${ip:-<leader-ip>}
cat <<EOF

Deployed k8s/overlays/$OVERLAY with image $image. Try:
  curl http://$ip:31000/pipelines
  curl http://$ip:31000/pipelines/object_detection/person_vehicle_bike -X POST \\
    -H 'Content-Type: application/json' \\
    -d '{"source": {"uri": "https://lvamedia.blob.core.windows.net/public/homes_00425.mkv", "type": "uri"},
         "destination": {"metadata": {"type": "mqtt", "host": "$ip:31020", "topic": "inference-results"}}}'
  curl http://$ip:31000/pipelines/status
  curl http://$ip:31000/backends
Workers on nodes that join later are picked up by themselves: no restart, no redeploy.
EOF
