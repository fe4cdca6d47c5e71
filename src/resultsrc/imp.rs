// roboflowresultsrc: a bin around the frame source.
//
//   JPEG:  framesrc ! queue (max-queued-frames) ! jpegdec ! identity ! ghost src
//   track: framesrc ! depayloader ! decoder ! identity ! ghost src
//
// The decoder chain is chosen from the caps the frame source announces. For
// data-channel JPEG the queue is the bounded queue of the flow control:
// while it is full the frame source does not read further results, its acks
// stop, and the server waits; with realtime processing it leaks its oldest
// frames. The returned track is not paced by acks: its packets wait in the
// session's bounded track queue (overflow counted as track-packets-dropped)
// and the frame source decodes each frame in its own streaming thread, so a
// frame crosses no further thread (the queue is left out of the chain).
//
// A JPEG frame carries its result from the frame source on; a decoded track
// frame carries its result's exact pts, and the tail looks the result up
// (the frame source held the frame's packets until the result was there).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::META_NAME;
use super::regions;
use super::framesrc::{self, CAT, DEFAULT_MAX_QUEUED_FRAMES, FrameSrcElement, Params, Shared};
use crate::config::{self, UploadSettings};
use crate::protocol::rtp_order::DEFAULT_LOSS_WAIT;
use crate::session::{self, registry};

const DEFAULT_ATTACH_ROI_META: bool = true;

pub struct ResultSrc {
    framesrc: FrameSrcElement,
    queue: gst::Element,
    tail: gst::Element,
    ghost: gst::GhostPad,
    shared: Shared,
    params: Mutex<Params>,
    /// The session properties, used with source-url.
    settings: Mutex<UploadSettings>,
    /// Session properties the user set (only source-url uses them).
    explicit: Mutex<BTreeSet<String>>,
    decoder: Mutex<Vec<gst::Element>>,
}

#[glib::object_subclass]
impl ObjectSubclass for ResultSrc {
    const NAME: &'static str = "GstRoboflowResultSrc";
    type Type = super::ResultSrc;
    type ParentType = gst::Bin;

    fn with_class(klass: &Self::Class) -> Self {
        let framesrc = glib::Object::builder::<FrameSrcElement>().property("name", "framesrc").build();
        let queue = gst::ElementFactory::make("queue")
            .name("queue")
            .property("max-size-buffers", DEFAULT_MAX_QUEUED_FRAMES)
            .property("max-size-bytes", 0u32)
            .property("max-size-time", 0u64)
            .build()
            .expect("the queue element (coreelements) is available");
        let tail = gst::ElementFactory::make("identity")
            .name("tail")
            .property("silent", true)
            .build()
            .expect("the identity element (coreelements) is available");
        let template = klass.pad_template("src").expect("src template");
        let ghost = gst::GhostPad::builder_from_template(&template).name("src").build();
        let shared = Shared::default();
        shared.attach_roi.store(DEFAULT_ATTACH_ROI_META, Ordering::Relaxed);
        Self {
            framesrc,
            queue,
            tail,
            ghost,
            shared,
            params: Mutex::new(Params::default()),
            settings: Mutex::new(config::camera_settings()),
            explicit: Mutex::new(BTreeSet::new()),
            decoder: Mutex::new(Vec::new()),
        }
    }
}

