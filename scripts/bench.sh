#!/usr/bin/env bash
# Benchmarks roboflowuploadsink against Roboflow's Python SDK (inference_sdk
# 1.8.3) on the same local Roboflow Inference Server, with the same files and
# Workflow, in alternating runs (ours, SDK, ours, SDK, ...), then checks the
# plugin's peak memory while it uploads a 1 GB file.
#   scripts/bench.sh
# Environment:
#   BENCH_RUNS      runs per client, file and mode (2)
#   BENCH_BIG       1: run the 1 GB memory check (default), 0: skip it
#   BENCH_TIMEOUT_SMALL / BENCH_TIMEOUT_LARGE / BENCH_TIMEOUT_BIG
#                   seconds allowed per job (120 / 400 / 600); a job that runs
#                   over is killed and counted as a timeout, never waited for
#   ROBOFLOW_SERVER_PORT  as for scripts/roboflow-server.sh (9001)
# Uses the server already answering on 127.0.0.1, or starts one with
# scripts/roboflow-server.sh and stops it at the end (only one it started).
# Files, per-job logs and results go to target/bench/. Network: 127.0.0.1 only.
#
# Measured per job (client side; see examples/bench_job.rs and
# scripts/bench_sdk.py for how each field is taken):
#   upload throughput  file bytes / (first chunk sent -> first result received)
#   total job time     start of the job -> end of stream, session closed
#   process wall, CPU, peak RSS  GNU time -v of the client process (CPU is
#                      user+sys; the SDK's includes Python's imports)
#   results            per-frame results delivered; video frames: decoded
#                      frames delivered (datachannel-frames mode)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${BENCH_RUNS:-2}"
BIG="${BENCH_BIG:-1}"
TIMEOUT_SMALL="${BENCH_TIMEOUT_SMALL:-120}"
TIMEOUT_LARGE="${BENCH_TIMEOUT_LARGE:-400}"
TIMEOUT_BIG="${BENCH_TIMEOUT_BIG:-600}"
PORT="${ROBOFLOW_SERVER_PORT:-9001}"
API_URL="http://127.0.0.1:$PORT"
SERVER_HOME="${ROBOFLOW_SERVER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/gst-roboflow}"
PY="$SERVER_HOME/venv/bin/python"
WORKFLOW=examples/workflows/blur-dominant-color.json
STREAM_OUTPUT=blurred
DATA_OUTPUT=rgb_color
OUT=target/bench
STAMP="$(date +%Y%m%d-%H%M%S)"
LOGS="$OUT/logs-$STAMP"
RESULTS="$OUT/results-$STAMP.jsonl"
REPORT="$OUT/report-$STAMP.txt"
OURS=target/release/examples/bench_job

log() { echo "bench: $*" >&2; }

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
if [ ! -x /usr/bin/time ]; then
    log "installing GNU time (apt package 'time') for peak RSS"
    $SUDO apt-get install -y -q time >&2 || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q time >&2; }
fi
command -v gst-launch-1.0 >/dev/null || { log "gst-launch-1.0 is missing (gstreamer1.0-tools)"; exit 1; }

# --- server: use the one that answers, else start ours (and stop it at exit)
STARTED_SERVER=0
info_up() { curl -fsS --max-time 5 "$API_URL/info" >/dev/null 2>&1; }
cleanup() {
    if [ "$STARTED_SERVER" = 1 ]; then
        log "stopping the server this script started"
        scripts/roboflow-server.sh stop || true
    fi
}
trap cleanup EXIT
if ! info_up; then
    if scripts/roboflow-server.sh status 2>/dev/null | grep -q '^starting'; then
        # Someone else is starting it: wait, but it stays theirs.
        log "the server is starting (not ours); waiting for $API_URL/info"
        for _ in $(seq 1 150); do info_up && break; sleep 2; done
        info_up || { log "no answer from $API_URL/info"; exit 1; }
    else
        scripts/roboflow-server.sh start
        STARTED_SERVER=1
    fi
