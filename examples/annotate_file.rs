//! Runs a video file through a Roboflow Workflow and writes the returned
//! video to an MP4 and every frame's result to a JSON-lines file, with
//! progress: a spinner while the server's worker starts, the upload (rate
//! from its first chunk), then the results (a bar with total and ETA when
//! the total is known: from the server's `total_frames`, else the file's
//! header). At the end it prints how many frames had a detection. Its
//! Python twin is examples/python/annotate.py (same command line).
//!
//! ```sh
//! cargo run --release --example annotate_file -- clip.mp4 \
//!     --workflow-spec-file examples/workflows/blur-dominant-color.json \
//!     --stream-output blurred --data-output rgb_color \
//!     --output annotated.mp4 --results results.jsonl
//! ```
//!
//! Options: --output FILE (annotated.mp4), --results FILE (results.jsonl),
//! and any roboflowuploadsink property as --name value, e.g. --api-url URL
//! (default http://127.0.0.1:9001), --api-key KEY, --workflow-spec-file
//! FILE, --workflow-parameters JSON, --stream-output NAME (the image output
//! to return as video; without it: results only), --data-output LIST,
//! --video-transport datachannel|track.

use std::io::Write;
use std::time::Instant;

use gst::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};

struct Options {
    input: String,
    output: String,
    results: String,
    sink_properties: Vec<(String, String)>,
    has_video: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: annotate_file INPUT (--workflow-spec-file FILE | --workspace W --workflow-id ID) \
         [--workflow-parameters JSON] [--stream-output NAME] [--data-output LIST] \
         [--output annotated.mp4] [--results results.jsonl] [--PROPERTY VALUE ...] \
         (PROPERTY: any roboflowuploadsink property, e.g. --api-url URL --api-key KEY --video-transport track)"
    );
    std::process::exit(2);
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        input: String::new(),
        output: "annotated.mp4".into(),
        results: "results.jsonl".into(),
        sink_properties: Vec::new(),
        has_video: false,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--output" => options.output = value(),
            "--results" => options.results = value(),
            "--help" | "-h" => usage(),
            flag if flag.starts_with("--") => {
                let property = flag.trim_start_matches("--").to_owned();
                if property == "stream-output" {
                    options.has_video = true;
                }
                options.sink_properties.push((property, value()));
            }
            input if options.input.is_empty() => options.input = input.to_owned(),
            _ => usage(),
        }
    }
    if options.input.is_empty() {
        usage();
    }
    options
}

