// Arbitrary bytes as a server's answer, error body or frame result: parsing
// and describing must never panic, and redaction must remove every image.
#![no_main]

#[path = "../../src/protocol/mod.rs"]
#[allow(dead_code, unused_imports)]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::{FrameResult, InitialiseAnswer, describe_error_body, find_image, redact_images};

fuzz_target!(|data: &[u8]| {
    let status = data.first().map(|b| 400 + u16::from(*b)).unwrap_or(500);
    let text = describe_error_body(status, data);
    assert!(text.contains(&status.to_string()));
    let _ = serde_json::from_slice::<InitialiseAnswer>(data);
    let _ = serde_json::from_slice::<FrameResult>(data);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let redacted = redact_images(&value);
        let _ = find_image(&value, "image");
        // No base64 image value survives redaction.
        fn no_images(value: &serde_json::Value) -> bool {
            match value {
                serde_json::Value::Object(map) => {
                    let is_image = map.get("type").and_then(|t| t.as_str()) == Some("base64")
                        && map.get("value").and_then(|v| v.as_str()).is_some_and(|v| !v.starts_with('<'));
                    !is_image && map.values().all(no_images)
                }
                serde_json::Value::Array(items) => items.iter().all(no_images),
                _ => true,
            }
        }
        assert!(no_images(&redacted));
    }
});