else
    log "using the server already answering at $API_URL (left running)"
fi
[ -x "$PY" ] && "$PY" -c 'import inference_sdk.webrtc' 2>/dev/null \
    || { log "the SDK's venv ($PY) cannot import inference_sdk.webrtc"; exit 1; }

# --- our client, release build
log "building the plugin and examples/bench_job.rs (release)"
cargo build --release --locked --lib --example bench_job >&2
# Which code was measured (read-only git; the build takes the work tree as is).
export BENCH_TREE="commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git --no-optional-locks status --porcelain 2>/dev/null | wc -l) changed/untracked paths in the work tree"

# --- files (cached)
mkdir -p "$OUT" "$LOGS"
make_clip() { # path width height frames kbit/s
    local path="$1"
    [ -s "$path" ] && return 0
    log "making $path (${2}x$3, $4 frames, $5 kbit/s)"
    gst-launch-1.0 -q videotestsrc num-buffers="$4" pattern=snow \
        ! "video/x-raw,width=$2,height=$3,framerate=30/1" \
        ! x264enc bitrate="$5" speed-preset=veryfast key-int-max=60 ! mp4mux \
        ! filesink location="$path.part" >&2
    mv "$path.part" "$path"
}
SMALL="$OUT/small-360p-10s.mp4"
LARGE="$OUT/large-720p-30s-25mbit.mp4"
BIGFILE="$OUT/random-1gib.bin"
make_clip "$SMALL" 640 360 300 800
make_clip "$LARGE" 1280 720 900 25000

# --- one job under GNU time and timeout; appends one JSON line to $RESULTS
run_job() { # client mode label file timeout run
    local client="$1" mode="$2" label="$3" file="$4" limit="$5" run="$6"
    local name="$label-$mode-$client-$run"
    local cmd
    if [ "$client" = ours ]; then
        cmd=("$OURS" --mode "$mode" --file "$file" --api-url "$API_URL"
             --workflow-spec-file "$WORKFLOW" --data-output "$DATA_OUTPUT")
    else
        cmd=(env ROBOFLOW_ICE_LOOPBACK_ONLY=1 "PYTHONPATH=$PWD/scripts/server${PYTHONPATH:+:$PYTHONPATH}"
             "$PY" scripts/bench_sdk.py --mode "$mode" --file "$file" --api-url "$API_URL"
             --workflow-spec-file "$WORKFLOW" --data-output "$DATA_OUTPUT")
    fi
    [ "$mode" = frames ] && cmd+=(--stream-output "$STREAM_OUTPUT")
    local load_before load_after rc
    load_before="$(cut -d' ' -f1 /proc/loadavg)"
    log "$name (timeout ${limit}s, load $load_before)"
    set +e
    /usr/bin/time -v -o "$LOGS/$name.time" timeout --kill-after=10 "$limit" "${cmd[@]}" \
        >"$LOGS/$name.out" 2>"$LOGS/$name.err"
    rc=$?
    set -e
    load_after="$(cut -d' ' -f1 /proc/loadavg)"
    "$PY" scripts/bench_common.py job "$LOGS/$name" "$rc" client="$client" mode="$mode" label="$label" \
        run="$run" load_before="$load_before" load_after="$load_after" >>"$RESULTS"
    tail -n 1 "$RESULTS" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print("bench:   ", j["status"], "total %.1f s" % j["total_time"] if j.get("total_time") else "", "results", j.get("frames"), "video", j.get("video_frames"), (j.get("error") or "")[:200], file=sys.stderr)'
}

LOAD_START="$(cat /proc/loadavg)"
UPTIME_START="$(uptime)"
for spec in "small:$SMALL:$TIMEOUT_SMALL" "large:$LARGE:$TIMEOUT_LARGE"; do
    IFS=: read -r label file limit <<<"$spec"
    for mode in data frames; do
        for run in $(seq 1 "$RUNS"); do
            run_job ours "$mode" "$label" "$file" "$limit" "$run"
            run_job sdk "$mode" "$label" "$file" "$limit" "$run"
        done
    done