fn main() {
    let options = parse_options();
    if let Err(message) = run(&options) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run(options: &Options) -> Result<(), String> {
    gst::init().map_err(|e| e.to_string())?;
    gstroboflow::plugin_register_static().map_err(|e| e.to_string())?;

    let pipeline = gst::Pipeline::new();
    let source = make("filesrc", &[("location", &options.input)])?;
    let upload = make("roboflowuploadsink", &[("session", "annotate_file")])?;
    for (name, value) in &options.sink_properties {
        if upload.find_property(name).is_none() {
            return Err(format!("roboflowuploadsink has no property '{name}'"));
        }
        set_from_str(&upload, name, value);
    }
    let results = make("roboflowresultsrc", &[("session", "annotate_file")])?;
    pipeline.add_many([&source, &upload, &results]).map_err(|e| e.to_string())?;
    source.link(&upload).map_err(|e| e.to_string())?;
    if options.has_video {
        let chain = [
            make("videoconvert", &[])?,
            make("x264enc", &[("speed-preset", "veryfast")])?,
            make("mp4mux", &[])?,
            make("filesink", &[("location", &options.output)])?,
        ];
        pipeline.add_many(&chain).map_err(|e| e.to_string())?;
        gst::Element::link_many([&results, &chain[0], &chain[1], &chain[2], &chain[3]]).map_err(|e| e.to_string())?;
    } else {
        let sink = make("fakesink", &[])?;
        pipeline.add(&sink).map_err(|e| e.to_string())?;
        results.link(&sink).map_err(|e| e.to_string())?;
    }

    let mut jsonl = std::io::BufWriter::new(
        std::fs::File::create(&options.results).map_err(|e| format!("cannot create {}: {e}", options.results))?,
    );
    let mut progress = Progress::new(frames_in(&options.input));

    let started = Instant::now();
    // The upload is over for the server when its first result arrives: the
    // honest upload time runs from the first chunk sent to that result.
    let mut upload_done: Option<(u64, f64)> = None;
    let mut frames = 0u64;
    let mut frames_with_boxes = 0u64;
    let mut boxes = 0u64;
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|_| "the pipeline does not start".to_owned())?;
    let outcome = loop {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            progress.tick();
            continue;
        };
        match message.view() {
            gst::MessageView::Eos(_) => break Ok(()),
            gst::MessageView::Error(err) => break Err(format!("{}", err.error())),
            gst::MessageView::Element(element) => {
                let Some(structure) = element.structure() else { continue };
                match structure.name().as_str() {
                    "roboflow-upload-progress" => progress.on_upload(
                        structure.get::<u64>("uploaded-bytes").unwrap_or(0),
                        structure.get::<u64>("total-bytes").unwrap_or(0),
                    ),
                    "roboflow-inference" => {
                        if upload_done.is_none()
                            && let Some((first, bytes)) = progress.upload_started()
                        {
                            upload_done = Some((bytes, first.elapsed().as_secs_f64()));
                        }
                        frames += 1;
                        let found = structure.get::<gst::ArrayRef>("detections").map(|list| list.as_slice().len()).unwrap_or(0);
                        boxes += found as u64;
                        frames_with_boxes += u64::from(found > 0);
                        let json = structure.get::<&str>("json").unwrap_or("{}");
                        progress.on_result(frames, || total_frames(json));
                        writeln!(jsonl, "{json}").map_err(|e| format!("writing {}: {e}", options.results))?;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    };
    progress.finish();
    let _ = pipeline.set_state(gst::State::Null);
    jsonl.flush().map_err(|e| e.to_string())?;
    outcome?;

    let elapsed = started.elapsed();
    println!("frames:      {frames}");
    println!("detections:  {boxes} boxes in {frames_with_boxes} of {frames} frames");
    println!("time:        {:.1} s", elapsed.as_secs_f64());
    match upload_done {
        Some((bytes, seconds)) if seconds > 0.0 => println!(
            "upload:      {:.1} MB in {seconds:.2} s, first chunk to first result: {:.1} MB/s",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / seconds
        ),
        _ => println!("upload:      n/a"),
    }
    if options.has_video {
        println!("video:       {}", options.output);
    }
    println!("results:     {}", options.results);
    Ok(())
}

/// What the person watching sees, in three steps: a spinner while the
/// server's worker starts (nothing is uploaded yet), the upload with its
/// rate counted from its first chunk, then the results, with a total and an
/// ETA once the total is known.
struct Progress {
    bar: ProgressBar,
    phase: Phase,
    /// Frames in the input, from its header (GstDiscoverer).
    file_frames: Option<u64>,
    /// The server's total_frames, once a result has carried it.
    server_total: Option<u64>,
    first_chunk: Option<Instant>,
    uploaded: u64,
}

#[derive(PartialEq)]
enum Phase {
    Connecting,
    Uploading,
    Results { total: Option<u64> },
}

impl Progress {
    fn new(file_frames: Option<u64>) -> Progress {
        let bar = ProgressBar::new_spinner();
        bar.set_style(ProgressStyle::with_template("{spinner} connecting (the server's worker starts) {elapsed}").unwrap());
        Progress { bar, phase: Phase::Connecting, file_frames, server_total: None, first_chunk: None, uploaded: 0 }
    }

    fn tick(&self) {
        self.bar.tick();
    }

    fn on_upload(&mut self, uploaded: u64, total: u64) {
        if uploaded == 0 || matches!(self.phase, Phase::Results { .. }) {
            return;
        }
        if self.phase == Phase::Connecting {
            // A new bar: its rate and ETA count from the first chunk.
            self.bar.finish_and_clear();
            self.bar = ProgressBar::new(total);
            self.bar.set_style(
                ProgressStyle::with_template("upload     [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            self.phase = Phase::Uploading;
            self.first_chunk = Some(Instant::now());
        }
        self.uploaded = uploaded;
        self.bar.set_length(total);
        self.bar.set_position(uploaded);
    }

    /// The first chunk's time and the bytes uploaded, once the upload began.
    fn upload_started(&self) -> Option<(Instant, u64)> {
        self.first_chunk.map(|first| (first, self.uploaded))
    }

    /// `server_total` reads the result's total_frames; it is called only
    /// until a result has carried one, which is then kept.
    fn on_result(&mut self, frames: u64, server_total: impl FnOnce() -> Option<u64>) {
        if self.server_total.is_none() {
            self.server_total = server_total();
        }
        let total = self.server_total.or(self.file_frames);
        let phase = Phase::Results { total };
        if self.phase != phase {
            self.bar.finish_and_clear();
            self.bar = match total {
                Some(total) => {
                    let bar = ProgressBar::new(total);
                    bar.set_style(
                        ProgressStyle::with_template("results    [{bar:40}] {pos}/{len} frames {per_sec} ETA {eta}")
                            .unwrap()
                            .progress_chars("=> "),
                    );
                    bar
                }
                None => {
                    let bar = ProgressBar::new_spinner();
                    bar.set_style(ProgressStyle::with_template("{spinner} results    {pos} frames {per_sec} {elapsed}").unwrap());
                    bar
                }
            };
            self.phase = phase;
        }
        self.bar.set_position(frames);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `total_frames` as the server puts it in an image output's metadata.
fn total_frames(json: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value["serialized_output_data"]
        .as_object()?
        .values()
        .find_map(|output| output["video_metadata"]["total_frames"].as_u64())
        .filter(|total| *total > 0)
}

/// The frames in a video file: its duration times its frame rate, as the
/// file's header says; None when it does not tell.
fn frames_in(path: &str) -> Option<u64> {
    let uri = gst::glib::filename_to_uri(std::fs::canonicalize(path).ok()?, None).ok()?;
    let discoverer = gst_pbutils::Discoverer::new(gst::ClockTime::from_seconds(5)).ok()?;
    let info = discoverer.discover_uri(&uri).ok()?;
    let duration = info.duration()?;
    let video = info.video_streams().into_iter().next()?;
    let rate = video.framerate();
    if rate.numer() <= 0 || rate.denom() <= 0 {
        return None;
    }
    let frames = duration.nseconds() as f64 * f64::from(rate.numer()) / f64::from(rate.denom()) / 1e9;
    Some(frames.round() as u64).filter(|frames| *frames > 0)
}

fn make(factory: &str, properties: &[(&str, &str)]) -> Result<gst::Element, String> {
    let element = gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| format!("the GStreamer element '{factory}' is missing"))?;
    for (name, value) in properties {
        set_from_str(&element, name, value);
    }
    Ok(element)
}

/// Strings are set verbatim (a JSON value must not be parsed as a GValue).
fn set_from_str(element: &gst::Element, name: &str, value: &str) {
    match element.find_property(name) {
        Some(pspec) if pspec.value_type() == gst::glib::Type::STRING => element.set_property(name, value),
        _ => element.set_property_from_str(name, value),
    }
}
