"""Configuration: read once at start-up into frozen, typed dataclasses.

Sources, later ones winning: defaults, the YAML file (``--config``), the
environment, command-line options. Each setting has one group in the YAML file
(``admission: {max_running_pipelines: 2}``), one environment variable (the
field's ``env`` metadata, e.g. ``MAX_RUNNING_PIPELINES``) and at most one
command-line option. Every bad value is reported, all at once, with the source
it came from, before anything starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

Check = Callable[[Any], str | None]


def setting(default: Any, env: str, check: Check | None = None) -> Any:
    """A dataclass field with its environment variable and validity check."""
    return field(default=default, metadata={"env": env, "check": check})


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def host_port(value: Any) -> str | None:
    try:
        split_host_port(value)
    except ValueError:
        return "is not HOST:PORT with a port from 1 to 65535"
    return None


def optional_host_port(value: Any) -> str | None:
    return None if value == "" else host_port(value)


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def mqtt_topic(value: Any) -> str | None:
    """A topic to publish to: not empty, no wildcards."""
    return None if value and not set(value) & set("#+\0") else "is not an MQTT topic to publish to (no + or #)"


def regex(value: Any) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression: {exc}"
    return None


def worker_urls(value: Any) -> str | None:
    for url in value:
        if not re.match(r"^https?://[^/\s]+(/[^\s#]*)?(#(cpu|gpu|CPU|GPU))?$", url):
            return f"{url!r} is not a worker URL like http://host:8080 (optionally #GPU or #CPU)"
    return None


def label_selector(value: Any) -> str | None:
    from balancer.discovery.pods import selector_problem  # late: pods imports this module

    return selector_problem(value)


STRATEGIES = ("round-robin", "least-pipelines", "most-headroom")
DEVICES = ("CPU", "GPU")


def parse_fallback(value: str) -> dict[str, str]:
    """``"GPU:CPU"`` → ``{"GPU": "CPU"}``; ValueError on anything else."""
    pairs: dict[str, str] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        src, sep, dst = item.strip().upper().partition(":")
        if not sep or src not in DEVICES or dst not in DEVICES or src == dst or src in pairs:
            raise ValueError(item)
        pairs[src] = dst
    return pairs


def device_fallback(value: Any) -> str | None:
    try:
        parse_fallback(value)
    except ValueError as exc:
        return f"has {str(exc)!r}, not a FROM:TO pair of two different devices (GPU:CPU)"
    return None


def split_host_port(value: str) -> tuple[str, int]:
    """``"0.0.0.0:31000"`` → ``("0.0.0.0", 31000)``; ``"[::1]:80"`` works too."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT with a port from 1 to 65535")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class ServerSettings:
    """The balancer's own listening sockets and request limits."""

    listen: str = setting("0.0.0.0:31000", "LISTEN", host_port)
    """HOST:PORT for the pipeline API (the seed's HAProxy frontend on NodePort 31000)."""

    shutdown_grace: float = setting(10.0, "SHUTDOWN_GRACE", non_negative)
    """Seconds that in-flight requests get to finish after SIGTERM before the process exits."""

    max_body_bytes: int = setting(64 * 1024, "MAX_BODY_BYTES", positive)
    """Largest request body accepted (413 beyond). Start requests are small JSON."""

    admin_listen: str = setting("", "ADMIN_LISTEN", optional_host_port)
    """HOST:PORT to serve /backends and /metrics on instead of the API port (empty: the API port)."""

    admin_token_file: str = setting("", "ADMIN_TOKEN_FILE")
    """File holding a bearer token required for /backends and /metrics (empty: no token)."""

    front: str = setting("fast", "FRONT", one_of("fast", "aiohttp"))
    """HTTP server for the API port: ``fast`` (asyncio Protocols + httptools) or ``aiohttp`` (simpler, slower)."""

    header_timeout: float = setting(10.0, "HEADER_TIMEOUT", positive)
    """Seconds a client has to send a whole request once it started one (408 beyond; slowloris). Fast front."""

    keepalive_timeout: float = setting(60.0, "KEEPALIVE_TIMEOUT", positive)
    """Seconds an idle client keep-alive connection stays open (HAProxy ``timeout client 60s``). Fast front."""

    max_connections: int = setting(10000, "MAX_CONNECTIONS", positive)
    """Client connections served at once; more are answered 503 and closed. Fast front."""

    max_header_bytes: int = setting(16384, "MAX_HEADER_BYTES", positive)
    """Largest request line plus headers accepted (431 beyond). Fast front."""


