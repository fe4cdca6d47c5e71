// Helpers shared by the element tests: plugin init, clips made with
// GStreamer, bounded pipeline runs that collect what the bus said.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use gst::prelude::*;
use sha2::{Digest, Sha256};

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().expect("GStreamer initialises");
        gstroboflow::plugin_register_static().expect("the roboflow plugin registers");
    });
}

/// Encodes `frames` frames of a test pattern into an MP4 at `path`.
pub fn make_clip(path: &Path, frames: u32, width: u32, height: u32) -> PathBuf {
    let description = format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width={width},height={height},framerate=30/1 \
         ! x264enc speed-preset=ultrafast key-int-max=30 ! mp4mux ! filesink location={}",
        path.display()
    );
    let pipeline = gst::parse::launch(&description).expect("clip pipeline parses");
    let outcome = run(&pipeline.downcast::<gst::Pipeline>().unwrap(), Duration::from_secs(60));
    assert!(outcome.eos, "making the clip failed: {:?}", outcome.error);
    path.to_owned()
}

/// A file of `len` pseudo-random bytes (not a video).
pub fn random_file(path: &Path, len: usize) -> PathBuf {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(path, bytes).unwrap();
    path.to_owned()
}

pub fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    hex(&Sha256::digest(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub eos: bool,
    /// "message (debug)" of the first ERROR.
    pub error: Option<String>,
    pub warnings: Vec<String>,
    /// Every element message, in bus order.
    pub messages: Vec<gst::Structure>,
    pub timed_out: bool,
}

impl Outcome {
    pub fn named(&self, name: &str) -> Vec<&gst::Structure> {
        self.messages.iter().filter(|s| s.name() == name).collect()
    }

    pub fn error_text(&self) -> &str {
        self.error.as_deref().unwrap_or("")
    }
}

/// Plays `pipeline` until EOS, an error or `limit`, then sets it to NULL.
pub fn run(pipeline: &gst::Pipeline, limit: Duration) -> Outcome {
    run_with(pipeline, limit, |_, _| false)
}

/// Like `run`; `on_message` sees every message and may return true to stop.
pub fn run_with(
    pipeline: &gst::Pipeline,
    limit: Duration,
    mut on_message: impl FnMut(&gst::Pipeline, &gst::Message) -> bool,
) -> Outcome {
    let bus = pipeline.bus().unwrap();
    let mut outcome = Outcome::default();
    if pipeline.set_state(gst::State::Playing).is_err() {
        // The error message explains why; collect it below.
    }
    let deadline = Instant::now() + limit;
    loop {
        let now = Instant::now();
        if now >= deadline {
            outcome.timed_out = true;
            break;
        }
        let Some(message) = bus.timed_pop(gst::ClockTime::from_nseconds((deadline - now).as_nanos() as u64)) else {
            outcome.timed_out = true;
            break;
        };
        let stop = on_message(pipeline, &message);
        match message.view() {
            gst::MessageView::Eos(_) => {
                outcome.eos = true;
                break;
            }
            gst::MessageView::Error(err) => {
                outcome.error = Some(format!("{} ({})", err.error(), err.debug().unwrap_or_default()));
                break;
            }
            gst::MessageView::Warning(warning) => outcome.warnings.push(warning.error().to_string()),
            gst::MessageView::Element(element) => {
                if let Some(structure) = element.structure() {
                    outcome.messages.push(structure.to_owned());
                }
            }
            _ => {}
        }
        if stop {
            break;
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    outcome
}

pub fn launch(description: &str) -> gst::Pipeline {
    gst::parse::launch(description)
        .unwrap_or_else(|err| panic!("pipeline '{description}' does not parse: {err}"))
        .downcast::<gst::Pipeline>()
        .unwrap()
}

pub fn sink_of(pipeline: &gst::Pipeline, name: &str) -> gst::Element {
    pipeline.by_name(name).unwrap_or_else(|| panic!("no element named {name}"))
}

/// A minimal valid workflow (the test worker accepts any with `steps`).
pub const WORKFLOW: &str = r#"{"version":"1.0","inputs":[{"type":"InferenceImage","name":"image"}],"steps":[{"type":"roboflow_core/dominant_color@v1","name":"color","image":"$inputs.image"}],"outputs":[{"type":"JsonField","name":"rgb_color","selector":"$steps.color.rgb_color"}]}"#;

/// dominant-color.json plus an `image` output, which the tests stream back:
/// the sink refuses a stream-output that the specification lacks.
pub fn workflow_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/dominant-color-image.json")
}

/// The real server the end-to-end tests use (ROBOFLOW_TEST_SERVER); they
/// fail without it, never pass without having talked to it.
pub fn real_server() -> String {
    std::env::var("ROBOFLOW_TEST_SERVER").expect(
        "ROBOFLOW_TEST_SERVER is not set: start the server with scripts/roboflow-server.sh start \
         and export ROBOFLOW_TEST_SERVER=http://127.0.0.1:9001 (scripts/test.sh does both)",
    )
}

/// The sink's properties for a test against `url`, with short timeouts.
pub fn sink_properties(url: &str) -> String {
    format!(
        "api-url={url} api-key=test-key workflow-spec-file={} connect-timeout=20000 stall-timeout=20000",
        workflow_file().display()
    )
}

pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Plays `pipeline` until its first ERROR, sets it to NULL, then drains the
/// bus; returns the text of every ERROR the element `sink` posted, and
/// whether the first ERROR on the bus was the sink's.
pub fn sink_errors(pipeline: &gst::Pipeline, sink: &str) -> (Vec<String>, bool) {
    // Keep what was posted around the change to NULL for the count below.
    pipeline.set_auto_flush_bus(false);
    let bus = pipeline.bus().unwrap();
    let is_sink = |message: &gst::Message| message.src().is_some_and(|src| src.name() == sink);
    let mut errors = Vec::new();
    let mut first_is_sink = false;
    let mut count = |message: &gst::Message, errors: &mut Vec<String>| {
        if let gst::MessageView::Error(err) = message.view() {
            if errors.is_empty() && !first_is_sink {
                first_is_sink = is_sink(message);
            }
            if is_sink(message) {
                errors.push(format!("{} ({})", err.error(), err.debug().unwrap_or_default()));
            }
            return true;
        }
        false
    };
    pipeline.set_state(gst::State::Playing).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failed = false;
    while !failed && Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        assert!(!matches!(message.view(), gst::MessageView::Eos(_)), "EOS instead of an error");
        failed = count(&message, &mut errors);
    }
    assert!(failed, "no error within 30 s");
    // Upstream's reaction to the failure (its error, its EOS) comes now.
    std::thread::sleep(Duration::from_millis(300));
    pipeline.set_state(gst::State::Null).unwrap();
    for _ in 0..10_000 {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(300)) else { break };
        count(&message, &mut errors);
    }
    (errors, first_is_sink)
}

/// Like `run`, and also returns the `stats` of the element `name` as they
/// were when EOS reached the bus (the counts are final then).
pub fn run_with_stats_at_eos(pipeline: &gst::Pipeline, limit: Duration, name: &str) -> (Outcome, Option<gst::Structure>) {
    let element = sink_of(pipeline, name);
    let mut stats = None;
    let outcome = run_with(pipeline, limit, |_, message| {
        if let gst::MessageView::Eos(_) = message.view() {
            stats = Some(element.property::<gst::Structure>("stats"));
        }
        false
    });
    (outcome, stats)
}
