#!/usr/bin/env bash
# Live-video benchmark: roboflowuploadsink in live mode (ours,
# examples/bench_live.rs) against Roboflow's Python SDK 1.8.3 ManualSource
# (scripts/bench_live_sdk.py), same synthetic camera stream, same Workflow,
# same local Roboflow Inference Server, alternating runs (ours, SDK, ...),
# realtime processing on and off.
#   scripts/bench_live.sh
# The stream: 300 frames of 640x480 at 30 fps, each a solid colour that
# encodes its index (3 channels x 7 levels 42 apart, base 7), handed to the
# client one every 33.3 ms like a camera; the Workflow
# (examples/workflows/blur-dominant-color.json) returns each frame's dominant
# colour as `rgb_color`, which names the frame the result really belongs to.
# Environment:
#   BENCH_RUNS         runs per client and mode (2)
#   BENCH_MODES        realtime-processing values to run ("1 0")
#   BENCH_CLIENTS      "ours sdk" (default), or one of them
#   BENCH_FRAMES       frames per job (300, at most 343)
#   BENCH_FORMAT       raw format appsrc pushes to our sink: RGB (default) or I420
#   BENCH_MAX_IN_FLIGHT  max-frames-in-flight for our sink (unset: its default)
#   BENCH_OURS_SET     extra "name=value" sink properties for ours, space-separated
#   BENCH_OURS_PRE    a bin put between our appsrc and the sink (diagnostics),
#                      e.g. "videoconvert ! vp8enc threads=1 deadline=1 ..."
#   BENCH_START_AFTER  connected (default): both clients hand over frame 0 once
#                      their session is up; playing/started: at once
#   BENCH_SDK_THREADSAFE  1: the SDK side hands frames over on the SDK's event
#                      loop (call_soon_threadsafe(source.send, frame)); 0
#                      (default): ManualSource.send() from the caller's
#                      thread, as the SDK documents it
#   BENCH_IDLE         seconds without a result after the last frame before a
#                      job stops waiting (5)
#   BENCH_TIMEOUT      seconds allowed per job (120); a job over it is killed
#   BENCH_BUILD        1 (default): cargo build --release the example first;
#                      0: use the binary already in ${CARGO_TARGET_DIR:-target}
#   ROBOFLOW_SERVER_PORT  as for scripts/roboflow-server.sh (9001)
# Uses the server answering on 127.0.0.1, or starts one with
# scripts/roboflow-server.sh; it never stops the server (others may use it).
# Per-job logs, per-result dumps, the report and a JSON file of all figures go
# to target/bench/ (live-<stamp>.json, live-report-<stamp>.txt).
#
# Measured per job (see the two clients' headers for details):
#   results / frames sent   results received / frames handed to the client
#   pairing errors          results whose dominant colour decodes to another
#                           frame than the client's pairing says: by the
#                           result's pts (round(pts * 30)), for both (the
#                           SDK's VideoMetadata.pts); the SDK's pairing by
#                           VideoMetadata.frame_id - 1 is shown too
#   latency p50/p95         result arrival - the instant the frame (named by
#                           its colour) was handed to the client; ours also
#                           prints the plugin's own `latency` field
#   CPU, peak RSS           GNU time -v of the client process (user+sys, max
#                           RSS; the SDK's includes Python's imports); the
#                           in-process getrusage / VmHWM figures are in the JSON
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${BENCH_RUNS:-2}"
MODES="${BENCH_MODES:-1 0}"
CLIENTS="${BENCH_CLIENTS:-ours sdk}"
FRAMES="${BENCH_FRAMES:-300}"
FORMAT="${BENCH_FORMAT:-RGB}"
START_AFTER="${BENCH_START_AFTER:-connected}"
IDLE="${BENCH_IDLE:-5}"
TIMEOUT="${BENCH_TIMEOUT:-120}"
BUILD="${BENCH_BUILD:-1}"
PORT="${ROBOFLOW_SERVER_PORT:-9001}"
API_URL="http://127.0.0.1:$PORT"
SERVER_HOME="${ROBOFLOW_SERVER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/gst-roboflow}"
PY="$SERVER_HOME/venv/bin/python"
WORKFLOW=examples/workflows/blur-dominant-color.json
DATA_OUTPUT=rgb_color
OUT=target/bench
STAMP="$(date +%Y%m%d-%H%M%S)"
LOGS="$OUT/live-logs-$STAMP"
RESULTS="$OUT/live-jobs-$STAMP.jsonl"
SUMMARY="$OUT/live-$STAMP.json"
REPORT="$OUT/live-report-$STAMP.txt"
OURS="${CARGO_TARGET_DIR:-target}/release/examples/bench_live"

log() { echo "bench_live: $*" >&2; }

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
if [ ! -x /usr/bin/time ]; then
    log "installing GNU time (apt package 'time') for CPU and peak RSS"
    $SUDO apt-get install -y -q time >&2 || { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q time >&2; }
