#!/usr/bin/env bash
# Installs (once) and runs a local Roboflow Inference Server 1.8.3 on loopback.
#   scripts/roboflow-server.sh install|start|stop|status
# Environment: ROBOFLOW_SERVER_PORT (9001), ROBOFLOW_SERVER_HOME (cache folder),
#              ROBOFLOW_SERVER_WAIT (seconds to wait for /info, 300),
#              ROBOFLOW_SERVER_MJPEG_LOCAL=1 to let the server read MJPEG
#              cameras on loopback and private addresses (off by default, as
#              in the server: WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES).
# Servers on different ports run side by side, each with its own state.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${ROBOFLOW_SERVER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/gst-roboflow}"
VENV="$HOME_DIR/venv"
PORT="${ROBOFLOW_SERVER_PORT:-9001}"
if [ "$PORT" = 9001 ]; then STATE="$HOME_DIR/server"; else STATE="$HOME_DIR/server-$PORT"; fi
WAIT="${ROBOFLOW_SERVER_WAIT:-300}"
PIDFILE="$STATE/server.pid"
LOG="$STATE/server.log"
PACKAGES=("inference-cpu[http]==1.8.3" "uvicorn")

log() { echo "roboflow-server: $*" >&2; }

installed() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import inference, uvicorn, aiortc' 2>/dev/null
}

install() {
    if installed; then return 0; fi
    log "installing ${PACKAGES[*]} into $VENV (several GB, a few minutes)"
    mkdir -p "$HOME_DIR"
    local python="${PYTHON:-python3.11}"
    command -v "$python" >/dev/null || python=python3
    "$python" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "${PACKAGES[@]}"
    installed || { log "the install finished but 'import inference' fails"; exit 1; }
}

# Our server is running when the pid file names a live process whose
# command line is our launcher: never touch a process we did not start.
our_pid() {
    [ -f "$PIDFILE" ] || return 1
    local pid; pid="$(cat "$PIDFILE")"
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # Any checkout's launcher counts: the pid file lives in the shared cache.
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "scripts/server/serve.py --host 127.0.0.1 --port $PORT" || return 1
    echo "$pid"
}

url() { echo "http://127.0.0.1:$PORT"; }

info_up() { curl -fsS --max-time 5 "$(url)/info" >/dev/null 2>&1; }

start() {
    install
    if pid="$(our_pid)"; then
        log "already running (pid $pid) at $(url)"
        return 0
    fi
    if info_up; then
        log "something else already answers at $(url); not starting a second server"
        exit 1
    fi
    mkdir -p "$STATE"
    : > "$LOG"
    (
        cd "$STATE"
        export OFFLINE_MODE=True DISABLE_VERSION_CHECK=True METRICS_ENABLED=False \
               WEBRTC_WORKER_ENABLED=True ROBOFLOW_ICE_LOOPBACK_ONLY=1 \
               PYTHONPATH="$HERE/server${PYTHONPATH:+:$PYTHONPATH}"
        if [ "${ROBOFLOW_SERVER_MJPEG_LOCAL:-0}" = 1 ]; then
            export WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES=True
        else
            export WEBRTC_MJPEG_ALLOW_NON_GLOBAL_ADDRESSES=False
        fi
        # Own process group, so stop can end the server and its workers.
        exec setsid "$VENV/bin/python" "$HERE/server/serve.py" --host 127.0.0.1 --port "$PORT"
    ) >>"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    log "starting (pid $(cat "$PIDFILE")), waiting up to ${WAIT}s for $(url)/info"
    local waited=0
    while [ "$waited" -lt "$WAIT" ]; do
        if info_up; then
            log "up at $(url) after ${waited}s"
            return 0
        fi
        if ! our_pid >/dev/null; then
            log "the server exited during start-up; its log ($LOG):"
            tail -n 60 "$LOG" >&2
            exit 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    log "no answer from $(url)/info within ${WAIT}s; its log ($LOG):"
    tail -n 60 "$LOG" >&2
    stop
    exit 1
}

stop() {
    local pid
    if ! pid="$(our_pid)"; then
        log "not running (no server of ours)"
        # Forget a stale pid file, but never one naming a live process.
        if [ -f "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then rm -f "$PIDFILE"; fi
        return 0
    fi
    log "stopping pid $pid and its workers"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
        our_pid >/dev/null || break
        sleep 0.5
    done
    if our_pid >/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    rm -f "$PIDFILE"
}

status() {
    if pid="$(our_pid)"; then
        if info_up; then echo "running (pid $pid) at $(url)"; else echo "starting (pid $pid)"; fi
    else
        echo "stopped"
        return 3
    fi
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    url) url ;;
    *) echo "usage: $0 install|start|stop|status|url" >&2; exit 2 ;;
esac
