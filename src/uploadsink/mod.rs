use gst::glib;
use gst::prelude::*;

mod gate;
mod imp;
mod live;
mod live_job;
mod spool;

glib::wrapper! {
    /// `roboflowuploadsink`: uploads muxed video bytes to a Roboflow
    /// Inference Server over the `video_upload` data channel.
    pub struct UploadSink(ObjectSubclass<imp::UploadSink>) @extends gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "roboflowuploadsink",
        gst::Rank::NONE,
        UploadSink::static_type(),
    )
}
