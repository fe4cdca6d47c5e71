"""One live-video job through Roboflow's Python SDK (inference_sdk 1.8.3,
ManualSource): the reference side of scripts/bench_live.sh. Prints one JSON
line with the same fields as examples/bench_live.rs.

    ROBOFLOW_ICE_LOOPBACK_ONLY=1 PYTHONPATH=scripts/server \
    ~/.cache/gst-roboflow/venv/bin/python scripts/bench_live_sdk.py \
        --workflow-spec-file examples/workflows/blur-dominant-color.json \
        --data-output rgb_color --realtime 1 [--frames 300] [--api-url URL]

The stream: FRAMES frames of WIDTHxHEIGHT at FPS, each a solid colour that
encodes its index (see colour_of / index_of: 3 channels x 7 levels 42 apart,
base 7, so consecutive frames differ by 42 in blue). Frame i is handed to
ManualSource.send() at t0 + i/FPS (like a camera); the instant is recorded
(time.monotonic) just before send().

How the SDK behaves here (inference_sdk/webrtc/{session,sources}.py):
- ManualSource adds a _ManualTrack (aiortc VideoStreamTrack) whose recv()
  takes the next frame from an asyncio.Queue of 10 (MANUAL_SOURCE_QUEUE_MAX_SIZE)
  and stamps it with the track's own counter (next_timestamp(): +3000 ticks
  of 90 kHz per frame, and it sleeps to hold 30 fps from its first frame).
  send() puts into that queue from the caller's thread (put_nowait, not
  call_soon_threadsafe); when full it drops the oldest queued frame.
- send() raises until the session has started; the session starts in
  run()/video()/wait(), which all block, so this script calls the private
  session._ensure_started() (what they call), which returns once the
  server's answer is applied. With --start-after connected (default) it
  then waits until the peer connection reports "connected" before handing
  over frame 0; with --start-after started it starts at once, and frames
  handed over while DTLS connects queue up (10 kept).
- StreamConfig(stream_output=[], data_output=[...]): no video back, results
  on the inference channel, passed to the on_data handler with a
  VideoMetadata (frame_id = the server's count of processed frames, pts =
  RTP-derived 90 kHz ticks from the server's first frame).
- realtime_processing=False makes the SDK ack every result ({"ack": id}).
- ManualSource has no end-of-stream call. After the last frame this script
  waits until every frame has a result, or --idle-timeout seconds pass with
  no result, then closes the session (session.close()).

Pairing "as the SDK gives it": a result is paired with frame
round(pts * time_base * FPS) [by_pts, pairing_errors: the same rule as our
client's] and with frame (frame_id - 1) [by_frame_id,
pairing_errors_by_frame_id]; a pairing error is a result whose dominant
colour decodes to another index. Latency uses the index decoded from the colour (the frame
the result really belongs to): arrival (monotonic, in the data callback)
minus the instant that frame was handed to send().
CPU and peak RSS: getrusage(RUSAGE_SELF) at the end (includes the imports);
bench_live.sh also runs this under GNU time.
"""

import argparse
import json
import os
import resource
import sys
import threading
import time

LEVELS = [42 * k for k in range(7)]  # 0, 42, ..., 252: decoding tolerates 20 per channel