impl ObjectImpl for ResultSrc {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let mut properties = vec![
                glib::ParamSpecString::builder("session")
                    .nick("Session")
                    .blurb("Name of the roboflowuploadsink session whose results to output (its 'session' property). Excludes source-url")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("source-url")
                    .nick("Source URL")
                    .blurb("A camera the server reads itself: rtsp:// or rtsps:// (RTSP), http:// or https:// (MJPEG). The element then runs a session of its own with the session properties below; no roboflowuploadsink. Credentials in the URL go to the server only: reading the property back shows the URL without them. Excludes session")
                    .mutable_ready()
                    .build(),
            ];
            properties.extend(config::camera_session_properties());
            properties.extend([
                glib::ParamSpecUInt::builder("max-queued-frames")
                    .nick("Max queued frames")
                    .blurb("Frames held for downstream; while full, acks stop and the server waits (realtime processing: the oldest are dropped)")
                    .minimum(1)
                    .maximum(1024)
                    .default_value(DEFAULT_MAX_QUEUED_FRAMES)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("latency")
                    .nick("Latency")
                    .blurb("Milliseconds reported as this live source's latency: with live video or a camera, a sink that syncs renders each returned frame this long after its timestamp (frames whose result takes longer come late)")
                    .default_value(framesrc::DEFAULT_LATENCY_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("loss-wait")
                    .nick("Loss wait")
                    .blurb("Track transport: milliseconds the returned track's packets wait behind a lost one for its retransmission (the session NACKs a gap 10 ms after it appears). It must cover a round trip to the server: raise it for a server far away. A packet not resent in time is given up; the frames up to the next keyframe, which the element then asks for, are dropped")
                    .minimum(10)
                    .maximum(5000)
                    .default_value(DEFAULT_LOSS_WAIT.as_millis() as u32)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("attach-roi-meta")
                    .nick("Attach ROI meta")
                    .blurb("Attach each detected box of a frame's result to the frame as a GstVideoRegionOfInterestMeta (pixels of the frame; roi_type the class; a 'detection' param with output, class, confidence, class-id, detection-id, tracker-id)")
                    .default_value(DEFAULT_ATTACH_ROI_META)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("Frames received, pushed, paired and unpaired, acks sent, largest queue depth, drops, results missed (processed by the server before the results channel opened), regions attached (ROI metas) and detections skipped (predictions that are no usable box)")
                    .read_only()
                    .build(),
            ]);
            properties
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let name = pspec.name();
        let mut params = self.params.lock().unwrap();
        let mut settings = self.settings.lock().unwrap();
        if name == "connect-timeout" {
            // Both meanings: the session's set-up, or the wait for a sink.
            let ms: u32 = value.get().expect("type checked upstream");
            params.attach_timeout = Duration::from_millis(ms.into());
            settings.connect_timeout_ms = ms;
            return;
        }
        if config::set_session_property(&mut settings, name, value) {
            self.explicit.lock().unwrap().insert(name.to_owned());
            return;
        }
        match name {
            "session" => params.session = value.get().expect("type checked upstream"),
            "source-url" => settings.source_url = value.get().expect("type checked upstream"),
            "max-queued-frames" => {
                params.max_queued_frames = value.get().expect("type checked upstream");
                self.queue.set_property("max-size-buffers", params.max_queued_frames);
            }
            "latency" => params.latency = Duration::from_millis(value.get::<u32>().expect("type checked upstream").into()),
            "loss-wait" => params.loss_wait = Duration::from_millis(value.get::<u32>().expect("type checked upstream").into()),
            "attach-roi-meta" => self.shared.attach_roi.store(value.get().expect("type checked upstream"), Ordering::Relaxed),
            name => unreachable!("unknown property {name}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        if pspec.name() == "stats" {
            return self.stats().to_value();
        }
        let params = self.params.lock().unwrap();
        let settings = self.settings.lock().unwrap();
        if let Some(value) = config::session_property(&settings, pspec.name()) {
            return value;
        }
        match pspec.name() {
            "session" => params.session.to_value(),
            // Never the credentials: the URL as shown in messages.
            "source-url" => settings
                .source_url
                .as_deref()
                .map(|url| config::CameraSource::parse(url).map(|camera| camera.shown()).unwrap_or_else(|_| "<invalid URL>".to_owned()))
                .to_value(),
            "max-queued-frames" => params.max_queued_frames.to_value(),
            "latency" => (params.latency.as_millis() as u32).to_value(),
            "loss-wait" => (params.loss_wait.as_millis() as u32).to_value(),
            "attach-roi-meta" => self.shared.attach_roi.load(Ordering::Relaxed).to_value(),
            name => unreachable!("unknown property {name}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        *self.shared.owner.lock().unwrap() = Some(obj.upcast_ref::<gst::Element>().downgrade());
        *self.framesrc.imp().shared.lock().unwrap() = self.shared.clone();
        obj.add_many([self.framesrc.upcast_ref::<gst::Element>(), &self.queue, &self.tail])
            .expect("children are added once");
        self.framesrc.link(&self.queue).expect("framesrc links to queue");
        self.queue.link(&self.tail).expect("queue links to tail");
        self.ghost
            .set_target(Some(&self.tail.static_pad("src").expect("identity has a src pad")))
            .expect("the ghost pad targets the tail");
        obj.add_pad(&self.ghost).expect("the ghost pad is added once");
        obj.set_suppressed_flags(gst::ElementFlags::SOURCE | gst::ElementFlags::SINK);
        obj.set_element_flags(gst::ElementFlags::SOURCE);
        self.install_probes();
    }
}

impl GstObjectImpl for ResultSrc {}

impl ElementImpl for ResultSrc {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Roboflow result source",
                "Source/Video/Network",
                "Outputs the video a Roboflow Inference Server returns, with each frame's Workflow result as a RoboflowInferenceMeta and a roboflow-inference bus message: for a roboflowuploadsink's session (session), or for a camera the server reads itself (source-url: RTSP or MJPEG)",
                "gst-roboflow developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &gst::Caps::new_empty_simple("video/x-raw")).unwrap()]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(&self, transition: gst::StateChange) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::NullToReady
            && let Err(message) = self.claim_results()
        {
            self.post_error_message(message);
            return Err(gst::StateChangeError);
        }
        if transition == gst::StateChange::ReadyToPaused {
            *self.framesrc.imp().params.lock().unwrap() = self.params.lock().unwrap().clone();
            self.reset_counters();
            if let Err(message) = self.start_camera_session() {
                self.post_error_message(message);
                return Err(gst::StateChangeError);
            }
        }
        let result = self.parent_change_state(transition);
        if transition == gst::StateChange::PausedToReady || (transition == gst::StateChange::ReadyToPaused && result.is_err()) {
            // A camera session not taken by the frame source ends here.
            self.shared.camera.lock().unwrap().take();
        }
        if transition == gst::StateChange::PausedToReady {
            self.remove_decoder();
        }
        let leaving = transition == gst::StateChange::ReadyToNull
            || (transition == gst::StateChange::NullToReady && result.is_err());
        if leaving {
            self.shared.claim.lock().unwrap().take();
        }
        result
    }
}

impl BinImpl for ResultSrc {}

impl ResultSrc {
    /// NULL to READY: which results to output. With `session`, the claim on
    /// them is made now, so that a sink starting later hands them here.
    fn claim_results(&self) -> Result<(), gst::ErrorMessage> {
        let session = self.params.lock().unwrap().session.clone().filter(|name| !name.trim().is_empty());
        let camera = self.settings.lock().unwrap().source_url.clone().filter(|url| !url.trim().is_empty());
        let settings_error = |text: String| gst::error_msg!(gst::LibraryError::Settings, ("{}", text));
        match (session, camera) {
            (Some(_), Some(_)) => Err(settings_error(
                "properties 'session' and 'source-url' exclude each other: set 'session' to output the results of a roboflowuploadsink, or 'source-url' for a camera the server reads".to_owned(),
            )),
            (None, None) => Err(settings_error(
                "set 'source-url' (a camera the server reads: rtsp://, rtsps://, http(s):// MJPEG) or 'session' (the roboflowuploadsink session whose results to output)".to_owned(),
            )),
            (None, Some(_)) => Ok(()),
            (Some(name), None) => {
                let explicit = self.explicit.lock().unwrap();
                if !explicit.is_empty() {
                    let names: Vec<&str> = explicit.iter().map(String::as_str).collect();
                    return Err(settings_error(format!(
                        "session properties of roboflowresultsrc apply only with source-url ({}): the session '{name}' is the roboflowuploadsink's, set them there",
                        names.join(", ")
                    )));
                }
                // From now on, a sink that starts this session hands its
                // results to this source.
                let claim = registry::claim(&name).map_err(|error| settings_error(error.to_string()))?;
                *self.shared.claim.lock().unwrap() = Some(claim);
                Ok(())
            }
        }
    }

    /// READY to PAUSED with source-url: the session starts connecting now
    /// (the server's worker takes seconds), the frame source reads it.
    fn start_camera_session(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        if settings.source_url.as_deref().is_none_or(|url| url.trim().is_empty()) {
            return Ok(());
        }
        let config = settings.validate().map_err(|err| gst::error_msg!(gst::LibraryError::Settings, ("{}", err)))?;
        let camera = config.camera.as_ref().map(|camera| camera.shown()).unwrap_or_default();
        let name = session::default_name(&self.obj().name());
        gst::info!(CAT, imp = self, "starting session '{name}' with {} on the camera {camera}", config.api_url);
        *self.shared.camera.lock().unwrap() = Some(session::start_camera(name, config));
        Ok(())
    }

    fn reset_counters(&self) {
        let counters = &self.shared.counters;
        for counter in [
            &counters.frames_received,
            &counters.buffers_queued,
            &counters.buffers_left_queue,
            &counters.frames_pushed,
            &counters.frames_paired,
            &counters.frames_unpaired,
            &counters.max_queue_depth,
            &counters.regions_attached,
            &counters.detections_skipped,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        *self.shared.results.lock().unwrap() = Default::default();
        *self.shared.session.lock().unwrap() = None;
    }

    fn stats(&self) -> gst::Structure {
        let counters = &self.shared.counters;
        let queued = counters.buffers_queued.load(Ordering::Relaxed);
        let left = counters.buffers_left_queue.load(Ordering::Relaxed);
        let level = u64::from(self.queue.property::<u32>("current-level-buffers"));
        // Only the queue drops frames, and only JPEG frames go through it.
        let dropped = if self.queue_in_chain() && self.shared.realtime.load(Ordering::Relaxed) { queued.saturating_sub(left + level) } else { 0 };
        let packets_dropped = framesrc::track_packets_dropped(&self.shared);
        let acks_sent = framesrc::acks_sent(&self.shared);
        gst::Structure::builder("roboflow-result-stats")
            .field("frames-received", counters.frames_received.load(Ordering::Relaxed))
            .field("frames-pushed", counters.frames_pushed.load(Ordering::Relaxed))
            .field("frames-paired", counters.frames_paired.load(Ordering::Relaxed))
            .field("frames-unpaired", counters.frames_unpaired.load(Ordering::Relaxed))
            .field("acks-sent", acks_sent)
            .field("max-queue-depth", counters.max_queue_depth.load(Ordering::Relaxed))
            .field("frames-dropped", dropped)
            .field("track-packets-dropped", packets_dropped)
            .field("track-packets-lost", counters.track_packets_lost.load(Ordering::Relaxed))
            .field("keyframe-requests", framesrc::keyframe_requests_sent(&self.shared))
            .field("results-missed", framesrc::results_missed(&self.shared))
            .field("regions-attached", counters.regions_attached.load(Ordering::Relaxed))
            .field("detections-skipped", counters.detections_skipped.load(Ordering::Relaxed))
            .build()
    }

    fn install_probes(&self) {
        // QoS from downstream stops at the tail while a track decoder runs
        // (see plug_decoder).
        let hide_qos = self.shared.hide_qos.clone();
        self.tail.static_pad("sink").unwrap().add_probe(gst::PadProbeType::EVENT_UPSTREAM, move |_, info| {
            let is_qos = matches!(&info.data, Some(gst::PadProbeData::Event(event)) if event.type_() == gst::EventType::Qos);
            if is_qos && hide_qos.load(Ordering::Relaxed) {
                // Taken and released here, and reported handled: returning
                // Drop instead made GStreamer unref a cleared event (a
                // CRITICAL per event).
                drop(info.take_event());
                return gst::PadProbeReturn::Handled;
            }
            gst::PadProbeReturn::Ok
        });

        // Frames leaving the bounded queue.
        let counters = self.shared.counters.clone();
        self.queue.static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            counters.buffers_left_queue.fetch_add(1, Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });

        // At EOS, when every frame has left, the counts are final.
        let weak = self.obj().downgrade();
        self.tail.static_pad("src").unwrap().add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
            if let Some(gst::PadProbeData::Event(event)) = &info.data
                && event.type_() == gst::EventType::Eos
                && let Some(obj) = weak.upgrade()
            {
                let summary = crate::bus::summary_structure(obj.imp().stats());
                gst::info!(CAT, obj = obj, "results done: {summary}");
                let message = gst::message::Element::builder(summary).src(&obj).build();
                let _ = obj.post_message(message);
            }
            gst::PadProbeReturn::Ok
        });

        // Every frame leaves the bin with its result as a meta: a JPEG frame
        // brought it along; a track frame's is looked up by its pts, never
        // waited for (the frame source held the frame until it was there).
        // Then its boxes go on it as region-of-interest metas.
        let shared = self.shared.clone();
        let weak = self.obj().downgrade();
        self.tail.static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            if let Some(buffer) = info.buffer_mut() {
                shared.counters.frames_pushed.fetch_add(1, Ordering::Relaxed);
                let paired = gst::meta::CustomMeta::from_buffer(buffer, META_NAME).is_ok()
                    || buffer
                        .pts()
                        .and_then(|pts| shared.results.lock().unwrap().take(pts.nseconds()))
                        .is_some_and(|result| {
                            let buffer = buffer.make_mut();
                            // Live video: the frame takes its source buffer's PTS.
                            if let Some(pts) = result.source_pts {
                                buffer.set_pts(gst::ClockTime::from_nseconds(pts));
                            }
                            result.attach(buffer)
                        });
                if paired {
                    shared.counters.frames_paired.fetch_add(1, Ordering::Relaxed);
                    let frame = pad.current_caps().as_deref().and_then(regions::frame_size);
                    if let Some(frame) = frame.filter(|_| shared.attach_roi.load(Ordering::Relaxed)) {
                        let attached = regions::attach(buffer.make_mut(), frame);
                        shared.counters.regions_attached.fetch_add(attached.regions, Ordering::Relaxed);
                        shared.counters.detections_skipped.fetch_add(attached.skipped, Ordering::Relaxed);
                    }
                } else {
                    shared.counters.frames_unpaired.fetch_add(1, Ordering::Relaxed);
                    if let Some(obj) = weak.upgrade() {
                        gst::debug!(CAT, obj = obj, "no result pairs with the frame at {:?}", buffer.pts());
                    }
                }
            }
            gst::PadProbeReturn::Ok
        });
    }

    /// Inserts the decoder for `caps` before the tail: after the queue for
    /// JPEG, straight after the frame source for the track.
    pub(super) fn plug_decoder(&self, caps: &gst::CapsRef) -> Result<(), String> {
        let mut decoder = self.decoder.lock().unwrap();
        if !decoder.is_empty() {
            return Ok(());
        }
        let structure = caps.structure(0).ok_or("empty caps")?;
        let names: &[&str] = match structure.name().as_str() {
            "image/jpeg" => &["jpegdec"],
            "application/x-rtp" => match structure.get::<&str>("encoding-name").unwrap_or_default() {
                "VP8" => &["rtpvp8depay", "vp8dec"],
                "H264" => &["rtph264depay", "h264parse", "avdec_h264"],
                other => return Err(format!("the server's video track uses {other}, which roboflowresultsrc cannot decode (VP8 and H264 are supported)")),
            },
            other => return Err(format!("unexpected caps {other} from the frame source")),
        };
        let elements = names
            .iter()
            .map(|name| {
                gst::ElementFactory::make(name).build().map_err(|_| {
                    format!("the GStreamer element '{name}' is missing: install gstreamer1.0-plugins-good, -bad and gstreamer1.0-libav")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The track's frames carry the server's pts until the tail gives
        // each its own (the source buffer's, or the camera's on the pipeline
        // clock): a sink's QoS, measured on those, would have the decoder
        // drop nearly every frame as late (vp8dec does even with qos=false).
        self.shared.hide_qos.store(structure.name() == "application/x-rtp", Ordering::Relaxed);
        // A decoded track frame carries its result's exact pts; half a
        // frame of slack covers a decoder that rounds it.
        let fps = structure.get::<gst::Fraction>("framerate").ok().filter(|f| f.numer() > 0);
        self.shared.results.lock().unwrap().tolerance_ns = match fps {
            Some(fps) => (500_000_000u64 * fps.denom() as u64) / fps.numer() as u64,
            None => 16_666_666,
        };
        let rtp = structure.name() == "application/x-rtp";
        if rtp {
            // A packet lost for good (not retransmitted within the frame
            // source's loss wait) breaks its frame and every frame after
            // it up to a keyframe, which the server's encoder sends only
            // when asked: drop those frames rather than show them
            // corrupted, and ask (the frame source turns the request into
            // a PLI).
            elements[0].set_property("request-keyframe", true);
            elements[0].set_property("wait-for-keyframe", true);
        }
        self.configure_queue(self.shared.realtime.load(Ordering::Relaxed));
        let obj = self.obj();
        obj.add_many(&elements).map_err(|err| err.to_string())?;
        self.queue.unlink(&self.tail);
        let framesrc = self.framesrc.upcast_ref::<gst::Element>();
        // The track's frames skip the queue (see the top of this file).
        let mut chain = if rtp {
            framesrc.unlink(&self.queue);
            vec![framesrc]
        } else {
            vec![&self.queue]
        };
        chain.extend(elements.iter());
        chain.push(&self.tail);
        gst::Element::link_many(chain).map_err(|err| format!("linking the decoder failed: {err}"))?;
        for element in &elements {
            element.sync_state_with_parent().map_err(|err| err.to_string())?;
        }
        gst::info!(CAT, imp = self, "decoding with {}", names.join(" ! "));
        *decoder = elements;
        Ok(())
    }

    fn remove_decoder(&self) {
        let elements = std::mem::take(&mut *self.decoder.lock().unwrap());
        if elements.is_empty() {
            return;
        }
        let obj = self.obj();
        for element in &elements {
            let _ = element.set_state(gst::State::Null);
        }
        let _ = obj.remove_many(&elements);
        let framesrc = self.framesrc.upcast_ref::<gst::Element>();
        if !self.queue_in_chain() {
            let _ = framesrc.link(&self.queue);
        }
        let _ = self.queue.link(&self.tail);
    }

    /// Whether frames pass the queue: JPEG does, the track bypasses it.
    fn queue_in_chain(&self) -> bool {
        self.queue.static_pad("sink").is_some_and(|pad| pad.is_linked())
    }

    /// Configures the bounded queue of the JPEG frames: bounded by
    /// max-queued-frames, leaking the oldest with realtime processing.
    fn configure_queue(&self, realtime: bool) {
        let frames = self.params.lock().unwrap().max_queued_frames;
        self.queue.set_property("max-size-buffers", frames);
        self.queue.set_property("max-size-bytes", 0u32);
        self.queue.set_property_from_str("leaky", if realtime { "downstream" } else { "no" });
    }
}
