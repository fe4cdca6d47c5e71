// The internal live source of roboflowresultsrc: attaches to a session by
// name, posts each frame's JSON, and pushes the encoded video on: JPEG from
// the data channel into the bin's queue, with its result already on it as a
// RoboflowInferenceMeta; or the RTP of the returned track straight into its
// depayloader and decoder (this thread decodes it), each frame held
// until its result has arrived (protocol::rtp_pairing) so that the bin's
// tail only looks the result up by pts.
//
// Every call into the session is in the "Session calls" section at the end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;
use tokio::sync::mpsc;

use super::META_NAME;
use crate::config::{CameraKind, VideoTransport};
use crate::protocol::find_image;
use crate::protocol::rtp_order::{DEFAULT_LOSS_WAIT, RtpOrder};
use crate::protocol::rtp_pairing::{DEFAULT_HOLD, Released, ResultsByPts, TrackPairing, VIDEO_CLOCK_RATE};
use crate::runtime::Waits;
use crate::stop::{Stop, waited};
use crate::session::registry::Claim;
use crate::session::{FrameEvent, ResultEvent, ResultStream, Sequenced, SessionError, SessionProbe, TrackItem};

pub static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "roboflowresultsrc",
        gst::DebugColorFlags::empty(),
        Some("Roboflow result source"),
    )
});

/// Frames held for downstream by default (the `max-queued-frames` property).
pub const DEFAULT_MAX_QUEUED_FRAMES: u32 = 8;

/// After processing_complete, the track is read until it has been quiet
/// this long.
const TRACK_DRAIN_QUIET: Duration = Duration::from_millis(300);

/// Counters shared between the frame source, the bin's probes and `stats`.
#[derive(Default, Debug)]
pub struct Counters {
    pub frames_received: AtomicU64,
    pub buffers_queued: AtomicU64,
    pub buffers_left_queue: AtomicU64,
    pub frames_pushed: AtomicU64,
    pub frames_paired: AtomicU64,
    pub frames_unpaired: AtomicU64,
    pub max_queue_depth: AtomicU64,
    /// Boxes attached to frames as GstVideoRegionOfInterestMeta.
    pub regions_attached: AtomicU64,
    /// Predictions that are no usable box (bus `detections-skipped`), and
    /// boxes left with no pixel in the frame they belong to.
    pub detections_skipped: AtomicU64,
    /// Track packets that did not come (nor a retransmission) within the
    /// loss wait: their frame is broken, the depayloader asks for a keyframe.
    pub track_packets_lost: AtomicU64,
}

/// A frame's result as it rides on its video: the fields of its
/// RoboflowInferenceMeta, taken as values from the structure of the
/// frame's bus message (no string is parsed or printed again).
#[derive(Debug, Clone)]
pub struct ResultMeta {
    frame_id: u64,
    json: glib::SendValue,
    detections: glib::SendValue,
    /// Live video: the PTS of the buffer sent, which the returned frame
    /// takes in place of the server's pts.
    pub source_pts: Option<u64>,
}

impl ResultMeta {
    fn from_structure(structure: &gst::StructureRef) -> Option<ResultMeta> {
        Some(ResultMeta {
            frame_id: structure.get("frame-id").ok()?,
            json: structure.value("json").ok()?.clone(),
            detections: structure.value("detections").ok()?.clone(),
            source_pts: None,
        })
    }

    /// Puts the result on `buffer` as a RoboflowInferenceMeta.
    pub fn attach(&self, buffer: &mut gst::BufferRef) -> bool {
        let Ok(mut meta) = gst::meta::CustomMeta::add(buffer, META_NAME) else {
            return false;
        };
        let structure = meta.mut_structure();
        structure.set_value("json", self.json.clone());
        structure.set("frame-id", self.frame_id);
        structure.set_value("detections", self.detections.clone());
        true
    }
}

#[derive(Clone, Default)]
pub struct Shared {
    pub counters: Arc<Counters>,
    /// Track transport: each result by its pts until its decoded frame
    /// leaves the bin (the frame carries exactly that pts).
    pub results: Arc<Mutex<ResultsByPts<ResultMeta>>>,
    /// The session processes in realtime: no acks, the queue leaks.
    pub realtime: Arc<AtomicBool>,
    /// A track decoder runs: downstream QoS does not reach it.
    pub hide_qos: Arc<AtomicBool>,
    /// Each frame's boxes go on it as GstVideoRegionOfInterestMeta
    /// (the `attach-roi-meta` property).
    pub attach_roi: Arc<AtomicBool>,
    /// The attached session, for the counts it keeps (acks, track packets dropped).
    pub session: Arc<Mutex<Option<SessionProbe>>>,
    /// The claim on the session's results, made when the bin went to READY.
    pub claim: Arc<Mutex<Option<Claim>>>,
    /// With source-url: the bin's own session on a camera, started when it
    /// went to PAUSED, until the frame source takes it.
    pub camera: Arc<Mutex<Option<ResultStream>>>,
    /// The bin that posts the messages, set by roboflowresultsrc.
    pub owner: Arc<Mutex<Option<glib::WeakRef<gst::Element>>>>,
}

