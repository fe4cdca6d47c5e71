// One upload-and-results session with the server:
// - core.rs: the protocol logic, sans-IO (events in, actions out, time passed in);
// - driver.rs: webrtc-rs and the signalling around that core;
// - nack.rs: the NACKs for the returned video, sent only on loss;
// - endpoints.rs: the two single-owner ends, the sink's upload writer and the
//   one result stream;
// - registry.rs: session names, and result sources that claim one;
// - error.rs: every way a session fails.

pub mod core;
mod driver;
mod early_checks;
pub mod endpoints;
pub mod error;
pub mod registry;
mod nack;
mod rtcp;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use self::core::{FrameEvent, ResultEvent, SessionStats};
pub use driver::{Sequenced, TrackItem, random_u32};
pub use endpoints::{ResultStream, SessionProbe, UploadWriter};
pub use error::SessionError;

use crate::config::SessionConfig;

/// Starts a session called `name` and connects in the background. Returns
/// the upload writer, and the result stream unless a roboflowresultsrc
/// claimed it (see [`registry::claim`]).
pub fn start(name: String, config: SessionConfig) -> Result<(UploadWriter, Option<ResultStream>), SessionError> {
    let (shared, receivers) = driver::Shared::start(name, config);
    let alive = Arc::new(endpoints::Alive(shared.clone()));
    let stream = ResultStream::new(shared.clone(), alive.clone(), receivers.results, receivers.track);
    let results = registry::register(&shared, stream)?;
    Ok((UploadWriter::new(shared, alive), results))
}

/// Starts a session on a camera the server reads (the config's `camera`)
/// and connects in the background. Nothing is uploaded: the result stream
/// is its only end, and dropping it ends the session.
pub fn start_camera(name: String, config: SessionConfig) -> ResultStream {
    let (shared, receivers) = driver::Shared::start(name, config);
    let alive = Arc::new(endpoints::Alive(shared.clone()));
    let mut stream = ResultStream::new(shared, alive, receivers.results, receivers.track);
    stream.set_reader(endpoints::Reader::ResultSource);
    stream
}

/// Unique default session names.
pub fn default_name(element_name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{element_name}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// The `stats` structure of the sink, with its own fields added by `extra`.
pub fn stats_structure(stats: &SessionStats, extra: impl FnOnce(&mut gst::structure::StructureRef)) -> gst::Structure {
    let mut structure = gst::Structure::builder("roboflow-stats")
        .field("phase", stats.state.as_str())
        .field("bytes-sent", stats.bytes_sent)
        .field("total-bytes", stats.total_bytes)
        .field("chunks-sent", stats.chunks_sent)
        .field("total-chunks", stats.total_chunks)
        .field("keepalives-sent", stats.keepalives_sent)
        .field("keepalives-echoed", stats.keepalives_echoed)
        .field("last-echo-rtt", stats.last_echo_rtt.map(|rtt| gst::ClockTime::from_nseconds(rtt.as_nanos() as u64)))
        .field("frames-received", stats.frames_received)
        .build();
    extra(&mut structure);
    structure
}
