"""Command line: flags and subcommands, nothing else.

    immich-gpu-exporter [serve] [flags]   run the daemon (default)
    immich-gpu-exporter --once [flags]    one collection cycle, exposition on stdout, exit 0
    immich-gpu-exporter check [flags]     validate the GPU setup (own issue)
    immich-gpu-exporter demo [flags]      replay a built-in CPU-then-CUDA scenario through the real code

Every configuration flag comes from `config.OPTIONS`. Invalid input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, Sequence

from . import __version__, config as configmod, logs

if TYPE_CHECKING:  # imported at run time only after lean_process() (it must come first)
    import asyncio

PROG = "immich-gpu-exporter"
COMMANDS = ("serve", "check", "demo")
log = logging.getLogger("immich_gpu_exporter")


_METAVARS = {"_positive_float": "SECONDS", "_positive_int": "N", "_url": "URL", "_opt_url": "URL",
             "_path": "PATH", "_opt_path": "PATH", "_log_level": "LEVEL"}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


USAGE = {
    "serve": f"""{PROG} [serve] [--once | --dry-run] [options]
       {PROG} demo [options]
       {PROG} check [options]""",
    "demo": f"{PROG} demo [options]",
    "check": f"{PROG} check [options]",
}
DESCRIPTION = {
    "serve": "Prometheus exporter that shows whether Immich really runs on the GPU. Without a command it runs the "
             "daemon: every enabled source is collected in the background and /metrics serves the result.",
    "demo": "Serve a looping replay of a small Immich host instead of reading this machine: ONNX Runtime fails to "
            "create the CUDA provider and the ML service runs on the CPU, then the setup is fixed and it runs on "
            "CUDA, about 40 s each at --demo.speed=1. The replay goes through the real parsers, attribution and "
            "timing code, so /metrics and the Grafana dashboard look as they would on such a host; every "
            "exposition says mode=\"demo\" in immich_gpu_exporter_build_info and the status page says DEMO.",
    "check": "Validate the GPU setup the way the daemon sees it: each source runs once (with a private state "
             "directory, so the daemon's journal cursor is untouched) and ten checks print PASS, WARN, FAIL or SKIP "
             "with a one-line fix. Exit 0 when nothing failed, 1 when something failed, 2 for usage or configuration "
             "errors; --json prints the documented structure of docs/check.md.",
}
EPILOG = {
    "serve": "commands: serve (the default: run the daemon), demo (serve a looping CPU-then-CUDA replay through the "
             "real parsers, for the dashboard; see demo --help), check (validate the GPU setup; see check --help). Every option is also "
             "an environment variable IMMICH_GPU_EXPORTER_<SECTION>_<KEY> and a TOML key [section] key; see "
             "docs/configuration.md.",
    "demo": "Options not listed here do not apply to the demo (its scenario fixes the Immich units, containers and URLs). "
            "Each option is also an environment variable IMMICH_GPU_EXPORTER_<SECTION>_<KEY> and a TOML key.",
}
# What the demo reads from the configuration; everything else is fixed by its scenario.
DEMO_KEYS = frozenset({"web.listen-address", "log.level", "collector.nvml", "collector.systemd", "collector.journal",
                       "collector.immich", "gpu.pid-labels", "systemd.unit", "demo.speed"})


def _applies(key: str, command: str) -> bool:
    if key in configmod.NOT_A_FLAG:
        return False
    if command == "demo":
        return key in DEMO_KEYS
    return not key.startswith("demo.")


def _help(o: configmod.Option) -> str:
    """The option's help with its default appended once (none when there is no default value)."""
    if o.boolean:
        default = "enabled" if o.default else "disabled"
    elif o.repeatable:
        default = ",".join(o.default)
    else:
        default = None if o.default is None else str(o.default)
    if default is None or "(default:" in o.help:
        return o.help
    return f"{o.help} (default: {default})"