@dataclass(frozen=True)
class DiscoverySettings:
    """Where workers come from."""

    source: str = setting("static", "DISCOVERY", one_of("static", "kubernetes"))
    """``static`` (the ``workers`` list) or ``kubernetes`` (watch worker pods)."""

    workers: tuple[str, ...] = setting((), "WORKERS", worker_urls)
    """Static worker base URLs, e.g. ``http://127.0.0.1:8080``; ``#GPU``/``#CPU`` sets the device pool."""

    namespace: str = setting("", "NAMESPACE")
    """Namespace to watch; empty: the pod's own namespace in-cluster, else ``pipeline-server``."""

    selector: str = setting("app=pipeline-server", "SELECTOR", label_selector)
    """Label selector of the worker pods."""

    worker_port: int = setting(8080, "WORKER_PORT", positive)
    """Port of the Pipeline Server REST API on each worker pod."""

    device_label: str = setting("device", "DEVICE_LABEL")
    """Pod label naming the device pool (CPU/GPU); else told from the ``-cpu-worker``/``-gpu-worker`` name."""

    kubeconfig: str = setting("", "KUBECONFIG")
    """Kubeconfig file(s) to use; empty: the in-cluster service account in a pod, else ``~/.kube/config``."""

    watch_timeout_min: int = setting(300, "WATCH_TIMEOUT_MIN", positive)
    """Shortest server-side ``timeoutSeconds`` of one pod watch; each watch picks a random value in range."""

    watch_timeout_max: int = setting(600, "WATCH_TIMEOUT_MAX", positive)
    """Longest server-side ``timeoutSeconds`` of one pod watch (random in range: replicas re-watch apart)."""

    backoff_min: float = setting(0.8, "WATCH_BACKOFF_MIN", positive)
    """Seconds before the first retry after an API server error; doubles per failure, with jitter."""

    backoff_max: float = setting(30.0, "WATCH_BACKOFF_MAX", positive)
    """Longest wait between two retries while the API server is unreachable."""

    api_timeout: float = setting(10.0, "KUBE_API_TIMEOUT", positive)
    """Seconds to connect to the API server and to receive a pod list."""

    watch_idle_timeout: float = setting(90.0, "WATCH_IDLE_TIMEOUT", positive)
    """Seconds a pod watch may stay silent (no event, no bookmark) before it is dropped and re-watched;
    API servers send a bookmark about every minute."""


@dataclass(frozen=True)
class HealthSettings:
    """Polling each worker's ``GET /pipelines/status``."""

    poll_interval: float = setting(1.0, "POLL_INTERVAL", positive)
    """Seconds between two polls of a worker."""

    poll_timeout: float = setting(1.0, "POLL_TIMEOUT", positive)
    """Seconds a poll may take; a slower worker is unhealthy."""

    stale_after: float = setting(3.0, "STALE_AFTER", positive)
    """A worker whose last good poll is older than this has no room (its picture is stale)."""


@dataclass(frozen=True)
class AdmissionSettings:
    """When a worker has room for one more pipeline (DESIGN §3)."""

    max_running_pipelines: int = setting(0, "MAX_RUNNING_PIPELINES")
    """Most active (RUNNING + QUEUED + starting) pipelines per worker; <= 0 disables the limit."""

    target_fps: float = setting(0.0, "TARGET_FPS")
    """A worker with a warmed-up pipeline at or below this fps is full; <= 0 disables the rule."""

    warmup: float = setting(5.0, "FPS_WARMUP", non_negative)
    """Seconds a new pipeline runs before its fps counts (cumulative fps reads low at first)."""

    retry_after: int = setting(2, "RETRY_AFTER", positive)
    """``Retry-After`` seconds on a 503."""

    pending_timeout: float = setting(15.0, "PENDING_TIMEOUT", positive)
    """Seconds a started instance may stay missing from its worker's status list before its
    reservation is dropped (so a worker that forgets a start cannot leak a slot)."""

    predictive: bool = setting(True, "PREDICTIVE_ADMISSION")
    """With TARGET_FPS > 0: also refuse a start that would push a worker's streams to TARGET_FPS or
    below, predicted from its measured capacity (n streams at f fps: n*f/(n+1)), before they get there.
    Off: the seed's rule alone (a worker is full once a stream is at or below TARGET_FPS)."""

    strategy: str = setting("round-robin", "STRATEGY", one_of(*STRATEGIES))
    """Which worker with room takes a start: ``round-robin`` (the seed's), ``least-pipelines``
    (fewest active + starting) or ``most-headroom`` (highest predicted fps for the new stream)."""

    fallback: str = setting("", "DEVICE_FALLBACK", device_fallback)
    """``GPU:CPU``: when no GPU worker has room, a GPU start goes to a CPU worker with its
    ``*-device`` parameters rewritten to CPU. Comma-separated ``FROM:TO`` pairs; empty: off."""


