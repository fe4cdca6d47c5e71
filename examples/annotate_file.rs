//! Runs a video file through a Roboflow Workflow and writes the returned
//! video to an MP4 and every frame's result to a JSON-lines file.
//!
//! ```sh
//! cargo run --release --example annotate_file -- clip.mp4 \
//!     --workflow-spec-file examples/workflows/blur-dominant-color.json \
//!     --stream-output blurred --data-output rgb_color \
//!     --output annotated.mp4 --results results.jsonl
//! ```
//!
//! Options: --api-url URL (default http://127.0.0.1:9001), --api-key KEY
//! (default $ROBOFLOW_API_KEY), --workflow-spec-file FILE | --workspace W
//! --workflow-id ID | --model-id ID, --stream-output NAME (the image output
//! to return as video; none: results only), --data-output LIST,
//! --video-transport datachannel|track, --output FILE, --results FILE.

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
        "usage: annotate_file INPUT [--api-url URL] [--api-key KEY] \
         (--workflow-spec-file FILE | --workspace W --workflow-id ID | --model-id ID) \
         [--stream-output NAME] [--data-output LIST] [--video-transport datachannel|track] \
         [--output annotated.mp4] [--results results.jsonl]"
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
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message("upload");

    let started = Instant::now();
    // The upload is over for the server when its first result arrives: the
    // honest upload time runs from the first chunk sent to that result.
    let mut first_chunk: Option<Instant> = None;
    let mut upload_done: Option<(u64, f64)> = None;
    let mut total_bytes = 0u64;
    let mut frames = 0u64;
    let bus = pipeline.bus().unwrap();
    pipeline.set_state(gst::State::Playing).map_err(|_| "the pipeline does not start".to_owned())?;
    let outcome = loop {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_seconds(1)) else { continue };
        match message.view() {
            gst::MessageView::Eos(_) => break Ok(()),
            gst::MessageView::Error(err) => break Err(format!("{}", err.error())),
            gst::MessageView::Element(element) => {
                let Some(structure) = element.structure() else { continue };
                match structure.name().as_str() {
                    "roboflow-upload-progress" => {
                        let total = structure.get::<u64>("total-bytes").unwrap_or(0);
                        let done = structure.get::<u64>("uploaded-bytes").unwrap_or(0);
                        total_bytes = total;
                        if first_chunk.is_none() {
                            let elapsed = structure.get::<gst::ClockTime>("elapsed").map(|t| t.seconds_f64()).unwrap_or(0.0);
                            first_chunk = Instant::now().checked_sub(std::time::Duration::from_secs_f64(elapsed));
                        }
                        bar.set_length(total);
                        bar.set_position(done);
                        if structure.get::<bool>("final").unwrap_or(false) {
                            bar.finish_and_clear();
                            bar.reset();
                            bar.set_style(ProgressStyle::with_template("{msg:10} {pos} frames {per_sec}").unwrap());
                            bar.set_message("results");
                        }
                    }
                    "roboflow-inference" => {
                        if upload_done.is_none()
                            && let Some(first) = first_chunk
                        {
                            upload_done = Some((total_bytes, first.elapsed().as_secs_f64()));
                        }
                        frames += 1;
                        bar.set_position(frames);
                        if let Ok(json) = structure.get::<&str>("json") {
                            writeln!(jsonl, "{json}").map_err(|e| format!("writing {}: {e}", options.results))?;
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    };
    bar.finish_and_clear();
    let _ = pipeline.set_state(gst::State::Null);
    jsonl.flush().map_err(|e| e.to_string())?;
    outcome?;

    let elapsed = started.elapsed();
    println!("frames:      {frames}");
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
