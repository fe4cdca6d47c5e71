//! Object detections in a frame's result (PROTOCOL.md §12).
//!
//! An output whose value holds a `predictions` list is a detections output:
//! `{"image": {"width": W, "height": H}, "predictions": [{"x": cx, "y": cy,
//! "width": w, "height": h, "confidence": c, "class": "name", "class_id": k,
//! "detection_id": "uuid", "tracker_id": t?}]}`, with `x`,`y` the box
//! centre in pixels of that image. This module turns them into boxes with a
//! top-left corner, checked and clipped, and scales them to the size of the
//! frame they are attached to. Pure: no GStreamer here.

use serde_json::Value;

/// A width and height in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    fn from_json(value: &Value) -> Option<Size> {
        let dimension = |name: &str| value.get(name)?.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0);
        Some(Size { width: dimension("width")?, height: dimension("height")? })
    }
}

/// A box in pixels: top-left corner and size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// One detected object.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The Workflow output it came from.
    pub output: String,
    pub class: String,
    pub class_id: Option<i64>,
    pub confidence: f64,
    pub detection_id: Option<String>,
    pub tracker_id: Option<i64>,
    /// In pixels of `image`, clipped to it when its size is known.
    pub rect: Rect,
    /// The size of the image the box refers to: the output's `image`, else
    /// the frame's (`video_metadata`); None when the result tells neither.
    pub image: Option<Size>,
}

/// The detections of one frame's result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameDetections {
    /// Outputs in name order, boxes in the order the server sent them.
    pub detections: Vec<Detection>,
    /// Predictions that are no usable box (a field missing or not a number,
    /// a negative size, entirely outside the image): left out.
    pub skipped: u32,
}

/// Every box of every detections output in `result` (a whole result, with
/// `serialized_output_data` and `video_metadata`).
pub fn frame_detections(result: &Value) -> FrameDetections {
    let mut found = FrameDetections::default();
    let Some(outputs) = result.get("serialized_output_data").and_then(Value::as_object) else {
        return found;
    };
    let frame = result.get("video_metadata").and_then(Size::from_json);
    let mut names: Vec<&String> = outputs.keys().collect();
    names.sort();
    for name in names {
        let value = &outputs[name];
        let Some(predictions) = value.get("predictions").and_then(Value::as_array) else {
            continue;
        };
        let image = value.get("image").and_then(Size::from_json).or(frame);
        for prediction in predictions {
            match detection(name, prediction, image) {
                Some(detection) => found.detections.push(detection),
                None => found.skipped += 1,
            }
        }
    }
    found
}

fn detection(output: &str, prediction: &Value, image: Option<Size>) -> Option<Detection> {
    let number = |name: &str| prediction.get(name)?.as_f64().filter(|n| n.is_finite());
    let integer = |name: &str| prediction.get(name).and_then(Value::as_i64);
    let (x, y, width, height) = (number("x")?, number("y")?, number("width")?, number("height")?);
    if width <= 0.0 || height <= 0.0 {
        return None;
    }
    let (mut left, mut top, mut right, mut bottom) = (x - width / 2.0, y - height / 2.0, x + width / 2.0, y + height / 2.0);
    left = left.max(0.0);
    top = top.max(0.0);
    if let Some(image) = image {
        right = right.min(f64::from(image.width));
        bottom = bottom.min(f64::from(image.height));
    }
    if right <= left || bottom <= top || !right.is_finite() || !bottom.is_finite() {
        return None;
    }
    Some(Detection {
        output: output.to_owned(),
        class: prediction.get("class")?.as_str()?.to_owned(),
        class_id: integer("class_id"),
        confidence: number("confidence")?,
        detection_id: prediction.get("detection_id").and_then(Value::as_str).map(str::to_owned),
        tracker_id: integer("tracker_id"),
        rect: Rect { left, top, width: right - left, height: bottom - top },
        image,
    })
}

/// A box in whole pixels of a frame: x, y, width, height.
pub type PixelRect = (u32, u32, u32, u32);