done

# --- 1 GB through filesrc ! roboflowuploadsink: the plugin's peak RSS. Random
# bytes: the server decodes no frame, so the job must end with our "decoded no
# frames" error; that is the expected outcome here, not a failure.
if [ "$BIG" = 1 ]; then
    avail_kib="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
    if [ "$avail_kib" -lt $((4 * 1024 * 1024)) ]; then
        log "skipping the 1 GB check: only $((avail_kib / 1024)) MiB available (the server holds the whole upload in memory)"
    else
        if [ "$(stat -c %s "$BIGFILE" 2>/dev/null || echo 0)" != 1073741824 ]; then
            log "making $BIGFILE (1 GiB of random bytes)"
            head -c 1073741824 /dev/urandom >"$BIGFILE.part" && mv "$BIGFILE.part" "$BIGFILE"
        fi
        run_job ours data big "$BIGFILE" "$TIMEOUT_BIG" 1
    fi
fi
LOAD_END="$(cat /proc/loadavg)"
UPTIME_END="$(uptime)"
export BENCH_SERVER="$API_URL ($([ "$STARTED_SERVER" = 1 ] && echo "started by this script" || echo "already running"))"

# --- the table
"$PY" - "$RESULTS" "$RUNS" "$LOAD_START" "$LOAD_END" "$UPTIME_START" "$UPTIME_END" "$SMALL" "$LARGE" <<'EOF' | tee "$REPORT"
import json, os, sys
path, runs, load_start, load_end, up_start, up_end, small, large = sys.argv[1:]
jobs = [json.loads(line) for line in open(path)]

def per_job(job, metric):
    ft, rt, tt = job.get("first_chunk_time"), job.get("first_result_time"), job.get("total_time")
    lt, size = job.get("last_chunk_time"), job.get("bytes")
    if metric == "throughput":
        return size / (rt - ft) / 1e6 if ft is not None and rt is not None and rt > ft else None
    if metric == "send_rate":
        return size / (lt - ft) / 1e6 if ft is not None and lt is not None and lt > ft else None
    if metric == "first_result":
        return rt - ft if ft is not None and rt is not None else None
    if metric == "setup":
        return ft
    if metric == "total":
        return tt if job["status"] == "ok" else None
    if metric == "rss":
        return job["peak_rss_kib"] / 1024 if job.get("peak_rss_kib") else None
    if metric == "cpu":
        return job.get("cpu_seconds") if job["status"] == "ok" else None
    if metric == "wall":
        return job.get("process_wall") if job["status"] == "ok" else None
    return job.get(metric) if job["status"] == "ok" else None

