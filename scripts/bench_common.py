"""Helpers shared by the benchmark scripts (scripts/bench.sh,
scripts/bench_live.sh, scripts/bench_camera.sh): one job's figures from its
files, and the summaries the reports print.

A job runs as
    /usr/bin/time -v -o BASE.time timeout ... CLIENT >BASE.out 2>BASE.err
and the scripts turn it into one JSON line with
    python3 scripts/bench_common.py job BASE EXIT_CODE [name=value]...
(`job` below) which prints the last JSON line of BASE.out (the client's own figures, if
any) updated with:
  status        ok (exit 0), error (1, 2), timeout (124, 137: killed by
                `timeout`), "exit N"; "no output (<status>)" when the client
                printed no JSON line, then `error` holds the last lines of
                BASE.err
  exit_code     EXIT_CODE
  cpu_seconds   user + system seconds of the process tree (GNU time)
  user_seconds, system_seconds
  peak_rss_kib  GNU time's maximum resident set size (of the largest
                process: for a client that runs children, theirs is not
                added)
  process_wall  elapsed wall-clock seconds (GNU time)
  log           BASE
  and every name=value given: the value read as JSON when it is JSON
  (1, 2.5, true, null, "text"), else as a string.
    python3 scripts/bench_common.py gst-camera GST_LAUNCH_STDOUT FPS
prints one JSON line of figures from a `gst-launch-1.0 -m roboflowresultsrc
source-url=...` run (see gst_launch_camera_job), for scripts/bench_camera.sh;
    python3 scripts/bench_common.py app-camera APP_STDOUT RESULTS_FILE FPS
the same from an `examples/bench_camera.rs` run (see app_camera_job).
Python 3 standard library only: any python3 runs it.
"""

import json
import re
import sys

EXIT_STATUS = {0: "ok", 1: "error", 2: "error", 124: "timeout", 137: "timeout"}


def gnu_time(path):
    """Figures from a `/usr/bin/time -v -o PATH` file (None when missing)."""
    try:
        text = open(path, errors="replace").read()
    except OSError:
        text = ""

    def field(pattern):
        m = re.search(pattern, text)
        return m.group(1) if m else None

    user = field(r"User time \(seconds\): (\S+)")
    system = field(r"System time \(seconds\): (\S+)")
    rss = field(r"Maximum resident set size \(kbytes\): (\d+)")
    wall = field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
    seconds = None
    if wall:
        parts = [float(p) for p in wall.split(":")]
        seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {
        "user_seconds": float(user) if user else None,
        "system_seconds": float(system) if system else None,
        "cpu_seconds": (float(user) + float(system)) if user and system else None,
        "peak_rss_kib": int(rss) if rss else None,
        "process_wall": seconds,
    }


def last_json_line(path):
    """The last line of `path` that starts with '{', parsed ({} if none)."""
    job = {}
    try:
        for line in open(path, errors="replace"):
            if line.startswith("{"):
                try:
                    job = json.loads(line)
                except ValueError:
                    pass
    except OSError:
        pass
    return job


def tail(path, lines=3):
    try:
        text = open(path, errors="replace").read().strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def job_record(base, exit_code, fields=None):
    """One job's JSON object (see the module's docstring)."""
    job = last_json_line(base + ".out")
    status = EXIT_STATUS.get(exit_code, f"exit {exit_code}")
    if not job:
        status = f"no output ({status})"
        job["error"] = tail(base + ".err")
    job.update(gnu_time(base + ".time"))
    job.update(status=status, exit_code=exit_code, log=base)
    job.update(fields or {})
    return job


def parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def summary(values):
    """mean, median, min, max and n of the values that are not None."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    n = len(values)
    median = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
    return {"mean": sum(values) / n, "median": median, "min": min(values), "max": max(values), "n": n}


def show(s, digits, key="mean"):
    """`s[key]`, then (min-max) when the runs differ: "1.23 (1.10-1.40)"."""
    if s is None:
        return "n/a"
    text = f"{s[key]:.{digits}f}"
    if s["n"] > 1 and s["max"] - s["min"] >= 10 ** -digits:
        text += f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})"
    return text


# --- cameras (examples/rtsp_camera.rs): frame i is colour(i mod 125), 3
# channels x 5 levels; the Workflow's dominant colour names the frame.
CAMERA_LEVELS = (20, 75, 130, 185, 240)
CAMERA_COLOURS = 125
CAMERA_MAX_DRIFT = 25.0


def camera_index(rgb):
    """The frame index mod 125 whose colour `rgb` is, or None."""
    if not isinstance(rgb, (list, tuple)) or len(rgb) != 3:
        return None
    index = 0
    for c in rgb:
        if not isinstance(c, (int, float)):
            return None
        k = next((k for k, level in enumerate(CAMERA_LEVELS) if abs(level - float(c)) <= CAMERA_MAX_DRIFT), None)
        if k is None:
            return None
        index = index * 5 + k
    return index


def camera_frames(results, fps):
    """The camera frames a session's results name, in arrival order.

    `results`: (rgb, pts_seconds) per result, pts_seconds the server's
    video_metadata pts x time_base (rebased to the first frame it read) or
    None. A colour names the frame mod 125; the frame is the one of that
    colour nearest round(pts_seconds x fps) when the pts is known, else the
    first one after the previous result's frame (results come in order).
    Returns a dict: indices (None for an unreadable colour), distinct,
    first, last, out_of_order, undecodable.
    """
    indices = []
    previous = -1
    for rgb, pts_seconds in results:
        m = camera_index(rgb)
        if m is None:
            indices.append(None)
            continue
        if pts_seconds is not None:
            expected = pts_seconds * fps
            k = round((expected - m) / CAMERA_COLOURS)
            index = m + CAMERA_COLOURS * max(0, k)
        else:
            index = m
            while index <= previous:
                index += CAMERA_COLOURS
        indices.append(index)
        previous = index
    known = [i for i in indices if i is not None]
    return {
        "indices": indices,
        "distinct": len(set(known)),
        "first": min(known) if known else None,
        "last": max(known) if known else None,
        "out_of_order": sum(1 for a, b in zip(known, known[1:]) if b <= a),
        "undecodable": len(indices) - len(known),
    }


def result_pts_seconds(message):
    """video_metadata pts x time_base of a server result message, or None."""
    meta = message.get("video_metadata") if isinstance(message, dict) else None
    if not isinstance(meta, dict) or meta.get("pts") is None or not meta.get("time_base"):
        return None
    try:
        return float(meta["pts"]) * float(meta["time_base"])
    except (TypeError, ValueError):
        return None


def gst_unescape(text):
    """A string as gst_value_serialize wrote it (backslash escapes, \ooo)."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "surrogateescape")
    while i < len(raw):
        c = raw[i]
        if c == 0x5C and i + 1 < len(raw):  # backslash
            octal = raw[i + 1:i + 4]
            if len(octal) == 3 and all(0x30 <= d <= 0x37 for d in octal):
                out.append(int(octal.decode(), 8))
                i += 4
            else:
                out.append(raw[i + 1])
                i += 2
        else:
            out.append(c)
            i += 1
    return out.decode("utf-8", "replace")


