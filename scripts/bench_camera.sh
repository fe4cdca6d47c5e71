#!/usr/bin/env bash
# Camera benchmark (issue #10: "client CPU for a 60 s camera session <= 0.3x
# the SDK's RTSPSource"): roboflowresultsrc source-url=rtsp://... (ours)
# against Roboflow's Python SDK 1.8.3 RTSPSource (scripts/bench_camera_sdk.py),
# the same loopback RTSP camera (examples/rtsp_camera.rs, a fresh one per
# run), the same Workflow, the same local Roboflow Inference Server, which
# reads the camera itself; alternating runs (ours, SDK, ours, SDK, ...).
#   scripts/bench_camera.sh
# The session: FRAMES frames (900: 60 s at 15 fps) of 640x480 H.264 from the
# camera; the Workflow (examples/workflows/blur-dominant-color.json) returns
# `rgb_color` on the data channel and the `blurred` image as a WebRTC video
# track, which both clients decode, every frame:
#   ours: examples/bench_camera.rs, an application running
#         roboflowresultsrc source-url=URL api-url=... workflow-spec-file=...
#         data-output=rgb_color stream-output=blurred video-transport=track
#         realtime-processing=true ! SINK; per roboflow-inference
#         message it parses the result's JSON and keeps rgb_color and the
#         pts, which is what the SDK script's on_data handler does
#         (the release plugin, GST_PLUGIN_PATH=target/release)
#   launch (not run by default): the same pipeline as
#         gst-launch-1.0 -m ... ! SINK, which also prints every message
#         in full (about 0.05-0.1 s of CPU more over 900 frames)
#   SDK:  RTSPSource + StreamConfig(stream_output=["blurred"],
#         data_output=["rgb_color"], realtime_processing=True), an on_frame
#         handler that receives every decoded frame, session.run()
# Both run until the camera's stream ends (the server's processing_complete).
# Environment:
#   BENCH_RUNS        runs per client (2)
#   BENCH_CLIENTS     "ours sdk" (default); any of ours, sdk, launch
#   BENCH_FRAMES      camera frames per session (900)
#   BENCH_FPS         camera frame rate (15)
#   BENCH_WIDTH / BENCH_HEIGHT   camera frame size (640 / 480)
#   BENCH_PATTERN     camera pattern: coded (solid colour per frame, default)
#                     or ball (a moving ball on the colour-coded background)
#   BENCH_REALTIME    realtime processing, 1 (default) or 0
#   BENCH_SINK        where our decoded frames go (fakesink, default):
#                     fakesink takes plain buffers, so vp8dec copies each
#                     frame out of libvpx's own buffer (about 460 KB at
#                     640x480); fakevideosink accepts GstVideoMeta, as
#                     display sinks, videoconvert and encoders do, and gets
#                     libvpx's buffer without a copy
#   BENCH_TIMEOUT     seconds allowed per session (FRAMES / FPS + 120); a
#                     session over it is killed and counted as a timeout
#   BENCH_BUILD       1 (default): cargo build --release the plugin, the
#                     camera and the application first; 0: use what is in ${CARGO_TARGET_DIR:-target}
#   ROBOFLOW_SERVER_PORT  as for scripts/roboflow-server.sh (9001)
# Uses the server answering on 127.0.0.1, or starts one with
# scripts/roboflow-server.sh; it never stops the server (others may use it).
# The cameras bind 127.0.0.1 on a port the system picks.
# Per-job logs, the report and a JSON file of all figures go to target/bench/
# (camera-<stamp>.json, camera-report-<stamp>.txt).
#
# Measured per session:
#   results           results received (roboflow-inference messages / the
#                     SDK's on_data calls)
#   frames decoded    returned frames the client decoded: ours, the source's
#                     final stats frames-pushed (decoded, pushed to the sink);
#                     SDK, frames its track reader decoded to BGR arrays
#                     (also: how many reached the on_frame handler)
#   camera frames     which camera frames got a result (first, last,
#                     distinct), from the result's dominant colour
#   CPU, peak RSS, wall  GNU time -v of the client process (user+sys; the
#                     SDK's includes Python's imports, ours GStreamer's
#                     start-up; the plugin registry is refreshed beforehand)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${BENCH_RUNS:-2}"
CLIENTS="${BENCH_CLIENTS:-ours sdk}"
FRAMES="${BENCH_FRAMES:-900}"
FPS="${BENCH_FPS:-15}"
WIDTH="${BENCH_WIDTH:-640}"
HEIGHT="${BENCH_HEIGHT:-480}"
PATTERN="${BENCH_PATTERN:-coded}"
REALTIME="${BENCH_REALTIME:-1}"
TIMEOUT="${BENCH_TIMEOUT:-$((FRAMES / FPS + 120))}"
SINK="${BENCH_SINK:-fakesink}"
BUILD="${BENCH_BUILD:-1}"
PORT="${ROBOFLOW_SERVER_PORT:-9001}"
API_URL="http://127.0.0.1:$PORT"
SERVER_HOME="${ROBOFLOW_SERVER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/gst-roboflow}"
PY="$SERVER_HOME/venv/bin/python"
WORKFLOW=examples/workflows/blur-dominant-color.json
DATA_OUTPUT=rgb_color
STREAM_OUTPUT=blurred
OUT=target/bench
STAMP="$(date +%Y%m%d-%H%M%S)"
LOGS="$OUT/camera-logs-$STAMP"
RESULTS="$OUT/camera-jobs-$STAMP.jsonl"
SUMMARY="$OUT/camera-$STAMP.json"
REPORT="$OUT/camera-report-$STAMP.txt"
TARGET="${CARGO_TARGET_DIR:-target}"
CAMERA="$TARGET/release/examples/rtsp_camera"
APP="$TARGET/release/examples/bench_camera"