@dataclass(frozen=True)
class UpstreamSettings:
    """Requests forwarded to workers."""

    connect_timeout: float = setting(5.0, "UPSTREAM_CONNECT_TIMEOUT", positive)
    """Seconds to connect to a worker (HAProxy ``timeout connect 5s``)."""

    timeout: float = setting(60.0, "UPSTREAM_TIMEOUT", positive)
    """Seconds a forwarded request may take in all (HAProxy ``timeout server 60s``); then 504."""

    status_timeout: float = setting(2.0, "STATUS_TIMEOUT", positive)
    """Seconds each worker gets to answer the merged ``GET /pipelines/status``; slower ones are left out."""

    instance_id_pattern: str = setting(r"[0-9a-f]{32}", "INSTANCE_ID_PATTERN", regex)
    """What an instance id looks like (the real server: uuid1 hex); other ids get 400 at once."""

    client: str = setting("fast", "UPSTREAM_CLIENT", one_of("fast", "aiohttp"))
    """HTTP client to workers: ``fast`` (pooled asyncio Protocols + httptools) or ``aiohttp``."""

    max_connections_per_worker: int = setting(128, "UPSTREAM_MAX_CONNECTIONS", positive)
    """Connections to one worker at most; requests beyond wait for one (within their timeout)."""

    idle_timeout: float = setting(15.0, "UPSTREAM_IDLE_TIMEOUT", positive)
    """Seconds an idle pooled connection to a worker is kept; keep it below the workers' keep-alive timeout."""

    start_reuse_idle: float = setting(2.0, "START_REUSE_IDLE", non_negative)
    """A start reuses a pooled connection only if it answered within this many seconds (0: always a new one)."""


@dataclass(frozen=True)
class MqttSettings:
    """Worker state events and a /backends snapshot published to an MQTT broker, for dashboards."""

    host: str = setting("", "MQTT_HOST", optional_host_port)
    """Broker HOST:PORT (e.g. ``mqtt:1883``); empty: publish nothing."""

    events_topic: str = setting("pipeline-balancer/events", "MQTT_EVENTS_TOPIC", mqtt_topic)
    """Topic of the JSON events: worker joined/left/ready/full/unhealthy..., and rejected starts."""

    backends_topic: str = setting("pipeline-balancer/backends", "MQTT_BACKENDS_TOPIC", mqtt_topic)
    """Topic of the retained /backends snapshot, republished on change."""

    client_id: str = setting("", "MQTT_CLIENT_ID")
    """MQTT client id; empty: ``pipeline-balancer-<hostname>-<pid>``."""

    snapshot_interval: float = setting(1.0, "MQTT_SNAPSHOT_INTERVAL", positive)
    """Shortest time between two /backends snapshots (they are sent only when something changed)."""

    queue_size: int = setting(1000, "MQTT_QUEUE_SIZE", positive)
    """Messages held while the broker is away; beyond it the oldest are dropped and counted."""

    keepalive: int = setting(15, "MQTT_KEEPALIVE", positive)
    """Seconds of MQTT keepalive: how soon a silent broker is noticed."""

    reconnect_max: float = setting(30.0, "MQTT_RECONNECT_MAX", positive)
    """Longest wait between two reconnection attempts (from 0.5 s, doubling)."""


