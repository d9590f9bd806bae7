"""One frozen, typed Config: flags > environment > TOML file > defaults.

Every option is declared once in `OPTIONS` with its dotted key (`web.listen-address`), which
gives at the same time the flag (`--web.listen-address`), the environment variable
(`IMMICH_GPU_EXPORTER_WEB_LISTEN_ADDRESS`) and the TOML key (`[web] listen-address`).
`load()` merges the layers and raises `ConfigError` with one line naming the key; the CLI
turns that into exit code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from typing import Any, Callable, Mapping, Sequence

from .files import read_small, problem_text

ENV_PREFIX = "IMMICH_GPU_EXPORTER_"
DEFAULT_PORT = 10283  # outside 9100-9999 and not one of Immich's ports (see README)
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
CONFIG_FILE_MAX_BYTES = 1 << 20  # a config file is a few KiB; /dev/zero or a log file by mistake is refused
# Upper bounds: an interval of 1e308 s (or a TOML integer with 400 digits) is a typo, not a wish, and
# would overflow the event loop's timer arithmetic.
MAX_SECONDS = 1e7  # about 116 days
MAX_INT = 10**9


class ConfigError(Exception):
    """An invalid configuration value; str() is the one line printed before exit 2."""


# --- value parsers: str (flag/env) or TOML value -> typed value ---------------------------------

def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"expected a boolean (true/false), got {v!r}")


def _positive_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a number of seconds, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {_short(v)}") from None
    except OverflowError:
        raise ValueError(f"must be at most {MAX_SECONDS:g}, got {_short(v)}") from None
    if not f > 0 or f != f:
        raise ValueError(f"must be a positive number, got {_short(v)}")
    if f > MAX_SECONDS:
        raise ValueError(f"must be at most {MAX_SECONDS:g}, got {_short(v)}")
    return f


def _seconds_or_off(v: Any) -> float:
    """0 (off) or a positive number of seconds."""
    if not isinstance(v, bool):
        try:
            if float(v) == 0:
                return 0.0
        except (TypeError, ValueError, OverflowError):
            pass
    return _positive_float(v)


def _positive_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"expected a positive integer, got {v!r}")
    if isinstance(v, str) and len(v.strip()) > 20:
        raise ValueError(f"must be at most {MAX_INT}, got {_short(v)}")
    try:
        i = int(v)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"expected a positive integer, got {_short(v)}") from None
    if i <= 0 or (isinstance(v, float) and v != i):
        raise ValueError(f"expected a positive integer, got {_short(v)}")
    if i > MAX_INT:
        raise ValueError(f"must be at most {MAX_INT}, got {_short(v)}")
    return i


def _short(v: Any) -> str:
    """repr() of a value for an error line: printable and at most ~60 characters."""
    r = repr(v)
    return r if len(r) <= 60 else r[:40] + f"...({len(r)} characters)"


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _opt_str(v: Any) -> str | None:
    s = _str(v).strip()
    return s or None


def _str_list(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        items = [x.strip() for x in v.split(",")]
    elif isinstance(v, (list, tuple)):
        items = []
        for x in v:
            if not isinstance(x, str):
                raise ValueError(f"expected a list of strings, got an element of type {type(x).__name__}")
            items.append(x.strip())
    else:
        raise ValueError(f"expected a list of strings, got {type(v).__name__}")
    return tuple(x for x in items if x)


def _url(v: Any) -> str:
    s = _str(v).strip()
    if not re.match(r"^https?://[^/\s]+", s) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in s):
        raise ValueError(f"expected an http(s):// URL, got {redact_url(_short(s))}")
    try:
        u = urllib.parse.urlsplit(s)
        u.port  # noqa: B018 - raises on a port out of range
        host = u.hostname or ""
    except ValueError as e:
        raise ValueError(f"invalid URL {redact_url(_short(s))}: {e}") from None
    if not host or not (_is_ip(host) or _valid_hostname(host)):
        raise ValueError(f"invalid host in URL {redact_url(_short(s))}")
    return s.rstrip("/")


def url_credentials(url: str | None) -> tuple[str, ...]:
    """The user-info parts of a URL (user:password@), which must never be shown."""
    if not url:
        return ()
    netloc = url.split("://", 1)[-1].split("/", 1)[0]
    if "@" not in netloc:
        return ()
    userinfo = netloc.rsplit("@", 1)[0]
    user, _, password = userinfo.partition(":")
    out = [userinfo]
    for part in (password, urllib.parse.unquote(password)):
        if part:
            out.append(part)
    return tuple(out)


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by `<secret>`; the user name stays readable."""
    def repl(m: re.Match[str]) -> str:
        user = m.group("user")
        return f"{m.group('scheme')}{user}:<secret>@" if m.group("pw") is not None else f"{m.group('scheme')}{user}@"
    return re.sub(r"(?P<scheme>https?://)(?P<user>[^:@/\s]*)(?::(?P<pw>[^@/\s]*))?@", repl, url)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _valid_hostname(host: str) -> bool:
    """RFC 1123 host name (underscores tolerated, as resolvers do): labels of 1-63 characters."""
    h = host[:-1] if host.endswith(".") else host
    return 0 < len(h) <= 253 and all(_LABEL.fullmatch(label) for label in h.split("."))


