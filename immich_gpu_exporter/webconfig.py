"""TLS and basic auth for the HTTP endpoints, from a web config file in exporter-toolkit's format.

    tls_server_config:
      cert_file: server.crt          # relative paths are relative to the web config file
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: clients-ca.crt                  # needed to verify client certificates
      min_version: TLS12                              # TLS10 TLS11 TLS12 TLS13
      max_version: TLS13
    basic_auth_users:
      prometheus: $2y$10$...         # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')

The supported subset of Prometheus exporter-toolkit's file (so existing files and habits carry
over); any other key is rejected rather than silently ignored. `load()` turns a file into an
immutable `WebConfig` or raises ConfigError with one line. `WebConfigWatcher` re-reads it when the
file (or a certificate it names) changes and on SIGHUP; a broken new version is logged and the
last good one stays in force. `BasicAuth` checks credentials with bcrypt off the event loop, one
check at a time, and caches each verdict per credential, so a flood of wrong passwords costs one
bcrypt run per distinct password and never blocks a scrape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import stat
from typing import Any, Mapping

from .config import ConfigError
from .files import problem_text, read_small

try:
    import ssl
except ImportError:  # cli.lean_process() keeps ssl out when no web config file and no https URL is set
    ssl = None  # type: ignore[assignment]

log = logging.getLogger("immich_gpu_exporter.web")

MAX_FILE_BYTES = 1 << 20
RELOAD_CHECK_EVERY = 2.0  # seconds between looks at the files' stat
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
} if ssl is not None else {}
UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")  # need certificates left unverified
TLS_VERSIONS = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1, "TLS12": ssl.TLSVersion.TLSv1_2,
                "TLS13": ssl.TLSVersion.TLSv1_3} if ssl is not None else {}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
TOP_KEYS = {"tls_server_config", "basic_auth_users"}


@dataclasses.dataclass(frozen=True)
class WebConfig:
    path: str | None = None
    tls: ssl.SSLContext | None = None
    users: Mapping[str, bytes] = dataclasses.field(default_factory=dict)  # user -> bcrypt hash
    watched: tuple[str, ...] = ()  # files whose change means a reload

    @property
    def auth(self) -> bool:
        return bool(self.users)


def _stat_regular(path: str, what: str, where: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{where}: {what} {path}: {problem_text(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {what} {path}: not a regular file")


def load(path: str) -> WebConfig:
    """Parse and check the web config file: certificates loaded, hashes checked. One-line errors."""
    import yaml

    where = f"web config {path}"
    try:
        raw = read_small(path, MAX_FILE_BYTES)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read: {problem_text(e) if isinstance(e, OSError) else e}") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not valid UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or 'syntax error'}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with tls_server_config and/or basic_auth_users")
    for k in data:
        if k not in TOP_KEYS:
            raise ConfigError(f"{where}: unsupported key {str(k)[:60]!r} (supported: {', '.join(sorted(TOP_KEYS))})")
    base = os.path.dirname(os.path.abspath(path))
    watched = [path]
    tls = None
    if data.get("tls_server_config") is not None:
        tls, files = _tls(data["tls_server_config"], base, where)
        watched += files
    users = _users(data.get("basic_auth_users"), where)
    return WebConfig(path, tls, users, tuple(watched))


def _tls(section: Any, base: str, where: str) -> tuple[ssl.SSLContext, list[str]]:
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: tls_server_config must be a mapping")
    for k in section:
        if k not in TLS_KEYS:
            raise ConfigError(f"{where}: unsupported key tls_server_config.{str(k)[:60]} "
                              f"(supported: {', '.join(sorted(TLS_KEYS))})")
    for k, v in section.items():
        if not isinstance(v, str):
            raise ConfigError(f"{where}: tls_server_config.{k} must be a string")

    def path_of(k: str) -> str | None:
        v = section.get(k)
        return os.path.join(base, v) if v else None

    cert, key, ca = path_of("cert_file"), path_of("key_file"), path_of("client_ca_file")
    if not cert or not key:
        raise ConfigError(f"{where}: tls_server_config needs both cert_file and key_file")
    auth_type = section.get("client_auth_type") or ("RequireAndVerifyClientCert" if ca else "NoClientCert")
    if auth_type in UNSUPPORTED_CLIENT_AUTH:
        raise ConfigError(f"{where}: client_auth_type {auth_type} is not supported (it accepts unverified "
                          f"certificates); use one of {', '.join(CLIENT_AUTH)}")
    if auth_type not in CLIENT_AUTH:
        raise ConfigError(f"{where}: unknown client_auth_type {auth_type[:60]!r} (one of {', '.join(CLIENT_AUTH)})")
    if CLIENT_AUTH[auth_type] != ssl.CERT_NONE and not ca:
        raise ConfigError(f"{where}: client_auth_type {auth_type} needs client_ca_file")
    versions = {}
    for k, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        v = section.get(k) or default
        if v not in TLS_VERSIONS:
            raise ConfigError(f"{where}: unknown tls_server_config.{k} {v[:60]!r} (one of {', '.join(TLS_VERSIONS)})")
        versions[k] = TLS_VERSIONS[v]
    if versions["min_version"] > versions["max_version"]:
        raise ConfigError(f"{where}: tls_server_config.min_version is above max_version")
    for p, what in ((cert, "cert_file"), (key, "key_file"), (ca, "client_ca_file")):
        if p:
            _stat_regular(p, what, where)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.minimum_version = versions["min_version"]
        ctx.maximum_version = versions["max_version"]
    except (ValueError, ssl.SSLError) as e:
        raise ConfigError(f"{where}: TLS version not available here: {e}") from None

    def no_passphrase() -> str:
        raise ConfigError(f"{where}: key_file {key} is encrypted; a key with a passphrase is not supported")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ConfigError:
        raise
    except ssl.SSLError as e:
        raise ConfigError(f"{where}: cannot load cert_file {cert} / key_file {key}: {e.reason or e}") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot load cert_file {cert} / key_file {key}: {problem_text(e)}") from None
    ctx.verify_mode = CLIENT_AUTH[auth_type]
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"{where}: cannot load client_ca_file {ca}: {getattr(e, 'reason', None) or e}") from None
    return ctx, [p for p in (cert, key, ca) if p]


def _users(section: Any, where: str) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: basic_auth_users must be a mapping of user name to bcrypt hash")
    users = {}
    for user, h in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(f"{where}: basic_auth_users: invalid user name {str(user)[:60]!r}")
        if not isinstance(h, str) or not _is_bcrypt(h):
            # never echo the value: a plain password put here by mistake must not reach the log
            raise ConfigError(f"{where}: basic_auth_users.{user[:60]}: expected a bcrypt hash ($2y$...), "
                              "e.g. from htpasswd -nBC 10 \"\"")
        users[user] = h.encode()
    return users


def _is_bcrypt(h: str) -> bool:
    return len(h) == 60 and h[:4] in ("$2a$", "$2b$", "$2y$") and h[4:6].isdigit() and h[6] == "$"


def signature(paths: tuple[str, ...]) -> tuple[Any, ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((p, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((p, None))
    return tuple(out)


class WebConfigWatcher:
    """Holds the web config in force; re-reads it when a file changes or on SIGHUP (reload())."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.current = load(path) if path else WebConfig()  # at start-up: ConfigError -> exit 2
        self._sig = signature(self.current.watched)
        self.reloads = 0
        self.reload_failures = 0

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.current.tls

    def reload(self, why: str) -> bool:
        if not self.path:
            log.info("%s: no --web.config.file to re-read", why)
            return False
        self._sig = signature(self.current.watched)
        try:
            new = load(self.path)
        except ConfigError as e:
            self.reload_failures += 1
            log.warning("%s: keeping the previous web config: %s", why, e)
            return False
        self.current = new
        self._sig = signature(new.watched)
        self.reloads += 1
        log.info("%s: web config re-read (TLS %s, basic auth %s)", why, "on" if new.tls else "off",
                 f"{len(new.users)} users" if new.users else "off")
        return True

    def check(self) -> bool:
        """Reload if a watched file changed since the last look."""
        if self.path and signature(self.current.watched) != self._sig:
            return self.reload("web config changed")
        return False

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_EVERY)
            await asyncio.get_running_loop().run_in_executor(None, self.check)


