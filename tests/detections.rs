// Detections through roboflowresultsrc against the test worker: the boxes of
// several detections outputs reach each frame as
// GstVideoRegionOfInterestMeta, box for box, scaled from the predictions'
// image to the returned frame; frames without boxes carry none; bad boxes
// are skipped and counted; attach-roi-meta=false attaches none; the bus
// message lists the same boxes.

mod common;

use std::time::Duration;

use common::harness::*;
use common::regions::*;
use common::worker::{TestWorker, WorkerConfig};
use serde_json::{Value, json};

const FRAMES: u32 = 24;

/// The worker's detections: on a frame whose id is a multiple of 3, none;
/// else two boxes in `found` and one in `more` plus three bad ones
/// (marked `"bad": true` for `json_boxes`), on an image twice the size of
/// the frames the worker returns (320x240).
fn detections(output: &str, frame_id: u32) -> Option<Value> {
    let image = json!({"width": 640, "height": 480});
    let f = f64::from(frame_id);
    let prediction = |x: f64, y: f64, w: f64, h: f64, class: &str, id: u32| {
        json!({"x": x, "y": y, "width": w, "height": h, "confidence": 0.5 + f / 100.0, "class": class,
               "class_id": id, "detection_id": format!("{output}-{frame_id}-{id}"), "parent_id": "image.[0]"})
    };
    if output != "found" && output != "more" {
        return None;
    }
    let predictions = match output {
        _ if frame_id % 3 == 0 => json!([]),
        "found" => json!([
            prediction(100.5 + 10.0 * f, 200.0, 41.0, 20.0, "ball", 0),
            prediction(600.0, 40.0 + f, 30.0, 31.0, "cat", 7),
        ]),
        "more" => json!([
            prediction(320.0, 240.0, 640.0, 480.0, "everything", 1),
            {"x": 10, "y": 10, "width": -5, "height": 5, "confidence": 0.5, "class": "negative", "bad": true},
            {"x": null, "y": 10, "width": 5, "height": 5, "confidence": 0.5, "class": "nan", "bad": true},
            {"x": 10, "y": 10, "width": 5, "height": 5, "confidence": 0.5, "bad": true},
        ]),
        _ => return None,
    };
    Some(json!({"image": image, "predictions": predictions}))
}

const BAD_PER_FRAME: u64 = 3;

fn frames_with_boxes() -> u64 {
    (1..=FRAMES).filter(|id| id % 3 != 0).count() as u64
}

struct Job {
    outcome: Outcome,
    frames: Vec<Frame>,
}

fn job(transport: &str, source_extra: &str) -> Job {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), FRAMES, 320, 240);
    let worker = TestWorker::start(WorkerConfig { detections: Some(detections), ..Default::default() });
    let session = format!("detections-{transport}-{}", source_extra.len());
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session={session} video-transport={transport} \
         stream-output=image data-output=found,more {} workflow-spec-file={} \
         roboflowresultsrc name=results session={session} {source_extra} ! videoconvert ! appsink name=out sync=false",
        clip.display(),
        sink_properties(&worker.url()),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workflows/two-detectors.json").display()
    ));
    let frames = collect_frames(&pipeline);
    let outcome = run(&pipeline, Duration::from_secs(90));
    assert!(outcome.eos, "{outcome:?}");
    let frames = std::mem::take(&mut *frames.lock().unwrap());
    assert_eq!(frames.len(), FRAMES as usize, "every frame returned");
    Job { outcome, frames }
}

fn json_boxes_by_frame(outcome: &Outcome) -> Vec<(u64, Vec<JsonBox>, Vec<gst::Structure>, u32)> {
    outcome
        .named("roboflow-inference")
        .iter()
        .map(|message| {
            let mut json: Value = serde_json::from_str(message.get::<&str>("json").unwrap()).unwrap();
            for output in json["serialized_output_data"].as_object_mut().unwrap().values_mut() {
                if let Some(predictions) = output.get_mut("predictions").and_then(Value::as_array_mut) {
                    predictions.retain(|p| p.get("bad").is_none());
                }
            }
            (
                message.get::<u64>("frame-id").unwrap(),
                json_boxes(&json),
                detections_of(message),
                message.get::<u32>("detections-skipped").unwrap(),
            )
        })
        .collect()
}

fn check(job: &Job) {
    let messages = json_boxes_by_frame(&job.outcome);
    assert_eq!(messages.len(), FRAMES as usize);
    for (frame_id, boxes, posted, skipped) in &messages {
        let bad = if frame_id % 3 == 0 { 0 } else { BAD_PER_FRAME as u32 };
        assert_eq!(*skipped, bad, "frame {frame_id}");
        assert_eq!(posted.len(), boxes.len(), "frame {frame_id}: {posted:?}");
        let frame = job.frames.iter().find(|frame| frame.frame_id == Some(*frame_id)).expect("every frame paired");
        assert_eq!(frame.size, (320, 240));
        assert_regions_match(frame, boxes);
        assert_eq!(&frame.meta_detections, posted, "frame {frame_id}: the bus and the meta agree");
        if frame_id % 3 == 0 {
            assert!(frame.regions.is_empty(), "frame {frame_id} has no boxes");
        } else {
            let classes: Vec<&str> = frame.regions.iter().map(|region| region.class.as_str()).collect();
            assert_eq!(classes, ["ball", "cat", "everything"], "outputs in name order: found, more");
        }
    }
    // Spot check of one frame by hand: frame 1's ball is centred at
    // (110.5, 200) with 41x20 on the 640x480 image, so its edges are
    // 90..131 x 190..210; halved and rounded, 45..66 x 95..105.
    let first = job.frames.iter().find(|frame| frame.frame_id == Some(1)).unwrap();
    assert_eq!(first.regions[0].rect, (45, 95, 21, 10));
    assert_eq!(first.regions[2].rect, (0, 0, 320, 240));
    let summary = &job.outcome.named("roboflow-result-summary")[0];
    assert_eq!(summary.get::<u64>("regions-attached").unwrap(), frames_with_boxes() * 3, "{summary}");
    assert_eq!(summary.get::<u64>("detections-skipped").unwrap(), frames_with_boxes() * BAD_PER_FRAME, "{summary}");
}

#[test]
fn boxes_of_several_outputs_reach_each_jpeg_frame_scaled_box_for_box() {
    check(&job("datachannel", ""));
}

#[test]
fn boxes_of_several_outputs_reach_each_track_frame_scaled_box_for_box() {
    check(&job("track", ""));
}

#[test]
fn attach_roi_meta_false_attaches_none_and_the_bus_still_lists_them() {
    let job = job("datachannel", "attach-roi-meta=false");
    assert!(job.frames.iter().all(|frame| frame.regions.is_empty()));
    let listed: usize = json_boxes_by_frame(&job.outcome).iter().map(|(_, _, posted, _)| posted.len()).sum();
    assert_eq!(listed as u64, frames_with_boxes() * 3);
    let summary = &job.outcome.named("roboflow-result-summary")[0];
    assert_eq!(summary.get::<u64>("regions-attached").unwrap(), 0, "{summary}");
}
