//! One live-video job: pushes a synthetic camera stream through
//! `appsrc ! roboflowuploadsink` in live mode and prints one JSON line of
//! figures, the client side of `scripts/bench_live.sh` (which runs
//! `scripts/bench_live_sdk.py` the same way for the Python SDK's
//! ManualSource).
//!
//! ```sh
//! cargo build --release --lib --example bench_live
//! target/release/examples/bench_live --realtime 1 \
//!     --workflow-spec-file examples/workflows/blur-dominant-color.json \
//!     --data-output rgb_color [--frames 300] [--format RGB|I420] \
//!     [--max-frames-in-flight N] [--set name=value]... [--api-url URL]
//! ```
//!
//! The stream: `--frames` frames of 640x480 (`--width`, `--height`) at 30
//! fps (`--fps`), each one solid colour that encodes its index: 3 channels
//! x 7 levels (0, 42, ..., 252), base 7 (r = i / 49, g = i / 7 % 7,
//! b = i % 7), so consecutive frames differ by 42 in blue. Decoding takes
//! the nearest level per channel.
//!
//! The pipeline: `appsrc is-live=true format=time do-timestamp=false
//! caps=video/x-raw,format=RGB|I420,... ! roboflowuploadsink` with
//! `api-url`, `workflow-spec-file`, `data-output`, `realtime-processing`
//! and, when given, `max-frames-in-flight` and any `--set` properties.
//! Slot k (a frame every 1/fps, like a camera) is pushed at t0 + k / fps
//! with PTS = k x (1 s / fps), duration 1 s / fps; the instant is taken
//! just before `push_buffer`. After the last frame: `end_of_stream()`.
//!
//! When the measured frames start (`--start-after`):
//! - `connected` (default): the sink starts its session on its first
//!   buffer and, with realtime-processing=true, drops frames until the
//!   session is up (false: the first buffer blocks). So the camera runs
//!   from PLAYING with warm-up frames (colour code 342, white; at most one
//!   waiting in the appsrc) until the sink's `stats` count `frames-sent` >= 1;
//!   measured frame 0 takes the next slot. This matches the SDK side, which
//!   hands frame 0 over once its session is connected. PTS stay continuous
//!   (slot x 1/fps), so a result's frame is round(pts x fps) - first_slot.
//! - `playing`: measured frames from the first slot (frames the sink drops
//!   while it connects count as lost).
//!
//! Results: every `roboflow-inference` element message, stamped in a bus
//! sync handler (the posting thread) with `Instant::now()`. Fields read:
//! `frame-id`, `pts` (frame index = round(pts x fps)), `latency` (the
//! plugin's own: buffer at the sink -> result), `json` (the dominant colour
//! is `serialized_output_data.<colour-output>`, else found anywhere by that
//! key), `errors`. A pairing error is a result whose colour decodes to an
//! index other than its pts's. Latency (ours) = arrival - push instant of
//! the frame the colour names; `latency_by_pts` uses the pts's frame.
//!
//! The job ends at EOS, an error, or `--idle-timeout` seconds (5) after the
//! last push with no new result (then `ended` is "timeout"). The sink's
//! `stats` structure is read right after that, before NULL. CPU =
//! getrusage(RUSAGE_SELF) user+sys at the very end; peak RSS = VmHWM.
//! Exit status 1 when the job ended with an error or a timeout.

#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

/// 42 apart: decoding tolerates 20 per channel (VP8 moved a channel by up
/// to 20 in the SDK runs, mostly chroma in the first seconds).
const LEVELS: [u8; 7] = [0, 42, 84, 126, 168, 210, 252];

fn colour_of(index: usize) -> [u8; 3] {
    [LEVELS[(index / 49) % 7], LEVELS[(index / 7) % 7], LEVELS[index % 7]]
}

/// (index, distance): the nearest code point to an (r, g, b) colour.
fn index_of(rgb: [f64; 3]) -> (usize, f64) {
    let mut index = 0;
    let mut distance: f64 = 0.0;
    for c in rgb {
        let k = ((c - LEVELS[0] as f64) / 42.0).round().clamp(0.0, 6.0) as usize;
        index = index * 7 + k;
        distance = distance.max((c - LEVELS[k] as f64).abs());
    }
    (index, distance)
}

