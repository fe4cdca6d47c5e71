// The RoboflowInferenceMeta that roboflowresultsrc puts on each JPEG frame
// survives the decoder and converters after it (GstVideoDecoder copies
// metas without tags; the meta is registered with none).

mod common;

use common::harness::init;
use gst::prelude::*;

fn jpeg_frame() -> gst::Buffer {
    let pipeline = gst::parse::launch(
        "videotestsrc num-buffers=1 ! video/x-raw,width=64,height=48 ! jpegenc ! appsink name=out sync=false",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let sink = pipeline.by_name("out").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let sample = sink.pull_sample().expect("one JPEG frame");
    pipeline.set_state(gst::State::Null).unwrap();
    sample.buffer_owned().unwrap()
}

#[test]
fn the_meta_survives_jpegdec_and_videoconvert() {
    init();
    let mut jpeg = jpeg_frame().copy();
    {
        let buffer = jpeg.get_mut().unwrap();
        buffer.set_pts(gst::ClockTime::from_mseconds(40));
        let mut meta = gst::meta::CustomMeta::add(buffer, gstroboflow::META_NAME).unwrap();
        meta.mut_structure().set("json", r#"{"video_metadata":{"frame_id":7}}"#);
        meta.mut_structure().set("frame-id", 7u64);
    }
    let mut harness = gst_check::Harness::new_parse("jpegdec ! videoconvert ! capsfilter caps=video/x-raw,format=GRAY8");
    harness.set_src_caps(gst::Caps::builder("image/jpeg").field("framerate", gst::Fraction::new(30, 1)).build());
    harness.push(jpeg).unwrap();
    harness.push_event(gst::event::Eos::new());
    let decoded = harness.pull().expect("a decoded frame");
    let meta = gst::meta::CustomMeta::from_buffer(&decoded, gstroboflow::META_NAME).expect("the meta is on the decoded frame");
    assert_eq!(meta.structure().get::<u64>("frame-id").unwrap(), 7);
    assert_eq!(meta.structure().get::<String>("json").unwrap(), r#"{"video_metadata":{"frame_id":7}}"#);
    assert_eq!(decoded.pts(), Some(gst::ClockTime::from_mseconds(40)));
}