def build_parser(command: str = "serve") -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG}" if command == "serve" else f"{PROG} {command}", usage=USAGE[command],
                description=DESCRIPTION[command], epilog=EPILOG.get(command, EPILOG["serve"]),
                argument_default=argparse.SUPPRESS, allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (flags > env > file > defaults)")
    if command == "check":
        p.add_argument("--json", action="store_true", help="print the findings as JSON (see docs/check.md)")
        p.add_argument("--root", metavar="DIR", help="read /proc/modules, /dev, /sys, /etc/cdi and the model cache "
                       "under DIR instead of / (a host root mounted into a container; tests)")
    if command == "serve":
        p.add_argument("--once", action="store_true",
                       help="run one collection cycle of every enabled source, print the exposition, exit 0")
        p.add_argument("--dry-run", action="store_true",
                       help="validate flags, environment and config file, print the merged config, exit 0")
    for o in configmod.OPTIONS:
        if not _applies(o.key, command):
            continue
        if o.boolean:
            p.add_argument(o.flag, dest=o.dest, action=argparse.BooleanOptionalAction, help=_help(o))
        elif o.repeatable:
            p.add_argument(o.flag, dest=o.dest, action="append", metavar=o.metavar or "VALUE", help=_help(o))
        else:
            p.add_argument(o.flag, dest=o.dest, metavar=o.metavar or _METAVARS.get(o.parse.__name__, "VALUE"),
                           help=_help(o))
    return p


