"""One benchmark job through Roboflow's Python SDK (inference_sdk 1.8.3), the
reference side of scripts/bench.sh. Prints one JSON line with the same fields
as examples/bench_job.rs.

    ROBOFLOW_ICE_LOOPBACK_ONLY=1 PYTHONPATH=scripts/server \
    ~/.cache/gst-roboflow/venv/bin/python scripts/bench_sdk.py --mode data \
        --file clip.mp4 --workflow-spec-file examples/workflows/blur-dominant-color.json \
        --data-output rgb_color [--stream-output blurred] [--api-url URL]

The two environment variables load scripts/server/sitecustomize.py, which
keeps this process's aiortc ICE candidates on 127.0.0.1 too.

How the SDK behaves here (read from inference_sdk/webrtc/{session,sources,
datachannel}.py):
- VideoFileSource(use_datachannel_frames=True) rewrites the request: every
  stream_output name is appended to data_output and stream_output becomes []
  (no video track). The images then come back as base64 JPEG inside each
  frame's JSON, are decoded with cv2.imdecode to BGR arrays and pushed into a
  queue of 8 (WEBRTC_VIDEO_QUEUE_MAX_SIZE) that drops its oldest entry when
  full; session.run() drains that queue and calls the on_frame handlers.
- Data-only: StreamConfig(stream_output=[], data_output=["rgb_color"]). No
  image is requested, nothing is decoded and the queue only ever receives the
  end-of-stream sentinel (None), which the SDK puts there when the server's
  processing_complete arrives; run() then returns and closes the session.
- The server is told webrtc_realtime_processing=False (VideoFileSource's
  own default, which overrides StreamConfig's), i.e. every frame, as fast as
  possible. StreamConfig.realtime_processing keeps its default True, and that
  is the flag the SDK's _send_ack reads: it never acks, so the server's flow
  control never turns on (PROTOCOL.md section 7). This is what an SDK user
  gets with the defaults; our plugin's data-only job does not ack either.
- The upload reads the file 48 KiB at a time (no whole-file buffering), waits
  while the channel's bufferedAmount exceeds 256 KiB (polling every 10 ms) and
  calls on_upload_progress(uploaded_chunks, total_chunks) after each send.
- The SDK sends no keepalives during the upload.

Times are time.monotonic() seconds since just before the session is created
(after the imports, which bench.sh counts in the process's wall time):
first_chunk_time is the first on_upload_progress call, last_chunk_time the
last one, first_result_time the first data callback (on_data, called for
every frame's JSON), total_time when run() has returned (session closed).
frames counts data callbacks, video_frames on_frame calls.
"""

import argparse
import json
import os
import sys
import threading
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["data", "frames"], default="data")
    parser.add_argument("--file", required=True)
    parser.add_argument("--api-url", default="http://127.0.0.1:9001")
    parser.add_argument("--workflow-spec-file", required=True)
    parser.add_argument("--data-output", default="")
    parser.add_argument("--stream-output", default="")
    args = parser.parse_args()

    from inference_sdk import InferenceHTTPClient
    from inference_sdk.config import WEBRTC_VIDEO_UPLOAD_CHUNK_SIZE
    from inference_sdk.webrtc import StreamConfig, VideoFileSource

    with open(args.workflow_spec_file) as f:
        spec = json.load(f)
    spec = spec.get("specification", spec)
    data_output = [name for name in args.data_output.split(",") if name]
    stream_output = [name for name in args.stream_output.split(",") if name] if args.mode == "frames" else []
    if args.mode == "frames" and not stream_output:
        parser.error("--mode frames needs --stream-output")

    lock = threading.Lock()
    stamps = {"first_chunk": None, "last_chunk": None, "first_result": None, "chunks": 0, "total_chunks": 0}
    counts = {"frames": 0, "video_frames": 0}

    started = time.monotonic()

    def since_start() -> float:
        return time.monotonic() - started

    def on_upload_progress(uploaded: int, total: int) -> None:
        now = since_start()
        with lock:
            if stamps["first_chunk"] is None:
                stamps["first_chunk"] = now
            stamps["last_chunk"] = now
            stamps["chunks"] = uploaded
            stamps["total_chunks"] = total

    client = InferenceHTTPClient(api_url=args.api_url, api_key=os.environ.get("ROBOFLOW_API_KEY"))
    source = VideoFileSource(
        args.file,
        on_upload_progress=on_upload_progress,
        use_datachannel_frames=True,
    )
    session = client.webrtc.stream(
        source=source,
        workflow=spec,
        config=StreamConfig(stream_output=stream_output, data_output=data_output),
    )

    @session.on_data()
    def on_data(data, metadata) -> None:  # every frame's JSON (images filtered out)
        now = since_start()
        with lock:
            if stamps["first_result"] is None:
                stamps["first_result"] = now
            counts["frames"] += 1

    @session.on_frame
    def on_frame(frame, metadata) -> None:  # a decoded BGR frame (frames mode)
        with lock:
            counts["video_frames"] += 1

    error = None
    try:
        session.run()
    except Exception as exc:  # reported in the JSON line, like bench_job's error
        error = f"{exc.__class__.__name__}: {exc}"
    total_time = since_start()

    size = os.path.getsize(args.file)
    chunk_size = WEBRTC_VIDEO_UPLOAD_CHUNK_SIZE
    with lock:
        report = {
            "client": "inference_sdk",
            "mode": args.mode,
            "file": args.file,
            "bytes": size,
            "bytes_uploaded": min(size, stamps["chunks"] * chunk_size),
            "first_chunk_time": stamps["first_chunk"],
            "last_chunk_time": stamps["last_chunk"],
            "first_result_time": stamps["first_result"],
            "total_time": total_time,
            "frames": counts["frames"],
            "video_frames": counts["video_frames"],
            "error": error,
        }
    print(json.dumps(report), flush=True)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
