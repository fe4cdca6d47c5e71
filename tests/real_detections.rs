// Detections end to end against the real Roboflow Inference Server 1.8.3,
// with Workflows that detect without model weights (PROTOCOL.md §12): every
// box of every result reaches the frame as a GstVideoRegionOfInterestMeta,
// in the frame's pixels, and the bus message as a `detections` list.
//
// #[ignore]d in a plain `cargo test`: scripts/test.sh starts the server and
// runs them with --ignored. Without ROBOFLOW_TEST_SERVER they fail.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::harness::*;
use common::regions::*;
use gst::prelude::*;

const JOB_LIMIT: Duration = Duration::from_secs(240);

fn file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

struct Job {
    outcome: Outcome,
    frames: Vec<Frame>,
    stats: gst::Structure,
}

/// Uploads `clip` through `workflow`, returns the frames of `stream-output`
/// and every message.
fn run_job(clip: &Path, workflow: &Path, extra: &str, transport: &str, parameters: Option<&str>) -> Job {
    let session = format!("detect-{transport}");
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink name=upload session={session} api-url={} api-key=offline-test-key \
         connect-timeout=120000 stall-timeout=120000 workflow-spec-file={} video-transport={transport} {extra} \
         roboflowresultsrc name=results session={session} ! videoconvert ! appsink name=out sync=false",
        clip.display(),
        real_server(),
        workflow.display()
    ));
    if let Some(parameters) = parameters {
        pipeline.by_name("upload").unwrap().set_property("workflow-parameters", parameters);
    }
    let frames = collect_frames(&pipeline);
    let results = pipeline.by_name("results").unwrap();
    let mut stats = None;
    let outcome = run_with(&pipeline, JOB_LIMIT, |_, message| {
        if let gst::MessageView::Eos(_) = message.view() {
            stats = Some(results.property::<gst::Structure>("stats"));
        }
        false
    });
    assert!(outcome.eos, "{outcome:?}");
    let frames = std::mem::take(&mut *frames.lock().unwrap());
    Job { outcome, frames, stats: stats.unwrap() }
}

/// The result JSON and the `detections` of each bus message, by frame id.
fn messages(outcome: &Outcome) -> Vec<(u64, serde_json::Value, Vec<gst::Structure>)> {
    outcome
        .named("roboflow-inference")
        .iter()
        .map(|message| {
            let json: serde_json::Value = serde_json::from_str(message.get::<&str>("json").unwrap()).unwrap();
            assert_eq!(message.get::<u32>("detections-skipped").unwrap(), 0, "{message}");
            (message.get::<u64>("frame-id").unwrap(), json, detections_of(message))
        })
        .collect()
}

/// Checks every returned frame against its own result, box for box; returns
/// how many frames had a box.
fn check_frames_against_results(job: &Job) -> usize {
    let messages = messages(&job.outcome);
    let mut with_boxes = 0;
    for frame in &job.frames {
        let frame_id = frame.frame_id.expect("every returned frame carries its result");
        let (_, json, posted) = messages.iter().find(|(id, ..)| *id == frame_id).expect("a message for every frame");
        let boxes = json_boxes(json);
        assert_regions_match(frame, &boxes);
        assert_eq!(posted, &frame.meta_detections, "frame {frame_id}: the bus message and the meta list the same boxes");
        with_boxes += usize::from(!boxes.is_empty());
    }
    let regions: u64 = job.frames.iter().map(|frame| frame.regions.len() as u64).sum();
    assert_eq!(job.stats.get::<u64>("regions-attached").unwrap(), regions, "{}", job.stats);
    assert_eq!(job.stats.get::<u64>("detections-skipped").unwrap(), 0, "{}", job.stats);
    with_boxes
}

/// Two fixed boxes on every frame (vlm_as_detector over a constant text),
/// the returned image resized to half: the regions are scaled to it.
fn fixed_boxes(transport: &str) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    let job = run_job(&clip, &file("tests/workflows/fixed-box-resized.json"), "stream-output=half data-output=boxes", transport, None);
    assert!(job.frames.len() >= if transport == "datachannel" { 30 } else { 20 }, "{} frames returned", job.frames.len());
    assert_eq!(check_frames_against_results(&job), job.frames.len());
    for frame in &job.frames {
        assert_eq!(frame.size, (160, 120));
        // 0.25..0.75 of 320x240 is (80, 60, 160, 120): halved.
        let rects: Vec<_> = frame.regions.iter().map(|region| (region.class.as_str(), region.rect)).collect();
        assert_eq!(rects, [("box", (40, 30, 80, 60)), ("edge", (0, 60, 16, 60))], "frame {:?}", frame.frame_id);
    }
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn fixed_boxes_are_regions_scaled_to_the_returned_jpeg() {
    fixed_boxes("datachannel");
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn fixed_boxes_are_regions_scaled_to_the_returned_track() {
    fixed_boxes("track");
}

/// A 44x44 PNG of the ball in the first frame of make_clip's clip, where
/// videotestsrc draws it: the centre.
fn ball_template(dir: &Path, width: u32, height: u32) -> String {
    let path = dir.join("ball.png");
    let (side_x, side_y) = ((width - 44) / 2, (height - 44) / 2);
    let pipeline = launch(&format!(
        "videotestsrc num-buffers=1 pattern=ball ! video/x-raw,width={width},height={height} \
         ! videocrop left={side_x} right={side_x} top={side_y} bottom={side_y} ! videoconvert ! pngenc \
         ! filesink location={}",
        path.display()
    ));
    assert!(run(&pipeline, Duration::from_secs(30)).eos);
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

#[test]
#[ignore = "needs the real server: scripts/test.sh"]
fn template_matching_finds_the_moving_ball_box_for_box() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 60, 320, 240);
    let template = ball_template(dir.path(), 320, 240);
    let parameters = format!(r#"{{"template": {{"type": "base64", "value": "{template}"}}}}"#);
    let job = run_job(
        &clip,
        &file("examples/workflows/template-match.json"),
        "stream-output=annotated data-output=predictions",
        "datachannel",
        Some(&parameters),
    );
    assert_eq!(job.frames.len(), 60);
    let with_boxes = check_frames_against_results(&job);
    // The ball is whole in most frames; near the edges the template's
    // margin leaves the frame and it may not match.
    assert!(with_boxes >= 50, "the ball was found in {with_boxes} of 60 frames");
    for frame in &job.frames {
        for region in &frame.regions {
            assert_eq!(region.class, "template_match");
            let (_, _, w, h) = region.rect;
            assert_eq!((w, h), (44, 44), "frame {:?}: {region:?}", frame.frame_id);
        }
    }
    // Not the same place twice in a row: the ball moves, and so do the boxes.
    let places: Vec<_> = job.frames.iter().filter_map(|frame| frame.regions.first().map(|r| r.rect)).collect();
    assert!(places.windows(2).filter(|w| w[0] != w[1]).count() >= places.len() / 2, "{places:?}");
}