def show(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a", None
    mean = sum(values) / len(values)
    text = f"{mean:.{digits}f}"
    if len(values) > 1 and max(values) - min(values) >= 10 ** -digits:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text, mean

rows = [
    ("upload throughput, MB/s (bytes / first chunk -> first result)", "throughput", 1),
    ("  first chunk -> first result, s", "first_result", 2),
    ("  upload send rate, MB/s (bytes / first -> last chunk handed over)", "send_rate", 1),
    ("set-up: start -> first chunk, s", "setup", 1),
    ("total job time, s", "total", 1),
    ("process wall time, s", "wall", 1),
    ("client CPU (user+sys), s", "cpu", 2),
    ("client peak RSS, MiB", "rss", 0),
    ("results delivered", "frames", 0),
    ("video frames delivered", "video_frames", 0),
]
def size_of(p):
    try:
        return f"{os.path.getsize(p) / 1e6:.1f} MB"
    except OSError:
        return "?"
labels = {"small": f"{os.path.basename(small)}, {size_of(small)}", "large": f"{os.path.basename(large)}, {size_of(large)}"}
modes = {"data": "data-only (data_output rgb_color, no video)", "frames": "datachannel-frames (stream-output blurred as JPEG on the data channel)"}

print(f"gst-roboflow benchmark: roboflowuploadsink (ours) vs inference_sdk 1.8.3 (SDK), {runs} run(s) each, alternating")
print(f"plugin built from {os.environ.get('BENCH_TREE', '?')}; server {os.environ.get('BENCH_SERVER', '?')}")
print(f"values: mean (min-max) over completed runs; ratio = ours/SDK (throughput: >1 is better; times, CPU, RSS: <1 is better)")
for label in ("small", "large"):
    for mode in ("data", "frames"):
        ours = [j for j in jobs if j["label"] == label and j["mode"] == mode and j["client"] == "ours"]
        sdk = [j for j in jobs if j["label"] == label and j["mode"] == mode and j["client"] == "sdk"]
        if not ours and not sdk:
            continue
        print()
        print(f"## {labels[label]} - {modes[mode]}")
        width = 68
        print(f"| {'metric':<{width}} | {'ours':<22} | {'SDK':<22} | {'ours/SDK':>8} |")
        print(f"|{'-' * (width + 2)}|{'-' * 24}|{'-' * 24}|{'-' * 10}|")
        for title, metric, digits in rows:
            if metric == "video_frames" and mode == "data":
                continue
            a, ma = show([per_job(j, metric) for j in ours], digits)
            b, mb = show([per_job(j, metric) for j in sdk], digits)
            ratio = f"{ma / mb:.2f}" if ma is not None and mb else "-"
            print(f"| {title:<{width}} | {a:<22} | {b:<22} | {ratio:>8} |")
        def outcome(js):
            counts = {}
            for j in js:
                counts[j["status"]] = counts.get(j["status"], 0) + 1
            return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"
        print(f"| {'runs (ok / error / timeout)':<{width}} | {outcome(ours):<22} | {outcome(sdk):<22} | {'':>8} |")
        for j in ours + sdk:
            if j["status"] != "ok":
                print(f"   {j['client']} run {j['run']}: {j['status']}: {(j.get('error') or '')[:300]} (log {j['log']}.err)")

big = [j for j in jobs if j["label"] == "big"]
if big:
    j = big[0]
    expected = j["status"] == "error" and "decoded no frames" in (j.get("error") or "")
    print()
    print("## 1 GiB of random bytes through filesrc ! roboflowuploadsink (plugin memory check)")
    print(f"- outcome: {j['status']}" + (" - the expected 'decoded no frames' error (random bytes are no video)" if expected else f" - UNEXPECTED: {j.get('error')}"))
    rss = j.get("peak_rss_kib")
    print(f"- peak RSS of the client process: {rss / 1024:.0f} MiB" if rss else "- peak RSS: n/a")
    print(f"- client CPU (user+sys): {j['cpu_seconds']:.1f} s" if j.get("cpu_seconds") is not None else "- client CPU: n/a")
    send = per_job(j, "send_rate")
    print(f"- bytes uploaded: {j.get('bytes_uploaded')} of {j.get('bytes')}; upload send rate {send:.1f} MB/s (first -> last chunk)" if send else f"- bytes uploaded: {j.get('bytes_uploaded')}")
    print(f"- total job time: {j['total_time']:.1f} s" if j.get("total_time") else "- total job time: n/a")

loads = [j["load_before"] for j in jobs] or [float("nan")]
print()
print(f"machine: {os.cpu_count()} CPUs; load average at start {load_start.split()[:3]}, at end {load_end.split()[:3]}; 1-min load when each job started: {min(loads):.2f}-{max(loads):.2f}")
print(f"uptime before: {up_start.strip()}")
print(f"uptime after:  {up_end.strip()}")
print(f"per-job JSON: {path}")
EOF
log "report saved to $REPORT"