fi

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
[ -x "$PY" ] && "$PY" -c 'import inference_sdk.webrtc' 2>/dev/null \
    || { log "the SDK's venv ($PY) cannot import inference_sdk.webrtc"; exit 1; }

# --- our client, release build
if [[ " $CLIENTS " == *" ours "* ]]; then
    if [ "$BUILD" = 1 ]; then
        log "building the plugin and examples/bench_live.rs (release)"
        cargo build --release --locked --lib --example bench_live >&2
    fi
    [ -x "$OURS" ] || { log "$OURS is missing (BENCH_BUILD=0 and no build there)"; exit 1; }
fi
export BENCH_TREE="commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(git --no-optional-locks status --porcelain 2>/dev/null | wc -l) changed/untracked paths in the work tree"

mkdir -p "$OUT" "$LOGS"

# --- one job under GNU time and timeout; appends one JSON line to $RESULTS
run_job() { # client realtime run
    local client="$1" realtime="$2" run="$3"
    local name="rt$realtime-$client-$run"
    local cmd
    if [ "$client" = ours ]; then
        local start="$START_AFTER"
        [ "$start" = started ] && start=playing
        cmd=("$OURS" --api-url "$API_URL" --workflow-spec-file "$WORKFLOW" --data-output "$DATA_OUTPUT"
             --realtime "$realtime" --frames "$FRAMES" --format "$FORMAT" --start-after "$start"
             --idle-timeout "$IDLE" --results-file "$LOGS/$name.results.json")
        [ -n "${BENCH_MAX_IN_FLIGHT:-}" ] && cmd+=(--max-frames-in-flight "$BENCH_MAX_IN_FLIGHT")
        [ -n "${BENCH_OURS_PRE:-}" ] && cmd+=(--pre "$BENCH_OURS_PRE")
        local pair
        for pair in ${BENCH_OURS_SET:-}; do cmd+=(--set "$pair"); done
    else
        local start="$START_AFTER"
        [ "$start" = playing ] && start=started
        cmd=(env ROBOFLOW_ICE_LOOPBACK_ONLY=1 "PYTHONPATH=$PWD/scripts/server${PYTHONPATH:+:$PYTHONPATH}"
             "$PY" scripts/bench_live_sdk.py --api-url "$API_URL" --workflow-spec-file "$WORKFLOW"
             --data-output "$DATA_OUTPUT" --realtime "$realtime" --frames "$FRAMES"
             --start-after "$start" --idle-timeout "$IDLE" --results-file "$LOGS/$name.results.json"
             --threadsafe-send "${BENCH_SDK_THREADSAFE:-0}")
    fi
    local load_before rc
    load_before="$(cut -d' ' -f1 /proc/loadavg)"
    log "$name (timeout ${TIMEOUT}s, load $load_before)"
    set +e
    /usr/bin/time -v -o "$LOGS/$name.time" timeout --kill-after=10 "$TIMEOUT" "${cmd[@]}" \
        >"$LOGS/$name.out" 2>"$LOGS/$name.err"
    rc=$?
    set -e
    "$PY" scripts/bench_common.py job "$LOGS/$name" "$rc" client="$client" \
        realtime="$([ "$realtime" = 1 ] && echo true || echo false)" run="$run" load_before="$load_before" >>"$RESULTS"
    tail -n 1 "$RESULTS" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print("bench_live:   ", j["status"], "results %s/%s" % (j.get("results"), j.get("frames_sent")), "pairing errors", j.get("pairing_errors"), "p50 %s ms" % (round(j["latency_ms_p50"]) if j.get("latency_ms_p50") is not None else "-"), "ended", j.get("ended", "-"), (j.get("error") or "")[:300], file=sys.stderr)'
}

LOAD_START="$(cat /proc/loadavg)"
for realtime in $MODES; do
    for run in $(seq 1 "$RUNS"); do
        for client in $CLIENTS; do
            run_job "$client" "$realtime" "$run"
        done
    done
done
LOAD_END="$(cat /proc/loadavg)"

# --- the table and the JSON file
"$PY" - "$RESULTS" "$SUMMARY" "$RUNS" "$FRAMES" "$LOAD_START" "$LOAD_END" <<'EOF' | tee "$REPORT"
import json, os, sys
path, summary_path, runs, frames, load_start, load_end = sys.argv[1:]
jobs = [json.loads(line) for line in open(path)]

def ok(j):
    return j["status"] in ("ok", "error") and j.get("results") is not None

def metric(j, name):
    if not ok(j):
        return None
    if name == "rss":
        return j["peak_rss_kib"] / 1024 if j.get("peak_rss_kib") else None
    if name == "rss_self":
        return j["peak_rss_kib_self"] / 1024 if j.get("peak_rss_kib_self") else None
    if name == "cpu":
        return j.get("cpu_seconds")
    return j.get(name)

