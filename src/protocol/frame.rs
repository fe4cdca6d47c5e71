//! One frame's result document from the `inference` channel (PROTOCOL.md
//! section 5), what is read out of it, and the client's ack (section 7).

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// One frame's result document from the `inference` channel.
///
/// Lenient: unknown fields are ignored and every field may be missing or null.
/// `Serialize` (all fields, absent ones as null) is for test servers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FrameResult {
    pub video_metadata: Option<VideoMetadata>,
    /// Requested outputs by name; null when none were requested.
    pub serialized_output_data: Option<Value>,
    /// Per-frame workflow errors; empty when fine (null reads as empty,
    /// non-string entries as their JSON text).
    #[serde(deserialize_with = "lenient_strings")]
    pub errors: Vec<String>,
    /// True on the final message; null reads as false.
    #[serde(deserialize_with = "null_as_default")]
    pub processing_complete: bool,
    pub termination_reason: Option<String>,
}

impl FrameResult {
    /// Parses a reassembled (decompressed) result document.
    #[cfg(test)]
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// The server's frame number (1-based), if present.
    #[cfg(test)]
    pub fn frame_id(&self) -> Option<u64> {
        self.video_metadata.as_ref().and_then(|m| m.frame_id)
    }
}

/// `video_metadata` of a frame result. Every field may be missing or null.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VideoMetadata {
    /// 1-based frame number.
    pub frame_id: Option<u64>,
    /// ISO 8601 time the server received the frame.
    pub received_at: Option<String>,
    pub pts: Option<i64>,
    /// Seconds per pts unit.
    pub time_base: Option<f64>,
    pub declared_fps: Option<f64>,
    pub measured_fps: Option<f64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

impl VideoMetadata {
    /// The frame's presentation time in seconds (`pts * time_base`).
    pub fn pts_seconds(&self) -> Option<f64> {
        Some(self.pts? as f64 * self.time_base?)
    }

    /// The pts in 90 kHz ticks, mod 2^32: a live track's RTP timestamp
    /// minus the server's first (PROTOCOL.md §10). Exact for the server's
    /// 1/90000 time base, rounded for any other.
    pub fn pts_90khz(&self) -> Option<u32> {
        let (pts, time_base) = (self.pts?, self.time_base?);
        if !(time_base.is_finite() && time_base > 0.0) {
            return None;
        }
        let ticks = if (time_base * 90_000.0 - 1.0).abs() < 1e-9 {
            pts
        } else {
            let ticks = (pts as f64 * time_base * 90_000.0).round();
            if !ticks.is_finite() || ticks.abs() > 9.0e15 {
                return None;
            }
            ticks as i64
        };
        Some(ticks.rem_euclid(1 << 32) as u32)
    }
}

/// A presentation time in seconds as whole nanoseconds, for a buffer
/// timestamp. `None` when no timestamp can carry it: negative, not finite,
/// or past `u64::MAX` ns (GStreamer's "no time"); the server's numbers are
/// not trusted.
pub fn pts_seconds_to_ns(seconds: f64) -> Option<u64> {
    let nanoseconds = (seconds * 1e9).round();
    (nanoseconds >= 0.0 && nanoseconds < u64::MAX as f64).then_some(nanoseconds as u64)
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn lenient_strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let values = Option::<Vec<Value>>::deserialize(deserializer)?.unwrap_or_default();
    Ok(values
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .collect())
}

/// The base64 text of an image value `{"type":"base64","value":"..."}`.
fn image_base64(value: &Value) -> Option<&str> {
    let object = value.as_object()?;
    if object.get("type")?.as_str()? != "base64" {
        return None;
    }
    object.get("value")?.as_str()
}

/// Bytes that a base64 text decodes to (padding and whitespace discounted).
fn base64_decoded_len(text: &str) -> usize {
    let symbols = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .count();
    symbols * 3 / 4
}

fn image_kind(base64: &str) -> &'static str {
    let start = base64.trim_start();
    if start.starts_with("/9j/") {
        "jpeg"
    } else if start.starts_with("iVBORw0KGgo") {
        "png"
    } else {
        "image"
    }
}

/// `value` with every `{"type":"base64","value":"..."}` object, at any
/// depth, having its `value` replaced by a short placeholder such as
/// `"<jpeg base64, 12345 bytes>"` (the decoded size). Other keys, such as an
/// image's `video_metadata`, are kept. For messages, logs and debug output.
/// A value without images comes back borrowed: each frame's result goes
/// through here, and most carry none.
pub fn redact_images(value: &Value) -> Cow<'_, Value> {
    if has_image(value) { Cow::Owned(redacted_copy(value)) } else { Cow::Borrowed(value) }
}

