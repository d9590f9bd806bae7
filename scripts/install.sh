#!/usr/bin/env bash
# Installs immich-gpu-exporter into /opt/immich-gpu-exporter (Debian/Ubuntu, as root), starts it on
# 127.0.0.1:10283 and returns:
#   - where systemd runs (it is PID 1): installs the shipped unit and its system user, then
#     `systemctl enable --now immich-gpu-exporter` (settings: /etc/immich-gpu-exporter/immich-gpu-exporter.env);
#   - elsewhere (a container, a chroot): starts it detached; log /var/log/immich-gpu-exporter.log,
#     PID in /run/immich-gpu-exporter.pid (running the script again replaces that process).
# Options (before the exporter's own flags):
#   --foreground   run it in the foreground instead (Ctrl-C stops it)
#   --detached     start it detached even where systemd runs
#   --no-start     install only
# Exporter flags after the options go to the detached or foreground process (with systemd, use the
# environment file). Verified on fresh minbase Debian 12 and Ubuntu 24.04; running it again upgrades in place.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --foreground) MODE=foreground; shift ;;
    --detached) MODE=detached; shift ;;
    --no-start) MODE=none; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
PREFIX=${PREFIX:-/opt/immich-gpu-exporter}
BINDIR=${BINDIR:-/usr/local/bin}                     # where the command is linked (the unit runs it from there)
LOG=${LOG:-/var/log/immich-gpu-exporter.log}          # detached mode only
PIDFILE=${PIDFILE:-/run/immich-gpu-exporter.pid}      # detached mode only
if [ "$MODE" = auto ]; then
  # sd_booted(): /run/systemd/system exists only where systemd is PID 1
  if [ -d /run/systemd/system ]; then MODE=systemd; else MODE=detached; fi
fi
if [ "$MODE" = systemd ] && [ $# -gt 0 ]; then
  echo "install.sh: the systemd unit takes its settings from /etc/immich-gpu-exporter/immich-gpu-exporter.env," \
       "not from flags ($*); or run with --foreground" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
# pystemd has no wheels on PyPI: pip compiles it, so it needs a C compiler with the libc headers
# (gcc only recommends libc6-dev, and recommends are off), Python.h, libsystemd's headers and
# pkg-config (its setup.py asks pkg-config for the libsystemd version). ca-certificates: pip
# from Debian's python3-venv trusts only the system CA bundle when it fetches from PyPI.
need=()
for p in python3 python3-venv python3-dev gcc libc6-dev pkg-config libsystemd-dev ca-certificates; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} (apt)" >&2
  apt-get update -qq && apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# The unit runs it as its own unprivileged user: a root umask of 027/077 must not leave the venv unreadable.
umask 022
[ -x "$PREFIX/bin/pip" ] || python3 -m venv "$PREFIX"
# Build from a throwaway copy: setuptools writes build/ and *.egg-info next to the sources, which
# fails in a read-only clone, and a stale build/lib would put modules deleted by a `git pull`
# back into the next install.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar -c --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' . | tar -x -C "$src"
echo "installing into $PREFIX (pip; pystemd compiles from source the first time)" >&2
"$PREFIX/bin/pip" install -q --disable-pip-version-check "$src"
rm -rf "$src"
trap - EXIT
# The path deploy/systemd/immich-gpu-exporter.service runs (ExecStart=).
mkdir -p "$BINDIR"
ln -sf "$PREFIX/bin/immich-gpu-exporter" "$BINDIR/immich-gpu-exporter"
EXE="$PREFIX/bin/immich-gpu-exporter"
echo "installed $("$EXE" --version) ($BINDIR/immich-gpu-exporter)" >&2

case "$MODE" in
  none)
    exit 0 ;;
  foreground)
    echo "starting it in the foreground (Ctrl-C stops it)" >&2
    exec "$EXE" "$@" ;;
  systemd)
    install -D -m 0644 deploy/systemd/immich-gpu-exporter.sysusers /usr/lib/sysusers.d/immich-gpu-exporter.conf
    systemd-sysusers /usr/lib/sysusers.d/immich-gpu-exporter.conf
    sed "s|/usr/local/bin/immich-gpu-exporter|$BINDIR/immich-gpu-exporter|" deploy/systemd/immich-gpu-exporter.service \
      > /etc/systemd/system/immich-gpu-exporter.service
    chmod 0644 /etc/systemd/system/immich-gpu-exporter.service
    [ -e /etc/immich-gpu-exporter/immich-gpu-exporter.env ] ||
      install -D -m 0644 deploy/systemd/immich-gpu-exporter.env.example /etc/immich-gpu-exporter/immich-gpu-exporter.env
    systemctl daemon-reload
    systemctl enable immich-gpu-exporter.service
    systemctl restart immich-gpu-exporter.service  # restart, not start: an upgrade must load the new code
    echo "started immich-gpu-exporter.service: systemctl status immich-gpu-exporter; journalctl -u immich-gpu-exporter" >&2
    echo "settings: /etc/immich-gpu-exporter/immich-gpu-exporter.env; Immich API key: /etc/credstore/immich-api-key (docs/deploy.md)" >&2
    ;;
  detached)
    if [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      old=$(cat "$PIDFILE")
      echo "stopping the previous instance (PID $old)" >&2
      kill "$old"
      for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    fi
    mkdir -p "$(dirname "$LOG")" "$(dirname "$PIDFILE")"
    before=0
    [ -f "$LOG" ] && before=$(wc -l <"$LOG")
    # setsid: out of this shell's session, so closing the terminal does not stop it
    setsid "$EXE" "$@" >>"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    # Return once it listens; if it exits at start, say why (its last log lines) and fail.
    for _ in $(seq 200); do
      tail -n +"$((before + 1))" "$LOG" | grep -q " listening on " && break
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "immich-gpu-exporter exited at start; the end of $LOG:" >&2
        tail -n +"$((before + 1))" "$LOG" | tail -n 5 >&2
        rm -f "$PIDFILE"
        exit 1
      fi
      sleep 0.1
    done
    echo "started immich-gpu-exporter in the background (PID $pid; no systemd here); log: $LOG; stop: kill \$(cat $PIDFILE)" >&2
    ;;
esac