/// BT.601 limited range, as videoconvert does for RGB -> I420.
fn yuv_of([r, g, b]: [u8; 3]) -> [u8; 3] {
    let (r, g, b) = (r as f64, g as f64, b as f64);
    let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
    let u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
    let v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
    [y.round().clamp(0.0, 255.0) as u8, u.round().clamp(0.0, 255.0) as u8, v.round().clamp(0.0, 255.0) as u8]
}

struct Options {
    api_url: Option<String>,
    workflow_spec_file: String,
    data_output: String,
    colour_output: String,
    realtime: bool,
    frames: usize,
    fps: u32,
    width: usize,
    height: usize,
    format: String,
    max_frames_in_flight: Option<u32>,
    sets: Vec<(String, String)>,
    idle_timeout: f64,
    start_after: String,
    results_file: Option<String>,
    /// A bin description put between the appsrc and the sink (diagnostics,
    /// e.g. encoding with other settings than the sink's own encoder).
    pre: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_live --workflow-spec-file FILE [--realtime 0|1] [--data-output LIST] \
         [--colour-output NAME] [--frames N] [--fps N] [--width N] [--height N] [--format RGB|I420] \
         [--max-frames-in-flight N] [--set name=value]... [--idle-timeout S] \
         [--start-after connected|playing] [--results-file PATH] [--pre 'BIN DESCRIPTION'] [--api-url URL]"
    );
    std::process::exit(2);
}

fn parse_options() -> Options {
    let mut o = Options {
        api_url: None,
        workflow_spec_file: String::new(),
        data_output: "rgb_color".into(),
        colour_output: "rgb_color".into(),
        realtime: true,
        frames: 300,
        fps: 30,
        width: 640,
        height: 480,
        format: "RGB".into(),
        max_frames_in_flight: None,
        sets: Vec::new(),
        idle_timeout: 5.0,
        start_after: "connected".into(),
        results_file: None,
        pre: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        let number = |s: String| s.parse::<f64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--api-url" => o.api_url = Some(value()),
            "--workflow-spec-file" => o.workflow_spec_file = value(),
            "--data-output" => o.data_output = value(),
            "--colour-output" => o.colour_output = value(),
            "--realtime" => o.realtime = number(value()) != 0.0,
            "--frames" => o.frames = number(value()) as usize,
            "--fps" => o.fps = number(value()) as u32,
            "--width" => o.width = number(value()) as usize,
            "--height" => o.height = number(value()) as usize,
            "--format" => o.format = value(),
            "--max-frames-in-flight" => o.max_frames_in_flight = Some(number(value()) as u32),
            "--idle-timeout" => o.idle_timeout = number(value()),
            "--start-after" => o.start_after = value(),
            "--results-file" => o.results_file = Some(value()),
            "--pre" => o.pre = Some(value()),
            "--set" => {
                let pair = value();
                let (name, value) = pair.split_once('=').unwrap_or_else(|| usage());
                o.sets.push((name.to_owned(), value.to_owned()));
            }
            _ => usage(),
        }
    }
    let known_format = o.format == "RGB" || o.format == "I420";
    let known_start = o.start_after == "connected" || o.start_after == "playing";
    if o.workflow_spec_file.is_empty() || !known_format || !known_start || o.fps == 0 {
        usage();
    }
    if o.frames == 0 || o.frames > WARMUP {
        eprintln!("bench_live: --frames must be 1..=342 (the colour code; 342 marks warm-up frames)");
        std::process::exit(2);
    }
    if o.format == "I420" && (!o.width.is_multiple_of(2) || !o.height.is_multiple_of(2)) {
        usage();
    }
    o
}

/// The colour code of warm-up frames (not a measured frame: frames are
/// at most 343 - 1).
const WARMUP: usize = 342;

#[derive(Default)]
struct Warmup {
    /// The slot of measured frame 0 (its PTS is slot / fps).
    first_slot: Option<u64>,
    /// Warm-up frames pushed.
    pushed: u64,
    /// Seconds from the first slot to the sink's first frame sent.
    ready_after: Option<f64>,
    /// This process's CPU seconds then (set-up and warm-up).
    cpu_at_ready: Option<f64>,
}