def _opt_url(v: Any) -> str | None:
    s = _str(v).strip()
    return _url(s) if s else None


def _listen_address(v: Any) -> str:
    s = _str(v).strip()
    m = re.match(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]+)$", s)
    if not m:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT}, [::]:{DEFAULT_PORT}), got {_short(s)}")
    port_s = m.group("port")
    if not (port_s.isascii() and port_s.isdigit()) or len(port_s) > 5 or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"port out of range 0-65535: {_short(port_s)}")
    host = m.group("v6") or m.group("host")
    if m.group("v6"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {_short(host)}") from None
    elif host and not (_is_ip(host) or _valid_hostname(host)):
        # getaddrinfo() would fail at bind time with a traceback (a NUL, a label over 63 characters)
        raise ValueError(f"invalid host {_short(host)} (an IP address or a host name with labels of 1-63 "
                         "letters, digits and dashes)")
    return s


ROLES = ("all", "ml", "server")
# What a role changes: defaults only, so an explicit flag, variable or key still wins.
# server: the ML service runs on another host, so this host's NVIDIA driver says nothing about it
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {"all": {}, "ml": {"collector.immich": False},
                                            "server": {"journal.nvidia-driver-path": ()}}


def _role(v: Any) -> str:
    s = _str(v).strip().lower()
    if s not in ROLES:
        raise ValueError(f"expected one of {', '.join(ROLES)}, got {v!r}")
    return s


def _url_list(v: Any) -> tuple[str, ...]:
    return tuple(_url(x) for x in _str_list(v))


def _log_level(v: Any) -> str:
    s = _str(v).strip().lower()
    if s not in ("debug", "info", "warning", "error"):
        raise ValueError(f"expected one of debug, info, warning, error, got {v!r}")
    return s


def _path(v: Any) -> str:
    s = _str(v).strip()
    if not s:
        raise ValueError("expected a path, got an empty string")
    return s


def _opt_path(v: Any) -> str | None:
    s = _str(v).strip()
    return s or None


@dataclasses.dataclass(frozen=True)
class Option:
    key: str  # dotted: section.name
    parse: Callable[[Any], Any]
    default: Any
    help: str
    repeatable: bool = False  # flag may be given several times (list)
    boolean: bool = False  # --x / --no-x
    metavar: str | None = None
    secret: bool = False  # never echoed in errors or logs

    @property
    def flag(self) -> str:
        return "--" + self.key

    @property
    def env(self) -> str:
        return ENV_PREFIX + re.sub(r"[.\-]", "_", self.key).upper()

    @property
    def dest(self) -> str:
        return re.sub(r"[.\-]", "_", self.key)

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]


