// roboflowresultsrc when downstream stops taking buffers before the results
// end: a snapshot that needs one frame ends the job with EOS, an unlinked
// source with an ERROR that says so; either way the session is let go at
// once, not at stall-timeout.

mod common;

use std::time::{Duration, Instant};

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};

/// Far beyond the few seconds the source may take to let go, and below the
/// sink's stall-timeout (20 s, `sink_properties`): a source that keeps the
/// session until then fails these tests.
const LIMIT: Duration = Duration::from_secs(15);

fn wait_closed(worker: &TestWorker) -> bool {
    let sessions = worker.wait_until(Duration::from_secs(5), |sessions| sessions.first().is_some_and(|s| s.closed));
    sessions.first().is_some_and(|s| s.closed)
}

#[test]
fn a_snapshot_of_the_first_frame_ends_the_job_with_eos() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 150, 160, 120);
    let png = dir.path().join("snapshot.png");
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session=snap stream-output=image {}  \
         roboflowresultsrc name=results session=snap ! videoconvert ! pngenc snapshot=true ! filesink location={}",
        clip.display(),
        sink_properties(&worker.url()),
        png.display()
    ));
    let mut first_result = None;
    let outcome = run_with(&pipeline, LIMIT, |_, message| {
        if first_result.is_none()
            && let gst::MessageView::Element(element) = message.view()
            && element.structure().is_some_and(|s| s.name() == "roboflow-inference")
        {
            first_result = Some(Instant::now());
        }
        false
    });
    assert!(outcome.eos, "EOS, not {:?} (timed out: {})", outcome.error, outcome.timed_out);
    assert!(first_result.is_some(), "a result arrived");
    let written = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(written > 0, "the snapshot was written");
    assert!(wait_closed(&worker), "the worker saw the session closed: {:?}", worker.sessions());
    let report = &worker.sessions()[0];
    assert!(!report.processing_complete_sent, "the job ended early, not by running to the end: {report:?}");
}

#[test]
fn an_unlinked_result_source_ends_with_an_error_naming_it() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 150, 160, 120);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink session=unlinked stream-output=image {}  \
         roboflowresultsrc name=results session=unlinked",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let outcome = run(&pipeline, LIMIT);
    assert!(!outcome.timed_out, "the job ends on its own: {outcome:?}");
    let text = outcome.error_text();
    assert!(text.contains("'results'") && text.contains("not-linked"), "names the element and the cause: {text}");
    assert!(text.contains("link it to"), "says what to do: {text}");
    // The error comes as the pipeline starts playing, usually before the
    // sink's session connected (a session that never connected cannot be
    // seen closing by the worker); one that did connect is closed.
    let connected_and_open = |sessions: &[common::worker::SessionReport]| {
        sessions.iter().filter(|s| !s.channels.is_empty() && !s.closed).count()
    };
    let sessions = worker.wait_until(Duration::from_secs(5), |sessions| connected_and_open(sessions) == 0);
    assert_eq!(connected_and_open(&sessions), 0, "no connected session is left open: {sessions:?}");
}
