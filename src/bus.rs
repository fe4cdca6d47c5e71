// The element messages the plugin posts on the bus.

use crate::protocol::detections::{Detection, FrameDetections, frame_detections};
use crate::protocol::redact_images;
use std::time::Duration;

use crate::session::{FrameEvent, SessionStats};

pub const PROGRESS_MESSAGE: &str = "roboflow-upload-progress";
pub const INFERENCE_MESSAGE: &str = "roboflow-inference";
/// Posted once by roboflowresultsrc at EOS: its final `stats`.
pub const SUMMARY_MESSAGE: &str = "roboflow-result-summary";

/// The `roboflow-upload-progress` message body.
pub fn progress_structure(stats: &SessionStats, percent: u64, elapsed: Duration, last: bool) -> gst::Structure {
    gst::Structure::builder(PROGRESS_MESSAGE)
        .field("uploaded-bytes", stats.bytes_sent)
        .field("total-bytes", stats.total_bytes)
        .field("uploaded-chunks", stats.chunks_sent)
        .field("total-chunks", stats.total_chunks)
        .field("percent", percent as f64)
        .field("elapsed", gst::ClockTime::from_nseconds(elapsed.as_nanos() as u64))
        .field("final", last)
        .build()
}

/// Posted once by roboflowuploadsink before its EOS: its final `stats`.
pub const UPLOAD_SUMMARY_MESSAGE: &str = "roboflow-upload-summary";

/// The `roboflow-upload-summary` message body: the sink's final stats.
pub fn upload_summary_structure(mut stats: gst::Structure) -> gst::Structure {
    stats.set_name(UPLOAD_SUMMARY_MESSAGE);
    stats
}

/// The `roboflow-result-summary` message body: the source's final stats.
pub fn summary_structure(mut stats: gst::Structure) -> gst::Structure {
    stats.set_name(SUMMARY_MESSAGE);
    stats
}

/// The `roboflow-inference` message body for one frame.
///
/// `errors` is a string holding a JSON array of strings, not a typed list:
/// GStreamer 1.22 prints an empty GstValueArray as `(int)< >` (an empty
/// array's type is taken as int) and a GStrv field as `(GStrv)NULL` even
/// when it has items, so neither reads right in `gst-launch-1.0 -m`.
///
/// Live video: `pts` is the PTS of the buffer the result belongs to (None
/// when no frame sent matches), `latency` the time from that buffer reaching
/// the sink to the result's arrival, and `frames-skipped` the frames sent
/// before it that got no result.
///
/// `detections` lists every box of the result's detections outputs
/// ([`detection_structure`]), `detections-skipped` counts the predictions
/// that are no usable box; that count is also returned, for the caller's
/// statistics.
pub fn inference_structure(frame: &FrameEvent) -> (gst::Structure, u32) {
    let pts = frame.source_pts_ns().map(gst::ClockTime::from_nseconds);
    let errors = serde_json::to_string(&frame.errors).expect("a list of strings is JSON");
    let found = frame_detections(&frame.json);
    let mut builder = gst::Structure::builder(INFERENCE_MESSAGE)
        .field("frame-id", frame.frame_id)
        .field("pts", pts)
        .field("json", redact_images(&frame.json).to_string())
        .field("errors", errors)
        .field("detections", detections_array(&found))
        .field("detections-skipped", found.skipped);
    if let Some(live) = &frame.live {
        let latency = live.latency.map(|latency| gst::ClockTime::from_nseconds(latency.as_nanos() as u64));
        builder = builder.field("latency", latency).field("frames-skipped", live.skipped);
    }
    (builder.build(), found.skipped)
}

/// Name of the structure describing one detected object: an item of the
/// `detections` field, and the param of its GstVideoRegionOfInterestMeta.
pub const DETECTION: &str = "detection";

/// The `detections` field: one [`detection_structure`] per box.
pub fn detections_array(found: &FrameDetections) -> gst::Array {
    gst::Array::new(found.detections.iter().map(detection_structure))
}