fn has_image(value: &Value) -> bool {
    match value {
        Value::Object(object) => image_base64(value).is_some() || object.values().any(has_image),
        Value::Array(items) => items.iter().any(has_image),
        _ => false,
    }
}

fn redacted_copy(value: &Value) -> Value {
    match value {
        Value::Object(object) => {
            if let Some(base64) = image_base64(value) {
                let mut copy = Map::with_capacity(object.len());
                for (key, item) in object {
                    let item = if key == "value" {
                        Value::String(format!(
                            "<{} base64, {} bytes>",
                            image_kind(base64),
                            base64_decoded_len(base64)
                        ))
                    } else {
                        redacted_copy(item)
                    };
                    copy.insert(key.clone(), item);
                }
                Value::Object(copy)
            } else {
                Value::Object(
                    object
                        .iter()
                        .map(|(key, item)| (key.clone(), redacted_copy(item)))
                        .collect(),
                )
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(redacted_copy).collect()),
        other => other.clone(),
    }
}

/// The base64 text of the image output `output_name`. `value` is either
/// `serialized_output_data` itself or a whole frame result holding it.
pub fn find_image<'a>(value: &'a Value, output_name: &str) -> Option<&'a str> {
    let outputs = match value.get("serialized_output_data") {
        Some(data) if value.get("video_metadata").is_some() || value.get("errors").is_some() => {
            data
        }
        _ => value,
    };
    image_base64(outputs.get(output_name)?)
}

