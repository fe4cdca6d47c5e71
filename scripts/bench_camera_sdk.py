"""One camera session through Roboflow's Python SDK (inference_sdk 1.8.3,
RTSPSource): the reference side of scripts/bench_camera.sh. Prints one JSON
line of figures (the same names scripts/bench_common.py gives our client's).

    ROBOFLOW_ICE_LOOPBACK_ONLY=1 PYTHONPATH=scripts/server \
    ~/.cache/gst-roboflow/venv/bin/python scripts/bench_camera_sdk.py \
        --rtsp-url rtsp://127.0.0.1:8554/cam \
        --workflow-spec-file examples/workflows/blur-dominant-color.json \
        [--data-output rgb_color] [--stream-output blurred] [--realtime 1] \
        [--fps 15] [--api-url URL]

The session is the SDK's documented use for a camera:
    session = client.webrtc.stream(source=RTSPSource(url), workflow=spec,
        config=StreamConfig(stream_output=[...], data_output=[...],
                            realtime_processing=...))
    @session.on_frame   -> every returned frame, a BGR numpy array
    @session.on_data()  -> every result
    session.run()       -> blocks until the stream ends, then closes
The server reads the camera itself; the returned video comes back as a
WebRTC track, which the SDK (aiortc + PyAV) decodes frame by frame into BGR
arrays (VideoFrame.to_ndarray(format="bgr24")) and queues for run() (8
frames, WEBRTC_VIDEO_QUEUE_MAX_SIZE; when full the oldest is dropped).
The stream ends with the server's `processing_complete`, which run() sees as
the end of the video. Counted here:
  frames_decoded    frames the SDK's track reader decoded and queued
                    (counted by wrapping session._enqueue, the one place
                    those frames go)
  frames_delivered  frames the on_frame handler received
  results           on_data calls; each result's dominant colour names the
                    camera frame it belongs to (camera_first/last/distinct,
                    see bench_common.camera_frames)
A watchdog closes the session (session.close(), which ends run()) when
nothing arrived for --idle-timeout seconds after the first frame or result,
or when nothing arrived within --start-timeout seconds.
CPU and peak RSS: getrusage(RUSAGE_SELF) and VmHWM at the end (the imports
included; cpu_seconds_imports: the CPU used once the SDK is imported, before
the session); bench_camera.sh also runs this under GNU time.
"""