SYSTEMD_DEFAULT_UNITS = (
    "immich-server.service",
    "immich-machine-learning.service",
    "nvidia-container-toolkit-cdi-generator.service",
    "postgresql.service",
    "redis-immich.service",
)

OPTIONS: tuple[Option, ...] = (
    Option("web.listen-address", _listen_address, DEFAULT_LISTEN,
           "address to serve /metrics on, HOST:PORT; use 0.0.0.0:PORT or [::]:PORT for all interfaces",
           metavar="HOST:PORT"),
    Option("web.config.file", _opt_path, None,
           "web config file (Prometheus exporter-toolkit format: tls_server_config, basic_auth_users) for "
           "TLS and basic auth; re-read when it changes and on SIGHUP", metavar="FILE"),
    Option("log.level", _log_level, "info", "log level: debug, info, warning, error"),
    Option("collection.interval", _positive_float, 5.0, "default seconds between collections of a source"),
    Option("collection.timeout", _positive_float, 4.0,
           "default seconds a collection may take before its source is marked down"),
    Option("state.directory", _opt_path, None,
           "directory for persistent state (journal cursor); default $STATE_DIRECTORY or "
           "/var/lib/immich-gpu-exporter", metavar="DIR"),
    Option("collector.processes", _bool, True,
           "find Immich's processes (systemd units, containers) and read their tuning, memory and CPU from /proc",
           boolean=True),
    Option("collector.nvml", _bool, True, "collect GPU use per Immich process from NVML", boolean=True),
    Option("collector.systemd", _bool, True, "collect systemd unit states and tuning over D-Bus", boolean=True),
    Option("collector.journal", _bool, True, "parse the ML service's journal for provider and fallback",
           boolean=True),
    Option("collector.immich", _bool, True, "poll the Immich API for job queues", boolean=True),
    Option("collector.docker", _bool, True,
           "Immich's containers (state, health, restarts, GPU access) and the ML container's log over the "
           "Docker Engine API; no socket means no Docker here, not an error", boolean=True),
    Option("collector.remote", _bool, True, "read the provider in force from the ML host's exporter (runs only "
           "when --remote-ml.exporter-url is set)", boolean=True),
    Option("deployment.role", _role, "all", "what this host runs: all (server and ML here, the default), ml (the GPU host of "
           "a remote-ML set-up: the Immich collector is off by default), server (the server host: the provider "
           "comes from --remote-ml.exporter-url); see docs/remote-ml.md", metavar="ROLE"),
    # NVML / attribution
    Option("nvml.interval", _positive_float, 5.0, "seconds between NVML collections"),
    Option("nvml.retry-interval", _positive_float, 300.0,
           "seconds between attempts to load a missing NVML library"),
    Option("gpu.pid-labels", _bool, False, "also expose per-PID series (pid, comm labels; they churn)",
           boolean=True),
    Option("component.ml", _str_list, ("immich-machine-learning.service", "immich_machine_learning"),
           "unit or container name patterns (globs) of the ML component", repeatable=True, metavar="PATTERN"),
    Option("component.server", _str_list, ("immich-server.service", "immich_server"),
           "unit or container name patterns (globs) of the server component", repeatable=True, metavar="PATTERN"),
    Option("docker.socket", _path, "/var/run/docker.sock",
           "Docker Engine API socket (Podman: its Docker-compatible socket) for containers and their logs"),
    Option("docker.interval", _positive_float, 15.0,
           "seconds between safety-net polls of the containers (events trigger a refresh at once)"),
    Option("docker.ml-service", _str_list, ("immich-machine-learning",),
           "compose service name (label com.docker.compose.service) of the ML container", repeatable=True,
           metavar="SERVICE"),
    Option("docker.server-service", _str_list, ("immich-server",),
           "compose service name of the server container", repeatable=True, metavar="SERVICE"),
    Option("docker.ml-image", _str_list, ("ghcr.io/immich-app/immich-machine-learning",),
           "image repository (no tag) that marks an ML container", repeatable=True, metavar="IMAGE"),
    Option("docker.server-image", _str_list, ("ghcr.io/immich-app/immich-server",),
           "image repository (no tag) that marks a server container", repeatable=True, metavar="IMAGE"),
    Option("docker.follow-logs", _bool, True,
           "read the ML container's log over the API for the provider verdict (containers logging to "
           "journald are read by the journal source instead)", boolean=True),
    Option("proc.root", _path, "/proc", "procfs mount to read processes from"),
    # systemd
    Option("systemd.unit", _str_list, SYSTEMD_DEFAULT_UNITS, "unit to watch (repeatable)", repeatable=True,
           metavar="UNIT"),
    Option("systemd.interval", _positive_float, 5.0, "seconds between safety-net polls of the units"),
    Option("systemd.cgroup-root", _opt_path, None,
           "cgroupfs root the units' ControlGroup paths are relative to, and the tree the processes source walks "
           "for Immich's units and containers (default: detected)", metavar="DIR"),
    # journal
    Option("journal.unit", _str_list, ("immich-machine-learning.service",), "ML unit whose journal to follow",
           repeatable=True, metavar="UNIT"),
    Option("journal.server-unit", _str_list, ("immich-server.service",),
           "server unit whose journal to follow for ML health and video transcoding lines", repeatable=True,
           metavar="UNIT"),
    Option("journal.server-container-name", _str_list, ("immich_server",),
           "CONTAINER_NAME of the server container (Docker journald log driver), for ML health and transcoding lines",
           repeatable=True, metavar="NAME"),
    Option("journal.container-name", _str_list, ("immich_machine_learning",),
           "CONTAINER_NAME of the ML container (Docker journald log driver)", repeatable=True, metavar="NAME"),
    Option("journal.directory", _opt_path, None, "read the journal from this directory (like journalctl -D)",
           metavar="DIR"),
    Option("journal.journalctl", _path, "journalctl", "journalctl binary"),
    Option("journal.fallback-grace", _positive_float, 120.0,
           "seconds a GPU provider may be preferred with models loaded but no GPU memory before it counts as "
           "a CPU fallback"),
    Option("journal.nvidia-driver-path", _str_list, ("/proc/driver/nvidia/version", "/sys/module/nvidia"),
           "host paths that exist when the NVIDIA kernel driver is loaded; none of them existing while an NVIDIA "
           "provider is preferred means the ML service cannot be on the GPU (empty: skip this check, e.g. when "
           "the ML service runs on another host)", repeatable=True, metavar="PATH"),
    Option("journal.transcode-window", _positive_int, 10,
           "immich_transcode_fallback is 1 while a fallback to software was logged within this many latest "
           "video transcodes started (docs/transcode.md)"),
    Option("journal.backfill-entries", _positive_int, 5000,
           "at first start without a cursor, read back at most this many entries of the unit's last start"),
    # immich
    Option("immich.url", _url, "http://localhost:2283", "Immich server URL"),
    Option("immich.ml-url", _url, "http://localhost:3003", "Immich machine-learning service URL"),
    Option("immich.ml-failover-url", _url_list, (),
           "further ML URLs in the order of Immich's machineLearning.urls list, after --immich.ml-url (repeatable)",
           repeatable=True, metavar="URL"),
    Option("immich.api-key-file", _opt_path, None,
           "file holding an admin API key with queue.read/job.read (systemd LoadCredential= works)",
           metavar="FILE"),
    Option("immich.api-key", _opt_str, None,
           "API key (environment or config file only; prefer --immich.api-key-file)", secret=True),
    Option("immich.telemetry-url", _opt_url, None,
           "Immich microservices telemetry URL (usually http://HOST:8082/metrics): exact job counters, and the "
           "ML call latency of jobs (docs/latency.md)", metavar="URL"),
    Option("immich.api-telemetry-url", _opt_url, None,
           "Immich API telemetry URL (usually http://HOST:8081/metrics): Smart Search and encode-text latency "
           "(docs/latency.md)", metavar="URL"),
    Option("immich.interval", _positive_float, 5.0, "seconds between Immich API polls"),
    Option("immich.timeout", _positive_float, 3.0, "seconds each Immich API request may take"),
    # the opt-in Smart Search probe (docs/probe.md)
    Option("probe.interval", _seconds_or_off, 0.0,
           "seconds between two synthetic Smart Searches through the API (0: off, the default; it keeps the "
           "textual model loaded: docs/probe.md)"),
    Option("probe.key-file", _opt_path, None,
           "file holding an Immich API key with only the asset.read permission (what Smart Search needs), for the probe; "
           "never the admin key", metavar="FILE"),
    Option("probe.query", _opt_str, "a photo of a dog on a beach",
           "the probe's search phrase; a random word is appended each time so that Immich's embedding cache "
           "never answers it"),
    Option("probe.timeout", _positive_float, 30.0, "seconds a probe search may take before it counts as a timeout"),
    # remote machine learning (the server host of a two-host installation)
    Option("remote-ml.exporter-url", _url_list, (),
           "/metrics URL of the exporter on the ML host (repeatable: one per ML URL, in the same order)",
           repeatable=True, metavar="URL"),
    # demo
    Option("demo.speed", _positive_float, 1.0,
           "demo command only: replay the built-in scenario this many times faster than real time (one "
           "CPU-then-CUDA loop lasts 80 s at 1)", metavar="FACTOR"),
)

