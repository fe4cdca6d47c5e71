//! One camera session as an application runs it, the client side of
//! `scripts/bench_camera.sh` (which runs `scripts/bench_camera_sdk.py` the
//! same way for the Python SDK's RTSPSource):
//!
//! ```sh
//! cargo build --release --lib --example bench_camera
//! GST_PLUGIN_PATH=target/release target/release/examples/bench_camera \
//!     --source-url rtsp://127.0.0.1:8554/camera --api-url http://127.0.0.1:9001 \
//!     --workflow-spec-file examples/workflows/blur-dominant-color.json \
//!     --data-output rgb_color --stream-output blurred --realtime 1 \
//!     --results-file results.json
//! ```
//!
//! The pipeline: `roboflowresultsrc source-url=... video-transport=track
//! ! fakesink` (`--sink fakevideosink`: a sink that accepts GstVideoMeta,
//! as display sinks, videoconvert and encoders do, so that vp8dec hands on
//! libvpx's frame without copying it). The application's share of the
//! work is what the SDK script's `on_data` handler does: for every
//! `roboflow-inference` message it parses the result's JSON and keeps the
//! data output's value and the frame's pts. Nothing is printed per result (`gst-launch-1.0 -m`, the
//! other way to run the benchmark, prints every message in full). The
//! decoded frames reach the sink, as the SDK's reach its `on_frame`.
//!
//! At the end it writes `--results-file` (a JSON list of
//! `{"rgb": ..., "pts_seconds": ...}` in arrival order) and prints one JSON
//! line: results, the source's final stats (from roboflow-result-summary),
//! the error if the pipeline failed. Exit status 0 on EOS, 1 on an error.

use std::time::{Duration, Instant};

use gst::prelude::*;

struct Options {
    source_url: String,
    api_url: String,
    workflow_spec_file: String,
    data_output: String,
    stream_output: String,
    realtime: bool,
    results_file: Option<String>,
    timeout: Duration,
    sink: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench_camera --source-url URL --api-url URL --workflow-spec-file FILE --data-output NAME \
         --stream-output NAME [--realtime 0|1] [--results-file FILE] [--timeout SECONDS] [--sink ELEMENT]"
    );
    std::process::exit(2);
}

fn parse_options() -> Options {
    let mut options = Options {
        source_url: String::new(),
        api_url: String::new(),
        workflow_spec_file: String::new(),
        data_output: String::new(),
        stream_output: String::new(),
        realtime: true,
        results_file: None,
        timeout: Duration::from_secs(600),
        sink: "fakesink".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--source-url" => options.source_url = value,
            "--api-url" => options.api_url = value,
            "--workflow-spec-file" => options.workflow_spec_file = value,
            "--data-output" => options.data_output = value,
            "--stream-output" => options.stream_output = value,
            "--realtime" => options.realtime = value == "1" || value == "true",
            "--results-file" => options.results_file = Some(value),
            "--sink" => options.sink = value,
            "--timeout" => options.timeout = Duration::from_secs(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    if options.source_url.is_empty() || options.api_url.is_empty() || options.workflow_spec_file.is_empty() {
        usage();
    }
    options
}

/// A result's pts in seconds (video_metadata's pts x time_base), as the
/// SDK script computes it.
fn pts_seconds(result: &serde_json::Value) -> Option<f64> {
    let metadata = result.get("video_metadata")?;
    let pts = metadata.get("pts")?.as_f64()?;
    let time_base = metadata.get("time_base")?.as_f64()?;
    Some(pts * time_base)
}

fn main() {
    let options = parse_options();
    if let Err(err) = gst::init() {
        eprintln!("bench_camera: GStreamer did not initialise: {err}");
        std::process::exit(1);
    }
    let source = match gst::ElementFactory::make("roboflowresultsrc")
        .property("source-url", &options.source_url)
        .property("api-url", &options.api_url)
        .property("workflow-spec-file", &options.workflow_spec_file)
        .property("data-output", &options.data_output)
        .property("stream-output", &options.stream_output)
        .property_from_str("video-transport", "track")
        .property("realtime-processing", options.realtime)
        .build()
    {
        Ok(source) => source,
        Err(_) => {
            eprintln!("bench_camera: no roboflowresultsrc: set GST_PLUGIN_PATH to the directory of libgstroboflow.so");
            std::process::exit(1);
        }
    };
    let sink = match gst::ElementFactory::make(&options.sink).build() {
        Ok(sink) => sink,
        Err(_) => {
            eprintln!("bench_camera: no element {}", options.sink);
            std::process::exit(1);
        }
    };
    let pipeline = gst::Pipeline::new();
    pipeline.add_many([&source, &sink]).expect("elements added once");
    source.link(&sink).expect("roboflowresultsrc links to the sink");

    let bus = pipeline.bus().expect("a pipeline has a bus");
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut summary = serde_json::Map::new();
    let mut error: Option<String> = None;
    if pipeline.set_state(gst::State::Playing).is_err() {
        error = Some("the pipeline did not start".to_owned());
    }
    let deadline = Instant::now() + options.timeout;
    while error.is_none() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            error = Some(format!("no end within {:?}", options.timeout));
            break;
        };
        let Some(message) = bus.timed_pop(gst::ClockTime::from_nseconds(left.as_nanos() as u64)) else {
            continue;
        };
        match message.view() {
            gst::MessageView::Element(element) => {
                let Some(structure) = element.structure() else { continue };
                match structure.name().as_str() {
                    "roboflow-inference" => {
                        let result = structure
                            .get::<&str>("json")
                            .ok()
                            .and_then(|json| serde_json::from_str::<serde_json::Value>(json).ok())
                            .unwrap_or_default();
                        let rgb = result
                            .get("serialized_output_data")
                            .and_then(|data| data.get(&options.data_output))
                            .cloned()
                            .unwrap_or_default();
                        results.push(serde_json::json!({"rgb": rgb, "pts_seconds": pts_seconds(&result)}));
                    }
                    "roboflow-result-summary" => {
                        for (name, value) in structure.iter() {
                            if let Ok(count) = value.get::<u64>() {
                                summary.insert(name.to_string(), count.into());
                            }
                        }
                    }
                    _ => {}
                }
            }
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(err) => error = Some(err.error().to_string()),
            _ => {}
        }
    }
    let _ = pipeline.set_state(gst::State::Null);

    if let Some(path) = &options.results_file
        && let Err(err) = std::fs::write(path, serde_json::to_string(&results).expect("JSON values serialise"))
    {
        eprintln!("bench_camera: {path}: {err}");
    }
    let line = serde_json::json!({
        "client": "bench_camera (roboflowresultsrc)",
        "results": results.len(),
        "frames_decoded": summary.get("frames-pushed"),
        "frames_delivered": summary.get("frames-pushed"),
        "stats": summary,
        "error": error,
    });
    println!("{line}");
    std::process::exit(if error.is_some() { 1 } else { 0 });
}