/// What the frame source emits, decided when it attaches to the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// No stream output: messages only, no buffers.
    Nothing,
    Jpeg { output: String },
    Rtp,
}

#[derive(Debug, Clone)]
pub struct Params {
    pub session: Option<String>,
    pub attach_timeout: Duration,
    pub max_queued_frames: u32,
    /// Reported as this live source's latency.
    pub latency: Duration,
    /// Track transport: how long packets wait behind a lost one for its
    /// retransmission (the `loss-wait` property).
    pub loss_wait: Duration,
}

/// The latency roboflowresultsrc reports by default: the time a live frame
/// takes to the server, through a Workflow of classical blocks and back
/// (tens of ms on a local server), with room to spare.
pub const DEFAULT_LATENCY_MS: u32 = 300;

impl Default for Params {
    fn default() -> Self {
        Self {
            session: None,
            attach_timeout: Duration::from_millis(crate::config::DEFAULT_CONNECT_TIMEOUT_MS.into()),
            max_queued_frames: DEFAULT_MAX_QUEUED_FRAMES,
            latency: Duration::from_millis(DEFAULT_LATENCY_MS.into()),
            loss_wait: DEFAULT_LOSS_WAIT,
        }
    }
}

/// A frame's result as read, and what of it rides on the frame's video.
type ReadFrame = (Box<FrameEvent>, Option<ResultMeta>);

struct Attached {
    /// Frames count as handled once pushed (into the queue, or through the
    /// track's decoder); the session acks them
    /// max-queued-frames ahead, so at most that many results wait in the
    /// client beyond the bounded queue.
    link: SessionLink,
    output: Output,
    /// Frame whose buffer was handed to basesrc: it has been pushed
    /// once create() is called again.
    handed_out: Option<u64>,
    /// A frame read ahead to learn the frame rate before setting caps.
    held: Option<ReadFrame>,
    caps_sent: bool,
    /// The track's packets back in sequence order, a lost one waited for.
    order: RtpOrder<Bytes>,
    /// `order.lost()` as last counted in the statistics.
    lost_counted: u64,
    pairing: TrackPairing<Bytes>,
    /// processing_complete arrived; RTP still in flight is drained (the two
    /// travel apart, so the last frames' packets may come after it).
    draining: bool,
    /// The track is drained or gone: what the pairing holds goes out.
    track_done: bool,
    ended: bool,
    /// A camera: RTSP: running time minus the server's pts, fixed at the
    /// first result; MJPEG: the last PTS given (see `camera_pts`).
    timeline: Option<i128>,
}

enum State {
    Idle,
    Attached(Box<Attached>),
    /// Downstream stopped taking buffers and the session was let go.
    LetGo,
}

pub struct FrameSrc {
    pub params: Mutex<Params>,
    pub shared: Mutex<Shared>,
    state: Mutex<State>,
    waits: Waits,
    /// This source ended the stream itself (end of results or an error):
    /// an EOS leaving it otherwise means downstream stopped early.
    finished: AtomicBool,
}

impl Default for FrameSrc {
    fn default() -> Self {
        Self {
            params: Mutex::new(Params::default()),
            shared: Mutex::new(Shared::default()),
            state: Mutex::new(State::Idle),
            waits: Waits::default(),
            finished: AtomicBool::new(false),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for FrameSrc {
    const NAME: &'static str = "GstRoboflowFrameSrc";
    type Type = FrameSrcElement;
    type ParentType = gst_base::PushSrc;
}

glib::wrapper! {
    pub struct FrameSrcElement(ObjectSubclass<FrameSrc>) @extends gst_base::PushSrc, gst_base::BaseSrc, gst::Element, gst::Object;
}

impl ObjectImpl for FrameSrc {
    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.set_live(true);
        obj.set_format(gst::Format::Time);
        // GstBaseSrc sends EOS when downstream answers a buffer with EOS
        // (e.g. a snapshot that has its frame) or not-linked, and then stops
        // calling create(): the session must be let go here, or the server
        // waits for acks that never come.
        let weak = obj.downgrade();
        obj.static_pad("src").expect("basesrc has a src pad").add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |pad, info| {
            if let Some(gst::PadProbeData::Event(event)) = &info.data
                && event.type_() == gst::EventType::Eos
                && let Some(obj) = weak.upgrade()
            {
                obj.imp().on_eos_leaving(pad.last_flow_result());
            }
            gst::PadProbeReturn::Ok
        });
    }
}

impl GstObjectImpl for FrameSrc {}

impl ElementImpl for FrameSrc {
    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &gst::Caps::new_any()).unwrap()]
        });
        TEMPLATES.as_ref()
    }
}