OPTIONS_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}
NOT_A_FLAG = {"immich.api-key"}  # secrets never go on a command line


class Config(Mapping[str, Any]):
    """Immutable merged configuration; read with cfg["section.name"] or cfg.section.name.

    `sources` records where each value came from (flag, env, file, default) for `check`.
    """

    __slots__ = ("_values", "_origin")

    def __init__(self, values: Mapping[str, Any], origin: Mapping[str, str] | None = None) -> None:
        missing = set(OPTIONS_BY_KEY) - set(values)
        full = {o.key: o.default for o in OPTIONS}
        full.update(values)
        object.__setattr__(self, "_values", full)
        object.__setattr__(self, "_origin", dict(origin or {k: "default" for k in missing}))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setattr__(self, *_: Any) -> None:
        raise AttributeError("Config is immutable")

    def __getattr__(self, section: str) -> Any:
        if section.startswith("_"):
            raise AttributeError(section)
        prefix = section.replace("_", "-") + "."
        items = {k[len(prefix):].replace("-", "_"): v for k, v in self._values.items() if k.startswith(prefix)}
        if not items:
            raise AttributeError(section)
        return _Section(items)

    def origin(self, key: str) -> str:
        return self._origin.get(key, "default")

    def replace(self, **changes: Any) -> "Config":
        """A copy with some keys changed; keys use underscores for dots and dashes (tests)."""
        vals = dict(self._values)
        for k, v in changes.items():
            for o in OPTIONS:
                if o.dest == k:
                    vals[o.key] = v
                    break
            else:
                raise KeyError(k)
        return Config(vals, self._origin)

    def __repr__(self) -> str:
        shown = {k: ("<secret>" if OPTIONS_BY_KEY[k].secret and v else v) for k, v in self._values.items()}
        return f"Config({shown!r})"


