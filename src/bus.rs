// The element messages the plugin posts on the bus.

use gst::prelude::*;

use crate::protocol::redact_images;
use crate::session::FrameEvent;

pub const PROGRESS_MESSAGE: &str = "roboflow-upload-progress";
pub const INFERENCE_MESSAGE: &str = "roboflow-inference";

/// The `roboflow-inference` message body for one frame.
pub fn inference_structure(frame: &FrameEvent) -> gst::Structure {
    let pts = frame
        .pts_seconds
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map(|seconds| gst::ClockTime::from_nseconds((seconds * 1e9).round() as u64));
    gst::Structure::builder(INFERENCE_MESSAGE)
        .field("frame-id", frame.frame_id)
        .field("pts", pts)
        .field("json", redact_images(&frame.json).to_string())
        .field("errors", gst::Array::new(frame.errors.iter().map(|e| e.to_send_value())))
        .build()
}
