//! What an application that embeds GStreamer calls to read detections:
//! runs a video file through a Workflow and, from an appsink, reads each
//! returned frame's GstVideoRegionOfInterestMeta (one per detected box, in
//! the frame's pixels) and its RoboflowInferenceMeta (the frame's result),
//! printing one line per frame and a summary.
//!
//! ```sh
//! cargo run --release --example read_detections -- clip.mp4 \
//!     --workflow-spec-file examples/workflows/template-match.json \
//!     --workflow-parameters '{"template": {"type": "base64", "value": "..."}}' \
//!     --stream-output annotated --data-output predictions
//! ```
//!
//! Any roboflowuploadsink property is passed as --name value (--api-url
//! defaults to http://127.0.0.1:9001). A stream output is needed: the boxes
//! ride on the returned frames.

use std::sync::{Arc, Mutex};

use gst::prelude::*;
use gst_video::VideoRegionOfInterestMeta;

fn usage() -> ! {
    eprintln!("usage: read_detections INPUT --stream-output NAME [--PROPERTY VALUE ...] (any roboflowuploadsink property)");
    std::process::exit(2);
}

/// One box as an application sees it.
struct Region {
    class: String,
    rect: (u32, u32, u32, u32),
    confidence: Option<f64>,
    output: Option<String>,
}

/// Reads the regions of one frame. The `detection` param holds the rest of
/// the box: output, class, confidence, class-id, detection-id, tracker-id,
/// the box in the predictions' image (x, y, width, height, image-width,
/// image-height) and relative to the frame (x_min, y_min, x_max, y_max).
fn regions(buffer: &gst::BufferRef) -> Vec<Region> {
    buffer
        .iter_meta::<VideoRegionOfInterestMeta>()
        .map(|meta| {
            let detection = meta.param("detection");
            Region {
                class: meta.roi_type().to_owned(),
                rect: meta.rect(),
                confidence: detection.and_then(|d| d.get::<f64>("confidence").ok()),
                output: detection.and_then(|d| d.get::<String>("output").ok()),
            }
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut input = None;
    let mut properties = Vec::new();
    while let Some(arg) = args.next() {
        match arg.strip_prefix("--") {
            Some("help") => usage(),
            Some(name) => properties.push((name.to_owned(), args.next().unwrap_or_else(|| usage()))),
            None if input.is_none() => input = Some(arg),
            None => usage(),
        }
    }
    let Some(input) = input else { usage() };
    if !properties.iter().any(|(name, _)| name == "stream-output") {
        usage();
    }
    if let Err(message) = run(&input, &properties) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run(input: &str, properties: &[(String, String)]) -> Result<(), String> {
    gst::init().map_err(|e| e.to_string())?;
    gstroboflow::plugin_register_static().map_err(|e| e.to_string())?;

    let pipeline = gst::parse::launch(
        "filesrc name=file ! roboflowuploadsink name=upload session=read_detections \
         roboflowresultsrc session=read_detections ! videoconvert ! appsink name=out sync=false",
    )
    .map_err(|e| e.to_string())?
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline.by_name("file").unwrap().set_property("location", input);
    let upload = pipeline.by_name("upload").unwrap();
    for (name, value) in properties {
        match upload.find_property(name) {
            Some(pspec) if pspec.value_type() == gst::glib::Type::STRING => upload.set_property(name, value),
            Some(_) => upload.set_property_from_str(name, value),
            None => return Err(format!("roboflowuploadsink has no property '{name}'")),
        }
    }

    // (frames, frames with boxes, boxes)
    let counts = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
    let appsink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
    let sink_counts = counts.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().ok_or(gst::FlowError::Error)?;
                let frame_id = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME)
                    .ok()
                    .and_then(|meta| meta.structure().get::<u64>("frame-id").ok());
                let found = regions(buffer);
                let described: Vec<String> = found
                    .iter()
                    .map(|r| {
                        let (x, y, w, h) = r.rect;
                        format!(
                            "{} {w}x{h} at ({x}, {y}) {:.2} [{}]",
                            r.class,
                            r.confidence.unwrap_or(f64::NAN),
                            r.output.as_deref().unwrap_or("?")
                        )
                    })
                    .collect();
                let frame = frame_id.map_or("?".to_owned(), |id| id.to_string());
                println!("frame {frame} pts {}: {} boxes {}", buffer.pts().display(), found.len(), described.join(", "));
                let mut counts = sink_counts.lock().unwrap();
                counts.0 += 1;
                counts.1 += u64::from(!found.is_empty());
                counts.2 += found.len() as u64;
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );

    pipeline.set_state(gst::State::Playing).map_err(|_| "the pipeline does not start".to_owned())?;
    let bus = pipeline.bus().unwrap();
    let mut outcome = Ok(());
    for message in bus.iter_timed(gst::ClockTime::NONE) {
        match message.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(err) => {
                outcome = Err(err.error().to_string());
                break;
            }
            _ => {}
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    outcome?;
    let (frames, with_boxes, boxes) = *counts.lock().unwrap();
    println!("summary: {frames} frames, {with_boxes} with boxes, {boxes} boxes");
    Ok(())
}
