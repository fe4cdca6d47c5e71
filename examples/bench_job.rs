//! One benchmark job: uploads a file through `roboflowuploadsink` and prints
//! one JSON line of timings, the client side of `scripts/bench.sh` (which
//! runs `scripts/bench_sdk.py` the same way for the Python SDK).
//!
//! ```sh
//! cargo build --release --lib --example bench_job
//! target/release/examples/bench_job --mode data --file clip.mp4 \
//!     --workflow-spec-file examples/workflows/blur-dominant-color.json \
//!     --data-output rgb_color [--stream-output blurred] [--api-url URL]
//! ```
//!
//! Modes:
//! - `data`: `filesrc ! roboflowuploadsink data-output=...`, results only.
//! - `frames`: adds `roboflowresultsrc ! appsink`; the image output named by
//!   `--stream-output` comes back as JPEG on the data channel, every frame,
//!   and is decoded to raw video before it reaches the appsink.
//!
//! Times are monotonic seconds since the pipeline was set to PLAYING:
//! `first_chunk_time` (the first chunk handed to the data channel: the
//! first `roboflow-upload-progress` minus its `elapsed`, which counts from
//! that chunk), `last_chunk_time` (the final progress message),
//! `first_result_time` (the first `roboflow-inference` message) and
//! `total_time` (EOS or error, after the pipeline is back in NULL). Bus
//! messages are stamped in a sync handler, in the thread that posts them.
//! Exit status 1 when the job ended with an error (its text is in `error`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use gst::prelude::*;

struct Options {
    /// Extra `--set name=value` sink properties (numbers, enums, booleans).
    sets: Vec<(String, String)>,
    mode: String,
    file: String,
    api_url: Option<String>,
    workflow_spec_file: String,
    stream_output: Option<String>,
    data_output: Option<String>,
}

#[derive(Default)]
struct Stamps {
    first_chunk: Option<f64>,
    last_chunk: Option<f64>,
    first_result: Option<f64>,
    frames: u64,
    bytes_uploaded: u64,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_job --mode data|frames --file PATH --workflow-spec-file FILE \
         [--data-output LIST] [--stream-output NAME] [--api-url URL]"
    );
    std::process::exit(2);
}

fn parse_options() -> Options {
    let mut options = Options {
        sets: Vec::new(),
        mode: "data".into(),
        file: String::new(),
        api_url: None,
        workflow_spec_file: String::new(),
        stream_output: None,
        data_output: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--mode" => options.mode = value(),
            "--file" => options.file = value(),
            "--api-url" => options.api_url = Some(value()),
            "--workflow-spec-file" => options.workflow_spec_file = value(),
            "--stream-output" => options.stream_output = Some(value()),
            "--data-output" => options.data_output = Some(value()),
            "--set" => {
                let pair = value();
                let (name, value) = pair.split_once('=').unwrap_or_else(|| usage());
                options.sets.push((name.to_owned(), value.to_owned()));
            }
            _ => usage(),
        }
    }
    let frames_need_output = options.mode == "frames" && options.stream_output.is_none();
    if options.file.is_empty() || options.workflow_spec_file.is_empty() || frames_need_output {
        usage();
    }
    if options.mode != "data" && options.mode != "frames" {
        usage();
    }
    options
}

fn main() {
    let options = parse_options();
    let report = match run(&options) {
        Ok(report) => report,
        Err(message) => {
            eprintln!("bench_job: {message}");
            std::process::exit(2);
        }
    };
    println!("{report}");
    if !report["error"].is_null() {
        std::process::exit(1);
    }
}

fn make(factory: &str) -> Result<gst::Element, String> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| format!("the GStreamer element '{factory}' is missing"))
}