impl BaseSrcImpl for FrameSrc {
    /// The track's depayloader met a loss it cannot repair (see
    /// `plug_decoder`): the server's encoder sends a keyframe only when
    /// asked, so ask.
    fn event(&self, event: &gst::Event) -> bool {
        if gst_video::UpstreamForceKeyUnitEvent::parse(event).is_ok() {
            let shared = self.shared.lock().unwrap().clone();
            if let Some(session) = shared.session.lock().unwrap().as_ref() {
                gst::debug!(CAT, imp = self, "the depayloader lost a frame: asking the server for a keyframe");
                session.request_keyframe();
            }
            return true;
        }
        self.parent_event(event)
    }

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        // basesrc marks its first buffer DISCONT, which the track's
        // depayloader (request-keyframe) takes for a loss and answers with
        // a keyframe request: the stream starts with a keyframe anyway, and
        // a real gap, in the first frame too, is still seen by the
        // depayloader from the sequence numbers.
        self.obj().static_pad("src").expect("basesrc has a src pad").add_probe(
            gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
            |_, info| {
                if let Some(gst::PadProbeData::Buffer(buffer)) = &mut info.data {
                    buffer.make_mut().unset_flags(gst::BufferFlags::DISCONT);
                } else if let Some(gst::PadProbeData::BufferList(list)) = &mut info.data
                    && let Some(first) = list.make_mut().get_mut(0)
                {
                    first.unset_flags(gst::BufferFlags::DISCONT);
                }
                gst::PadProbeReturn::Remove
            },
        );
        *self.state.lock().unwrap() = State::Idle;
        self.finished.store(false, Ordering::Release);
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // Dropping the link lets go of the session.
        *self.state.lock().unwrap() = State::Idle;
        Ok(())
    }

    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        self.waits.unlock();
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        self.waits.unlock_stop();
        Ok(())
    }

    fn is_seekable(&self) -> bool {
        false
    }

    fn query(&self, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Latency(latency) = query.view_mut() {
            // A frame leaves as late as its result: a sink that syncs renders
            // each frame this long after its source PTS (live video).
            let min = self.params.lock().unwrap().latency;
            latency.set(true, gst::ClockTime::from_nseconds(min.as_nanos() as u64), gst::ClockTime::NONE);
            return true;
        }
        BaseSrcImplExt::parent_query(self, query)
    }

}

impl PushSrcImpl for FrameSrc {
    fn create(&self, _buffer: Option<&mut gst::BufferRef>) -> Result<CreateSuccess, gst::FlowError> {
        let mut state = self.state.lock().unwrap();
        let outcome = match &mut *state {
            // A bin whose output goes nowhere would take one buffer and then
            // answer not-linked; say so in plain words before the session
            // is even read.
            State::Idle if !self.downstream_linked() => Err(Stop::NotLinked),
            State::Idle => match self.attach() {
                Ok(attached) => {
                    *state = State::Attached(Box::new(attached));
                    let State::Attached(attached) = &mut *state else { unreachable!() };
                    self.next_buffer(attached)
                }
                Err(stop) => Err(stop),
            },
            State::Attached(attached) => self.next_buffer(attached),
            State::LetGo => Err(Stop::Eos),
        };
        drop(state);
        outcome.map_err(|stop| self.report(stop))
    }
}