def gst_string_field(line, name):
    """The value of `name=(string)"..."` in a printed GstStructure, unescaped."""
    start = line.find(f"{name}=(string)\"")
    if start < 0:
        return None
    i = start + len(name) + len("=(string)\"")
    j = i
    while j < len(line):
        if line[j] == "\\":
            j += 2
            continue
        if line[j] == '"':
            break
        j += 1
    return gst_unescape(line[i:j])


def gst_launch_camera_job(path, fps, colour_output="rgb_color"):
    """Figures of a `gst-launch-1.0 -m roboflowresultsrc source-url=...`
    run from its stdout: the roboflow-inference messages (each one's `json`
    is the server's result message) and roboflow-result-summary."""
    results = []
    results_with_errors = 0
    summary_fields = {}
    execution = None
    errors = []
    for line in open(path, errors="replace"):
        if "): roboflow-inference," in line:
            text = gst_string_field(line, "json")
            try:
                message = json.loads(text) if text else {}
            except ValueError:
                message = {}
            data = message.get("serialized_output_data") or {}
            results.append((data.get(colour_output), result_pts_seconds(message)))
            if message.get("errors"):
                results_with_errors += 1
        elif "): roboflow-result-summary," in line:
            for name, value in re.findall(r"([a-z-]+)=\((?:guint64|guint|gint|gint64|guint32)\)(\d+)", line):
                summary_fields[name] = int(value)
        elif line.startswith("Execution ended after "):
            parts = [float(p) for p in line.split()[-1].split(":")]
            execution = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif line.startswith("ERROR") or "(error):" in line:
            errors.append(line.strip()[:400])
    frames = camera_frames(results, fps)
    return {
        "client": "gst-launch-1.0 roboflowresultsrc",
        "results": len(results),
        "frames_decoded": summary_fields.get("frames-pushed"),
        "frames_delivered": summary_fields.get("frames-pushed"),
        "results_with_errors": results_with_errors,
        "camera_first": frames["first"],
        "camera_last": frames["last"],
        "camera_distinct": frames["distinct"],
        "camera_out_of_order": frames["out_of_order"],
        "undecodable_results": frames["undecodable"],
        "stats": summary_fields,
        "execution_seconds": execution,
        "error": " | ".join(errors[:3]) or None,
        "camera_indices": frames["indices"],
    }


def app_camera_job(path, results_path, fps):
    """Figures of an examples/bench_camera.rs run: its JSON line, with the
    camera frames its results file names (as the SDK script computes them)."""
    job = {}
    for line in open(path, errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            try:
                job = json.loads(line)
            except ValueError:
                pass
    try:
        rows = json.load(open(results_path))
    except (OSError, ValueError):
        rows = []
    frames = camera_frames([(row.get("rgb"), row.get("pts_seconds")) for row in rows], fps)
    job.update({
        "camera_first": frames["first"],
        "camera_last": frames["last"],
        "camera_distinct": frames["distinct"],
        "camera_out_of_order": frames["out_of_order"],
        "undecodable_results": frames["undecodable"],
        "camera_indices": frames["indices"],
    })
    return job


def main(argv):
    if len(argv) >= 3 and argv[0] == "job":
        base, exit_code = argv[1], int(argv[2])
        fields = {}
        for pair in argv[3:]:
            name, _, value = pair.partition("=")
            fields[name] = parse_value(value)
        print(json.dumps(job_record(base, exit_code, fields)))
        return 0
    if len(argv) in (3, 4) and argv[0] == "gst-camera":
        job = gst_launch_camera_job(argv[1], float(argv[2]), *argv[3:])
        print(json.dumps(job))
        return 0
    if len(argv) == 4 and argv[0] == "app-camera":
        print(json.dumps(app_camera_job(argv[1], argv[2], float(argv[3]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
