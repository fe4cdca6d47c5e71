// What a frame leaving roboflowresultsrc carries: its result's frame id and
// detections (RoboflowInferenceMeta) and its GstVideoRegionOfInterestMeta,
// collected by an appsink; and the boxes a result's JSON holds, computed
// here from the JSON on its own (centre to top-left, scaled, rounded) to
// check the element against.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use gst::prelude::*;

/// One GstVideoRegionOfInterestMeta.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub class: String,
    pub rect: (u32, u32, u32, u32),
    pub id: i32,
    pub detection: gst::Structure,
}

/// One frame that left the element.
#[derive(Debug, Clone)]
pub struct Frame {
    pub frame_id: Option<u64>,
    pub pts: Option<gst::ClockTime>,
    pub size: (u32, u32),
    pub regions: Vec<Region>,
    /// The `detections` of its RoboflowInferenceMeta.
    pub meta_detections: Vec<gst::Structure>,
}

pub fn detections_of(structure: &gst::StructureRef) -> Vec<gst::Structure> {
    structure
        .get::<gst::ArrayRef>("detections")
        .map(|array| array.as_slice().iter().map(|value| value.get::<gst::Structure>().unwrap()).collect())
        .unwrap_or_default()
}

pub fn regions_of(buffer: &gst::BufferRef) -> Vec<Region> {
    buffer
        .iter_meta::<gst_video::VideoRegionOfInterestMeta>()
        .map(|meta| Region {
            class: meta.roi_type().to_owned(),
            rect: meta.rect(),
            id: meta.id(),
            detection: meta.param("detection").expect("every region has a detection param").to_owned(),
        })
        .collect()
}

/// Collects every frame reaching the appsink `out` of `pipeline`.
pub fn collect_frames(pipeline: &gst::Pipeline) -> Arc<Mutex<Vec<Frame>>> {
    let frames = Arc::new(Mutex::new(Vec::new()));
    let appsink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
    let collected = frames.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let buffer = sample.buffer().unwrap();
                let caps = sample.caps().unwrap().structure(0).unwrap();
                let size = (caps.get::<i32>("width").unwrap() as u32, caps.get::<i32>("height").unwrap() as u32);
                let meta = gst::meta::CustomMeta::from_buffer(buffer, gstroboflow::META_NAME).ok();
                collected.lock().unwrap().push(Frame {
                    frame_id: meta.as_ref().and_then(|meta| meta.structure().get::<u64>("frame-id").ok()),
                    pts: buffer.pts(),
                    size,
                    regions: regions_of(buffer),
                    meta_detections: meta.map(|meta| detections_of(meta.structure())).unwrap_or_default(),
                });
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    frames
}

/// A box as the JSON has it, computed independently of the plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonBox {
    pub output: String,
    pub class: String,
    pub confidence: f64,
    pub class_id: Option<i64>,
    pub detection_id: Option<String>,
    /// Top-left corner and size in pixels of the predictions' image.
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub image: (u32, u32),
}

/// Every box of the detections outputs in a result (complete, in-image
/// boxes only: the tests' Workflows make no others), outputs by name.
pub fn json_boxes(result: &serde_json::Value) -> Vec<JsonBox> {
    let mut boxes = Vec::new();
    let Some(outputs) = result["serialized_output_data"].as_object() else { return boxes };
    let mut names: Vec<&String> = outputs.keys().collect();
    names.sort();
    for name in names {
        let Some(predictions) = outputs[name]["predictions"].as_array() else { continue };
        let image = (outputs[name]["image"]["width"].as_u64().unwrap() as u32, outputs[name]["image"]["height"].as_u64().unwrap() as u32);
        for p in predictions {
            let (w, h) = (p["width"].as_f64().unwrap(), p["height"].as_f64().unwrap());
            boxes.push(JsonBox {
                output: name.clone(),
                class: p["class"].as_str().unwrap().to_owned(),
                confidence: p["confidence"].as_f64().unwrap(),
                class_id: p["class_id"].as_i64(),
                detection_id: p["detection_id"].as_str().map(str::to_owned),
                left: p["x"].as_f64().unwrap() - w / 2.0,
                top: p["y"].as_f64().unwrap() - h / 2.0,
                width: w,
                height: h,
                image,
            });
        }
    }
    boxes
}

impl JsonBox {
    /// The box in whole pixels of a frame of `size`: each edge scaled and
    /// rounded.
    pub fn in_frame(&self, size: (u32, u32)) -> (u32, u32, u32, u32) {
        let sx = size.0 as f64 / self.image.0 as f64;
        let sy = size.1 as f64 / self.image.1 as f64;
        let x0 = (self.left * sx).round() as u32;
        let y0 = (self.top * sy).round() as u32;
        let x1 = ((self.left + self.width) * sx).round() as u32;
        let y1 = ((self.top + self.height) * sy).round() as u32;
        (x0, y0, x1 - x0, y1 - y0)
    }
}

/// Asserts that `frame`'s regions are `boxes`, box for box: class, pixels
/// in the frame, id, and the detection param's fields; and that its meta's
/// detections say the same in the image's pixels.
pub fn assert_regions_match(frame: &Frame, boxes: &[JsonBox]) {
    let what = format!("frame {:?} at {:?}", frame.frame_id, frame.pts);
    assert_eq!(frame.regions.len(), boxes.len(), "{what}: regions {:?}, JSON boxes {boxes:?}", frame.regions);
    assert_eq!(frame.meta_detections.len(), boxes.len(), "{what}: meta detections {:?}", frame.meta_detections);
    for (index, ((region, expected), meta)) in frame.regions.iter().zip(boxes).zip(&frame.meta_detections).enumerate() {
        assert_eq!(region.class, expected.class, "{what} box {index}");
        assert_eq!(region.rect, expected.in_frame(frame.size), "{what} box {index}: {expected:?} in a {:?} frame", frame.size);
        assert_eq!(region.id, index as i32 + 1, "{what} box {index}");
        for structure in [&region.detection, meta] {
            assert_eq!(structure.get::<&str>("output").unwrap(), expected.output, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<&str>("class").unwrap(), expected.class, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<f64>("confidence").unwrap(), expected.confidence, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<i32>("class-id").ok().map(i64::from), expected.class_id, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<String>("detection-id").ok(), expected.detection_id, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<f64>("x").unwrap(), expected.left, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<f64>("y").unwrap(), expected.top, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<f64>("width").unwrap(), expected.width, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<f64>("height").unwrap(), expected.height, "{what} box {index}: {structure}");
            assert_eq!(structure.get::<u32>("image-width").unwrap(), expected.image.0, "{what} box {index}: {structure}");
        }
        let (x, y, _, h) = region.rect;
        let x_min = region.detection.get::<f64>("x_min").unwrap();
        let y_max = region.detection.get::<f64>("y_max").unwrap();
        assert_eq!(x_min, x as f64 / frame.size.0 as f64, "{what} box {index}");
        assert_eq!(y_max, (y + h) as f64 / frame.size.1 as f64, "{what} box {index}");
    }
}