log() { echo "bench_camera: $*" >&2; }

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
if [ ! -x /usr/bin/time ]; then
    log "installing GNU time (apt package 'time') for CPU and peak RSS"
    $SUDO apt-get install -y -q time >&2 || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q time >&2; }
fi
command -v gst-launch-1.0 >/dev/null || { log "gst-launch-1.0 is missing (gstreamer1.0-tools)"; exit 1; }

# --- server: use the one that answers, else start one (and leave it running)
info_up() { curl -fsS --max-time 5 "$API_URL/info" >/dev/null 2>&1; }
if ! info_up; then
    if scripts/roboflow-server.sh status 2>/dev/null | grep -q '^starting'; then
        log "the server is starting; waiting for $API_URL/info"
        for _ in $(seq 1 150); do info_up && break; sleep 2; done
        info_up || { log "no answer from $API_URL/info"; exit 1; }
    else
        log "no server answers at $API_URL: starting one (it is left running)"
        scripts/roboflow-server.sh start
    fi
else
    log "using the server already answering at $API_URL"
fi
if [[ " $CLIENTS " == *" sdk "* ]]; then
    [ -x "$PY" ] && "$PY" -c 'import inference_sdk.webrtc' 2>/dev/null \
        || { log "the SDK's venv ($PY) cannot import inference_sdk.webrtc"; exit 1; }
fi

# --- the plugin and the camera, release build
if [ "$BUILD" = 1 ]; then
    log "building the plugin, examples/rtsp_camera.rs and examples/bench_camera.rs (release)"
    cargo build --release --locked --lib --example rtsp_camera --example bench_camera >&2
fi
PLUGIN_DIR="$(realpath -m "$TARGET/release")"
[ -x "$CAMERA" ] || { log "$CAMERA is missing (BENCH_BUILD=0 and no build there)"; exit 1; }
if [[ " $CLIENTS " == *" ours "* ]]; then
    [ -x "$APP" ] || { log "$APP is missing (BENCH_BUILD=0 and no build there)"; exit 1; }