/// The sink's `stats` field `frames-sent` (0 while absent).
fn frames_sent(sink: &gst::Element) -> u64 {
    let Some(stats) = sink.property::<Option<gst::Structure>>("stats") else { return 0 };
    stats
        .get::<u64>("frames-sent")
        .or_else(|_| stats.get::<u32>("frames-sent").map(u64::from))
        .or_else(|_| stats.get::<i64>("frames-sent").map(|v| v.max(0) as u64))
        .unwrap_or(0)
}

/// One `roboflow-inference` message as received.
struct Received {
    arrival: Instant,
    frame_id: Option<u64>,
    pts: Option<gst::ClockTime>,
    latency: Option<gst::ClockTime>,
    rgb: Option<[f64; 3]>,
    errors: Option<String>,
    skipped: Option<u64>,
}

#[derive(Default)]
struct Shared {
    received: Vec<Received>,
    other_messages: BTreeMap<String, u64>,
    warnings: Vec<String>,
    last_result: Option<Instant>,
}

fn find_colour(json: &serde_json::Value, key: &str) -> Option<[f64; 3]> {
    fn as_rgb(v: &serde_json::Value) -> Option<[f64; 3]> {
        if let Some(a) = v.as_array()
            && a.len() == 3
        {
            return Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?]);
        }
        if let Some(o) = v.as_object() {
            return Some([o.get("r")?.as_f64()?, o.get("g")?.as_f64()?, o.get("b")?.as_f64()?]);
        }
        None
    }
    fn anywhere<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
        match v {
            serde_json::Value::Object(map) => map
                .get(key)
                .or_else(|| map.values().find_map(|child| anywhere(child, key))),
            serde_json::Value::Array(items) => items.iter().find_map(|child| anywhere(child, key)),
            _ => None,
        }
    }
    json.get("serialized_output_data")
        .and_then(|o| o.get(key))
        .or_else(|| anywhere(json, key))
        .and_then(as_rgb)
}

fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let k = (v.len() - 1) as f64 * p / 100.0;
    let lo = k.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    Some(v[lo] + (v[hi] - v[lo]) * (k - lo as f64))
}

/// A GstStructure's fields as JSON (numbers, booleans, strings; the rest
/// as GStreamer's own serialisation).
fn structure_json(s: &gst::StructureRef) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    map.insert("name".into(), s.name().as_str().into());
    for (field, value) in s.iter() {
        let v: serde_json::Value = if let Ok(x) = value.get::<u64>() {
            x.into()
        } else if let Ok(x) = value.get::<i64>() {
            x.into()
        } else if let Ok(x) = value.get::<u32>() {
            x.into()
        } else if let Ok(x) = value.get::<i32>() {
            x.into()
        } else if let Ok(x) = value.get::<f64>() {
            x.into()
        } else if let Ok(x) = value.get::<bool>() {
            x.into()
        } else if let Ok(x) = value.get::<Option<String>>() {
            x.into()
        } else {
            value.serialize().map(|s| s.to_string()).unwrap_or_default().into()
        };
        map.insert(field.to_string(), v);
    }
    map.into()
}

#[repr(C)]
struct Rusage {
    utime: [i64; 2],
    stime: [i64; 2],
    rest: [i64; 14],
}

unsafe extern "C" {
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
}

/// user + sys CPU seconds of this process (all threads).
fn cpu_seconds() -> Option<f64> {
    let mut usage = Rusage { utime: [0; 2], stime: [0; 2], rest: [0; 14] };
    // SAFETY: RUSAGE_SELF (0) and a struct rusage-sized, writable buffer
    // (x86_64/aarch64 Linux: two timevals then 14 longs).
    let rc = unsafe { getrusage(0, &mut usage) };
    (rc == 0).then(|| {
        usage.utime[0] as f64 + usage.utime[1] as f64 / 1e6 + usage.stime[0] as f64 + usage.stime[1] as f64 / 1e6
    })
}