class _Section:
    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, *_: Any) -> None:
        raise AttributeError("Config is immutable")


def defaults() -> Config:
    return Config({o.key: o.default for o in OPTIONS}, {o.key: "default" for o in OPTIONS})


def _read_toml(path: str) -> dict[str, Any]:
    try:
        raw = read_small(path, CONFIG_FILE_MAX_BYTES)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        text = problem_text(e) if isinstance(e, OSError) else str(e)
        raise ConfigError(f"config: cannot read {path!r}: {text}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config: {path} is not valid UTF-8 (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"config: {path} is not valid TOML: nested too deeply") from None
    except (ValueError, OverflowError) as e:  # tomllib's own number conversions
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if not isinstance(body, dict):
            raise ConfigError(f"config: {path}: unknown key {_short(section)} (options live in sections, e.g. [web])")
        for name, value in body.items():
            key = f"{section}.{name}"
            # a dotted name (`config.file = ...` under [web]) arrives as a nested table
            while isinstance(value, dict) and len(value) == 1 and key not in OPTIONS_BY_KEY:
                (sub, value), = value.items()
                key = f"{key}.{sub}"
            if key not in OPTIONS_BY_KEY:
                raise ConfigError(f"config: {path}: unknown key {_short(key)}")
            flat[key] = value
    return flat


def _parse(opt: Option, raw: Any, where: str) -> Any:
    try:
        return opt.parse(raw)
    except (ValueError, OverflowError, RecursionError) as e:
        msg = str(e) or type(e).__name__
        if opt.secret:
            msg = "invalid value"
        raise ConfigError(f"{where}: invalid value for {opt.key}: {msg}") from None


def load(flags: Mapping[str, Any], config_file: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Merge the layers. `flags` maps option keys to raw values given on the command line."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for o in OPTIONS:
        values[o.key] = o.default
        origin[o.key] = "default"
    if config_file is None:
        config_file = environ.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        for key, raw in _read_toml(config_file).items():
            values[key] = _parse(OPTIONS_BY_KEY[key], raw, f"config file {config_file}")
            origin[key] = "file"
    known_env = {o.env: o for o in OPTIONS} | {ENV_PREFIX + "CONFIG": None}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        opt = known_env.get(name, False)
        if opt is False:
            raise ConfigError(f"environment: unknown variable {name}")
        if opt is None:
            continue
        values[opt.key] = _parse(opt, raw, f"environment {name}")
        origin[opt.key] = "env"
    for key, raw in flags.items():
        opt = OPTIONS_BY_KEY[key]
        if opt.repeatable and isinstance(raw, (list, tuple)):
            parsed: list[str] = []
            for item in raw:
                parsed.extend(_parse(opt, item, f"flag {opt.flag}"))
            values[key] = tuple(parsed)
        else:
            values[key] = _parse(opt, raw, f"flag {opt.flag}")
        origin[key] = "flag"
    for key, value in ROLE_DEFAULTS[values["deployment.role"]].items():
        if origin[key] == "default":
            values[key], origin[key] = value, "role"
    _check_probe(values)
    return Config(values, origin)


def _check_probe(values: Mapping[str, Any]) -> None:
    """The probe needs its own key, readable now (docs/probe.md)."""
    if not values["probe.interval"]:
        return
    path = values["probe.key-file"]
    if not path:
        raise ConfigError("--probe.interval is set but --probe.key-file is not: the probe needs an API key with "
                          "asset.read, the permission Smart Search needs (docs/probe.md)")
    from .files import header_safe, problem_text, read_key_file

    try:
        key, _ = read_key_file(path)
    except OSError as e:
        raise ConfigError(f"--probe.key-file: cannot read {path}: {problem_text(e)}") from None
    if not key or not header_safe(key):
        raise ConfigError(f"--probe.key-file: {path} holds no usable key (empty, or characters an HTTP header "
                          "cannot carry)")
    admin = values["immich.api-key"]
    if values["immich.api-key-file"]:
        try:
            admin, _ = read_key_file(values["immich.api-key-file"])
        except OSError:
            admin = None  # the Immich source says why, as it always does
    if admin and admin == key:
        raise ConfigError(f"--probe.key-file: {path} holds the admin API key; give the probe its own key with only "
                          "asset.read (docs/probe.md)")


def option_table() -> Sequence[Option]:
    return OPTIONS