fi
[ -f "$PLUGIN_DIR/libgstroboflow.so" ] || { log "$PLUGIN_DIR/libgstroboflow.so is missing"; exit 1; }
export GST_PLUGIN_PATH="$PLUGIN_DIR"
# Refresh GStreamer's registry now, so no session pays for the plugin scan.
gst-inspect-1.0 roboflowresultsrc >/dev/null \
    || { log "gst-inspect-1.0 finds no roboflowresultsrc in $PLUGIN_DIR"; exit 1; }
export BENCH_SINK_NAME="$SINK"
export BENCH_TREE="commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git --no-optional-locks status --porcelain 2>/dev/null | wc -l) changed/untracked paths in the work tree"

mkdir -p "$OUT" "$LOGS"

# --- a fresh camera: sets CAMERA_PID and CAMERA_URL
CAMERA_PID=""
stop_camera() {
    if [ -n "$CAMERA_PID" ] && kill -0 "$CAMERA_PID" 2>/dev/null; then
        kill "$CAMERA_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$CAMERA_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$CAMERA_PID" 2>/dev/null || true
    fi
    [ -n "$CAMERA_PID" ] && wait "$CAMERA_PID" 2>/dev/null || true
    CAMERA_PID=""
}
trap stop_camera EXIT
start_camera() { # log file
    local file="$1"
    "$CAMERA" --port 0 --frames "$FRAMES" --fps "$FPS" --width "$WIDTH" --height "$HEIGHT" \
        --pattern "$PATTERN" --exit-after 1 >"$file" 2>&1 &
    CAMERA_PID=$!
    CAMERA_URL=""
    for _ in $(seq 1 100); do
        CAMERA_URL="$(grep -m1 '^rtsp://' "$file" 2>/dev/null || true)"
        [ -n "$CAMERA_URL" ] && return 0
        kill -0 "$CAMERA_PID" 2>/dev/null || break
        sleep 0.1
    done
    log "the camera did not start: $(tail -n 3 "$file" | tr '\n' ' ')"
    stop_camera
    return 1
}

# --- one session under GNU time and timeout; appends one JSON line to $RESULTS
run_job() { # client run
    local client="$1" run="$2"
    local name="$client-$run"
    start_camera "$LOGS/$name.camera"
    local cmd out="$LOGS/$name.out"
    local realtime=false
    [ "$REALTIME" = 1 ] && realtime=true
    if [ "$client" = ours ]; then
        cmd=("$APP" --source-url "$CAMERA_URL" --api-url "$API_URL" --workflow-spec-file "$WORKFLOW"
             --data-output "$DATA_OUTPUT" --stream-output "$STREAM_OUTPUT" --realtime "$REALTIME"
             --results-file "$LOGS/$name.results.json" --timeout "$TIMEOUT" --sink "$SINK")
        out="$LOGS/$name.app"
    elif [ "$client" = launch ]; then
        cmd=(gst-launch-1.0 -m roboflowresultsrc "source-url=$CAMERA_URL" "api-url=$API_URL"
             "workflow-spec-file=$WORKFLOW" "data-output=$DATA_OUTPUT" "stream-output=$STREAM_OUTPUT"
             video-transport=track "realtime-processing=$realtime" ! "$SINK")
        out="$LOGS/$name.gst"
    else
        cmd=(env ROBOFLOW_ICE_LOOPBACK_ONLY=1 "PYTHONPATH=$PWD/scripts/server${PYTHONPATH:+:$PYTHONPATH}"
             "$PY" scripts/bench_camera_sdk.py --api-url "$API_URL" --rtsp-url "$CAMERA_URL"
             --workflow-spec-file "$WORKFLOW" --data-output "$DATA_OUTPUT" --stream-output "$STREAM_OUTPUT"
             --realtime "$REALTIME" --fps "$FPS" --results-file "$LOGS/$name.results.json")
    fi
    local load_before rc
    load_before="$(cut -d' ' -f1 /proc/loadavg)"
    log "$name on $CAMERA_URL (timeout ${TIMEOUT}s, load $load_before)"
    set +e
    /usr/bin/time -v -o "$LOGS/$name.time" timeout --kill-after=10 "$TIMEOUT" "${cmd[@]}" \
        >"$out" 2>"$LOGS/$name.err"
    rc=$?
    set -e
    stop_camera
    if [ "$client" = ours ]; then
        "$PY" scripts/bench_common.py app-camera "$out" "$LOGS/$name.results.json" "$FPS" >"$LOGS/$name.out"
    elif [ "$client" = launch ]; then
        # gst-launch prints the messages; their figures become the job's line.
        "$PY" scripts/bench_common.py gst-camera "$out" "$FPS" >"$LOGS/$name.out"
    fi
    "$PY" scripts/bench_common.py job "$LOGS/$name" "$rc" client="$client" run="$run" \
        load_before="$load_before" load_after="$(cut -d' ' -f1 /proc/loadavg)" >>"$RESULTS"
    tail -n 1 "$RESULTS" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print("bench_camera:   ", j["status"], "results", j.get("results"), "decoded", j.get("frames_decoded"), "camera frames %s-%s" % (j.get("camera_first"), j.get("camera_last")), "CPU %s s" % (round(j["cpu_seconds"], 2) if j.get("cpu_seconds") is not None else "-"), (j.get("error") or "")[:300], file=sys.stderr)'
}