def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}

def show(s, digits):
    if s is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f}"
    if s["n"] > 1 and s["max"] - s["min"] >= 10 ** -digits:
        text += f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
    return text

rows = [
    ("results (of frames sent)", "results", 0),
    ("frames sent (handed to the client)", "frames_sent", 0),
    ("distinct frames with a result", "distinct_frames", 0),
    ("pairing errors (result's pts -> frame; colour differs)", "pairing_errors", 0),
    ("  SDK pairing errors by frame_id - 1 instead", "pairing_errors_by_frame_id", 0),
    ("latency p50, ms (handed -> result, frame by colour)", "latency_ms_p50", 0),
    ("latency p95, ms", "latency_ms_p95", 0),
    ("  plugin's own latency field p50, ms", "plugin_latency_ms_p50", 0),
    ("  plugin's own latency field p95, ms", "plugin_latency_ms_p95", 0),
    ("client CPU (user+sys, GNU time), s", "cpu", 2),
    ("client peak RSS (GNU time), MiB", "rss", 0),
    ("  in-process CPU (getrusage), s", "cpu_seconds_self", 2),
    ("  of which after the session was ready (300 frames + end), s", "cpu_seconds_measured_stream", 2),
    ("session ready after (start -> first frame can go), s", "session_ready_after", 1),
    ("  in-process peak RSS (VmHWM), MiB", "rss_self", 0),
    ("max colour distance to its code point (decodes up to 20)", "max_colour_distance", 0),
    ("results with colour distance >= 15", "results_colour_distance_ge_15", 0),
]
ratio_rows = {"results", "distinct_frames", "latency_ms_p50", "latency_ms_p95", "cpu", "rss", "cpu_seconds_measured_stream"}
out = {"tree": os.environ.get("BENCH_TREE"), "runs": int(runs), "frames": int(frames),
       "load_start": load_start, "load_end": load_end, "modes": {}, "jobs": jobs}
print(f"gst-roboflow live benchmark: roboflowuploadsink live mode (ours) vs inference_sdk 1.8.3 ManualSource (SDK)")
print(f"{frames} frames 640x480 at 30 fps handed over in real time; {runs} run(s) per client and mode, alternating")
print(f"plugin built from {os.environ.get('BENCH_TREE', '?')}")
print("values: mean (min-max) over runs that produced figures; ratio = ours/SDK")
for realtime in (True, False):
    ours = [j for j in jobs if j["realtime"] == realtime and j["client"] == "ours"]
    sdk = [j for j in jobs if j["realtime"] == realtime and j["client"] == "sdk"]
    if not ours and not sdk:
        continue
    mode = "realtime on" if realtime else "realtime off"
    print()
    print(f"## {mode}")
    width = 54
    print(f"| {'metric':<{width}} | {'ours':<20} | {'SDK':<20} | {'ours/SDK':>8} |")
    print(f"|{'-' * (width + 2)}|{'-' * 22}|{'-' * 22}|{'-' * 10}|")
    table = {}
    for title, name, digits in rows:
        a = summary([metric(j, name) for j in ours])
        b = summary([metric(j, name) for j in sdk])
        if a is None and b is None:
            continue
        ratio = a["mean"] / b["mean"] if name in ratio_rows and a and b and b["mean"] else None
        table[name] = {"ours": a, "sdk": b, "ours_over_sdk": ratio}
        print(f"| {title:<{width}} | {show(a, digits):<20} | {show(b, digits):<20} | {(f'{ratio:.2f}' if ratio is not None else '-'):>8} |")
    def outcome(js):
        counts = {}
        for j in js:
            key = j["status"] + (f"/{j['ended']}" if j.get("ended") else "")
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"
    print(f"| {'runs (status/ended)':<{width}} | {outcome(ours):<20} | {outcome(sdk):<20} | {'':>8} |")
    out["modes"][mode] = table
    for j in ours + sdk:
        line = f"   {j['client']} run {j['run']}: {j['status']}, results {j.get('results')}/{j.get('frames_sent')}, pairing errors {j.get('pairing_errors')}"
        if j.get("error"):
            line += f", error: {j['error'][:300]}"
        if j["client"] == "ours":
            line += f", start: {j.get('start')}, stats: {json.dumps(j.get('stats'))[:400]}"
            if j.get("warnings"):
                line += f", warnings: {j['warnings'][:3]}"
        print(line + f" (log {j['log']}.err)")
print()
print(f"machine: {os.cpu_count()} CPUs; load average at start {load_start.split()[:3]}, at end {load_end.split()[:3]}")
print(f"per-job JSON: {path}; all figures: {summary_path}")
with open(summary_path, "w") as f:
    json.dump(out, f, indent=1)
EOF
log "report saved to $REPORT, figures to $SUMMARY"