fn run(options: &Options) -> Result<serde_json::Value, String> {
    gst::init().map_err(|e| e.to_string())?;
    gstroboflow::plugin_register_static().map_err(|e| e.to_string())?;
    let bytes = std::fs::metadata(&options.file)
        .map_err(|e| format!("cannot read {}: {e}", options.file))?
        .len();

    let pipeline = gst::Pipeline::new();
    let source = make("filesrc")?;
    source.set_property("location", &options.file);
    let upload = make("roboflowuploadsink")?;
    // Strings verbatim (set_property, not from_str): paths and JSON must not
    // be parsed as GValues.
    upload.set_property("workflow-spec-file", &options.workflow_spec_file);
    for (name, value) in &options.sets {
        upload.set_property_from_str(name, value);
    }
    if let Some(url) = &options.api_url {
        upload.set_property("api-url", url);
    }
    if let Some(outputs) = &options.data_output {
        upload.set_property("data-output", outputs);
    }
    pipeline.add_many([&source, &upload]).map_err(|e| e.to_string())?;
    source.link(&upload).map_err(|e| e.to_string())?;

    let video_frames = Arc::new(AtomicU64::new(0));
    if options.mode == "frames" {
        let session = "bench_job";
        upload.set_property("session", session);
        upload.set_property("stream-output", options.stream_output.as_deref().unwrap_or_default());
        let results = make("roboflowresultsrc")?;
        results.set_property("session", session);
        let counter = video_frames.clone();
        // sync=false: count frames as they arrive, not at their pts.
        let sink = gst_app::AppSink::builder()
            .sync(false)
            .callbacks(
                gst_app::AppSinkCallbacks::builder()
                    .new_sample(move |sink| {
                        let _sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok(gst::FlowSuccess::Ok)
                    })
                    .build(),
            )
            .build();
        pipeline
            .add_many([&results, sink.upcast_ref::<gst::Element>()])
            .map_err(|e| e.to_string())?;
        results.link(&sink).map_err(|e| e.to_string())?;
    }

    let started = Instant::now();
    let stamps = Arc::new(Mutex::new(Stamps::default()));
    let bus = pipeline.bus().expect("a pipeline has a bus");
    {
        let stamps = stamps.clone();
        bus.set_sync_handler(move |_bus, message| {
            if let gst::MessageView::Element(element) = message.view()
                && let Some(structure) = element.structure()
            {
                let now = started.elapsed().as_secs_f64();
                let mut stamps = stamps.lock().unwrap();
                match structure.name().as_str() {
                    "roboflow-upload-progress" => {
                        let elapsed = structure
                            .get::<gst::ClockTime>("elapsed")
                            .map(|t| t.seconds_f64())
                            .unwrap_or(0.0);
                        let chunks = structure.get::<u64>("uploaded-chunks").unwrap_or(0);
                        if chunks >= 1 && stamps.first_chunk.is_none() {
                            stamps.first_chunk = Some(now - elapsed);
                        }
                        stamps.last_chunk = Some(now);
                        stamps.bytes_uploaded = structure.get::<u64>("uploaded-bytes").unwrap_or(0);
                    }
                    "roboflow-inference" => {
                        stamps.first_result.get_or_insert(now);
                        stamps.frames += 1;
                    }
                    _ => {}
                }
            }
            gst::BusSyncReply::Pass
        });
    }

    pipeline
        .set_state(gst::State::Playing)
        .map_err(|_| "the pipeline does not start".to_owned())?;
    let mut error = None;
    for message in bus.iter_timed(gst::ClockTime::NONE) {
        match message.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(err) => {
                error = Some(format!("{} ({})", err.error(), err.debug().unwrap_or_default()));
                break;
            }
            _ => {}
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    let total_time = started.elapsed().as_secs_f64();
    bus.unset_sync_handler();

    let stamps = stamps.lock().unwrap();
    Ok(serde_json::json!({
        "client": "gst-roboflow",
        "mode": options.mode,
        "file": options.file,
        "bytes": bytes,
        "bytes_uploaded": stamps.bytes_uploaded,
        "first_chunk_time": stamps.first_chunk,
        "last_chunk_time": stamps.last_chunk,
        "first_result_time": stamps.first_result,
        "total_time": total_time,
        "frames": stamps.frames,
        "video_frames": video_frames.load(Ordering::Relaxed),
        "error": error,
    }))
}
