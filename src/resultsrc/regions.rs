// Each frame's detections as GstVideoRegionOfInterestMeta, attached where
// the frame leaves roboflowresultsrc (decoded, its size known), from the
// `detections` its RoboflowInferenceMeta carries.

use gst_video::VideoRegionOfInterestMeta;

use super::META_NAME;
use crate::bus::DETECTION;
#[cfg(feature = "analytics")]
use crate::protocol::detections::PixelRect;
use crate::protocol::detections::{Rect, Size, scale_to_frame};

/// What attaching did to one frame.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Attached {
    pub regions: u64,
    /// Boxes with no pixel left in this frame.
    pub skipped: u64,
}

/// The size of the raw video frames `caps` describe.
pub fn frame_size(caps: &gst::CapsRef) -> Option<Size> {
    let structure = caps.structure(0)?;
    let dimension = |name: &str| structure.get::<i32>(name).ok().and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0);
    Some(Size { width: dimension("width")?, height: dimension("height")? })
}

/// One GstVideoRegionOfInterestMeta per box of the frame's result:
/// `roi_type` the class, the rectangle in pixels of this frame (scaled from
/// the image the predictions refer to), `id` 1, 2, ... in the result's
/// order, and a `detection` param: the box's structure from the result plus
/// `x_min`, `y_min`, `x_max`, `y_max`, the box relative to the frame (0..1,
/// as Intel's DL Streamer writes them).
///
/// With the `analytics` feature (GStreamer 1.24+), each box is also an
/// object-detection entry of one GstAnalyticsRelationMeta: type the class,
/// the same rectangle, location confidence the box's confidence.
pub fn attach(buffer: &mut gst::BufferRef, frame: Size) -> Attached {
    let mut attached = Attached::default();
    #[cfg(feature = "analytics")]
    let mut analytics: Vec<(String, PixelRect, f64)> = Vec::new();
    let detections: Vec<gst::Structure> = match gst::meta::CustomMeta::from_buffer(buffer, META_NAME) {
        Ok(meta) => match meta.structure().get::<gst::ArrayRef>("detections") {
            Ok(array) => array.as_slice().iter().filter_map(|value| value.get::<gst::Structure>().ok()).collect(),
            Err(_) => return attached,
        },
        Err(_) => return attached,
    };
    for mut detection in detections {
        let Some((class, rect, image)) = geometry(&detection) else {
            attached.skipped += 1;
            continue;
        };
        let Some(pixels) = scale_to_frame(rect, image, frame) else {
            attached.skipped += 1;
            continue;
        };
        let (x, y, width, height) = pixels;
        let (frame_width, frame_height) = (f64::from(frame.width), f64::from(frame.height));
        detection.set("x_min", f64::from(x) / frame_width);
        detection.set("y_min", f64::from(y) / frame_height);
        detection.set("x_max", f64::from(x + width) / frame_width);
        detection.set("y_max", f64::from(y + height) / frame_height);
        attached.regions += 1;
        #[cfg(feature = "analytics")]
        analytics.push((class.clone(), pixels, detection.get::<f64>("confidence").unwrap_or(0.0)));
        let mut meta = VideoRegionOfInterestMeta::add(buffer, &class, pixels);
        meta.set_id(i32::try_from(attached.regions).unwrap_or(i32::MAX));
        meta.add_param(detection);
    }
    #[cfg(feature = "analytics")]
    if !analytics.is_empty() {
        attach_analytics(buffer, &analytics);
    }
    attached
}

#[cfg(feature = "analytics")]
fn attach_analytics(buffer: &mut gst::BufferRef, boxes: &[(String, PixelRect, f64)]) {
    use gst_analytics::AnalyticsRelationMetaODExt as _;
    let mut meta = gst_analytics::AnalyticsRelationMeta::add(buffer);
    for (class, (x, y, width, height), confidence) in boxes {
        let clamp = |value: u32| i32::try_from(value).unwrap_or(i32::MAX);
        let _ = meta.add_od_mtd(
            glib::Quark::from_str(class),
            clamp(*x),
            clamp(*y),
            clamp(*width),
            clamp(*height),
            *confidence as f32,
        );
    }
}