/// CPU seconds of this process's live threads, by thread name
/// (/proc/self/task/*/stat, 100 ticks a second); threads that ended are
/// only in the process total.
fn cpu_by_thread() -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return by_name };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        // After "pid (comm) ": state is field 3, utime 14, stime 15.
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        *by_name.entry(name).or_insert(0.0) += (ticks(14) + ticks(15)) / 100.0;
    }
    by_name
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn make_frame(format: &str, width: usize, height: usize, index: usize) -> Vec<u8> {
    let rgb = colour_of(index);
    if format == "RGB" {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        data
    } else {
        let [y, u, v] = yuv_of(rgb);
        let luma = width * height;
        let chroma = (width / 2) * (height / 2);
        let mut data = vec![y; luma + 2 * chroma];
        data[luma..luma + chroma].fill(u);
        data[luma + chroma..].fill(v);
        data
    }
}

fn main() {
    let options = parse_options();
    let report = match run(&options) {
        Ok(report) => report,
        Err(message) => {
            eprintln!("bench_live: {message}");
            std::process::exit(2);
        }
    };
    println!("{report}");
    if !report["error"].is_null() || report["ended"] != "eos" {
        std::process::exit(1);
    }
}

fn run(o: &Options) -> Result<serde_json::Value, String> {
    let started = Instant::now();
    gst::init().map_err(|e| e.to_string())?;
    gstroboflow::plugin_register_static().map_err(|e| e.to_string())?;

    let caps = gst::Caps::builder("video/x-raw")
        .field("format", o.format.as_str())
        .field("width", o.width as i32)
        .field("height", o.height as i32)
        .field("framerate", gst::Fraction::new(o.fps as i32, 1))
        .build();
    let appsrc = gst_app::AppSrc::builder()
        .is_live(true)
        .format(gst::Format::Time)
        .do_timestamp(false)
        .caps(&caps)
        .build();
    let sink = gst::ElementFactory::make("roboflowuploadsink")
        .build()
        .map_err(|_| "the element 'roboflowuploadsink' is missing".to_owned())?;
    sink.set_property("workflow-spec-file", &o.workflow_spec_file);
    if let Some(url) = &o.api_url {
        sink.set_property("api-url", url);
    }
    sink.set_property("data-output", &o.data_output);
    sink.set_property("realtime-processing", o.realtime);
    let set_checked = |name: &str, value: &str| -> Result<(), String> {
        if sink.find_property(name).is_none() {
            let names: Vec<_> = sink.list_properties().iter().map(|p| p.name().to_owned()).collect();
            return Err(format!("roboflowuploadsink has no property '{name}' (it has: {})", names.join(", ")));
        }
        sink.set_property_from_str(name, value);
        Ok(())
    };
    if let Some(n) = o.max_frames_in_flight {
        set_checked("max-frames-in-flight", &n.to_string())?;
    }
    for (name, value) in &o.sets {
        set_checked(name, value)?;
    }

    let pipeline = gst::Pipeline::new();
    pipeline
        .add_many([appsrc.upcast_ref::<gst::Element>(), &sink])
        .map_err(|e| e.to_string())?;
    if let Some(description) = &o.pre {
        let bin = gst::parse::bin_from_description(description, true)
            .map_err(|e| format!("--pre '{description}': {e}"))?;
        pipeline.add(&bin).map_err(|e| e.to_string())?;
        gst::Element::link_many([appsrc.upcast_ref::<gst::Element>(), bin.upcast_ref(), &sink])
            .map_err(|e| format!("appsrc ! {description} ! roboflowuploadsink does not link: {e}"))?;
    } else {
        appsrc.link(&sink).map_err(|e| format!("appsrc ({caps}) does not link to roboflowuploadsink: {e}"))?;
    }

    let shared = Arc::new(Mutex::new(Shared::default()));
    let colour_key = o.colour_output.clone();
    let bus = pipeline.bus().expect("a pipeline has a bus");
    {
        let shared = shared.clone();
        bus.set_sync_handler(move |_bus, message| {
            let arrival = Instant::now();
            match message.view() {
                gst::MessageView::Element(element) => {
                    if let Some(s) = element.structure() {
                        let mut shared = shared.lock().unwrap();
                        if s.name().as_str() == "roboflow-inference" {
                            let rgb = s
                                .get::<&str>("json")
                                .ok()
                                .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
                                .and_then(|json| find_colour(&json, &colour_key));
                            shared.received.push(Received {
                                arrival,
                                frame_id: s.get::<u64>("frame-id").ok(),
                                pts: s.get::<Option<gst::ClockTime>>("pts").ok().flatten(),
                                latency: s.get::<Option<gst::ClockTime>>("latency").ok().flatten(),
                                rgb,
                                errors: s.get::<&str>("errors").ok().map(str::to_owned),
                                skipped: s
                                    .get::<u64>("frames-skipped")
                                    .ok()
                                    .or_else(|| s.get::<u32>("frames-skipped").ok().map(u64::from)),
                            });
                            shared.last_result = Some(arrival);
                        } else {
                            *shared.other_messages.entry(s.name().to_string()).or_default() += 1;
                        }
                    }
                }
                gst::MessageView::Warning(w) => {
                    let text = format!("{} ({})", w.error(), w.debug().unwrap_or_default());
                    shared.lock().unwrap().warnings.push(text);
                }
                _ => {}
            }
            gst::BusSyncReply::Pass
        });
    }

    pipeline
        .set_state(gst::State::Playing)
        .map_err(|_| "the pipeline does not start (set_state(Playing) failed)".to_owned())?;
    let playing_time = started.elapsed().as_secs_f64();

    // The camera: one frame slot every 1/fps from PLAYING, on its own
    // thread. With --start-after connected the first slots carry warm-up
    // frames (colour code WARMUP, not a measured frame) until the sink's
    // stats count a frame sent; the measured frames fill the next slots.
    let frame_ns = 1_000_000_000u64 / o.fps as u64;
    let pushed_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; o.frames]));
    let push_done = Arc::new(AtomicBool::new(false));
    let push_errors: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let warmup = Arc::new(Mutex::new(Warmup::default()));
    let pusher = {
        let (appsrc, sink, pushed_at, push_done, push_errors, warmup) = (
            appsrc.clone(),
            sink.clone(),
            pushed_at.clone(),
            push_done.clone(),
            push_errors.clone(),
            warmup.clone(),
        );
        // Made one at a time, as a camera would (holding all 300 would add
        // 276 MB of RGB to this process's peak RSS).
        let (format, width, height, count) = (o.format.clone(), o.width, o.height, o.frames);
        let frames = (0..count).map(move |i| make_frame(&format, width, height, i));
        let warm_frame = make_frame(&o.format, o.width, o.height, WARMUP);
        let wait_for_session = o.start_after == "connected";
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut first: Option<u64> = if wait_for_session { None } else { Some(0) };
            warmup.lock().unwrap().first_slot = first;
            let mut frames = frames;
            let mut slot = 0u64;
            loop {
                let target = t0 + Duration::from_nanos(slot * frame_ns);
                let now = Instant::now();
                if target > now {
                    std::thread::sleep(target - now);
                }
                if first.is_none() {
                    if frames_sent(&sink) >= 1 {
                        first = Some(slot);
                        let mut w = warmup.lock().unwrap();
                        w.first_slot = first;
                        w.ready_after = Some(t0.elapsed().as_secs_f64());
                        w.cpu_at_ready = cpu_seconds();
                    } else if t0.elapsed() > Duration::from_secs(90) {
                        push_errors.lock().unwrap().push("no frame sent after 90 s of warm-up frames".into());
                        break;
                    }
                }
                let (data, index) = match first {
                    Some(f) => match frames.next() {
                        Some(data) => (data, Some((slot - f) as usize)),
                        None => break,
                    },
                    None => {
                        // Like a camera's leaky queue: warm-up frames do not
                        // pile up in the appsrc while the sink blocks.
                        if appsrc.current_level_buffers() >= 1 {
                            slot += 1;
                            continue;
                        }
                        (warm_frame.clone(), None)
                    }
                };
                let mut buffer = gst::Buffer::from_mut_slice(data);
                {
                    let b = buffer.get_mut().unwrap();
                    b.set_pts(gst::ClockTime::from_nseconds(slot * frame_ns));
                    b.set_duration(gst::ClockTime::from_nseconds(frame_ns));
                }
                let at = Instant::now();
                match index {
                    Some(i) => pushed_at.lock().unwrap()[i] = Some(at),
                    None => warmup.lock().unwrap().pushed += 1,
                }
                if let Err(flow) = appsrc.push_buffer(buffer) {
                    push_errors.lock().unwrap().push(format!("slot {slot}: {flow:?}"));
                    break;
                }
                slot += 1;
            }
            let _ = appsrc.end_of_stream();
            push_done.store(true, Ordering::SeqCst);
        })
    };
    let pusher = Some(pusher);
    let early_error: Option<String> = None;

    let mut error = early_error;
    let mut ended = if error.is_some() { "error".to_owned() } else { String::new() };
    let mut last_push: Option<Instant> = None;
    while error.is_none() {
        if let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) {
            match message.view() {
                gst::MessageView::Eos(_) => {
                    ended = "eos".into();
                    break;
                }
                gst::MessageView::Error(err) => {
                    error = Some(format!("{} ({})", err.error(), err.debug().unwrap_or_default()));
                    ended = "error".into();
                    break;
                }
                _ => {}
            }
        }
        if push_done.load(Ordering::SeqCst) {
            let done_at = *last_push.get_or_insert_with(Instant::now);
            let last_result = shared.lock().unwrap().last_result;
            let quiet_since = last_result.map_or(done_at, |r| r.max(done_at));
            if quiet_since.elapsed().as_secs_f64() > o.idle_timeout {
                ended = "timeout".into();
                break;
            }
        }
    }
    let end_time = started.elapsed().as_secs_f64();
    let threads_cpu = cpu_by_thread();
    let stats = sink
        .property::<Option<gst::Structure>>("stats")
        .map(|s| structure_json(&s))
        .unwrap_or(serde_json::Value::Null);
    let _ = pipeline.set_state(gst::State::Null);
    if let Some(pusher) = pusher {
        let _ = pusher.join();
    }
    let total_time = started.elapsed().as_secs_f64();
    bus.unset_sync_handler();
    // Whatever was still queued on the bus (posted before NULL).
    let mut late_errors = Vec::new();
    while let Some(message) = bus.pop() {
        if let gst::MessageView::Error(err) = message.view() {
            late_errors.push(format!("{} ({})", err.error(), err.debug().unwrap_or_default()));
        }
    }

    let cpu = cpu_seconds();
    let hwm = vm_hwm_kib();

    let shared = shared.lock().unwrap();
    let pushed_at = pushed_at.lock().unwrap();
    let sent = pushed_at.iter().filter(|t| t.is_some()).count();
    let ms = |a: Instant, b: Instant| a.saturating_duration_since(b).as_secs_f64() * 1000.0
        - b.saturating_duration_since(a).as_secs_f64() * 1000.0;
    let warmup = warmup.lock().unwrap();
    let first_slot = warmup.first_slot.unwrap_or(0) as i64;
    let mut latencies = Vec::new();
    let mut latencies_by_pts = Vec::new();
    let mut plugin_latencies = Vec::new();
    let (mut pairing_errors, mut no_pts, mut undecodable, mut with_errors) = (0, 0, 0, 0);
    let (mut measured, mut warmup_results, mut skipped_max) = (0, 0, 0u64);
    let mut max_distance: f64 = 0.0;
    let mut near_boundary = 0;
    let mut indexes = std::collections::BTreeSet::new();
    let mut rows = Vec::new();
    for r in &shared.received {
        // The result's pts names a slot; slots before first_slot are warm-up.
        let slot = r.pts.map(|pts| (pts.nseconds() as f64 / frame_ns as f64).round() as i64);
        let by_pts = slot.and_then(|s| usize::try_from(s - first_slot).ok()).filter(|i| *i < sent);
        let pts_says_warmup = slot.is_some_and(|s| s < first_slot);
        let decoded = r.rgb.map(index_of);
        if let Some((_, d)) = decoded {
            max_distance = max_distance.max(d);
            if d >= 15.0 {
                near_boundary += 1;
            }
        }
        let colour_index = decoded.map(|(i, _)| i);
        let colour_says_warmup = colour_index.is_some_and(|i| i >= o.frames);
        let true_index = colour_index.filter(|i| *i < sent);
        if let Some(l) = r.latency {
            plugin_latencies.push(l.nseconds() as f64 / 1e6);
        }
        skipped_max = skipped_max.max(r.skipped.unwrap_or(0));
        if r.errors.as_deref().is_some_and(|e| e != "[]" && !e.is_empty()) {
            with_errors += 1;
        }
        if colour_says_warmup {
            warmup_results += 1;
            if !pts_says_warmup {
                pairing_errors += 1; // a warm-up frame's result given a measured frame's pts
            }
        } else if let Some(i) = true_index {
            measured += 1;
            indexes.insert(i);
            if let Some(at) = pushed_at[i] {
                latencies.push(ms(r.arrival, at));
            }
            if by_pts != Some(i) {
                pairing_errors += 1;
            }
            match by_pts {
                Some(p) => {
                    if let Some(at) = pushed_at[p] {
                        latencies_by_pts.push(ms(r.arrival, at));
                    }
                }
                None => no_pts += 1,
            }
        } else {
            undecodable += 1;
        }
        rows.push(serde_json::json!({
            "arrival": r.arrival.saturating_duration_since(started).as_secs_f64(),
            "frame_id": r.frame_id,
            "pts_ns": r.pts.map(|p| p.nseconds()),
            "latency_ms": r.latency.map(|l| l.nseconds() as f64 / 1e6),
            "rgb": r.rgb,
            "index": true_index,
            "colour_index": colour_index,
            "slot": slot,
            "by_pts": by_pts,
            "frames_skipped": r.skipped,
            "errors": r.errors,
        }));
    }
    if let Some(path) = &o.results_file {
        let handed: Vec<Option<f64>> = pushed_at
            .iter()
            .map(|t| t.map(|t| t.saturating_duration_since(started).as_secs_f64()))
            .collect();
        let dump = serde_json::json!({"handed": handed, "results": rows});
        std::fs::write(path, dump.to_string()).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    let mut push_errors = push_errors.lock().unwrap().clone();
    push_errors.extend(late_errors);
    Ok(serde_json::json!({
        "client": "gst-roboflow",
        "realtime": o.realtime,
        "format": o.format,
        "max_frames_in_flight": o.max_frames_in_flight,
        "pre": o.pre,
        "sets": o.sets.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "start_after": o.start_after,
        "first_slot": warmup.first_slot,
        "warmup_frames_pushed": warmup.pushed,
        "warmup_results": warmup_results,
        "session_ready_after": warmup.ready_after,
        "frames_skipped_max": skipped_max,
        "frames_sent": sent,
        "results": measured,
        "messages": shared.received.len(),
        "distinct_frames": indexes.len(),
        "pairing_errors": pairing_errors,
        "pairing": "round(pts * fps) - first_slot",
        "measured_results_without_usable_pts": no_pts,
        "undecodable_results": undecodable,
        "max_colour_distance": max_distance,
        "results_colour_distance_ge_15": near_boundary,
        "results_with_errors": with_errors,
        "latency_ms_p50": percentile(&latencies, 50.0),
        "latency_ms_p95": percentile(&latencies, 95.0),
        "latency_ms_max": latencies.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
        "latency_by_pts_ms_p50": percentile(&latencies_by_pts, 50.0),
        "latency_by_pts_ms_p95": percentile(&latencies_by_pts, 95.0),
        "plugin_latency_ms_p50": percentile(&plugin_latencies, 50.0),
        "plugin_latency_ms_p95": percentile(&plugin_latencies, 95.0),
        "plugin_latency_count": plugin_latencies.len(),
        "playing_time": playing_time,
        "end_time": end_time,
        "total_time": total_time,
        "ended": ended,
        "stats": stats,
        "other_messages": shared.other_messages,
        "warnings": shared.warnings,
        "push_errors": push_errors,
        "cpu_seconds_self": cpu,
        "cpu_seconds_at_ready": warmup.cpu_at_ready,
        "cpu_seconds_by_thread_at_end": threads_cpu,
        "cpu_seconds_measured_stream": cpu.zip(warmup.cpu_at_ready).map(|(end, ready)| end - ready),
        "peak_rss_kib_self": hwm,
        "error": error,
    }))
}