# A real bcrypt hash of a random password, checked against when the user is unknown, so the answer
# takes the same time whether or not the user exists.
_DUMMY_HASH = b"$2b$10$CrzTxu4/lHJ77H7u4MZT3ezY3FGsjR66lLxqAb81mmNFaKEgTAT.G"
CACHE_SIZE = 256
MAX_PENDING = 32  # bcrypt checks waiting; beyond, answer 503 at once instead of queueing more CPU


class BasicAuth:
    def __init__(self, watcher: WebConfigWatcher) -> None:
        self.watcher = watcher
        self._cache: collections.OrderedDict[bytes, bool] = collections.OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcrypt")
        self._pending = 0
        self.checks = 0  # bcrypt runs (tests: the cache works)

    @staticmethod
    def parse_header(value: str) -> tuple[str, str] | None:
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "basic" or not token or len(token) > 4096:
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else None

    async def allowed(self, header: str | None) -> bool | None:
        """True/False, or None when too many checks are queued (answer 503)."""
        users = self.watcher.current.users
        creds = self.parse_header(header) if header else None
        if creds is None:
            return False
        user, password = creds
        hashed = users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed or b""))).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if self._pending >= MAX_PENDING:
            return None
        self._pending += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(self._pool, self._check, password, hashed)
        finally:
            self._pending -= 1
        self._cache[key] = ok
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return ok

    def _check(self, password: str, hashed: bytes | None) -> bool:
        import bcrypt

        self.checks += 1
        try:
            ok = bcrypt.checkpw(password.encode(), hashed or _DUMMY_HASH)
        except ValueError:
            return False
        return ok and hashed is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
