#!/usr/bin/env python3
"""Runs a video file through a Roboflow Workflow with gst-roboflow, from Python.

The Python twin of examples/annotate_file.rs, with the same command line:

    GST_PLUGIN_PATH=target/release python3 examples/python/annotate.py clip.mp4 \\
        --workflow-spec-file examples/workflows/template-match.json \\
        --workflow-parameters '{"template": {"type": "base64", "value": "..."}}' \\
        --stream-output annotated --data-output predictions \\
        --output annotated.mp4 --results results.jsonl

    INPUT                      the video file to upload
    --output FILE              the returned video as MP4 (annotated.mp4)
    --results FILE             one JSON result per frame (results.jsonl)
    --PROPERTY VALUE           any roboflowuploadsink property, e.g.
                               --api-url URL --api-key KEY --workflow-spec-file F
                               --workflow-parameters JSON --stream-output NAME
                               --data-output LIST --video-transport track

It builds the pipeline

    filesrc ! roboflowuploadsink    roboflowresultsrc ! videoconvert ! x264enc ! mp4mux ! filesink

shows progress (a spinner while the server's worker starts, the upload, then
the results with a total and an ETA), writes every frame's result (the
`roboflow-inference` bus message) as a JSON line, and reads each returned
frame's RoboflowInferenceMeta and GstVideoRegionOfInterestMeta (the boxes
detected in it) in a pad probe.

Needs the system python3 with PyGObject and GStreamer's introspection data
(Debian 12: python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0)
and the plugin on GST_PLUGIN_PATH (cargo build --release: target/release).
"""

import json
import os
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstVideo", "1.0")
gi.require_version("GstPbutils", "1.0")
from gi.repository import GLib, GObject, Gst, GstPbutils, GstVideo  # noqa: E402

SESSION = "annotate_py"
META_NAME = "RoboflowInferenceMeta"


def usage(code=2):
    print(
        "usage: annotate.py INPUT (--workflow-spec-file FILE | --workspace W --workflow-id ID) "
        "[--workflow-parameters JSON] [--stream-output NAME] [--data-output LIST] "
        "[--output annotated.mp4] [--results results.jsonl] [--PROPERTY VALUE ...] "
        "(PROPERTY: any roboflowuploadsink property)",
        file=sys.stderr,
    )
    sys.exit(code)


def parse_options(argv):
    options = {"input": None, "output": "annotated.mp4", "results": "results.jsonl", "sink": [], "has_video": False}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            usage(0)
        if arg.startswith("--"):
            if not args:
                usage()
            value = args.pop(0)
            name = arg[2:]
            if name in ("output", "results"):
                options[name] = value
            else:
                options["sink"].append((name, value))
                options["has_video"] |= name == "stream-output"
        elif options["input"] is None:
            options["input"] = arg
        else:
            usage()
    if options["input"] is None:
        usage()
    return options


def make(factory, **properties):
    element = Gst.ElementFactory.make(factory, None)
    if element is None:
        hint = ""
        if factory.startswith("roboflow"):
            hint = " (build the plugin with cargo build --release and set GST_PLUGIN_PATH to its target/release)"
        raise RuntimeError(f"the GStreamer element '{factory}' is missing{hint}")
    for name, value in properties.items():
        set_property(element, name, value)
    return element


def set_property(element, name, value):
    """Strings are set verbatim (a JSON value must not be parsed as a GValue)."""
    spec = element.find_property(name)
    if spec is None:
        raise RuntimeError(f"{element.get_factory().get_name()} has no property '{name}'")
    if spec.value_type == GObject.TYPE_STRING:
        element.set_property(name, value)
    else:
        Gst.util_set_object_arg(element, name, value)


def frames_in(path):
    """The frames in a video file, as its header tells (duration x frame rate), or None."""
    try:
        uri = Gst.filename_to_uri(os.path.abspath(path))
        info = GstPbutils.Discoverer.new(5 * Gst.SECOND).discover_uri(uri)
        streams = info.get_video_streams()
        duration = info.get_duration()
        if not streams or duration == Gst.CLOCK_TIME_NONE:
            return None
        num, den = streams[0].get_framerate_num(), streams[0].get_framerate_denom()
        if num <= 0 or den <= 0:
            return None
        frames = round(duration * num / den / Gst.SECOND)
        return frames if frames > 0 else None
    except GLib.Error:
        return None


