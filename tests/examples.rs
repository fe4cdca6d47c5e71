// The embedding examples, run as a user runs them, against the test worker
// with detections: examples/python/annotate.py (system python3 with
// PyGObject, the plugin found through GST_PLUGIN_PATH) and the Rust
// examples read_detections and annotate_file (binaries built by
// `cargo build --examples`, as scripts/test.sh does first: `cargo test`
// builds examples only as test harnesses).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};
use serde_json::{Value, json};

const FRAMES: u32 = 15;

/// Two boxes on odd frames, none on even ones, on the frame's own size.
fn detections(output: &str, frame_id: u32) -> Option<Value> {
    if output != "found" {
        return None;
    }
    let predictions = if frame_id % 2 == 1 {
        json!([
            {"x": 40, "y": 30, "width": 20, "height": 10, "confidence": 0.9, "class": "ball", "class_id": 0, "detection_id": "a"},
            {"x": 100, "y": 80, "width": 30, "height": 30, "confidence": 0.7, "class": "cat", "class_id": 1, "detection_id": "b"},
        ])
    } else {
        json!([])
    };
    Some(json!({"image": {"width": 160, "height": 120}, "predictions": predictions}))
}

/// target/debug (or the profile's directory): where cargo put this test's
/// executable's parent, the plugin library and the examples.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

/// Runs `command` to its end, bounded in time; kills it past `limit`.
fn run_bounded(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("{command:?} ran over {limit:?}: {}", String::from_utf8_lossy(&output.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    clip: PathBuf,
    worker: TestWorker,
}

fn setup() -> Setup {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), FRAMES, 160, 120);
    let worker = TestWorker::start(WorkerConfig { detections: Some(detections), ..Default::default() });
    Setup { dir: dir.path().to_owned(), _dir: dir, clip, worker }
}

fn workflow() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workflows/two-detectors.json")
}

fn common_args(setup: &Setup) -> Vec<String> {
    [
        setup.clip.display().to_string(),
        "--api-url".into(),
        setup.worker.url(),
        "--api-key".into(),
        "test-key".into(),
        "--workflow-spec-file".into(),
        workflow().display().to_string(),
        "--stream-output".into(),
        "image".into(),
        "--data-output".into(),
        "found".into(),
        "--connect-timeout".into(),
        "20000".into(),
    ]
    .into()
}

/// Checks a results file: one JSON result per frame, frames 1..=FRAMES.
fn check_results_file(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let ids: Vec<u64> = text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["video_metadata"]["frame_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (1..=u64::from(FRAMES)).collect::<Vec<_>>(), "{}", path.display());
}

fn check_video(path: &Path) {
    let pipeline = launch(&format!("filesrc location={} ! decodebin ! fakesink name=sink", path.display()));
    let (outcome, _) = run_with_stats_at_eos(&pipeline, Duration::from_secs(30), "sink");
    assert!(outcome.eos, "{} plays: {outcome:?}", path.display());
}

const ODD_FRAMES: u32 = FRAMES.div_ceil(2);

#[test]
fn python_annotate_writes_the_video_the_results_and_reads_every_region() {
    let setup = setup();
    let python = Path::new("/usr/bin/python3");
    assert!(python.exists(), "the Python example needs /usr/bin/python3 with python3-gi (apt-get install python3-gi)");
    let plugin = target_dir().join("libgstroboflow.so");
    assert!(plugin.exists(), "{} is built by cargo test", plugin.display());
    let (video, results) = (setup.dir.join("annotated.mp4"), setup.dir.join("results.jsonl"));
    let mut command = Command::new(python);
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/annotate.py"))
        .args(common_args(&setup))
        .args(["--output".as_ref(), video.as_os_str(), "--results".as_ref(), results.as_os_str()])
        .env("GST_PLUGIN_PATH", target_dir())
        // A registry of its own: the user's is not touched.
        .env("GST_REGISTRY", setup.dir.join("registry.bin"));
    let output = run_bounded(command, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("frames:      {FRAMES}\n")), "{stdout}");
    assert!(stdout.contains(&format!("detections:  {} boxes in {ODD_FRAMES} of {FRAMES} frames", 2 * ODD_FRAMES)), "{stdout}");
    assert!(stdout.contains(&format!("({FRAMES} frames, {FRAMES} with their result)")), "{stdout}");
    assert!(stdout.contains(&format!("regions:     {} ROI metas on {ODD_FRAMES} frames (ball {ODD_FRAMES}, cat {ODD_FRAMES})", 2 * ODD_FRAMES)), "{stdout}");
    check_results_file(&results);
    check_video(&video);
}

#[test]
fn python_annotate_names_a_missing_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new("/usr/bin/python3");
    command
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python/annotate.py"))
        .args(["clip.mp4", "--stream-output", "image"])
        .env("GST_PLUGIN_PATH", dir.path())
        .env("GST_REGISTRY", dir.path().join("registry.bin"));
    let output = run_bounded(command, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the GStreamer element 'roboflowuploadsink' is missing"), "{stderr}");
    assert!(stderr.contains("set GST_PLUGIN_PATH to its target/release"), "{stderr}");
}

#[test]
fn rust_read_detections_prints_every_frame_with_its_regions() {
    let setup = setup();
    let example = target_dir().join("examples/read_detections");
    assert!(example.exists(), "{} is missing: run cargo build --examples first (scripts/test.sh does)", example.display());
    let mut command = Command::new(example);
    command.args(common_args(&setup));
    let output = run_bounded(command, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("frame 1 pts 0:00:00.000000000: 2 boxes ball 20x10 at (30, 25) 0.90 [found], cat 30x30 at (85, 65) 0.70 [found]"), "{stdout}");
    assert!(stdout.contains("frame 2 pts 0:00:00.033333333: 0 boxes"), "{stdout}");
    assert!(stdout.contains(&format!("summary: {FRAMES} frames, {ODD_FRAMES} with boxes, {} boxes", 2 * ODD_FRAMES)), "{stdout}");
}

#[test]
fn rust_annotate_file_counts_the_frames_with_detections() {
    let setup = setup();
    let example = target_dir().join("examples/annotate_file");
    assert!(example.exists(), "{} is missing: run cargo build --examples first (scripts/test.sh does)", example.display());
    let (video, results) = (setup.dir.join("annotated.mp4"), setup.dir.join("results.jsonl"));
    let mut command = Command::new(example);
    command.args(common_args(&setup)).args(["--output".as_ref(), video.as_os_str(), "--results".as_ref(), results.as_os_str()]);
    let output = run_bounded(command, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("detections:  {} boxes in {ODD_FRAMES} of {FRAMES} frames", 2 * ODD_FRAMES)), "{stdout}");
    check_results_file(&results);
    check_video(&video);
}
