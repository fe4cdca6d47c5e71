// Live video with the encoder missing: a clear error that names the
// element and the Debian package. In a test binary of its own: it removes
// vp8enc from this process's registry.

mod common;

use std::time::Duration;

use common::harness::*;
use common::worker::{TestWorker, WorkerConfig};

#[test]
fn a_missing_encoder_is_an_error_naming_the_plugin() {
    init();
    let registry = gst::Registry::get();
    let vp8enc = registry.lookup_feature("vp8enc").expect("vp8enc is installed here");
    registry.remove_feature(&vp8enc);
    let worker = TestWorker::start(WorkerConfig::default());
    let pipeline = launch(&format!(
        "videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48 ! roboflowuploadsink {}",
        sink_properties(&worker.url())
    ));
    let error = run(&pipeline, Duration::from_secs(30)).error.expect("an error");
    assert!(
        error.contains("'vp8enc' is not installed") && error.contains("gstreamer1.0-plugins-good"),
        "{error}"
    );
    assert!(worker.sessions().is_empty(), "no session without an encoder");
}
