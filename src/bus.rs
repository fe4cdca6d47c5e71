// The element messages the plugin posts on the bus.

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
pub fn inference_structure(frame: &FrameEvent) -> gst::Structure {
    let pts = frame.source_pts_ns().map(gst::ClockTime::from_nseconds);
    let errors = serde_json::to_string(&frame.errors).expect("a list of strings is JSON");
    let mut builder = gst::Structure::builder(INFERENCE_MESSAGE)
        .field("frame-id", frame.frame_id)
        .field("pts", pts)
        .field("json", redact_images(&frame.json).to_string())
        .field("errors", errors);
    if let Some(live) = &frame.live {
        let latency = live.latency.map(|latency| gst::ClockTime::from_nseconds(latency.as_nanos() as u64));
        builder = builder.field("latency", latency).field("frames-skipped", live.skipped);
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
        let empty = inference_structure(&frame(&[])).to_string();
        assert!(empty.contains(r#"errors=(string)"\[\]""#), "{empty}");
        assert!(empty.contains("pts=(guint64)100000000"), "{empty}");

        let structure = inference_structure(&frame(&["step x failed", "a, \"b\""]));
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
    fn a_pts_no_clock_time_can_carry_is_left_out() {
        gst::init().unwrap();
        for seconds in [-1.0, f64::NAN, 1e12] {
            let event = FrameEvent {
                pts_seconds: Some(seconds),
                ..frame(&[])
            };
            let structure = inference_structure(&event);
            assert_eq!(
                structure.get::<Option<gst::ClockTime>>("pts").unwrap(),
                None
            );
        }
    }
}