/// The class, box and image size of a `detection` structure.
fn geometry(detection: &gst::Structure) -> Option<(String, Rect, Option<Size>)> {
    if detection.name() != DETECTION {
        return None;
    }
    let number = |name: &str| detection.get::<f64>(name).ok();
    let rect = Rect { left: number("x")?, top: number("y")?, width: number("width")?, height: number("height")? };
    let image = match (detection.get::<u32>("image-width"), detection.get::<u32>("image-height")) {
        (Ok(width), Ok(height)) if width > 0 && height > 0 => Some(Size { width, height }),
        _ => None,
    };
    Some((detection.get::<String>("class").ok()?, rect, image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::detections::frame_detections;
    use serde_json::json;

    fn frame_with_result(result: serde_json::Value) -> gst::Buffer {
        crate::plugin_register_static().unwrap();
        let found = frame_detections(&result);
        let mut buffer = gst::Buffer::new();
        {
            let buffer = buffer.get_mut().unwrap();
            let mut meta = gst::meta::CustomMeta::add(buffer, META_NAME).unwrap();
            meta.mut_structure().set("detections", crate::bus::detections_array(&found));
        }
        buffer
    }

    fn regions(buffer: &gst::BufferRef) -> Vec<(String, (u32, u32, u32, u32), i32, gst::Structure)> {
        buffer
            .iter_meta::<VideoRegionOfInterestMeta>()
            .map(|meta| (meta.roi_type().to_owned(), meta.rect(), meta.id(), meta.param(DETECTION).unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn boxes_become_regions_in_frame_pixels() {
        let mut buffer = frame_with_result(json!({
            "video_metadata": {"width": 1280, "height": 720},
            "serialized_output_data": {
                "a": {"image": {"width": 1280, "height": 720}, "predictions": [
                    {"x": 640, "y": 360, "width": 40, "height": 20, "confidence": 0.75, "class": "ball",
                     "class_id": 2, "detection_id": "id-1", "tracker_id": 9},
                ]},
                "b": {"image": {"width": 1280, "height": 720}, "predictions": [
                    {"x": 100, "y": 50, "width": 20, "height": 10, "confidence": 0.5, "class": "cat"},
                    {"x": 100, "y": 50, "width": -20, "height": 10, "confidence": 0.5, "class": "bad"},
                ]},
            },
        }));
        let attached = attach(buffer.get_mut().unwrap(), Size { width: 640, height: 360 });
        assert_eq!(attached, Attached { regions: 2, skipped: 0 });
        let found = regions(&buffer);
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].0.as_str(), found[0].1, found[0].2), ("ball", (310, 175, 20, 10), 1));
        assert_eq!((found[1].0.as_str(), found[1].1, found[1].2), ("cat", (45, 23, 10, 5), 2));
        let param = &found[0].3;
        assert_eq!(param.get::<&str>("output").unwrap(), "a");
        assert_eq!(param.get::<f64>("confidence").unwrap(), 0.75);
        assert_eq!(param.get::<i32>("class-id").unwrap(), 2);
        assert_eq!(param.get::<&str>("detection-id").unwrap(), "id-1");
        assert_eq!(param.get::<i64>("tracker-id").unwrap(), 9);
        assert_eq!(param.get::<f64>("x_min").unwrap(), 310.0 / 640.0);
        assert_eq!(param.get::<f64>("y_max").unwrap(), 185.0 / 360.0);
        let cat = &found[1].3;
        assert!(!cat.has_field("class-id") && !cat.has_field("detection-id") && !cat.has_field("tracker-id"), "{cat}");
    }

    #[test]
    fn frames_without_boxes_or_result_carry_none() {
        let mut empty = frame_with_result(json!({"serialized_output_data": {"p": {"image": {"width": 4, "height": 4}, "predictions": []}}}));
        assert_eq!(attach(empty.get_mut().unwrap(), Size { width: 4, height: 4 }), Attached::default());
        assert!(regions(&empty).is_empty());
        let mut bare = gst::Buffer::new();
        assert_eq!(attach(bare.get_mut().unwrap(), Size { width: 4, height: 4 }), Attached::default());
    }

    #[test]
    fn a_box_with_no_pixel_in_the_frame_is_counted() {
        let mut buffer = gst::Buffer::new();
        crate::plugin_register_static().unwrap();
        {
            let buffer = buffer.get_mut().unwrap();
            let mut meta = gst::meta::CustomMeta::add(buffer, META_NAME).unwrap();
            let outside = gst::Structure::builder(DETECTION)
                .field("class", "x")
                .field("x", 50.0)
                .field("y", 0.0)
                .field("width", 5.0)
                .field("height", 5.0)
                .build();
            let not_a_box = gst::Structure::builder(DETECTION).field("class", "x").build();
            meta.mut_structure().set("detections", gst::Array::new([outside, not_a_box]));
        }
        assert_eq!(attach(buffer.get_mut().unwrap(), Size { width: 32, height: 32 }), Attached { regions: 0, skipped: 2 });
    }
}
