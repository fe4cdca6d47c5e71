//! Live video for the tests: frames that tell themselves apart by colour.
//!
//! [`paint_frames`] fills each RGB buffer leaving an element with the colour
//! of its index (the buffer's offset, as videotestsrc numbers them) and
//! records which PTS carried which index, so a result paired with a PTS
//! can be checked against the colour the Workflow saw.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gst::prelude::*;

/// Channel levels: 7 per channel, 36 apart (343 colours), far enough apart
/// for VP8/H.264 and the RGB/YUV round trip to keep them distinct.
const LEVELS: [u8; 7] = [16, 52, 88, 124, 160, 196, 232];
/// How far a channel may drift from its level and still read as it.
const MAX_DRIFT: f64 = 14.0;

/// The colour of frame `index` (mod 343).
pub fn colour(index: u64) -> [u8; 3] {
    let i = (index % 343) as usize;
    [LEVELS[i / 49], LEVELS[(i / 7) % 7], LEVELS[i % 7]]
}

/// The index (mod 343) whose colour `rgb` is, if it is one.
pub fn index_of(rgb: [f64; 3]) -> Option<u64> {
    let level = |value: f64| {
        LEVELS
            .iter()
            .position(|level| (f64::from(*level) - value).abs() <= MAX_DRIFT)
    };
    Some((level(rgb[0])? * 49 + level(rgb[1])? * 7 + level(rgb[2])?) as u64)
}

/// The `rgb_color` of a result's JSON (the dominant colour Workflow).
pub fn rgb_color(json: &serde_json::Value) -> Option<[f64; 3]> {
    let value = json.get("serialized_output_data")?.get("rgb_color")?;
    let values: Vec<f64> = value.as_array()?.iter().filter_map(|v| v.as_f64()).collect();
    (values.len() == 3).then(|| [values[0], values[1], values[2]])
}

/// Which index each PTS carried, as painted.
pub type Painted = Arc<Mutex<HashMap<u64, u64>>>;

/// Paints every buffer leaving `element` (RGB video) with the colour of
/// its offset and records PTS -> offset.
pub fn paint_frames(element: &gst::Element) -> Painted {
    let painted: Painted = Arc::default();
    let record = painted.clone();
    element.static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(buffer) = info.buffer_mut() {
            let index = buffer.offset();
            let buffer = buffer.make_mut();
            if let Some(pts) = buffer.pts() {
                record.lock().unwrap().insert(pts.nseconds(), index);
            }
            let [r, g, b] = colour(index);
            if let Ok(mut map) = buffer.map_writable() {
                for pixel in map.chunks_exact_mut(3) {
                    pixel.copy_from_slice(&[r, g, b]);
                }
            }
        }
        gst::PadProbeReturn::Ok
    });
    painted
}
