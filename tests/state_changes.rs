// While roboflowuploadsink waits on the server (in its chain function or at
// EOS), it holds no lock a state change takes: state changes and queries go
// on, and a roboflowresultsrc of the same pipeline starts. (As a GstBaseSink
// it once held the PREROLL_LOCK through such a wait: the pipeline's change
// to PLAYING, when the first buffer raced it, stalled behind the wait, the
// result source never started and the job failed after connect-timeout;
// seen once in CI, in the eight-pairs concurrency test.)

mod common;

use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};
use gst::prelude::*;

fn phase(sink: &gst::Element) -> String {
    sink.property::<gst::Structure>("stats").get::<String>("phase").unwrap()
}

#[test]
fn state_changes_go_on_while_the_sink_waits_for_the_server() {
    init();
    let worker = TestWorker::start(WorkerConfig {
        faults: vec![Fault::DelayAnswer(Duration::from_secs(4))],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink name=sink {}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let sink = sink_of(&pipeline, "sink");
    pipeline.set_state(gst::State::Playing).unwrap();

    // filesrc's first buffer reaches the sink at once, which then waits for
    // the server's delayed answer.
    let bus = pipeline.bus().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut playing = false;
    while !playing && Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        match message.view() {
            gst::MessageView::Error(err) => panic!("unexpected error: {}", err.error()),
            gst::MessageView::StateChanged(change) => {
                playing = change.src().is_some_and(|s| s.is::<gst::Pipeline>()) && change.current() == gst::State::Playing;
            }
            _ => {}
        }
    }
    assert!(playing, "the pipeline never reached PLAYING");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(phase(&sink), "connecting", "the answer is delayed: the sink is still waiting");

    // A state query and two state changes, each bounded: none may wait for
    // the sink's wait (the answer is still ~3 s away).
    let (result, current, pending) = pipeline.state(gst::ClockTime::from_mseconds(500));
    assert_eq!((result, current, pending), (Ok(gst::StateChangeSuccess::Success), gst::State::Playing, gst::State::VoidPending));
    assert_eq!(pipeline.set_state(gst::State::Paused), Ok(gst::StateChangeSuccess::Success), "the sink does not preroll");
    let (result, current, _) = pipeline.state(gst::ClockTime::from_mseconds(500));
    assert_eq!((result, current), (Ok(gst::StateChangeSuccess::Success), gst::State::Paused));
    assert_eq!(sink.current_state(), gst::State::Paused);
    assert_eq!(pipeline.set_state(gst::State::Playing), Ok(gst::StateChangeSuccess::Success));
    assert_eq!(
        phase(&sink),
        "connecting",
        "the state changes waited for the sink's wait on the server to finish"
    );

    // The job still completes once the answer comes.
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "no EOS: {:?}", outcome.error);
    assert_eq!(outcome.named("roboflow-inference").len(), 5);
}

/// What a pause looked like from the server.
struct Paused {
    keepalives_at_pause: u32,
    keepalives_at_resume: u32,
    /// The worker held the whole upload when the pipeline resumed.
    upload_complete_at_resume: bool,
}

/// Plays until `ready`, pauses for `pause`, plays again: the job completes
/// as if never paused (the upload byte-exact, every frame reported).
fn pause_and_resume(
    worker: WorkerConfig,
    clip: &std::path::Path,
    frames: usize,
    extra: &str,
    pause: Duration,
    ready: impl Fn(&gst::Message) -> bool,
) -> Paused {
    init();
    let sha = sha256_file(clip);
    let worker = TestWorker::start(worker);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink name=sink buffer-limit=65536 {} {extra}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reached = false;
    let mut messages_before = 0;
    while !reached && Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) else { continue };
        match message.view() {
            gst::MessageView::Error(err) => panic!("unexpected error before the pause: {}", err.error()),
            gst::MessageView::Eos(_) => panic!("the job ended before the pause"),
            _ => {}
        }
        if message.structure().is_some_and(|s| s.name() == "roboflow-inference") {
            messages_before += 1;
        }
        reached = ready(&message);
    }
    assert!(reached, "the phase to pause in was never reached");

    assert_ne!(pipeline.set_state(gst::State::Paused), Err(gst::StateChangeError));
    let keepalives = || worker.sessions().first().map_or(0, |s| s.keepalives_received);
    let keepalives_at_pause = keepalives();
    std::thread::sleep(pause);
    let keepalives_at_resume = keepalives();
    let upload_complete_at_resume = worker.sessions().first().is_some_and(|s| s.upload_complete);
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "no EOS after a pause of {pause:?}: {:?}", outcome.error);
    assert_eq!(
        messages_before + outcome.named("roboflow-inference").len(),
        frames,
        "one message per frame, across the pause"
    );
    let sessions = worker.wait_for_sessions(1, Duration::from_secs(5));
    assert_eq!(sessions[0].upload_sha256.as_deref(), Some(sha.as_str()), "the upload is byte-exact");
    Paused { keepalives_at_pause, keepalives_at_resume, upload_complete_at_resume }
}