/// One detected object:
/// - `output` (the Workflow output), `class`, `confidence` (double),
///   `class-id` (int), `detection-id` (string) and `tracker-id` (int64),
///   each of the last three only when the server sent it;
/// - `x`, `y`, `width`, `height` (double): the box, top-left corner and
///   size, in pixels of the image the predictions refer to, whose size is
///   `image-width`, `image-height` (uint) when the result tells it.
pub fn detection_structure(detection: &Detection) -> gst::Structure {
    let mut builder = gst::Structure::builder(DETECTION)
        .field("output", detection.output.as_str())
        .field("class", detection.class.as_str())
        .field("confidence", detection.confidence)
        .field_if_some("class-id", detection.class_id.and_then(|id| i32::try_from(id).ok()))
        .field_if_some("detection-id", detection.detection_id.as_deref())
        .field_if_some("tracker-id", detection.tracker_id)
        .field("x", detection.rect.left)
        .field("y", detection.rect.top)
        .field("width", detection.rect.width)
        .field("height", detection.rect.height);
    if let Some(image) = detection.image {
        builder = builder.field("image-width", image.width).field("image-height", image.height);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(errors: &[&str]) -> FrameEvent {
        FrameEvent {
            frame_id: 3,
            pts_seconds: Some(0.1),
            errors: errors.iter().map(|e| (*e).to_owned()).collect(),
            json: serde_json::json!({"errors": errors}),
            pts_90khz: Some(9000),
            live: None,
        }
    }

    #[test]
    fn errors_read_as_a_list_of_strings_when_printed() {
        gst::init().unwrap();
        let empty = inference_structure(&frame(&[])).0.to_string();
        assert!(empty.contains(r#"errors=(string)"\[\]""#), "{empty}");
        assert!(empty.contains("pts=(guint64)100000000"), "{empty}");

        let (structure, _) = inference_structure(&frame(&["step x failed", "a, \"b\""]));
        let text = structure.to_string();
        assert!(
            text.contains(r#"errors=(string)"\[\"step\ x\ failed\""#),
            "{text}"
        );
        let errors: Vec<String> =
            serde_json::from_str(structure.get::<&str>("errors").unwrap()).unwrap();
        assert_eq!(errors, ["step x failed", "a, \"b\""]);
    }

    #[test]
    fn detections_are_listed_as_structures() {
        gst::init().unwrap();
        let event = FrameEvent {
            json: serde_json::json!({
                "video_metadata": {"width": 64, "height": 48},
                "serialized_output_data": {"found": {"image": {"width": 64, "height": 48}, "predictions": [
                    {"x": 10, "y": 10, "width": 4, "height": 6, "confidence": 0.8, "class": "ball", "class_id": 1, "detection_id": "d"},
                    {"x": 10, "y": 10, "width": 4, "height": null, "confidence": 0.8, "class": "ball"},
                ]}},
            }),
            ..frame(&[])
        };
        let (structure, skipped) = inference_structure(&event);
        assert_eq!(structure.get::<u32>("detections-skipped").unwrap(), 1);
        assert_eq!(skipped, 1, "the count returned is the message's");
        let detections = structure.get::<gst::ArrayRef>("detections").unwrap();
        let boxes: Vec<gst::Structure> = detections.as_slice().iter().map(|v| v.get().unwrap()).collect();
        assert_eq!(boxes.len(), 1);
        assert_eq!(
            boxes[0].to_string(),
            "detection, output=(string)found, class=(string)ball, confidence=(double)0.80000000000000004, \
             class-id=(int)1, detection-id=(string)d, x=(double)8, y=(double)7, width=(double)4, height=(double)6, \
             image-width=(uint)64, image-height=(uint)48;"
        );
        // No detections output: an empty list, nothing skipped.
        let (plain, _) = inference_structure(&frame(&[]));
        assert!(plain.get::<gst::ArrayRef>("detections").unwrap().as_slice().is_empty());
        assert_eq!(plain.get::<u32>("detections-skipped").unwrap(), 0);
    }

    #[test]
    fn a_pts_no_clock_time_can_carry_is_left_out() {
        gst::init().unwrap();
        for seconds in [-1.0, f64::NAN, 1e12] {
            let event = FrameEvent {
                pts_seconds: Some(seconds),
                ..frame(&[])
            };
            let (structure, _) = inference_structure(&event);
            assert_eq!(
                structure.get::<Option<gst::ClockTime>>("pts").unwrap(),
                None
            );
        }
    }
}
