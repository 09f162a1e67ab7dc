#!/usr/bin/env bash
# Install the system packages the project needs, only when they are missing (Debian/Ubuntu, apt-get).
#   scripts/ensure_deps.sh python   a Python >= 3.11 with the venv module
#   scripts/ensure_deps.sh redis    redis-server, only when no Redis answers on 127.0.0.1:6379
#   scripts/ensure_deps.sh net      iproute2 (ip, tc): the network-partition tests make namespaces with it
#   scripts/ensure_deps.sh chromium Debian's chromium: the report test renders report.html in it (headless)
#   scripts/ensure_deps.sh wrk      Debian's wrk: the HTTP load generator of bench/api_load.py
#   scripts/ensure_deps.sh all      all three
set -euo pipefail

want="${1:-all}"
PYTHON="${PYTHON:-python3}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@";
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@";
  else echo "ensure_deps: need root to run: $*" >&2; return 1; fi
}

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_deps: apt-get not available; install these yourself: $*" >&2
    return 1
  fi
  if [ "$apt_updated" = 0 ]; then as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

ensure_python() {
  if ! command -v "$PYTHON" >/dev/null 2>&1; then apt_install python3 python3-venv; fi
  if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "ensure_deps: $("$PYTHON" -V 2>&1) is too old; Python >= 3.11 is required (set PYTHON=...)" >&2
    return 1
  fi
  # Debian splits venv and ensurepip out of the interpreter package.
  if [ -x .venv/bin/python ]; then return 0; fi
  if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    minor="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install "python${minor}-venv" || apt_install python3-venv
  fi
}

redis_answers() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]
  else
    # No client either: a raw PING over bash's /dev/tcp.
    (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null
  fi
}

ensure_redis() {
  if redis_answers; then return 0; fi
  if command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; then return 0; fi
  apt_install redis-server
}

ensure_net() {
  if command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; then return 0; fi
  apt_install iproute2
}

ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then return 0; fi
  apt_install chromium
}

ensure_wrk() {
  if command -v wrk >/dev/null 2>&1; then return 0; fi
  apt_install wrk
}

case "$want" in
  python) ensure_python ;;
  redis) ensure_redis ;;
  net) ensure_net ;;
  chromium) ensure_chromium ;;
  wrk) ensure_wrk ;;
  all) ensure_python; ensure_redis; ensure_net || echo "ensure_deps: no iproute2: the partition tests will be skipped" >&2 ;;
  *) echo "usage: $0 [python|redis|net|chromium|wrk|all]" >&2; exit 2 ;;
esac