LOAD_START="$(cat /proc/loadavg)"
for run in $(seq 1 "$RUNS"); do
    for client in $CLIENTS; do
        run_job "$client" "$run"
    done
done
LOAD_END="$(cat /proc/loadavg)"

# --- the table and the JSON file
"$PY" - "$RESULTS" "$SUMMARY" "$RUNS" "$FRAMES" "$FPS" "${WIDTH}x$HEIGHT" "$PATTERN" "$REALTIME" "$LOAD_START" "$LOAD_END" <<'EOF' | tee "$REPORT"
import json, os, sys
sys.path.insert(0, "scripts")
from bench_common import summary, show
path, summary_path, runs, frames, fps, size, pattern, realtime, load_start, load_end = sys.argv[1:]
jobs = [json.loads(line) for line in open(path)]

def metric(j, name):
    if j["status"] not in ("ok", "error") or j.get("results") is None:
        return None
    if name == "rss":
        return j["peak_rss_kib"] / 1024 if j.get("peak_rss_kib") else None
    if name == "cpu_per_frame":
        cpu, n = j.get("cpu_seconds"), j.get("frames_decoded")
        return cpu / n * 1000 if cpu is not None and n else None
    return j.get(name)

rows = [
    ("results received", "results", 0),
    ("returned frames decoded by the client", "frames_decoded", 0),
    ("  of which reached the SDK's on_frame handler", "frames_delivered", 0),
    ("camera frames with a result: distinct", "camera_distinct", 0),
    ("  first camera frame with a result", "camera_first", 0),
    ("  last camera frame with a result", "camera_last", 0),
    ("client CPU (user+sys, GNU time), s", "cpu_seconds", 2),
    ("  of which the SDK's imports (getrusage), s", "cpu_seconds_imports", 2),
    ("  CPU per decoded frame, ms", "cpu_per_frame", 2),
    ("client peak RSS (GNU time), MiB", "rss", 0),
    ("client wall time (GNU time), s", "process_wall", 1),
]
ratio_rows = {"results", "frames_decoded", "cpu_seconds", "cpu_per_frame", "rss", "process_wall"}
ours = [j for j in jobs if j["client"] == "ours"]
sdk = [j for j in jobs if j["client"] == "sdk"]
out = {"tree": os.environ.get("BENCH_TREE"), "runs": int(runs), "frames": int(frames), "fps": float(fps),
       "size": size, "pattern": pattern, "realtime": realtime == "1",
       "load_start": load_start, "load_end": load_end, "sink": os.environ.get("BENCH_SINK_NAME"), "table": {}, "jobs": jobs}