def colour_of(index: int) -> tuple:
    """(r, g, b) of frame `index` (0 <= index < 343)."""
    return (LEVELS[(index // 49) % 7], LEVELS[(index // 7) % 7], LEVELS[index % 7])


def index_of(rgb) -> tuple:
    """(index, distance): nearest code point to an (r, g, b) colour."""
    digits = []
    distance = 0
    for c in rgb:
        k = min(6, max(0, int((float(c) - LEVELS[0]) / 42 + 0.5)))
        digits.append(k)
        distance = max(distance, abs(float(c) - LEVELS[k]))
    return digits[0] * 49 + digits[1] * 7 + digits[2], distance


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-url", default="http://127.0.0.1:9001")
    parser.add_argument("--workflow-spec-file", required=True)
    parser.add_argument("--data-output", default="rgb_color")
    parser.add_argument("--colour-output", default="rgb_color")
    parser.add_argument("--realtime", type=int, choices=[0, 1], default=1)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    parser.add_argument("--start-after", choices=["connected", "started"], default="connected")
    parser.add_argument("--results-file", default="")
    parser.add_argument("--threadsafe-send", type=int, choices=[0, 1], default=0,
                        help="1: call send() on the SDK's event loop (call_soon_threadsafe) "
                             "instead of from this thread, as the SDK's own send() does not")
    args = parser.parse_args()
    if args.frames > 343:
        parser.error("the colour code holds 343 frames")

    started = time.monotonic()
    import numpy as np
    from inference_sdk import InferenceHTTPClient
    from inference_sdk.webrtc import ManualSource, StreamConfig

    with open(args.workflow_spec_file) as f:
        spec = json.load(f)
    spec = spec.get("specification", spec)
    data_output = [name for name in args.data_output.split(",") if name]

    lock = threading.Lock()
    handed = [None] * args.frames  # monotonic instant frame i went to send()
    results = []  # (arrival, frame_id, pts, time_base, rgb, errors)
    last_result = [None]

    client = InferenceHTTPClient(api_url=args.api_url, api_key=os.environ.get("ROBOFLOW_API_KEY"))
    source = ManualSource()
    session = client.webrtc.stream(
        source=source,
        workflow=spec,
        config=StreamConfig(
            stream_output=[],
            data_output=data_output,
            realtime_processing=bool(args.realtime),
            declared_fps=args.fps,
        ),
    )

    @session.on_data()
    def on_data(data, metadata) -> None:
        now = time.monotonic()
        rgb = None
        if isinstance(data, dict):
            rgb = data.get(args.colour_output)
            if isinstance(rgb, dict):  # tolerate {"r":..,"g":..,"b":..}
                rgb = [rgb.get("r"), rgb.get("g"), rgb.get("b")]
        with lock:
            results.append((
                now,
                metadata.frame_id if metadata else None,
                metadata.pts if metadata else None,
                float(metadata.time_base) if metadata and metadata.time_base else None,
                rgb,
                list(metadata.errors) if metadata else [],
            ))
            last_result[0] = now

    error = None
    setup_time = connect_time = cpu_at_ready = None
    sent = 0
    try:
        session._ensure_started()  # what run()/video()/wait() call first
        setup_time = time.monotonic() - started
        if args.start_after == "connected":
            deadline = time.monotonic() + 60
            while session._pc is None or session._pc.connectionState != "connected":
                if time.monotonic() > deadline:
                    raise RuntimeError("the peer connection did not connect within 60 s")
                time.sleep(0.005)
        connect_time = time.monotonic() - started
        ready_usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu_at_ready = ready_usage.ru_utime + ready_usage.ru_stime
        period = 1.0 / args.fps
        t0 = time.monotonic()
        for i in range(args.frames):
            target = t0 + i * period
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            r, g, b = colour_of(i)
            frame = np.empty((args.height, args.width, 3), dtype=np.uint8)
            frame[:, :] = (b, g, r)  # BGR, as ManualSource.send() expects
            handed[i] = time.monotonic()
            if args.threadsafe_send:
                session._loop.call_soon_threadsafe(source.send, frame)
            else:
                source.send(frame)
            sent += 1
        last_sent = time.monotonic()
        while True:
            time.sleep(0.05)
            with lock:
                count = len(results)
                last = last_result[0] or last_sent
            if count >= args.frames:
                break
            if time.monotonic() - max(last, last_sent) > args.idle_timeout:
                break
    except Exception as exc:
        error = f"{exc.__class__.__name__}: {exc}"
    finally:
        try:
            session.close()
        except Exception as exc:
            error = error or f"close: {exc.__class__.__name__}: {exc}"
    total_time = time.monotonic() - started

    usage = resource.getrusage(resource.RUSAGE_SELF)
    with lock:
        rows = list(results)
    latencies = []
    errors_by_frame_id = errors_by_pts = undecodable = frame_errors = 0
    max_distance = 0.0
    near_boundary = 0
    per_result = []
    for arrival, frame_id, pts, time_base, rgb, errors in rows:
        if errors:
            frame_errors += 1
        true_index = None
        if isinstance(rgb, (list, tuple)) and len(rgb) == 3 and all(isinstance(c, (int, float)) for c in rgb):
            true_index, distance = index_of(rgb)
            max_distance = max(max_distance, distance)
            near_boundary += distance >= 15
            if true_index >= sent:
                true_index = None
        if true_index is None:
            undecodable += 1
        else:
            latencies.append((arrival - handed[true_index]) * 1000)
        by_id = frame_id - 1 if frame_id is not None else None
        by_pts = round(pts * time_base * args.fps) if pts is not None and time_base else None
        if true_index is not None and by_id != true_index:
            errors_by_frame_id += 1
        if true_index is not None and by_pts != true_index:
            errors_by_pts += 1
        per_result.append({"arrival": arrival - started, "frame_id": frame_id, "pts": pts,
                           "rgb": rgb, "index": true_index, "by_frame_id": by_id, "by_pts": by_pts})
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump({"handed": [h - started if h else None for h in handed], "results": per_result}, f)

    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                status[key] = int(value.split()[0])
    report = {
        "client": "inference_sdk",
        "realtime": bool(args.realtime),
        "start_after": args.start_after,
        "threadsafe_send": bool(args.threadsafe_send),
        "frames_sent": sent,
        "results": len(rows),
        "distinct_frames": len({r["index"] for r in per_result if r["index"] is not None}),
        "pairing_errors": errors_by_pts,
        "pairing_errors_by_frame_id": errors_by_frame_id,
        "pairing": "round(pts * time_base * fps) (frame_id - 1 in pairing_errors_by_frame_id)",
        "undecodable_results": undecodable,
        "max_colour_distance": max_distance,
        "results_colour_distance_ge_15": near_boundary,
        "results_with_errors": frame_errors,
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p95": percentile(latencies, 95),
        "latency_ms_max": max(latencies) if latencies else None,
        "setup_time": setup_time,
        "connect_time": connect_time,
        "total_time": total_time,
        "cpu_seconds_self": usage.ru_utime + usage.ru_stime,
        "cpu_seconds_at_ready": cpu_at_ready,
        "cpu_seconds_measured_stream": (usage.ru_utime + usage.ru_stime - cpu_at_ready) if cpu_at_ready is not None else None,
        "session_ready_after": connect_time,
        "peak_rss_kib_self": status.get("VmHWM"),
        "error": error,
    }
    print(json.dumps(report), flush=True)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