def total_frames(result):
    """`total_frames`, as the server puts it in an image output's metadata."""
    outputs = result.get("serialized_output_data") or {}
    for output in outputs.values() if isinstance(outputs, dict) else ():
        if isinstance(output, dict):
            total = (output.get("video_metadata") or {}).get("total_frames")
            if isinstance(total, int) and total > 0:
                return total
    return None


def human_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024


class Progress:
    """A spinner while the server's worker starts, the upload with its rate
    counted from the first chunk, then the results with total and ETA when
    the total is known. Drawn on stderr when it is a terminal."""

    SPINNER = "|/-\\"

    def __init__(self, file_frames):
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()
        self.phase = "connecting"
        self.file_frames = file_frames
        self.first_chunk = None
        self.uploaded = 0
        self.total_bytes = 0
        self.results_started = None
        self.frames = 0
        self.total = None
        # The server's total_frames, once a result has carried it.
        self.server_total = None
        self.ticks = 0

    def draw(self, text):
        if self.enabled:
            sys.stderr.write("\r\033[2K" + text)
            sys.stderr.flush()

    def tick(self):
        self.ticks += 1
        if self.phase == "connecting":
            spin = self.SPINNER[self.ticks % 4]
            self.draw(f"{spin} connecting (the server's worker starts) {time.monotonic() - self.started:.0f}s")
        elif self.phase == "results" and self.total is None:
            self.on_result(self.frames, None)

    def on_upload(self, uploaded, total):
        if uploaded == 0 or self.phase == "results":
            return
        if self.phase == "connecting":
            self.phase = "upload"
            self.first_chunk = time.monotonic()
        self.uploaded, self.total_bytes = uploaded, total
        elapsed = max(time.monotonic() - self.first_chunk, 1e-3)
        rate = uploaded / elapsed
        eta = (total - uploaded) / rate if rate > 0 else 0
        percent = 100 * uploaded / total if total else 0
        self.draw(
            f"upload  {bar(percent)} {human_bytes(uploaded)}/{human_bytes(total)} "
            f"{human_bytes(rate)}/s ETA {eta:.0f}s"
        )

    def on_result(self, frames, result_text):
        """`result_text`: the result's JSON, read for the server's total
        until one has carried it (None: no new result)."""
        if self.phase != "results":
            self.phase = "results"
            self.results_started = time.monotonic()
        self.frames = frames
        if self.server_total is None and result_text is not None:
            self.server_total = total_frames(json.loads(result_text))
        self.total = self.server_total or self.file_frames
        elapsed = max(time.monotonic() - self.results_started, 1e-3)
        rate = frames / elapsed
        if self.total:
            eta = max(self.total - frames, 0) / rate if rate > 0 else 0
            self.draw(f"results {bar(100 * frames / self.total)} {frames}/{self.total} frames {rate:.1f}/s ETA {eta:.0f}s")
        else:
            self.draw(f"{self.SPINNER[self.ticks % 4]} results {frames} frames {rate:.1f}/s")

    def finish(self):
        self.draw("")


def bar(percent, width=30):
    done = int(width * min(max(percent, 0), 100) / 100)
    return "[" + "=" * done + ">" * (done < width) + " " * (width - done - 1) + "]"


