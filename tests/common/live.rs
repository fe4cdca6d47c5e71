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

use super::harness::Outcome;

/// Channel levels: 5 per channel, 55 apart (125 colours), far enough apart
/// for VP8/H.264, twice, and the RGB/YUV round trips to keep them distinct
/// (the server's returned track darkens its first frames by up to 18).
const LEVELS: [u8; 5] = [20, 75, 130, 185, 240];
pub const COLOURS: u64 = 125;
/// How far a channel may drift from its level and still read as it.
const MAX_DRIFT: f64 = 25.0;

/// The colour of frame `index` (mod [`COLOURS`]).
pub fn colour(index: u64) -> [u8; 3] {
    let i = (index % COLOURS) as usize;
    [LEVELS[i / 25], LEVELS[(i / 5) % 5], LEVELS[i % 5]]
}

/// The index (mod [`COLOURS`]) whose colour `rgb` is, if it is one.
pub fn index_of(rgb: [f64; 3]) -> Option<u64> {
    let level = |value: f64| {
        LEVELS
            .iter()
            .position(|level| (f64::from(*level) - value).abs() <= MAX_DRIFT)
    };
    Some((level(rgb[0])? * 25 + level(rgb[1])? * 5 + level(rgb[2])?) as u64)
}

/// Of the frames next to `index`, the one whose colour is nearest `rgb`:
/// for colours encoded twice (the server's returned track re-encodes what
/// it received), where the drift can pass a level, a shifted pairing
/// still shows as a neighbour being nearer.
pub fn nearest_neighbour(rgb: [f64; 3], index: u64) -> u64 {
    let distance = |i: u64| -> f64 {
        let c = colour(i);
        (0..3).map(|k| (f64::from(c[k]) - rgb[k]).powi(2)).sum()
    };
    // Own index first: a tie keeps it.
    let candidates = [index, index.saturating_sub(1), index + 1];
    *candidates
        .iter()
        .min_by(|a, b| distance(**a).total_cmp(&distance(**b)))
        .unwrap()
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

/// Checks each live result against the frame it was paired with: the
/// Workflow's dominant colour is the colour of the buffer whose PTS the
/// result carries. An encoder between the painter and the sink may move
/// every PTS by a constant (x264enc: 1000 hours), read off the first result.
/// Returns the frame indices, in message order.
pub fn check_pairing(outcome: &Outcome, painted: &Painted) -> Vec<u64> {
    let painted = painted.lock().unwrap();
    let by_index: HashMap<u64, u64> = painted.iter().map(|(pts, index)| (*index, *pts)).collect();
    let mut offset: Option<i128> = None;
    let mut indices = Vec::new();
    for message in outcome.named("roboflow-inference") {
        let frame_id = message.get::<u64>("frame-id").unwrap();
        let pts = message.get::<Option<gst::ClockTime>>("pts").unwrap().unwrap_or_else(|| panic!("result {frame_id}: no pts"));
        let json: serde_json::Value = serde_json::from_str(message.get::<&str>("json").unwrap()).unwrap();
        let rgb = rgb_color(&json).unwrap_or_else(|| panic!("result {frame_id}: no rgb_color in {json}"));
        let seen = index_of(rgb).unwrap_or_else(|| panic!("result {frame_id}: colour {rgb:?} is no frame's"));
        let offset = *offset.get_or_insert_with(|| {
            // The first result's frame: the earliest painted with its colour.
            let index = (0..).map(|k| seen + k * COLOURS).find(|i| by_index.contains_key(i)).expect("a painted frame");
            i128::from(pts.nseconds()) - i128::from(by_index[&index])
        });
        let source_pts = u64::try_from(i128::from(pts.nseconds()) - offset).unwrap();
        let index = *painted.get(&source_pts).unwrap_or_else(|| panic!("result {frame_id}: pts {pts} is no buffer's"));
        assert_eq!(
            seen,
            index % COLOURS,
            "result {frame_id} paired with frame {index} (colour {:?}) saw colour {rgb:?}",
            colour(index)
        );
        let latency = message.get::<Option<gst::ClockTime>>("latency").unwrap();
        assert!(latency.is_some(), "result {frame_id}: no latency");
        indices.push(index);
    }
    indices
}
