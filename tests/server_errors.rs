// The server's own explanation reaches the user: error bodies are shown in
// the GStreamer error, not just the status code.

mod common;

use std::time::Duration;

use common::harness::*;
use common::worker::{Fault, TestWorker, WorkerConfig};

fn upload_clip_expecting_error(worker: &TestWorker, extra: &str) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 10, 160, 120);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink {} {extra}",
        clip.display(),
        sink_properties(&worker.url())
    ));
    let outcome = run(&pipeline, Duration::from_secs(30));
    assert!(!outcome.eos && !outcome.timed_out, "expected an error, got {outcome:?}");
    outcome
}

#[test]
fn workflow_error_body_is_shown() {
    init();
    let worker = TestWorker::start(WorkerConfig {
        faults: vec![Fault::HttpError {
            status: 400,
            content_type: "application/json",
            body: r#"{"message":"Step 'blur' references unknown block type 'nope'","error_type":"WorkflowSyntaxError","blocks_errors":[]}"#.into(),
        }],
        ..Default::default()
    });
    let outcome = upload_clip_expecting_error(&worker, "");
    let text = outcome.error_text();
    assert!(text.contains("unknown block type 'nope'"), "{text}");
    assert!(text.contains("WorkflowSyntaxError"), "{text}");
    assert!(text.contains("400"), "{text}");
    assert!(text.contains(&worker.url()), "the error names the server: {text}");
}

#[test]
fn request_shape_error_detail_is_shown() {
    init();
    let worker = TestWorker::start(WorkerConfig {
        faults: vec![Fault::HttpError {
            status: 422,
            content_type: "application/json",
            body: r#"{"detail":[{"loc":["body","webrtc_offer","sdp"],"msg":"field required","type":"value_error.missing"}]}"#.into(),
        }],
        ..Default::default()
    });
    let text = upload_clip_expecting_error(&worker, "").error.unwrap();
    assert!(text.contains("422"), "{text}");
    assert!(text.contains("webrtc_offer"), "{text}");
    assert!(text.contains("field required"), "{text}");
}

#[test]
fn an_invalid_workflow_is_refused_with_the_servers_message() {
    init();
    // The faithful worker refuses a specification without steps, as the
    // real server's workflow compiler does.
    let worker = TestWorker::start(WorkerConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let spec = dir.path().join("no-steps.json");
    std::fs::write(&spec, r#"{"version":"1.0","inputs":[],"outputs":[]}"#).unwrap();
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink api-url={} workflow-spec-file={} connect-timeout=20000",
        clip.display(),
        worker.url(),
        spec.display()
    ));
    let outcome = run(&pipeline, Duration::from_secs(30));
    let text = outcome.error_text();
    assert!(text.contains("WorkflowSyntaxError"), "{text}");
}

#[test]
fn connection_refused_names_the_server() {
    init();
    // A port nobody listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let clip = make_clip(&dir.path().join("clip.mp4"), 5, 160, 120);
    let pipeline = launch(&format!(
        "filesrc location={} ! roboflowuploadsink {}",
        clip.display(),
        sink_properties(&format!("http://127.0.0.1:{port}"))
    ));
    let outcome = run(&pipeline, Duration::from_secs(30));
    let text = outcome.error_text();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(text.contains("could not connect"), "{text}");
}