class ReturnedFrames:
    """What the returned frames carry, read in a pad probe (a streaming thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.frames = 0
        self.with_result = 0
        self.with_regions = 0
        self.regions = 0
        self.classes = {}

    def probe(self, _pad, info):
        buffer = info.get_buffer()
        result = buffer.get_custom_meta(META_NAME)
        frame_id = result.get_structure().get_value("frame-id") if result is not None else None
        regions = read_regions(buffer)
        with self.lock:
            self.frames += 1
            self.with_result += frame_id is not None
            self.with_regions += bool(regions)
            self.regions += len(regions)
            for region in regions:
                self.classes[region["class"]] = self.classes.get(region["class"], 0) + 1
        return Gst.PadProbeReturn.OK


ROI_API = None


def read_regions(buffer):
    """The GstVideoRegionOfInterestMeta of a frame: roboflowresultsrc numbers them 1..n."""
    regions = []
    for roi_id in range(1, buffer.get_n_meta(ROI_API) + 1):
        meta = GstVideo.buffer_get_video_region_of_interest_meta_id(buffer, roi_id)
        if meta is None:
            continue
        detection = meta.get_param("detection")
        regions.append(
            {
                "class": GLib.quark_to_string(meta.roi_type),
                "x": meta.x,
                "y": meta.y,
                "width": meta.w,
                "height": meta.h,
                "confidence": detection.get_value("confidence") if detection else None,
                "output": detection.get_value("output") if detection else None,
            }
        )
    return regions


def run(options):
    global ROI_API
    Gst.init(None)
    ROI_API = GstVideo.VideoRegionOfInterestMeta.get_info().api

    pipeline = Gst.Pipeline.new("annotate")
    source = make("filesrc", location=options["input"])
    upload = make("roboflowuploadsink", session=SESSION)
    for name, value in options["sink"]:
        set_property(upload, name, value)
    results = make("roboflowresultsrc", session=SESSION)
    for element in (source, upload, results):
        pipeline.add(element)
    source.link(upload)
    returned = ReturnedFrames()
    if options["has_video"]:
        chain = [
            make("videoconvert"),
            make("x264enc", **{"speed-preset": "veryfast"}),
            make("mp4mux"),
            make("filesink", location=options["output"]),
        ]
        for element in chain:
            pipeline.add(element)
        previous = results
        for element in chain:
            if not previous.link(element):
                raise RuntimeError(f"cannot link {previous.get_name()} to {element.get_name()}")
            previous = element
        results.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, returned.probe)
    else:
        sink = make("fakesink")
        pipeline.add(sink)
        results.link(sink)

    progress = Progress(frames_in(options["input"]))
    frames = frames_with_boxes = boxes = 0
    upload_done = None
    started = time.monotonic()
    error = None
    bus = pipeline.get_bus()
    with open(options["results"], "w", encoding="utf-8") as jsonl:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            message = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.ERROR)
            error = message.parse_error()[0].message if message else "the pipeline does not start"
        while error is None:
            message = bus.timed_pop(100 * Gst.MSECOND)
            if message is None:
                progress.tick()
                continue
            if message.type == Gst.MessageType.EOS:
                break
            if message.type == Gst.MessageType.ERROR:
                error = message.parse_error()[0].message
                break
            structure = message.get_structure()
            if message.type != Gst.MessageType.ELEMENT or structure is None:
                continue
            name = structure.get_name()
            if name == "roboflow-upload-progress":
                progress.on_upload(structure.get_value("uploaded-bytes"), structure.get_value("total-bytes"))
            elif name == "roboflow-inference":
                if upload_done is None and progress.first_chunk is not None:
                    upload_done = (progress.uploaded, time.monotonic() - progress.first_chunk)
                frames += 1
                # `detections` is a GstValueArray of structures: PyGObject
                # reads it with get_array (a GValueArray).
                ok, detections = structure.get_array("detections")
                found = detections.n_values if ok else 0
                boxes += found
                frames_with_boxes += found > 0
                text = structure.get_value("json")
                progress.on_result(frames, text)
                jsonl.write(text + "\n")
    progress.finish()
    pipeline.set_state(Gst.State.NULL)
    if error is not None:
        raise RuntimeError(error)

    print(f"frames:      {frames}")
    print(f"detections:  {boxes} boxes in {frames_with_boxes} of {frames} frames")
    print(f"time:        {time.monotonic() - started:.1f} s")
    if upload_done and upload_done[1] > 0:
        megabytes, seconds = upload_done[0] / 1e6, upload_done[1]
        print(f"upload:      {megabytes:.1f} MB in {seconds:.2f} s, first chunk to first result: {megabytes / seconds:.1f} MB/s")
    else:
        print("upload:      n/a")
    if options["has_video"]:
        with returned.lock:
            classes = ", ".join(f"{name} {count}" for name, count in sorted(returned.classes.items())) or "none"
            print(f"video:       {options['output']} ({returned.frames} frames, {returned.with_result} with their result)")
            print(f"regions:     {returned.regions} ROI metas on {returned.with_regions} frames ({classes})")
    print(f"results:     {options['results']}")


def main():
    options = parse_options(sys.argv[1:])
    try:
        run(options)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