/// `rect`, given in pixels of `image`, in whole pixels of a frame of size
/// `frame` (scaled when the sizes differ; `image` None: the same size),
/// clipped to it; None when nothing of it is left.
pub fn scale_to_frame(rect: Rect, image: Option<Size>, frame: Size) -> Option<PixelRect> {
    let (sx, sy) = match image {
        Some(image) => (
            f64::from(frame.width) / f64::from(image.width),
            f64::from(frame.height) / f64::from(image.height),
        ),
        None => (1.0, 1.0),
    };
    let edge = |value: f64, scale: f64, limit: u32| (value * scale).round().clamp(0.0, f64::from(limit)) as u32;
    let left = edge(rect.left, sx, frame.width);
    let top = edge(rect.top, sy, frame.height);
    let right = edge(rect.left + rect.width, sx, frame.width);
    let bottom = edge(rect.top + rect.height, sy, frame.height);
    // A box smaller than a pixel keeps one pixel, unless it is outside.
    let right = if right == left && left < frame.width { left + 1 } else { right };
    let bottom = if bottom == top && top < frame.height { top + 1 } else { bottom };
    (right > left && bottom > top).then(|| (left, top, right - left, bottom - top))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn result(outputs: Value) -> Value {
        json!({
            "video_metadata": {"frame_id": 1, "width": 640, "height": 480},
            "serialized_output_data": outputs,
            "errors": [],
        })
    }

    fn prediction(x: f64, y: f64, width: f64, height: f64) -> Value {
        json!({"x": x, "y": y, "width": width, "height": height, "confidence": 0.9,
               "class": "ball", "class_id": 0, "detection_id": "d1", "parent_id": "image.[0]"})
    }

    #[test]
    fn the_documented_example_becomes_a_top_left_box() {
        // PROTOCOL.md §12, as the server serializes template matching.
        let found = frame_detections(&result(json!({
            "predictions": {"image": {"width": 1280, "height": 720}, "predictions": [
                {"x": 640.0, "y": 360.5, "width": 44.0, "height": 43.0, "confidence": 0.97,
                 "class": "ball", "class_id": 3, "detection_id": "0b8c", "parent_id": "image.[0]",
                 "tracker_id": 12}
            ]},
            "count": 1,
        })));
        assert_eq!(found.skipped, 0);
        assert_eq!(
            found.detections,
            [Detection {
                output: "predictions".into(),
                class: "ball".into(),
                class_id: Some(3),
                confidence: 0.97,
                detection_id: Some("0b8c".into()),
                tracker_id: Some(12),
                rect: Rect { left: 618.0, top: 339.0, width: 44.0, height: 43.0 },
                image: Some(Size { width: 1280, height: 720 }),
            }]
        );
    }

    #[test]
    fn optional_fields_may_be_absent_and_the_frame_size_stands_in() {
        let found = frame_detections(&result(json!({
            "boxes": {"image": {"width": null, "height": null}, "predictions": [
                {"x": 10, "y": 20, "width": 4, "height": 6, "confidence": 1, "class": "a"}
            ]}
        })));
        let detection = &found.detections[0];
        assert_eq!((detection.class_id, detection.detection_id.as_deref(), detection.tracker_id), (None, None, None));
        assert_eq!(detection.rect, Rect { left: 8.0, top: 17.0, width: 4.0, height: 6.0 });
        assert_eq!(detection.image, Some(Size { width: 640, height: 480 }));
    }

    #[test]
    fn every_detections_output_counts_in_name_order_and_others_are_ignored() {
        let found = frame_detections(&result(json!({
            "zeta": {"image": {"width": 640, "height": 480}, "predictions": [prediction(100.0, 100.0, 10.0, 10.0)]},
            "alpha": {"image": {"width": 320, "height": 240}, "predictions": [prediction(50.0, 50.0, 10.0, 10.0), prediction(60.0, 60.0, 10.0, 10.0)]},
            "count": 3,
            "image": {"type": "base64", "value": "abc"},
            "empty": {"image": {"width": 640, "height": 480}, "predictions": []},
            "not_a_list": {"predictions": {"x": 1}},
        })));
        let outputs: Vec<&str> = found.detections.iter().map(|d| d.output.as_str()).collect();
        assert_eq!(outputs, ["alpha", "alpha", "zeta"]);
        assert_eq!(found.detections[0].image, Some(Size { width: 320, height: 240 }));
        assert_eq!(found.skipped, 0);
    }

    #[test]
    fn no_outputs_no_detections() {
        for value in [json!(null), json!({}), json!({"serialized_output_data": null}), json!({"serialized_output_data": [1]})] {
            assert_eq!(frame_detections(&value), FrameDetections::default());
        }
    }

    #[test]
    fn bad_boxes_are_skipped_and_counted() {
        let mut missing_class = prediction(10.0, 10.0, 4.0, 4.0);
        missing_class.as_object_mut().unwrap().remove("class");
        let mut missing_confidence = prediction(10.0, 10.0, 4.0, 4.0);
        missing_confidence.as_object_mut().unwrap().remove("confidence");
        let bad = [
            prediction(10.0, 10.0, -4.0, 4.0),
            prediction(10.0, 10.0, 4.0, 0.0),
            prediction(-10.0, 10.0, 4.0, 4.0),
            prediction(700.0, 10.0, 20.0, 4.0),
            prediction(10.0, 500.0, 4.0, 20.0),
            // orjson writes NaN and infinities as null (§12's serializer).
            json!({"x": null, "y": 1, "width": 2, "height": 2, "confidence": 0.5, "class": "a"}),
            json!({"x": "NaN", "y": 1, "width": 2, "height": 2, "confidence": 0.5, "class": "a"}),
            json!({"y": 1, "width": 2, "height": 2, "confidence": 0.5, "class": "a"}),
            json!({"x": 1, "y": 1, "width": 2, "height": 2, "confidence": 0.5, "class": 7}),
            json!("not a box"),
            missing_class,
            missing_confidence,
        ];
        let count = bad.len() as u32;
        let mut predictions = bad.to_vec();
        predictions.push(prediction(320.0, 240.0, 10.0, 10.0));
        let found = frame_detections(&result(json!({"p": {"image": {"width": 640, "height": 480}, "predictions": predictions}})));
        assert_eq!(found.skipped, count);
        assert_eq!(found.detections.len(), 1);
        assert_eq!(found.detections[0].rect, Rect { left: 315.0, top: 235.0, width: 10.0, height: 10.0 });
    }

    #[test]
    fn boxes_across_the_edge_are_clipped_to_the_image() {
        let found = frame_detections(&result(json!({"p": {"image": {"width": 100, "height": 50}, "predictions": [
            prediction(2.0, 3.0, 10.0, 10.0),
            prediction(98.0, 48.0, 10.0, 10.0),
        ]}})));
        assert_eq!(found.detections[0].rect, Rect { left: 0.0, top: 0.0, width: 7.0, height: 8.0 });
        assert_eq!(found.detections[1].rect, Rect { left: 93.0, top: 43.0, width: 7.0, height: 7.0 });
    }

    #[test]
    fn scaling_to_the_frame() {
        let rect = Rect { left: 618.0, top: 339.0, width: 44.0, height: 43.0 };
        let image = Some(Size { width: 1280, height: 720 });
        assert_eq!(scale_to_frame(rect, image, Size { width: 1280, height: 720 }), Some((618, 339, 44, 43)));
        assert_eq!(scale_to_frame(rect, None, Size { width: 1280, height: 720 }), Some((618, 339, 44, 43)));
        // Half the size: edges scale and round, so boxes side by side stay so.
        assert_eq!(scale_to_frame(rect, image, Size { width: 640, height: 360 }), Some((309, 170, 22, 21)));
        // Anisotropic.
        assert_eq!(scale_to_frame(rect, image, Size { width: 2560, height: 360 }), Some((1236, 170, 88, 21)));
        // Tiny boxes keep a pixel; what leaves the frame is clipped.
        let tiny = Rect { left: 10.0, top: 10.0, width: 0.2, height: 0.2 };
        assert_eq!(scale_to_frame(tiny, None, Size { width: 64, height: 64 }), Some((10, 10, 1, 1)));
        let across = Rect { left: 60.0, top: 60.0, width: 10.0, height: 10.0 };
        assert_eq!(scale_to_frame(across, None, Size { width: 64, height: 64 }), Some((60, 60, 4, 4)));
        let outside = Rect { left: 70.0, top: 10.0, width: 10.0, height: 10.0 };
        assert_eq!(scale_to_frame(outside, None, Size { width: 64, height: 64 }), None);
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>().prop_map(|n| serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)),
            (-2000i64..4000).prop_map(Value::from),
            Just(Value::Null),
            Just(json!("NaN")),
            Just(json!([1])),
        ]
    }

    fn prediction_strategy() -> impl Strategy<Value = Value> {
        (number(), number(), number(), number(), number(), prop::option::of("[a-z]{0,4}"), number(), number()).prop_map(
            |(x, y, width, height, confidence, class, class_id, tracker_id)| {
                let mut p = json!({"x": x, "y": y, "width": width, "height": height, "confidence": confidence,
                                   "class_id": class_id, "tracker_id": tracker_id});
                if let Some(class) = class {
                    p["class"] = json!(class);
                }
                p
            },
        )
    }

    proptest! {
        /// Whatever the server sends, every prediction is a box or counted
        /// as skipped, every box is inside its image with a positive size,
        /// and scaling it never panics and stays in the frame.
        #[test]
        fn every_prediction_is_a_box_or_skipped(
            predictions in prop::collection::vec(prediction_strategy(), 0..8),
            image in (number(), number()),
            frame in (1u32..5000, 1u32..5000),
        ) {
            let count = predictions.len() as u32;
            let result = json!({"serialized_output_data": {"p": {"image": {"width": image.0, "height": image.1}, "predictions": predictions}}});
            let found = frame_detections(&result);
            prop_assert_eq!(found.detections.len() as u32 + found.skipped, count);
            for detection in &found.detections {
                let rect = detection.rect;
                prop_assert!(rect.left >= 0.0 && rect.top >= 0.0 && rect.width > 0.0 && rect.height > 0.0, "{:?}", rect);
                prop_assert!(rect.width.is_finite() && rect.height.is_finite(), "{:?}", rect);
                if let Some(image) = detection.image {
                    prop_assert!(rect.left + rect.width <= f64::from(image.width) + 1e-6, "{:?} in {:?}", rect, image);
                    prop_assert!(rect.top + rect.height <= f64::from(image.height) + 1e-6, "{:?} in {:?}", rect, image);
                }
                let frame = Size { width: frame.0, height: frame.1 };
                if let Some((x, y, w, h)) = scale_to_frame(rect, detection.image, frame) {
                    prop_assert!(w > 0 && h > 0 && x + w <= frame.width && y + h <= frame.height);
                }
            }
        }
    }

    #[test]
    fn nothing_panics_on_any_json() {
        let values = [
            json!({"serialized_output_data": {"p": {"predictions": [{"x": 1e308, "y": -1e308, "width": 1e308, "height": 1e308, "confidence": 1, "class": "a"}]}}}),
            json!({"serialized_output_data": {"p": {"image": {"width": 4294967296u64, "height": -1}, "predictions": [prediction(1.0, 1.0, 1.0, 1.0)]}}}),
            json!({"video_metadata": {"width": 0, "height": 0}, "serialized_output_data": {"p": {"predictions": [prediction(1.0, 1.0, 1.0, 1.0)]}}}),
        ];
        for value in values {
            for detection in frame_detections(&value).detections {
                for frame in [Size { width: 1, height: 1 }, Size { width: u32::MAX, height: u32::MAX }] {
                    let _ = scale_to_frame(detection.rect, detection.image, frame);
                }
            }
        }
    }
}