/// Keepalives every 500 ms; stall-timeout (1.5 s) shorter than the pause
/// (2.5 s): a pause is not a stall.
const PAUSE: Duration = Duration::from_millis(2500);
const PAUSE_PROPERTIES: &str = "keepalive-interval=500 stall-timeout=1500";

/// About 1 MB (snow at a high bitrate): about 20 chunks, 2 s at 100 ms each.
fn noisy_clip(dir: &std::path::Path, frames: u32) -> std::path::PathBuf {
    let path = dir.join("noisy.mp4");
    let maker = launch(&format!(
        "videotestsrc num-buffers={frames} pattern=snow ! video/x-raw,width=320,height=240,framerate=30/1 \
         ! x264enc speed-preset=ultrafast bitrate=8000 ! mp4mux ! filesink location={}",
        path.display()
    ));
    let outcome = run(&maker, Duration::from_secs(60));
    assert!(outcome.eos, "making the clip failed: {:?}", outcome.error);
    path
}

#[test]
fn a_pause_mid_upload_resumes_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    init();
    let clip = noisy_clip(dir.path(), 30);
    let paused = pause_and_resume(
        WorkerConfig { upload_read_delay: Some(Duration::from_millis(100)), ..Default::default() },
        &clip,
        30,
        PAUSE_PROPERTIES,
        PAUSE,
        |message| {
            message.structure().is_some_and(|s| {
                s.name() == "roboflow-upload-progress" && s.get::<u64>("uploaded-chunks").unwrap_or(0) >= 2
            })
        },
    );
    assert!(!paused.upload_complete_at_resume, "the pause came before the end of the upload");
    // About five in 2.5 s; at least three, whatever the scheduling.
    let during = paused.keepalives_at_resume - paused.keepalives_at_pause;
    assert!(
        during >= 3,
        "keepalives go on while the upload is paused: {during} in {PAUSE:?} (from {} to {})",
        paused.keepalives_at_pause,
        paused.keepalives_at_resume
    );
}

#[test]
fn a_pause_while_results_arrive_resumes_the_results() {
    let dir = tempfile::tempdir().unwrap();
    init();
    let clip = make_clip(&dir.path().join("clip.mp4"), 30, 320, 240);
    pause_and_resume(WorkerConfig::default(), &clip, 30, PAUSE_PROPERTIES, PAUSE, |message| {
        message.structure().is_some_and(|s| s.name() == "roboflow-inference")
    });
}

/// PAUSED before the first PLAYING: the sink takes the first buffer (it
/// does not preroll) but sends no chunk, however long the pause, and the
/// stall timer does not run; PLAYING then runs the job to the end.
#[test]
fn paused_before_playing_holds_the_upload_without_a_stall() {
    init();
    let worker = TestWorker::start(WorkerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink name=sink {} stall-timeout=300",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let sink = sink_of(&pipeline, "sink");
    assert_eq!(pipeline.set_state(gst::State::Paused), Ok(gst::StateChangeSuccess::Success), "the sink does not preroll");
    // The first buffer makes the sink connect and begin the upload.
    let deadline = Instant::now() + Duration::from_secs(20);
    while phase(&sink) != "uploading" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(phase(&sink), "uploading");
    // Several stall-timeouts long.
    std::thread::sleep(Duration::from_millis(1200));
    let stats = sink.property::<gst::Structure>("stats");
    assert_eq!(stats.get::<u64>("chunks-sent").unwrap(), 0, "PAUSED sends no chunk: {stats}");
    assert_eq!(phase(&sink), "uploading");
    let bus = pipeline.bus().unwrap();
    while let Some(message) = bus.pop() {
        if let gst::MessageView::Error(err) = message.view() {
            panic!("an error while paused: {}", err.error());
        }
    }
    let outcome = run(&pipeline, Duration::from_secs(60));
    assert!(outcome.eos, "no EOS after PLAYING: {:?}", outcome.error);
    assert_eq!(outcome.named("roboflow-inference").len(), 5);
}