def parse(argv: Sequence[str], environ: Any = None) -> tuple[str, argparse.Namespace, configmod.Config]:
    argv = list(argv)
    command = "serve"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    ns = build_parser(command).parse_args(argv)
    flags = {}
    for o in configmod.OPTIONS:
        if hasattr(ns, o.dest):
            flags[o.key] = getattr(ns, o.dest)
    cfg = configmod.load(flags, getattr(ns, "config", None), environ)
    return command, ns, cfg


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--immich.api-key" or a.startswith("--immich.api-key=") for a in argv):
        print(f"{PROG}: error: immich.api-key is not accepted as a flag (every user can read command lines); "
              "use --immich.api-key-file or IMMICH_GPU_EXPORTER_IMMICH_API_KEY", file=sys.stderr)
        return 2
    try:
        command, ns, cfg = parse(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except configmod.ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    register_secrets(cfg)
    logs.setup(cfg["log.level"])
    if command != "check":
        lean_process(cfg)
    if command == "check":
        from .check import run_check
        return run_check(cfg, as_json=getattr(ns, "json", False), root=getattr(ns, "root", "/"))
    if command == "demo":
        from .demo import demo_daemon
        return serve(cfg, demo_daemon(cfg))
    if getattr(ns, "dry_run", False):
        if cfg["web.config.file"]:
            from .webconfig import load as load_web_config

            try:
                load_web_config(cfg["web.config.file"])
            except configmod.ConfigError as e:
                print(f"{PROG}: error: {e}", file=sys.stderr)
                return 2
        for o in configmod.OPTIONS:
            v = cfg[o.key]
            if o.secret and v:
                v = "<set>"
            elif isinstance(v, str):
                v = logs.redact(v)
            elif isinstance(v, tuple):
                v = tuple(logs.redact(x) if isinstance(x, str) else x for x in v)
            print(f"{o.key} = {v!r}  # {cfg.origin(o.key)}")
        return 0
    if getattr(ns, "once", False):
        return run_once(cfg)
    return serve(cfg)


def register_secrets(cfg: configmod.Config) -> None:
    """Every secret the configuration holds, so that logs and pages redact them (logs.redact)."""
    for o in configmod.OPTIONS:
        v = cfg[o.key]
        if o.secret and isinstance(v, str):
            logs.add_secret(v)
        else:
            for item in (v if isinstance(v, tuple) else (v,)):
                if isinstance(item, str) and "://" in item:
                    for part in configmod.url_credentials(item):
                        logs.add_secret(part)


def lean_process(cfg: configmod.Config) -> None:
    """Keep out of this process what its configuration never uses (BENCHMARKS.md, "Resident memory").

    * TLS: with no https:// URL configured nothing here speaks TLS, so `ssl` is made unimportable
      before asyncio and aiohttp load; both then run without it (they import it optionally), and
      libssl, the ssl module and aiohttp's TLS parts stay out: ~4.5 MiB.
    * malloc arenas: glibc gives each thread that allocates its own arena; the event loop and a
      few blocking workers (NVML, sd-bus, the executor) need no more than two: ~2 MiB.
    Only the command line calls this, before the first `import asyncio`.
    """
    urls = [cfg[o.key] for o in configmod.OPTIONS if o.parse.__name__ in ("_url", "_opt_url")]
    if "ssl" not in sys.modules and "asyncio" not in sys.modules and not cfg["web.config.file"] and \
            not any(isinstance(u, str) and u.lower().startswith("https:") for u in urls):
        sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` now raises ImportError
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX (glibc); elsewhere there is no such symbol
    except (OSError, AttributeError):
        pass


def make_daemon(cfg: configmod.Config):  # type: ignore[no-untyped-def]
    from . import sources
    from .daemon import Daemon

    daemon = Daemon(role=cfg["deployment.role"])
    for name in sources.enabled(cfg):
        daemon.add(sources.create(name, cfg, daemon.hub))
    return daemon


def run_once(cfg: configmod.Config) -> int:
    import asyncio

    async def go() -> bytes:
        daemon = make_daemon(cfg)
        await daemon.run_once()
        return daemon.rendered.text

    sys.stdout.buffer.write(asyncio.run(go()))
    sys.stdout.flush()
    return 0


def split_listen(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve_async(cfg: configmod.Config, daemon: Any = None, stop: asyncio.Event | None = None,
                      web_config: Any = None) -> None:
    import asyncio

    from aiohttp import web

    from .http import KEEPALIVE_TIMEOUT, Listener, auth_middleware, make_app
    from .webconfig import BasicAuth, WebConfigWatcher

    web_config = web_config or WebConfigWatcher(cfg["web.config.file"])
    daemon = daemon or make_daemon(cfg)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.loop_exception_handler)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    listener_box: list[Listener] = []

    @web.middleware
    async def track(request: web.Request, handler: Any) -> Any:
        return await listener_box[0].middleware(request, handler)

    auth = BasicAuth(web_config)
    app = make_app(daemon, middlewares=(track, auth_middleware(auth)))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5,
                           keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    assert runner.server is not None
    listener = Listener(runner.server, ssl_context=web_config.ssl_context)
    listener_box.append(listener)
    host, port = split_listen(cfg["web.listen-address"])
    try:
        bound = await listener.start(host, port)
    except (OSError, UnicodeError, ValueError) as e:
        await runner.cleanup()
        raise SystemExit(f"{PROG}: error: cannot listen on {cfg['web.listen-address']}: "
                         f"{getattr(e, 'strerror', None) or e}")
    current = web_config.current
    log.info("%s %s listening on %s (%s%s, at most %d connections)", PROG, __version__,
             ", ".join(f"{a[0]}:{a[1]}" for a in bound), "https" if current.tls else "http",
             ", basic auth" if current.auth else "", listener.cap)
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: web_config.reload("SIGHUP"))
    except (NotImplementedError, RuntimeError):
        pass
    watch = asyncio.create_task(web_config.watch(), name="web-config-watch")
    await daemon.start()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        try:
            await asyncio.wait_for(daemon.stop(), 1.5)
        except asyncio.TimeoutError:
            log.warning("sources did not stop within 1.5s")
        watch.cancel()
        await listener.close()
        await runner.cleanup()
        auth.close()


def serve(cfg: configmod.Config, daemon: Any = None) -> int:
    import asyncio

    from .webconfig import WebConfigWatcher

    try:
        web_config = WebConfigWatcher(cfg["web.config.file"])
    except configmod.ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_async(cfg, daemon, web_config=web_config))
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise
    return 0
