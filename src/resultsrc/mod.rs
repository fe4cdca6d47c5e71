use gst::glib;
use gst::prelude::*;

mod framesrc;
mod imp;
mod regions;

/// Registered name of the custom meta carrying a frame's result: a
/// structure with `json` (string), `frame-id` (guint64) and `detections`
/// (an array of `detection` structures, as in the bus message) fields.
pub const META_NAME: &str = "RoboflowInferenceMeta";

glib::wrapper! {
    /// `roboflowresultsrc`: the video and per-frame results of a
    /// roboflowuploadsink session.
    pub struct ResultSrc(ObjectSubclass<imp::ResultSrc>) @extends gst::Bin, gst::Element, gst::Object, @implements gst::ChildProxy;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    if !gst::meta::CustomMeta::is_registered(META_NAME) {
        // Copy the result along with the frame through transforms (e.g.
        // videoconvert), so it stays with exactly that frame downstream.
        gst::meta::CustomMeta::register_with_transform(META_NAME, &[], |dest, meta, _src, _kind| {
            let source = meta.structure().to_owned();
            match gst::meta::CustomMeta::add(dest, META_NAME) {
                Ok(mut copy) => {
                    let target = copy.mut_structure();
                    for (field, value) in source.iter() {
                        target.set_value(field, value.clone());
                    }
                    true
                }
                Err(_) => false,
            }
        });
    }
    gst::Element::register(
        Some(plugin),
        "roboflowresultsrc",
        gst::Rank::NONE,
        ResultSrc::static_type(),
    )
}