@dataclass(frozen=True)
class LogSettings:
    """Logging."""

    level: str = setting("INFO", "LOG_LEVEL", one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    """Log level."""

    format: str = setting("text", "LOG_FORMAT", one_of("text", "json"))
    """``text`` for people, ``json`` for log pipelines: one object per line."""


def lease_name(value: Any) -> str | None:
    ok = len(value) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", value)
    return None if ok else "is not a Kubernetes object name (lowercase letters, digits, '-', '.')"


@dataclass(frozen=True)
class HaSettings:
    """Active-passive replicas: a ``coordination.k8s.io/v1`` Lease elects the one that serves (docs/ha.md)."""

    enabled: bool = setting(False, "HA_ENABLED")
    """Take part in leader election; only the lease holder is ready and serves pipeline routes."""

    lease_name: str = setting("pipeline-balancer", "HA_LEASE_NAME", lease_name)
    """Name of the Lease, in the namespace of the watched pods."""

    lease_duration: int = setting(15, "HA_LEASE_DURATION", positive)
    """Seconds a standby waits, by its own clock, after the lease last changed before taking it over."""

    renew_deadline: float = setting(10.0, "HA_RENEW_DEADLINE", positive)
    """Seconds the leader keeps serving without a successful renewal; then it steps down."""

    retry_period: float = setting(2.0, "HA_RETRY_PERIOD", positive)
    """Seconds between two lease reads or renewals."""

    identity: str = setting("", "POD_NAME")
    """This replica's holder identity; empty: hostname and process id."""


@dataclass(frozen=True)
class Config:
    """Everything the balancer is told. Built by :func:`load_config`, never mutated."""

    server: ServerSettings = field(default_factory=ServerSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    log: LogSettings = field(default_factory=LogSettings)
    ha: HaSettings = field(default_factory=HaSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)


class ConfigError(ValueError):
    """Bad configuration: one line per problem."""


def _convert(raw: Any, kind: Any, source: str) -> Any:
    """Turn a YAML or environment value into the field's type."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{source}: {raw!r} is not a boolean (true/false)")
    if kind is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError(f"{source}: {raw!r} is not an integer")
        try:
            return int(str(raw).strip()) if not isinstance(raw, float) else int(raw)
        except ValueError:
            raise ValueError(f"{source}: {raw!r} is not an integer") from None
    if kind is float:
        if isinstance(raw, bool):
            raise ValueError(f"{source}: {raw!r} is not a number")
        try:
            return float(str(raw).strip())
        except ValueError:
            raise ValueError(f"{source}: {raw!r} is not a number") from None
    if kind == tuple[str, ...]:
        items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if raw is None:
        return ""
    return str(raw).strip()


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config. ``overrides`` maps ``"group.field"`` to values from the command line."""
    env = {} if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    errors: list[str] = []
    file_values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: must be a mapping of groups")
        file_values = loaded

    groups: dict[str, Any] = {}
    for group_field in dataclasses.fields(Config):
        group_cls = get_type_hints(Config)[group_field.name]
        hints = get_type_hints(group_cls)
        from_file = file_values.pop(group_field.name, None) or {}
        if not isinstance(from_file, dict):
            errors.append(f"config file: '{group_field.name}' must be a mapping")
            from_file = {}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(group_cls):
            dotted = f"{group_field.name}.{f.name}"
            candidates = [
                (f"config file {dotted}", from_file.pop(f.name, None)),
                (f"${f.metadata['env']}", env.get(f.metadata["env"])),
                (f"option for {dotted}", overrides.get(dotted)),
            ]
            for source, raw in candidates:
                if raw is None:
                    continue
                try:
                    values[f.name] = _convert(raw, hints[f.name], source)
                except ValueError as exc:
                    errors.append(str(exc))
                    continue
                check = f.metadata.get("check")
                problem = check(values[f.name]) if check else None
                if problem:
                    errors.append(f"{source}: {values[f.name]!r} {problem}")
        errors.extend(f"config file: unknown setting '{group_field.name}.{k}'" for k in from_file)
        groups[group_field.name] = group_cls(**values)
    errors.extend(f"config file: unknown group '{k}'" for k in file_values)

    config = Config(**groups)
    errors.extend(_cross_checks(config))
    if errors:
        raise ConfigError("\n".join(errors))
    return config


def _cross_checks(config: Config) -> list[str]:
    """Rules that involve more than one setting."""
    errors = []
    if config.discovery.source == "static" and not config.discovery.workers:
        errors.append("static discovery needs workers: --workers http://host:8080,... or $WORKERS")
    if config.health.poll_timeout > config.health.stale_after:
        errors.append("health.poll_timeout must not exceed health.stale_after")
    ha = config.ha
    if ha.enabled and config.discovery.source != "kubernetes":
        errors.append("ha.enabled needs Kubernetes discovery (--kubernetes): the lease lives in the API server")
    if ha.renew_deadline >= ha.lease_duration:
        errors.append("ha.renew_deadline must be shorter than ha.lease_duration")
    if ha.retry_period >= ha.renew_deadline:
        errors.append("ha.retry_period must be shorter than ha.renew_deadline")
    return errors


def env_table() -> list[tuple[str, str, Any, str]]:
    """(group.field, ENV, default, doc) rows, for the README's configuration table."""
    import ast
    import inspect
    import textwrap

    rows = []
    for group_field in dataclasses.fields(Config):
        group_cls = get_type_hints(Config)[group_field.name]
        tree = ast.parse(textwrap.dedent(inspect.getsource(group_cls)))
        docs: dict[str, str] = {}
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined,union-attr]
        for f in dataclasses.fields(group_cls):
            rows.append((f"{group_field.name}.{f.name}", f.metadata["env"], f.default, docs.get(f.name, "")))
    return rows