impl FrameSrc {
    fn report(&self, stop: Stop) -> gst::FlowError {
        if !matches!(stop, Stop::Flushing) {
            self.finished.store(true, Ordering::Release);
        }
        match stop {
            Stop::Flushing => gst::FlowError::Flushing,
            Stop::Eos => gst::FlowError::Eos,
            Stop::NotLinked => {
                let name = self.owner().map(|owner| owner.name().to_string()).unwrap_or_else(|| "roboflowresultsrc".to_owned());
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("the src pad of roboflowresultsrc '{}' is not linked (not-linked): link it to a consumer such as '! videoconvert ! autovideosink', or to fakesink to keep only the roboflow-inference messages", name)
                );
                // Posted first: letting go of the results ends the sink's job.
                self.shared.lock().unwrap().claim.lock().unwrap().take();
                gst::FlowError::NotLinked
            }
            Stop::Error(message) => {
                self.post_error_message(message);
                gst::FlowError::Error
            }
        }
    }

    /// An EOS leaves the source. Unless the source ended the stream itself,
    /// downstream stopped taking buffers: no more results will be read, so
    /// the session is let go now (a session no one else holds then closes).
    fn on_eos_leaving(&self, flow: Result<gst::FlowSuccess, gst::FlowError>) {
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        let previous = std::mem::replace(&mut *self.state.lock().unwrap(), State::LetGo);
        if let State::Attached(attached) = previous {
            gst::info!(CAT, imp = self, "downstream stopped taking buffers ({flow:?}): letting go of the session");
            drop(attached);
        }
    }

    fn wait<T: Send>(&self, timeout: Option<Duration>, on_timeout: impl FnOnce() -> String, future: impl Future<Output = T> + Send) -> Result<T, Stop> {
        waited(self.waits.run(timeout, future), on_timeout)
    }

    fn owner(&self) -> Option<gst::Element> {
        self.shared.lock().unwrap().owner.lock().unwrap().as_ref().and_then(|weak| weak.upgrade())
    }

    /// Whether the bin's src pad leads anywhere (true when not in a bin).
    fn downstream_linked(&self) -> bool {
        self.owner().and_then(|owner| owner.static_pad("src")).is_none_or(|pad| pad.is_linked())
    }

    /// Has the bin insert the decoder for `caps`, then announces them: the
    /// decoder must be linked before downstream is asked to accept them.
    fn announce(&self, caps: gst::Caps) -> Result<(), Stop> {
        gst::info!(CAT, imp = self, "caps {caps}");
        if let Some(owner) = self.owner().and_then(|owner| owner.downcast::<super::ResultSrc>().ok()) {
            owner.imp().plug_decoder(&caps).map_err(Stop::failed)?;
        }
        let obj = self.obj();
        obj.set_caps(&caps)
            .map_err(|_| Stop::failed(format!("downstream of roboflowresultsrc refused the decoded form of {caps}")))?;
        // Linking the decoder asked this pad to reconfigure; the caps are
        // set and the buffers wrap received bytes, so there is nothing to
        // renegotiate. Left pending, GstBaseSrc would send an ALLOCATION
        // query before the next buffer, which the queue holds until its
        // downstream takes it: after a snapshot answered EOS it never does,
        // and this thread would hang there instead of learning of the EOS.
        obj.src_pad().check_reconfigure();
        Ok(())
    }

    fn attach(&self) -> Result<Attached, Stop> {
        let params = self.params.lock().unwrap().clone();
        let (claim, camera) = {
            let shared = self.shared.lock().unwrap();
            (shared.claim.lock().unwrap().take(), shared.camera.lock().unwrap().take())
        };
        let stream = match (camera, claim) {
            // The bin's own session: its failures (the server cannot open
            // the camera, no connection) come with its first result.
            (Some(stream), _) => stream,
            (None, Some(mut claim)) => {
                let name = claim.name().to_owned();
                let limit = params.attach_timeout;
                gst::info!(CAT, imp = self, "waiting up to {limit:?} for session '{name}'");
                self.wait(Some(limit), String::new, claim.stream()).ok().flatten().ok_or_else(|| {
                    Stop::failed(format!(
                        "no roboflowuploadsink with session '{name}' started within {:.1} s (connect-timeout of roboflowresultsrc)",
                        limit.as_secs_f64()
                    ))
                })?
            }
            (None, None) => {
                return Err(Stop::failed(
                    "set 'source-url' (a camera the server reads) or 'session' (the roboflowuploadsink session to read results from)".to_owned(),
                ));
            }
        };
        let name = stream.name().to_owned();
        let link = SessionLink::take(stream, u64::from(params.max_queued_frames));
        let output = link.settings.output.clone();
        {
            let shared = self.shared.lock().unwrap();
            shared.realtime.store(link.settings.realtime, Ordering::Relaxed);
            *shared.session.lock().unwrap() = Some(link.stream.probe());
        }
        gst::info!(CAT, imp = self, "attached to session '{name}', output {output:?}");
        Ok(Attached {
            link,
            output,
            handed_out: None,
            held: None,
            caps_sent: false,
            order: RtpOrder::new(params.loss_wait),
            lost_counted: 0,
            pairing: TrackPairing::new(VIDEO_CLOCK_RATE, DEFAULT_HOLD),
            draining: false,
            track_done: false,
            ended: false,
            timeline: None,
        })
    }

    fn send_ack(&self, attached: &mut Attached, frame_id: u64) {
        attached.link.stream.frame_handled(frame_id);
    }

    /// Called once the previous buffer has been pushed: the queue's own
    /// level is the depth (counting buffers in and out would race with the
    /// queue's thread); the track has no queue (depth 0).
    fn record_queue_entry(&self) {
        let counters = self.shared.lock().unwrap().counters.clone();
        counters.buffers_queued.fetch_add(1, Ordering::Relaxed);
        let level = self
            .obj()
            .static_pad("src")
            .and_then(|pad| pad.peer())
            .and_then(|peer| peer.parent_element())
            .filter(|queue| queue.find_property("current-level-buffers").is_some())
            .map(|queue| u64::from(queue.property::<u32>("current-level-buffers")))
            .unwrap_or(0);
        counters.max_queue_depth.fetch_max(level, Ordering::Relaxed);
    }

    fn next_buffer(&self, attached: &mut Attached) -> Result<CreateSuccess, Stop> {
        // The buffer handed out last time has entered the queue by now.
        if let Some(frame_id) = attached.handed_out.take() {
            self.record_queue_entry();
            self.send_ack(attached, frame_id);
        }
        loop {
            if attached.ended && attached.held.is_none() {
                return Err(Stop::Eos);
            }
            if attached.output == Output::Rtp {
                if let Some(released) = self.next_rtp(attached)? {
                    return Ok(released);
                }
                continue;
            }
            let (frame, result) = match attached.held.take() {
                Some(held) => held,
                None => match self.next_event(attached)? {
                    Some(read) => read,
                    None => continue,
                },
            };
            let Output::Jpeg { output } = attached.output.clone() else {
                self.send_ack(attached, frame.frame_id);
                continue;
            };
            if !attached.caps_sent {
                // A second frame tells the frame rate, which the caps carry.
                let next = if attached.ended { None } else { self.next_event(attached)? };
                let fps = match attached.link.settings.camera {
                    // Its pts step is FFmpeg's nominal 25 fps, not the camera's.
                    Some(CameraKind::Mjpeg) => attached.link.settings.declared_fps.map_or(gst::Fraction::new(0, 1), fraction),
                    _ => frame_rate(attached.link.settings.declared_fps, &frame, next.as_ref().map(|(frame, _)| frame.as_ref())),
                };
                attached.held = next;
                self.announce(gst::Caps::builder("image/jpeg").field("framerate", fps).build())?;
                attached.caps_sent = true;
            }
            match self.jpeg_buffer(&frame, &output, result.as_ref()) {
                Some(buffer) => {
                    attached.handed_out = Some(frame.frame_id);
                    return Ok(CreateSuccess::NewBuffer(buffer));
                }
                None => {
                    gst::warning!(CAT, imp = self, "frame {} carries no image output '{output}'", frame.frame_id);
                    self.send_ack(attached, frame.frame_id);
                }
            }
        }
    }

    /// Reads the next session event: Some(frame, its result) for a frame
    /// (already posted on the bus), None when the stream ended
    /// (attached.ended set).
    fn next_event(&self, attached: &mut Attached) -> Result<Option<ReadFrame>, Stop> {
        let stall = attached.link.settings.stall_timeout;
        let link = &mut attached.link;
        let received = link.frames_received();
        let event = self.wait(
            Some(stall),
            || SessionError::ResultsStalled { timeout: stall, results: received }.to_string(),
            link.next_event(),
        )?;
        match event {
            Ok(ResultEvent::Frame(frame)) => {
                let result = self.on_frame(attached, &frame);
                Ok(Some((frame, result)))
            }
            Ok(ResultEvent::Complete { frames, .. }) => {
                gst::info!(CAT, imp = self, "processing complete after {frames} frames");
                attached.ended = true;
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Counts and posts a frame's result; returns what rides on its video.
    fn on_frame(&self, attached: &mut Attached, frame: &FrameEvent) -> Option<ResultMeta> {
        let shared = self.shared.lock().unwrap().clone();
        shared.counters.frames_received.fetch_add(1, Ordering::Relaxed);
        let (mut structure, skipped) = crate::bus::inference_structure(frame);
        if skipped > 0 {
            shared.counters.detections_skipped.fetch_add(u64::from(skipped), Ordering::Relaxed);
            gst::warning!(CAT, imp = self, "frame {}: {skipped} predictions are no usable box (a field missing or not a number, a negative size, outside the image): left out", frame.frame_id);
        }
        let source_pts = if attached.link.settings.camera.is_some() {
            // The frame's buffer and its message carry the same PTS.
            let pts = self.camera_pts(attached, frame);
            structure.set("pts", pts.map(gst::ClockTime::from_nseconds));
            pts
        } else {
            frame.live.as_ref().and(frame.source_pts_ns())
        };
        let result = ResultMeta::from_structure(&structure).map(|result| ResultMeta { source_pts, ..result });
        if let Some(owner) = self.owner() {
            let message = gst::message::Element::builder(structure).src(&owner).build();
            let _ = owner.post_message(message);
        }
        result
    }

    /// A camera's frame on the pipeline's clock, so that a syncing sink
    /// plays it `latency` after it arrived:
    /// - RTSP: the server's pts (the camera's own clock, counted from the
    ///   first frame the server read), moved so that the first result
    ///   leaves at the running time it arrived: the camera's pace, no jitter;
    /// - MJPEG: the running time the result arrived: the server numbers an
    ///   MJPEG stream's frames at FFmpeg's nominal 25 fps whatever the
    ///   camera's rate, so its pts is no clock.
    fn camera_pts(&self, attached: &mut Attached, frame: &FrameEvent) -> Option<u64> {
        let now = i128::from(self.obj().current_running_time().map_or(0, gst::ClockTime::nseconds));
        let pts = match attached.link.settings.camera {
            Some(CameraKind::Rtsp) => {
                let pts = i128::from(frame.pts_ns()?);
                pts + *attached.timeline.get_or_insert(now - pts)
            }
            _ => {
                // Strictly increasing, whatever the clock's resolution.
                let previous = attached.timeline.unwrap_or(-1);
                let pts = now.max(previous + 1);
                attached.timeline = Some(pts);
                pts
            }
        };
        u64::try_from(pts).ok()
    }

    fn jpeg_buffer(&self, frame: &FrameEvent, output: &str, result: Option<&ResultMeta>) -> Option<gst::Buffer> {
        let data = frame.json.get("serialized_output_data")?;
        let encoded = find_image(data, output)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
        let mut buffer = gst::Buffer::from_mut_slice(bytes);
        {
            let buffer = buffer.get_mut().unwrap();
            let pts = result.and_then(|result| result.source_pts).or_else(|| frame.source_pts_ns());
            buffer.set_pts(pts.map(gst::ClockTime::from_nseconds));
            buffer.set_offset(frame.frame_id);
            // The frame's result travels on the frame itself, through the
            // decoder and whatever follows (the meta has no tags, so
            // GstVideoDecoder and GstBaseTransform copy it).
            if let Some(result) = result
                && !result.attach(buffer)
            {
                gst::warning!(CAT, imp = self, "frame {}: the RoboflowInferenceMeta could not be added", frame.frame_id);
            }
        }
        Some(buffer)
    }

    /// One step of track transport: a packet ready to push, or None after
    /// taking in one input (a result, a packet, or a hold that ran out).
    fn next_rtp(&self, attached: &mut Attached) -> Result<Option<CreateSuccess>, Stop> {
        // Packets and results already here go in without a wait, in the
        // order the session handed them over, before the pairing decides:
        // while downstream held this thread (a syncing sink), the results of
        // the frames held here queued up too, and a hold that ran out
        // meanwhile must not send those frames out unpaired. Everything the
        // pairing can release then leaves as one list: a frame's packets
        // cost one push and one queue hand-over, not one each.
        while let Some(input) = attached.link.ready_input() {
            self.on_rtp_input(attached, input)?;
        }
        if let Some(released) = released_packets(&mut attached.pairing) {
            return Ok(Some(released));
        }
        if attached.track_done {
            attached.order.finish();
            order_into_pairing(attached, Instant::now());
            attached.pairing.finish();
            if let Some(released) = released_packets(&mut attached.pairing) {
                return Ok(Some(released));
            }
            attached.ended = true;
            return Ok(None);
        }
        let stall = attached.link.settings.stall_timeout;
        // A pending hold ends the wait by itself; draining ends when the
        // track goes quiet.
        let timeout = (!attached.draining).then_some(stall);
        let deadline = match (attached.pairing.next_deadline(), attached.order.next_deadline()) {
            (Some(pairing), Some(order)) => Some(pairing.min(order)),
            (pairing, order) => pairing.or(order),
        };
        let input = self.wait(
            timeout,
            || format!("neither results nor video from the server for {:.1} s (stall-timeout)", stall.as_secs_f64()),
            attached.link.next_input(attached.draining, deadline),
        )?;
        self.on_rtp_input(attached, input)?;
        Ok(None)
    }

    /// Takes in one input of track transport.
    fn on_rtp_input(&self, attached: &mut Attached, input: Input) -> Result<(), Stop> {
        let now = Instant::now();
        match input {
            Input::Event(Ok(ResultEvent::Frame(frame))) => {
                let result = self.on_frame(attached, &frame);
                gst::trace!(CAT, "json {} pts {:?}", frame.frame_id, frame.pts_ns());
                if let Some(pts) = frame.pts_ns() {
                    // In the map before the pairing can release the frame.
                    if let Some(result) = result {
                        self.shared.lock().unwrap().results.lock().unwrap().insert(pts, result);
                    }
                    attached.pairing.on_result(pts, frame.frame_id);
                }
                self.send_ack(attached, frame.frame_id);
            }
            Input::Event(Ok(ResultEvent::Complete { frames, .. })) => {
                gst::info!(CAT, imp = self, "processing complete after {frames} frames; draining the track");
                attached.draining = true;
            }
            Input::Event(Err(error)) => return Err(error.into()),
            Input::Codec { mime_type, clock_rate, payload_type } => {
                let encoding = mime_type.rsplit('/').next().unwrap_or_default().to_ascii_uppercase();
                attached.pairing.set_clock_rate(clock_rate);
                let caps = gst::Caps::builder("application/x-rtp")
                    .field("media", "video")
                    .field("clock-rate", clock_rate as i32)
                    .field("encoding-name", encoding.as_str())
                    .field("payload", i32::from(payload_type))
                    .build();
                self.announce(caps)?;
                attached.caps_sent = true;
            }
            Input::Packet(bytes) => {
                if attached.caps_sent && bytes.len() >= 12 {
                    let sequence = u16::from_be_bytes([bytes[2], bytes[3]]);
                    gst::trace!(CAT, "packet seq {sequence} marker {}", bytes[1] >> 7);
                    attached.order.push(sequence, bytes, now);
                }
            }
            Input::TrackDone => attached.track_done = true,
            Input::TrackClosed => {
                attached.order.finish();
                order_into_pairing(attached, now);
                attached.pairing.finish();
                attached.track_done = attached.draining;
            }
            Input::HoldOver => {}
        }
        order_into_pairing(attached, now);
        self.count_lost_packets(attached);
        Ok(())
    }
}

/// Hands the packets that are in order (or whose wait for a lost one ran
/// out) to the pairing.
fn order_into_pairing(attached: &mut Attached, now: Instant) {
    while let Some(packet) = attached.order.poll(now) {
        let timestamp = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        attached.pairing.on_packet(timestamp, packet, now);
    }
}

impl FrameSrc {
    /// Counts the track packets given up, and says so once per loss.
    fn count_lost_packets(&self, attached: &mut Attached) {
        let lost = attached.order.lost();
        if lost == attached.lost_counted {
            return;
        }
        gst::info!(
            CAT,
            imp = self,
            "{} RTP packets of the returned track lost (not retransmitted within loss-wait, {} ms): the depayloader asks the server for a keyframe",
            lost - attached.lost_counted,
            attached.order.wait().as_millis()
        );
        attached.lost_counted = lost;
        let shared = self.shared.lock().unwrap().clone();
        shared.counters.track_packets_lost.store(lost, Ordering::Relaxed);
    }
}

/// Every packet the pairing releases now, as one buffer or one list; None
/// when it holds them all.
fn released_packets(pairing: &mut TrackPairing<Bytes>) -> Option<CreateSuccess> {
    let now = Instant::now();
    let mut buffers: Vec<gst::Buffer> = std::iter::from_fn(|| pairing.poll_packet(now)).filter_map(rtp_buffer).collect();
    match buffers.len() {
        0 => None,
        1 => buffers.pop().map(CreateSuccess::NewBuffer),
        _ => Some(CreateSuccess::NewBufferList(gst::BufferList::from_iter(buffers))),
    }
}

/// A released packet as a buffer; None for one that maps before the origin.
fn rtp_buffer(released: Released<Bytes>) -> Option<gst::Buffer> {
    let pts = released.pts_ns?;
    let mut buffer = gst::Buffer::from_slice(released.packet);
    buffer.get_mut().unwrap().set_pts(gst::ClockTime::from_nseconds(pts));
    Some(buffer)
}

/// The frame rate for caps: declared, measured by the server, or from the
/// pts step between the first two frames; 0/1 when unknown.
fn frame_rate(declared: Option<f64>, first: &FrameEvent, second: Option<&FrameEvent>) -> gst::Fraction {
    let metadata = &first.json["video_metadata"];
    let declared = declared.or_else(|| metadata["declared_fps"].as_f64()).filter(|fps| *fps > 0.0);
    let from_pts = second.and_then(|second| {
        let step = second.pts_seconds? - first.pts_seconds?;
        (step > 0.0).then(|| 1.0 / step)
    });
    match declared.or(from_pts) {
        Some(fps) => fraction(fps),
        None => gst::Fraction::new(0, 1),
    }
}

fn fraction(fps: f64) -> gst::Fraction {
    // Prefer the NTSC rates when the value is one of them.
    for (num, den) in [(24000, 1001), (30000, 1001), (60000, 1001)] {
        if (fps - num as f64 / den as f64).abs() < 0.01 {
            return gst::Fraction::new(num, den);
        }
    }
    gst::Fraction::new((fps * 1000.0).round() as i32, 1000)
}

// ---------------------------------------------------------------------------
// Session calls: every use of the session API by the result source is in
// this section (and `reserve`/`unreserve`/`track_packets_dropped`, which the
// bin calls), so that a new session API only needs these remapped.
// ---------------------------------------------------------------------------

/// RTP packets the session dropped because the source read too slowly.
pub fn track_packets_dropped(shared: &Shared) -> u64 {
    shared.session.lock().unwrap().as_ref().map_or(0, SessionProbe::track_packets_dropped)
}

/// Keyframe requests (PLI) the session sent for the returned track.
pub fn keyframe_requests_sent(shared: &Shared) -> u64 {
    shared.session.lock().unwrap().as_ref().map_or(0, SessionProbe::keyframe_requests_sent)
}

/// Acks the session sent for this source.
pub fn acks_sent(shared: &Shared) -> u64 {
    shared.session.lock().unwrap().as_ref().map_or(0, |session| session.stats().acks_sent)
}

/// Frames the server processed whose result never came (a camera: those
/// before the results channel opened).
pub fn results_missed(shared: &Shared) -> u64 {
    shared.session.lock().unwrap().as_ref().map_or(0, |session| session.stats().results_missed)
}

/// What the source needs to know of the session it reads.
struct SessionSettings {
    output: Output,
    realtime: bool,
    /// A camera the server reads: frames go on the pipeline's clock.
    camera: Option<CameraKind>,
    stall_timeout: Duration,
    declared_fps: Option<f64>,
}

/// One input of track transport.
enum Input {
    Event(Result<ResultEvent, SessionError>),
    Codec { mime_type: String, clock_rate: u32, payload_type: u8 },
    Packet(Bytes),
    /// The track went quiet after processing_complete.
    TrackDone,
    /// The session dropped the track: no more packets (results may follow).
    TrackClosed,
    /// A held frame's wait for its JSON ran out.
    HoldOver,
}

impl From<TrackItem> for Input {
    fn from(item: TrackItem) -> Self {
        match item {
            TrackItem::Codec { mime_type, clock_rate, payload_type } => Input::Codec { mime_type, clock_rate, payload_type },
            TrackItem::Packet(bytes) => Input::Packet(bytes),
        }
    }
}

/// What `next_input` took off a channel.
enum Taken {
    Track(Option<Sequenced<TrackItem>>),
    Result(Sequenced<ResultEvent>),
}

/// The source's hold on a session: its result stream, its returned track.
/// Dropping it lets go of the session.
struct SessionLink {
    stream: ResultStream,
    settings: SessionSettings,
    track: Option<mpsc::Receiver<Sequenced<TrackItem>>>,
    /// Track transport: the next track item and the next result, taken off
    /// their channels but not handed on yet; whichever the session handed
    /// over first goes first.
    track_ahead: Option<Sequenced<TrackItem>>,
    result_ahead: Option<Sequenced<ResultEvent>>,
}

impl SessionLink {
    /// Takes the results (and the returned track in track transport); acks
    /// run `ack_lead` frames ahead of the frames the source handled.
    fn take(mut stream: ResultStream, ack_lead: u64) -> SessionLink {
        let config = stream.config();
        let output = match (config.video_transport, config.stream_output.first()) {
            (VideoTransport::Track, _) => Output::Rtp,
            (VideoTransport::Datachannel, Some(name)) => Output::Jpeg { output: name.clone() },
            (VideoTransport::Datachannel, None) => Output::Nothing,
        };
        let settings = SessionSettings {
            output,
            realtime: config.realtime_processing,
            camera: config.camera.as_ref().map(|camera| camera.kind),
            stall_timeout: config.stall_timeout,
            declared_fps: config.declared_fps,
        };
        let track = if settings.output == Output::Rtp { stream.take_track() } else { None };
        stream.enable_acks(ack_lead);
        SessionLink { stream, settings, track, track_ahead: None, result_ahead: None }
    }

    /// Track transport: the track item or result already waiting that the
    /// session handed over first, taken without a wait (None when neither
    /// is; `next_input` reports a track gone or a failure).
    fn ready_input(&mut self) -> Option<Input> {
        if self.track_ahead.is_none() {
            self.track_ahead = self.track.as_mut().and_then(|track| track.try_recv().ok());
        }
        if self.result_ahead.is_none() {
            self.result_ahead = self.stream.try_next_sequenced();
        }
        let track_first = match (&self.track_ahead, &self.result_ahead) {
            (Some((track, _)), Some((result, _))) => track < result,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        if track_first {
            self.track_ahead.take().map(|(_, item)| Input::from(item))
        } else {
            self.result_ahead.take().map(|(_, event)| Input::Event(Ok(event)))
        }
    }

    fn frames_received(&self) -> u64 {
        self.stream.stats().frames_received
    }

    async fn next_event(&mut self) -> Result<ResultEvent, SessionError> {
        self.stream.next().await
    }

    /// The next result event or track item, in the order the session handed
    /// them over (the pairing relies on arrival order), or the end of a hold
    /// at `deadline`.
    async fn next_input(&mut self, draining: bool, deadline: Option<Instant>) -> Input {
        if let Some(input) = self.ready_input() {
            return input;
        }
        let SessionLink { stream, track, .. } = self;
        if draining && track.is_none() {
            return Input::TrackDone;
        }
        let hold_over = async move {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        let packet = async {
            match track.as_mut() {
                Some(track) => track.recv().await,
                None => std::future::pending().await,
            }
        };
        let next = if draining {
            tokio::select! {
                biased;
                item = packet => Taken::Track(item),
                _ = hold_over => return Input::HoldOver,
                _ = tokio::time::sleep(TRACK_DRAIN_QUIET) => return Input::TrackDone,
            }
        } else {
            tokio::select! {
                biased;
                item = packet => Taken::Track(item),
                event = stream.next_sequenced() => match event {
                    Ok(event) => Taken::Result(event),
                    Err(error) => return Input::Event(Err(error)),
                },
                _ = hold_over => return Input::HoldOver,
            }
        };
        // Back through ready_input: what the session handed over before it
        // on the other channel may be waiting too.
        match next {
            Taken::Track(Some(item)) => self.track_ahead = Some(item),
            Taken::Track(None) => {
                self.track = None;
                return Input::TrackClosed;
            }
            Taken::Result(event) => self.result_ahead = Some(event),
        }
        self.ready_input().expect("an input was just taken")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_for_common_rates() {
        assert_eq!(fraction(30.0), gst::Fraction::new(30, 1));
        assert_eq!(fraction(29.97), gst::Fraction::new(30000, 1001));
        assert_eq!(fraction(12.5), gst::Fraction::new(25, 2));
    }
}