import argparse
import json
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import camera_frames, result_pts_seconds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-url", default="http://127.0.0.1:9001")
    parser.add_argument("--rtsp-url", required=True)
    parser.add_argument("--workflow-spec-file", required=True)
    parser.add_argument("--data-output", default="rgb_color")
    parser.add_argument("--stream-output", default="blurred")
    parser.add_argument("--colour-output", default="rgb_color")
    parser.add_argument("--realtime", type=int, choices=[0, 1], default=1)
    parser.add_argument("--fps", type=float, default=15.0, help="the camera's, to name frames by pts")
    parser.add_argument("--idle-timeout", type=float, default=10.0)
    parser.add_argument("--start-timeout", type=float, default=90.0)
    parser.add_argument("--results-file", default="")
    args = parser.parse_args()

    started = time.monotonic()
    from inference_sdk import InferenceHTTPClient
    from inference_sdk.webrtc import RTSPSource, StreamConfig

    imported = resource.getrusage(resource.RUSAGE_SELF)
    with open(args.workflow_spec_file) as f:
        spec = json.load(f)
    spec = spec.get("specification", spec)
    split = lambda text: [name for name in text.split(",") if name]  # noqa: E731

    lock = threading.Lock()
    results = []  # (arrival, rgb, pts_seconds, frame_id, errors)
    counts = {"decoded": 0, "delivered": 0}
    first_frame = [None]
    last_activity = [None]
    shape = [None]

    client = InferenceHTTPClient(api_url=args.api_url, api_key=os.environ.get("ROBOFLOW_API_KEY"))
    session = client.webrtc.stream(
        source=RTSPSource(args.rtsp_url),
        workflow=spec,
        config=StreamConfig(
            stream_output=split(args.stream_output),
            data_output=split(args.data_output),
            realtime_processing=bool(args.realtime),
        ),
    )

    # Count what the SDK's track reader decodes, before its queue drops any.
    enqueue = session._enqueue

    def counting_enqueue(item):
        with lock:
            counts["decoded"] += 1
            last_activity[0] = time.monotonic()
        enqueue(item)

    session._enqueue = counting_enqueue

    @session.on_frame
    def on_frame(frame, metadata) -> None:
        now = time.monotonic()
        with lock:
            counts["delivered"] += 1
            if first_frame[0] is None:
                first_frame[0] = now
                shape[0] = list(frame.shape)
            last_activity[0] = now

    @session.on_data()
    def on_data(data, metadata) -> None:
        now = time.monotonic()
        rgb = data.get(args.colour_output) if isinstance(data, dict) else None
        pts_seconds = None
        if metadata is not None and metadata.pts is not None and metadata.time_base:
            pts_seconds = result_pts_seconds({"video_metadata": {"pts": metadata.pts, "time_base": metadata.time_base}})
        with lock:
            results.append((now, rgb, pts_seconds, metadata.frame_id if metadata else None,
                            list(metadata.errors) if metadata else []))
            last_activity[0] = now

    watchdog_reason = []
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.5):
            now = time.monotonic()
            with lock:
                last = last_activity[0]
            if last is None and now - started > args.start_timeout:
                watchdog_reason.append(f"nothing arrived within {args.start_timeout:.0f} s")
            elif last is not None and now - last > args.idle_timeout:
                watchdog_reason.append(f"nothing arrived for {args.idle_timeout:.0f} s")
            else:
                continue
            try:
                session.close()
            except Exception:
                pass
            return

    threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
    error = None
    try:
        session.run()  # starts the session, ends with the stream, closes it
    except Exception as exc:
        error = f"{exc.__class__.__name__}: {exc}"
    finally:
        done.set()
        try:
            session.close()
        except Exception as exc:
            error = error or f"close: {exc.__class__.__name__}: {exc}"
    total_time = time.monotonic() - started

    usage = resource.getrusage(resource.RUSAGE_SELF)
    with lock:
        rows = list(results)
        decoded, delivered = counts["decoded"], counts["delivered"]
    frames = camera_frames([(rgb, pts) for _, rgb, pts, _, _ in rows], args.fps)
    if args.results_file:
        with open(args.results_file, "w") as f:
            json.dump([{"arrival": a - started, "rgb": rgb, "pts_seconds": pts, "frame_id": fid, "index": index}
                       for (a, rgb, pts, fid, _), index in zip(rows, frames["indices"])], f)
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                status[key] = int(value.split()[0])
    report = {
        "client": "inference_sdk RTSPSource",
        "realtime": bool(args.realtime),
        "results": len(rows),
        "frames_decoded": decoded,
        "frames_delivered": delivered,
        "frame_shape": shape[0],
        "results_with_errors": sum(1 for row in rows if row[4]),
        "camera_first": frames["first"],
        "camera_last": frames["last"],
        "camera_distinct": frames["distinct"],
        "camera_out_of_order": frames["out_of_order"],
        "undecodable_results": frames["undecodable"],
        "first_frame_id": rows[0][3] if rows else None,
        "first_result_after": rows[0][0] - started if rows else None,
        "first_frame_after": first_frame[0] - started if first_frame[0] else None,
        "last_result_after": rows[-1][0] - started if rows else None,
        "total_time": total_time,
        "ended": ("watchdog: " + watchdog_reason[0]) if watchdog_reason else "stream end",
        "cpu_seconds_self": usage.ru_utime + usage.ru_stime,
        "cpu_seconds_imports": imported.ru_utime + imported.ru_stime,
        "peak_rss_kib_self": status.get("VmHWM"),
        "error": error,
        "camera_indices": frames["indices"],
    }
    print(json.dumps(report), flush=True)
    return 1 if error or watchdog_reason else 0


if __name__ == "__main__":
    sys.exit(main())
