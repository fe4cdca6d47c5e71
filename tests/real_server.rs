// End-to-end against the real Roboflow Inference Server 1.8.3.
//
// These tests are #[ignore]d in a plain `cargo test`: scripts/test.sh starts
// the server (scripts/roboflow-server.sh), exports ROBOFLOW_TEST_SERVER and
// runs them with --ignored, one at a time. Without ROBOFLOW_TEST_SERVER they
// fail: they never pass without having talked to the server.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::harness::*;
use gst::prelude::*;

const JOB_LIMIT: Duration = Duration::from_secs(240);

fn server() -> String {
    std::env::var("ROBOFLOW_TEST_SERVER").expect(
        "ROBOFLOW_TEST_SERVER is not set: start the server with scripts/roboflow-server.sh start \
         and export ROBOFLOW_TEST_SERVER=http://127.0.0.1:9001 (scripts/test.sh does both)",
    )
}

fn workflow(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows").join(name)
}

fn sink(extra: &str) -> String {
    format!(
        "roboflowuploadsink api-url={} api-key=offline-test-key connect-timeout=120000 stall-timeout=120000 {extra}",
        server()
    )
}

fn clip(dir: &Path, frames: u32) -> PathBuf {
    make_clip(&dir.join("clip.mp4"), frames, 320, 240)
}

#[test]
#[ignore = "needs the real server: run scripts/test.sh"]
fn data_only_reports_every_frame() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path(), 60);
    let pipeline = launch(&format!(
        "filesrc location={} ! {}",
        clip.display(),
        sink(&format!("workflow-spec-file={} data-output=rgb_color", workflow("blur-dominant-color.json").display()))
    ));
    let outcome = run(&pipeline, JOB_LIMIT);
    assert!(outcome.eos, "{outcome:?}");
    let messages = outcome.named("roboflow-inference");
    assert_eq!(messages.len(), 60);
    for (index, message) in messages.iter().enumerate() {
        assert_eq!(message.get::<u64>("frame-id").unwrap(), index as u64 + 1);
        let json: serde_json::Value = serde_json::from_str(message.get::<&str>("json").unwrap()).unwrap();
        assert_eq!(json["serialized_output_data"]["rgb_color"].as_array().map(|a| a.len()), Some(3), "{json}");
    }
}

fn returned_frames(transport: &str, frames: u32) -> (usize, usize) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path(), frames);
    let output = dir.path().join("out.mp4");
    let session = format!("real-{transport}");
    let pipeline = launch(&format!(
        "filesrc location={} ! {}  roboflowresultsrc session={session} ! videoconvert ! x264enc speed-preset=ultrafast ! mp4mux ! filesink location={}",
        clip.display(),
        sink(&format!(
            "session={session} video-transport={transport} workflow-spec-file={} stream-output=blurred data-output=rgb_color",
            workflow("blur-dominant-color.json").display()
        )),
        output.display()
    ));
    let outcome = run(&pipeline, JOB_LIMIT);
    assert!(outcome.eos, "{outcome:?}");
    (count_video_frames(&output), outcome.named("roboflow-inference").len())
}

/// Frames in an MP4, counted by demuxing it.
fn count_video_frames(path: &Path) -> usize {
    let pipeline = launch(&format!("filesrc location={} ! qtdemux ! appsink name=out sync=false", path.display()));
    let appsink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = counter.clone();
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |sink| {
                let _ = sink.pull_sample();
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(gst::FlowSuccess::Ok)
            })
            .build(),
    );
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "{outcome:?}");
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

#[test]
#[ignore = "needs the real server: run scripts/test.sh"]
fn datachannel_frames_return_every_frame() {
    let (video, messages) = returned_frames("datachannel", 60);
    assert_eq!(video, 60);
    assert_eq!(messages, 60);
}

#[test]
#[ignore = "needs the real server: run scripts/test.sh"]
fn track_returns_most_frames_and_every_result() {
    let (video, messages) = returned_frames("track", 60);
    assert_eq!(messages, 60, "every JSON result arrives");
    assert!(video >= 57, "track transport returned {video} of 60 frames (< 95 %)");
}

#[test]
#[ignore = "needs the real server: run scripts/test.sh"]
fn encoder_pipeline_is_spooled_and_processed() {
    init();
    let pipeline = launch(&format!(
        "videotestsrc num-buffers=45 ! video/x-raw,width=320,height=240,framerate=30/1 ! x264enc speed-preset=ultrafast ! mp4mux ! {}",
        sink(&format!("name=upload workflow-spec-file={}", workflow("dominant-color.json").display()))
    ));
    let upload = pipeline.by_name("upload").unwrap();
    let mut mode = None;
    let outcome = run_with(&pipeline, JOB_LIMIT, |_, message| {
        if let gst::MessageView::Eos(_) = message.view() {
            mode = upload.property::<gst::Structure>("stats").get::<String>("upload-mode").ok();
        }
        false
    });
    assert!(outcome.eos, "{outcome:?}");
    assert_eq!(mode.as_deref(), Some("spooled"));
    assert_eq!(outcome.named("roboflow-inference").len(), 45);
}

#[test]
#[ignore = "needs the real server: run scripts/test.sh"]
fn invalid_workflow_shows_the_servers_message() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = clip(dir.path(), 5);
    let spec = dir.path().join("bad.json");
    std::fs::write(
        &spec,
        r#"{"version":"1.0","inputs":[{"type":"InferenceImage","name":"image"}],
            "steps":[{"type":"roboflow_core/no_such_block@v1","name":"nope","image":"$inputs.image"}],
            "outputs":[{"type":"JsonField","name":"x","selector":"$steps.nope.x"}]}"#,
    )
    .unwrap();
    let pipeline = launch(&format!("filesrc location={} ! {}", clip.display(), sink(&format!("workflow-spec-file={}", spec.display()))));
    let outcome = run(&pipeline, JOB_LIMIT);
    let text = outcome.error_text();
    assert!(text.contains("refused the session"), "{text}");
    assert!(text.contains("no_such_block"), "the server's own message is shown: {text}");
}

#[test]
#[ignore = "needs the real server: run scripts/test.sh"]
fn random_bytes_end_with_the_zero_frames_error() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let blob = random_file(&dir.path().join("random.bin"), 200_000);
    let pipeline = launch(&format!(
        "filesrc location={} ! {}",
        blob.display(),
        sink(&format!("workflow-spec-file={}", workflow("dominant-color.json").display()))
    ));
    let outcome = run(&pipeline, JOB_LIMIT);
    assert!(outcome.error_text().contains("decoded no frames"), "{outcome:?}");
}