/// `{"ack":N}`: "the client has fully handled frames <= N" (cumulative).
pub fn ack_message(frame_id: u64) -> String {
    format!("{{\"ack\":{frame_id}}}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frame_result_full_example() {
        let json = br#"{
            "video_metadata": {"frame_id": 17, "received_at": "2025-01-01T12:00:00.123456",
                "pts": 51200, "time_base": 7.8125e-05, "declared_fps": 30.0, "measured_fps": 29.5,
                "width": 1280, "height": 720, "comment": "unknown field"},
            "serialized_output_data": {"rgb_color": [10, 20, 30],
                "image": {"type": "base64", "value": "/9j/4AAQ", "video_metadata": {"frame_id": 17}}},
            "errors": ["step x failed"],
            "processing_complete": false,
            "termination_reason": null,
            "other": 5
        }"#;
        let result = FrameResult::from_json(json).unwrap();
        let metadata = result.video_metadata.clone().unwrap();
        assert_eq!(
            metadata,
            VideoMetadata {
                frame_id: Some(17),
                received_at: Some("2025-01-01T12:00:00.123456".to_owned()),
                pts: Some(51200),
                time_base: Some(7.8125e-05),
                declared_fps: Some(30.0),
                measured_fps: Some(29.5),
                width: Some(1280),
                height: Some(720),
            }
        );
        assert_eq!(metadata.pts_seconds(), Some(4.0));
        assert_eq!(metadata.pts_seconds().and_then(pts_seconds_to_ns), Some(4_000_000_000));
        assert_eq!(result.frame_id(), Some(17));
        assert_eq!(result.errors, vec!["step x failed".to_owned()]);
        assert!(!result.processing_complete);
        assert_eq!(result.termination_reason, None);
        let outputs = result.serialized_output_data.as_ref().unwrap();
        assert_eq!(outputs["rgb_color"], json!([10, 20, 30]));
        assert_eq!(find_image(outputs, "image"), Some("/9j/4AAQ"));
    }

    #[test]
    fn frame_result_minimal_with_nulls() {
        let result = FrameResult::from_json(
            br#"{"video_metadata":{"frame_id":null,"pts":null,"time_base":null},
                 "serialized_output_data":null,"errors":null,"processing_complete":null,
                 "termination_reason":null}"#,
        )
        .unwrap();
        assert_eq!(result.video_metadata, Some(VideoMetadata::default()));
        assert_eq!(result.serialized_output_data, None);
        assert!(result.errors.is_empty());
        assert!(!result.processing_complete);
        assert_eq!(result.frame_id(), None);

        let empty = FrameResult::from_json(b"{}").unwrap();
        assert_eq!(empty, FrameResult::default());

        let end = FrameResult::from_json(
            br#"{"video_metadata":null,"processing_complete":true,"termination_reason":"end_of_stream","errors":[1,null,"x"]}"#,
        )
        .unwrap();
        assert!(end.processing_complete);
        assert_eq!(end.termination_reason.as_deref(), Some("end_of_stream"));
        assert_eq!(end.errors, vec!["1".to_owned(), "x".to_owned()]);

        let partial = VideoMetadata {
            pts: Some(3),
            ..VideoMetadata::default()
        };
        assert_eq!(partial.pts_seconds(), None);
        assert_eq!(partial.pts_seconds().and_then(pts_seconds_to_ns), None);
    }

    #[test]
    fn frame_result_round_trips() {
        let result = FrameResult {
            video_metadata: Some(VideoMetadata {
                frame_id: Some(2),
                pts: Some(1000),
                time_base: Some(0.001),
                ..VideoMetadata::default()
            }),
            serialized_output_data: Some(json!({"n": 1})),
            errors: vec![],
            processing_complete: false,
            termination_reason: None,
        };
        let text = serde_json::to_string(&result).unwrap();
        assert_eq!(FrameResult::from_json(text.as_bytes()).unwrap(), result);
    }

    #[test]
    fn redact_images_replaces_only_image_values() {
        let jpeg = "/9j/".to_owned() + &"A".repeat(1996); // 2000 symbols -> 1500 bytes
        let value = json!({
            "video_metadata": {"frame_id": 3},
            "serialized_output_data": {
                "image": {"type": "base64", "value": jpeg, "video_metadata": {"frame_id": 3}},
                "crops": [{"type": "base64", "value": "iVBORw0KGgoAAA=="}],
                "label": {"type": "text", "value": "kept"},
                "value": "kept too"
            }
        });
        let redacted = redact_images(&value);
        assert!(matches!(redacted, Cow::Owned(_)));
        assert_eq!(
            *redacted,
            json!({
                "video_metadata": {"frame_id": 3},
                "serialized_output_data": {
                    "image": {"type": "base64", "value": "<jpeg base64, 1500 bytes>",
                              "video_metadata": {"frame_id": 3}},
                    "crops": [{"type": "base64", "value": "<png base64, 10 bytes>"}],
                    "label": {"type": "text", "value": "kept"},
                    "value": "kept too"
                }
            })
        );
        // The original is untouched.
        assert_eq!(find_image(&value, "image"), Some(jpeg.as_str()));
        // Nothing to redact: no copy.
        let plain = json!({"serialized_output_data": {"rgb_color": [1, 2, 3], "label": {"type": "text", "value": "x"}}});
        assert!(matches!(redact_images(&plain), Cow::Borrowed(v) if *v == plain));
    }

    #[test]
    fn find_image_lookups() {
        let outputs = json!({"image": {"type": "base64", "value": "abc"}, "n": 1,
                             "t": {"type": "text", "value": "no"}});
        assert_eq!(find_image(&outputs, "image"), Some("abc"));
        assert_eq!(find_image(&outputs, "n"), None);
        assert_eq!(find_image(&outputs, "t"), None);
        assert_eq!(find_image(&outputs, "missing"), None);
        let whole = json!({"video_metadata": {}, "serialized_output_data": outputs, "errors": []});
        assert_eq!(find_image(&whole, "image"), Some("abc"));
        assert_eq!(find_image(&json!(null), "image"), None);
    }

    #[test]
    fn ack_messages() {
        assert_eq!(ack_message(0), r#"{"ack":0}"#);
        assert_eq!(ack_message(42), r#"{"ack":42}"#);
        assert_eq!(ack_message(u64::MAX), format!("{{\"ack\":{}}}", u64::MAX));
        let parsed: Value = serde_json::from_str(&ack_message(7)).unwrap();
        assert_eq!(parsed, json!({"ack": 7}));
    }

    #[test]
    fn pts_nanoseconds_only_when_a_timestamp_can_carry_them() {
        assert_eq!(pts_seconds_to_ns(0.0), Some(0));
        assert_eq!(pts_seconds_to_ns(1.0 / 3.0), Some(333_333_333));
        assert_eq!(pts_seconds_to_ns(-0.0), Some(0));
        assert_eq!(pts_seconds_to_ns(-1e-3), None);
        assert_eq!(pts_seconds_to_ns(f64::NAN), None);
        assert_eq!(pts_seconds_to_ns(f64::INFINITY), None);
        // 2^64 ns would read as GST_CLOCK_TIME_NONE: refused, never saturated.
        assert_eq!(pts_seconds_to_ns(18_446_744_073.709_553), None);
        assert_eq!(pts_seconds_to_ns(1e12), None);
        assert!(pts_seconds_to_ns(18_446_744_000.0).is_some());
    }
}
