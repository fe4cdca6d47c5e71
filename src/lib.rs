// gst-roboflow: run a video through a Roboflow Inference Server Workflow
// over WebRTC, from any GStreamer pipeline.

#![allow(clippy::non_send_fields_in_send_ty)]

use gst::glib;

mod bus;
mod config;
mod protocol;
mod resultsrc;
mod runtime;
mod session;
mod signalling;
mod stop;
mod uploadsink;

pub use resultsrc::{META_NAME, ResultSrc};
pub use runtime::live_tasks;
pub use uploadsink::UploadSink;

fn plugin_init(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    uploadsink::register(plugin)?;
    resultsrc::register(plugin)?;
    Ok(())
}

gst::plugin_define!(
    roboflow,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