print("gst-roboflow camera benchmark: roboflowresultsrc source-url (ours) vs inference_sdk 1.8.3 RTSPSource (SDK)")
print(f"our decoded frames go to {os.environ.get('BENCH_SINK_NAME')}")
print(f"a loopback RTSP camera (examples/rtsp_camera.rs, pattern {pattern}): {frames} frames {size} at {fps} fps; "
      f"realtime processing {'on' if realtime == '1' else 'off'}; returned video as a track, decoded by both")
print(f"{runs} run(s) per client, alternating; plugin built from {os.environ.get('BENCH_TREE', '?')}")
print("values: median (min-max) over runs that produced figures; ratio = ours/SDK of the medians")
print()
width = 50
print(f"| {'metric':<{width}} | {'ours':<20} | {'SDK':<20} | {'ours/SDK':>8} |")
print(f"|{'-' * (width + 2)}|{'-' * 22}|{'-' * 22}|{'-' * 10}|")
for title, name, digits in rows:
    a = summary([metric(j, name) for j in ours])
    b = summary([metric(j, name) for j in sdk])
    if a is None and b is None:
        continue
    if name == "frames_delivered":
        a = None
    ratio = a["median"] / b["median"] if name in ratio_rows and a and b and b["median"] else None
    out["table"][name] = {"ours": a, "sdk": b, "ours_over_sdk": ratio}
    print(f"| {title:<{width}} | {show(a, digits, 'median'):<20} | {show(b, digits, 'median'):<20} | {(f'{ratio:.2f}' if ratio is not None else '-'):>8} |")
def outcome(js):
    counts = {}
    for j in js:
        counts[j["status"]] = counts.get(j["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"
print(f"| {'runs (status)':<{width}} | {outcome(ours):<20} | {outcome(sdk):<20} | {'':>8} |")
cpu = out["table"].get("cpu_seconds", {})
if cpu.get("ours_over_sdk") is not None:
    ratio = cpu["ours_over_sdk"]
    print()
    print(f"issue #10 goal (client CPU <= 0.3x the SDK's): {ratio:.2f}x, {'met' if ratio <= 0.3 else 'NOT met'}")
launch = [j for j in jobs if j["client"] == "launch"]
if launch:
    a = summary([metric(j, "cpu_seconds") for j in launch])
    b = summary([metric(j, "cpu_seconds") for j in sdk])
    out["table"]["cpu_seconds_launch"] = {"launch": a, "sdk": b}
    ratio = f"{a['median'] / b['median']:.2f}x the SDK's" if a and b and b["median"] else "-"
    print(f"gst-launch-1.0 -m (prints every message): client CPU {show(a, 2, 'median')} s, {ratio}")
print()
def fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"
for j in sorted(jobs, key=lambda j: (j["run"], j["client"])):
    line = (f"   {j['client']} run {j['run']}: {j['status']}, results {j.get('results')}, decoded {j.get('frames_decoded')}"
            f", camera frames {j.get('camera_first')}-{j.get('camera_last')} ({j.get('camera_distinct')} distinct)"
            f", CPU {fmt(j.get('cpu_seconds'), 2)} s, RSS {fmt(j['peak_rss_kib'] / 1024 if j.get('peak_rss_kib') else None, 0)} MiB"
            f", wall {fmt(j.get('process_wall'), 1)} s, load {j.get('load_before')}-{j.get('load_after')}")
    if j["client"] == "sdk":
        line += f", on_frame {j.get('frames_delivered')}, ended: {j.get('ended')}"
    else:
        line += f", stats: {json.dumps(j.get('stats'))[:300]}"
    if j.get("error"):
        line += f", error: {j['error'][:300]}"
    print(line + f" (log {j['log']}.err)")
print()
print(f"machine: {os.cpu_count()} CPUs; load average at start {load_start.split()[:3]}, at end {load_end.split()[:3]}")
print(f"per-job JSON: {path}; all figures: {summary_path}")
with open(summary_path, "w") as f:
    json.dump(out, f, indent=1)
EOF
log "report saved to $REPORT, figures to $SUMMARY"
