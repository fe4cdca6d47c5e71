// The internal live source of roboflowresultsrc: attaches to a session by
// name, posts each frame's JSON, and pushes the encoded video (JPEG from the
// data channel, or RTP from the returned track) into the bin's queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use base64::Engine as _;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::*;
use gst_base::subclass::base_src::CreateSuccess;
use gst_base::subclass::prelude::*;
use tokio::sync::mpsc;

use crate::config::VideoTransport;
use crate::protocol::find_image;
use crate::runtime::{WaitError, Waits};
use crate::session::registry::Claim;
use crate::session::{FrameEvent, ResultEvent, ResultStream, SessionError, SessionProbe, TrackItem};

pub static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "roboflowresultsrc",
        gst::DebugColorFlags::empty(),
        Some("Roboflow result source"),
    )
});

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
}

/// The JSON of frames whose video has not left the bin yet, by pts.
#[derive(Default, Debug)]
pub struct Pairing {
    pending: std::collections::BTreeMap<u64, (u64, String)>,
    /// Half a frame, in ns: the tolerance for track-mode pairing.
    pub tolerance: u64,
    /// JPEG frames carry their result with them: nothing to wait for.
    pub exact: bool,
}

impl Pairing {
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    pub fn insert(&mut self, pts: u64, frame_id: u64, json: String) {
        self.pending.insert(pts, (frame_id, json));
        // Frames the codec dropped never pair: forget them after 2 s.
        let horizon = pts.saturating_sub(2_000_000_000);
        self.pending = self.pending.split_off(&horizon);
    }

    /// The JSON for video at `pts`: exact, else nearest within tolerance.
    pub fn take(&mut self, pts: u64) -> Option<(u64, String)> {
        if let Some(entry) = self.pending.remove(&pts) {
            return Some(entry);
        }
        let low = pts.saturating_sub(self.tolerance);
        let high = pts.saturating_add(self.tolerance);
        let nearest = self
            .pending
            .range(low..=high)
            .min_by_key(|(key, _)| key.abs_diff(pts))
            .map(|(key, _)| *key)?;
        self.pending.remove(&nearest)
    }
}

#[derive(Clone, Default)]
pub struct Shared {
    pub counters: Arc<Counters>,
    pub pairing: Arc<Mutex<Pairing>>,
    /// The session processes in realtime: no acks, the queue leaks.
    pub realtime: Arc<std::sync::atomic::AtomicBool>,
    /// The attached session, for the counts it keeps (track packets dropped).
    pub session: Arc<Mutex<Option<SessionProbe>>>,
    /// The claim on the session's results, made when the bin went to READY.
    pub claim: Arc<Mutex<Option<Claim>>>,
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
}

impl Default for Params {
    fn default() -> Self {
        Self {
            session: None,
            attach_timeout: Duration::from_millis(crate::config::DEFAULT_CONNECT_TIMEOUT_MS.into()),
            max_queued_frames: 8,
        }
    }
}

struct Attached {
    /// Frames count as handled once in the queue; the acks lead by
    /// max-queued-frames, so at most that many results wait in the client
    /// beyond the bounded queue.
    stream: ResultStream,
    track: Option<mpsc::Receiver<TrackItem>>,
    output: Output,
    /// Frame whose buffer was handed to basesrc: it has entered the queue
    /// once create() is called again.
    handed_out: Option<u64>,
    /// A frame read ahead to learn the frame rate before setting caps.
    held: Option<Box<FrameEvent>>,
    caps_sent: bool,
    rtp: RtpClock,
    /// processing_complete arrived; RTP still in flight is drained (the two
    /// travel apart, so the last frames' packets may come after it).
    draining: bool,
    ended: bool,
}

/// Maps RTP timestamps of the returned track to the source timeline.
#[derive(Default)]
struct RtpClock {
    clock_rate: u32,
    last_ts: Option<u32>,
    extended: u64,
    /// extended RTP timestamp of source pts 0.
    origin: Option<i128>,
    first_json_pts: Option<f64>,
}

impl RtpClock {
    fn extend(&mut self, ts: u32) -> u64 {
        match self.last_ts {
            None => self.extended = u64::from(ts),
            Some(last) => {
                let delta = ts.wrapping_sub(last) as i32;
                self.extended = (self.extended as i64 + i64::from(delta)).max(0) as u64;
            }
        }
        self.last_ts = Some(ts);
        self.extended
    }

    /// Source pts in ns of a packet with RTP timestamp `ts`.
    fn pts(&mut self, ts: u32) -> Option<u64> {
        let extended = self.extend(ts) as i128;
        let rate = i128::from(self.clock_rate.max(1));
        if self.origin.is_none() {
            // The server sends a frame's JSON before its RTP, so the first
            // packet normally belongs to the first frame with a JSON.
            let first = self.first_json_pts.unwrap_or(0.0);
            self.origin = Some(extended - (first * rate as f64).round() as i128);
        }
        let units = extended - self.origin?;
        (units >= 0).then(|| (units * 1_000_000_000 / rate) as u64)
    }
}

enum State {
    Idle,
    Attached(Box<Attached>),
}

pub struct FrameSrc {
    pub params: Mutex<Params>,
    pub shared: Mutex<Shared>,
    state: Mutex<State>,
    waits: Waits,
}

impl Default for FrameSrc {
    fn default() -> Self {
        Self {
            params: Mutex::new(Params::default()),
            shared: Mutex::new(Shared::default()),
            state: Mutex::new(State::Idle),
            waits: Waits::default(),
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
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        *self.state.lock().unwrap() = State::Idle;
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // Dropping the stream lets go of the session.
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
}

impl PushSrcImpl for FrameSrc {
    fn create(&self, _buffer: Option<&mut gst::BufferRef>) -> Result<CreateSuccess, gst::FlowError> {
        let mut state = self.state.lock().unwrap();
        if matches!(*state, State::Idle) {
            let attached = self.attach().map_err(|stop| self.report(stop))?;
            *state = State::Attached(Box::new(attached));
        }
        let State::Attached(attached) = &mut *state else { unreachable!() };
        let outcome = self.next_buffer(attached);
        drop(state);
        outcome.map_err(|stop| self.report(stop))
    }
}

enum Stop {
    Flushing,
    Eos,
    Error(String),
}

impl FrameSrc {
    fn report(&self, stop: Stop) -> gst::FlowError {
        match stop {
            Stop::Flushing => gst::FlowError::Flushing,
            Stop::Eos => gst::FlowError::Eos,
            Stop::Error(message) => {
                gst::element_imp_error!(self, gst::ResourceError::Failed, ("{}", message));
                gst::FlowError::Error
            }
        }
    }

    fn wait<T: Send>(&self, timeout: Option<Duration>, on_timeout: impl FnOnce() -> String, future: impl Future<Output = T> + Send) -> Result<T, Stop> {
        match self.waits.run(timeout, future) {
            Ok(value) => Ok(value),
            Err(WaitError::Cancelled) => Err(Stop::Flushing),
            Err(WaitError::TimedOut(_)) => Err(Stop::Error(on_timeout())),
        }
    }

    fn owner(&self) -> Option<gst::Element> {
        self.shared.lock().unwrap().owner.lock().unwrap().as_ref().and_then(|weak| weak.upgrade())
    }

    /// Has the bin insert the decoder for `caps`, then announces them: the
    /// decoder must be linked before downstream is asked to accept them.
    fn announce(&self, caps: gst::Caps) -> Result<(), Stop> {
        gst::info!(CAT, imp = self, "caps {caps}");
        if let Some(owner) = self.owner().and_then(|owner| owner.downcast::<super::ResultSrc>().ok()) {
            owner.imp().plug_decoder(&caps).map_err(Stop::Error)?;
        }
        self.obj()
            .set_caps(&caps)
            .map_err(|_| Stop::Error(format!("downstream of roboflowresultsrc refused the decoded form of {caps}")))
    }

    fn attach(&self) -> Result<Attached, Stop> {
        let params = self.params.lock().unwrap().clone();
        let claim = self.shared.lock().unwrap().claim.lock().unwrap().take();
        let Some(mut claim) = claim else {
            return Err(Stop::Error("property 'session': name the roboflowuploadsink session to read results from".to_owned()));
        };
        let name = claim.name().to_owned();
        let limit = params.attach_timeout;
        gst::info!(CAT, imp = self, "waiting up to {limit:?} for session '{name}'");
        let mut stream = self
            .wait(Some(limit), String::new, claim.stream())
            .ok()
            .flatten()
            .ok_or_else(|| {
                Stop::Error(format!(
                    "no roboflowuploadsink with session '{name}' started within {:.1} s (connect-timeout of roboflowresultsrc)",
                    limit.as_secs_f64()
                ))
            })?;
        let config = stream.config();
        let output = match (config.video_transport, config.stream_output.first()) {
            (VideoTransport::Track, _) => Output::Rtp,
            (VideoTransport::Datachannel, Some(name)) => Output::Jpeg { output: name.clone() },
            (VideoTransport::Datachannel, None) => Output::Nothing,
        };
        let realtime = config.realtime_processing;
        let track = if output == Output::Rtp { stream.take_track() } else { None };
        {
            let shared = self.shared.lock().unwrap();
            shared.realtime.store(realtime, Ordering::Relaxed);
            *shared.session.lock().unwrap() = Some(stream.probe());
        }
        gst::info!(CAT, imp = self, "attached to session '{name}', output {output:?}");
        stream.enable_acks(u64::from(params.max_queued_frames));
        Ok(Attached {
            stream,
            track,
            output,
            handed_out: None,
            held: None,
            caps_sent: false,
            rtp: RtpClock::default(),
            draining: false,
            ended: false,
        })
    }

    fn send_ack(&self, attached: &mut Attached, frame_id: u64) {
        attached.stream.frame_handled(frame_id);
    }

    /// Called once the previous buffer has entered the bin's queue: the
    /// queue's own level is the depth (counting buffers in and out would
    /// race with the queue's thread).
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
                if let Some(buffer) = self.next_rtp(attached)? {
                    return Ok(buffer);
                }
                continue;
            }
            let frame = match attached.held.take() {
                Some(frame) => frame,
                None => match self.next_event(attached)? {
                    Some(frame) => frame,
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
                let fps = frame_rate(attached.stream.config().declared_fps, &frame, next.as_deref());
                attached.held = next;
                self.announce(gst::Caps::builder("image/jpeg").field("framerate", fps).build())?;
                attached.caps_sent = true;
            }
            match self.jpeg_buffer(&frame, &output) {
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

    /// Reads the next session event: Some(frame) for a frame result (already
    /// posted on the bus), None when the stream ended (attached.ended set).
    fn next_event(&self, attached: &mut Attached) -> Result<Option<Box<FrameEvent>>, Stop> {
        let probe = attached.stream.probe();
        let stall = attached.stream.config().stall_timeout;
        let event = self.wait(
            Some(stall),
            || SessionError::ResultsStalled { timeout: stall, results: probe.stats().frames_received }.to_string(),
            attached.stream.next(),
        )?;
        match event.map_err(|error| Stop::Error(error.to_string()))? {
            ResultEvent::Frame(frame) => {
                self.on_frame(attached, &frame);
                Ok(Some(frame))
            }
            ResultEvent::Complete { frames, .. } => {
                gst::info!(CAT, imp = self, "processing complete after {frames} frames");
                attached.ended = true;
                Ok(None)
            }
        }
    }

    fn on_frame(&self, attached: &Attached, frame: &FrameEvent) {
        let shared = self.shared.lock().unwrap().clone();
        shared.counters.frames_received.fetch_add(1, Ordering::Relaxed);
        let structure = crate::bus::inference_structure(frame);
        if attached.output != Output::Nothing
            && let Some(pts) = pts_ns(frame)
        {
            let json = structure.get::<String>("json").unwrap_or_default();
            shared.pairing.lock().unwrap().insert(pts, frame.frame_id, json);
        }
        if let Some(owner) = self.owner() {
            let message = gst::message::Element::builder(structure).src(&owner).build();
            let _ = owner.post_message(message);
        }
    }

    fn jpeg_buffer(&self, frame: &FrameEvent, output: &str) -> Option<gst::Buffer> {
        let data = frame.json.get("serialized_output_data")?;
        let encoded = find_image(data, output)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
        let mut buffer = gst::Buffer::from_mut_slice(bytes);
        {
            let buffer = buffer.get_mut().unwrap();
            buffer.set_pts(pts_ns(frame).map(gst::ClockTime::from_nseconds));
            buffer.set_offset(frame.frame_id);
        }
        Some(buffer)
    }

    fn next_rtp(&self, attached: &mut Attached) -> Result<Option<CreateSuccess>, Stop> {
        let stall = attached.stream.config().stall_timeout;
        let Attached { stream, track, .. } = attached;
        let track = track.as_mut().expect("track mode has a track");
        enum Next {
            Event(Result<ResultEvent, SessionError>),
            Track(Option<TrackItem>),
        }
        let next = if attached.draining {
            match self.wait(None, String::new, async { tokio::time::timeout(TRACK_DRAIN_QUIET, track.recv()).await })? {
                Ok(Some(item)) => Next::Track(Some(item)),
                _ => {
                    attached.ended = true;
                    return Ok(None);
                }
            }
        } else {
            self.wait(
                Some(stall),
                || format!("neither results nor video from the server for {:.1} s (stall-timeout)", stall.as_secs_f64()),
                async {
                    tokio::select! {
                        // Results first: a frame's JSON normally precedes its
                        // RTP, and pairing needs it when the frame is decoded.
                        biased;
                        event = stream.next() => Next::Event(event),
                        item = track.recv() => Next::Track(item),
                    }
                },
            )?
        };
        match next {
            Next::Event(Ok(ResultEvent::Frame(frame))) => {
                self.on_frame(attached, &frame);
                if attached.rtp.first_json_pts.is_none() {
                    attached.rtp.first_json_pts = frame.pts_seconds;
                }
                self.send_ack(attached, frame.frame_id);
                Ok(None)
            }
            Next::Event(Ok(ResultEvent::Complete { .. })) => {
                attached.draining = true;
                Ok(None)
            }
            Next::Event(Err(error)) => Err(Stop::Error(error.to_string())),
            Next::Track(None) => Ok(None),
            Next::Track(Some(TrackItem::Codec { mime_type, clock_rate, payload_type })) => {
                let encoding = mime_type.rsplit('/').next().unwrap_or_default().to_ascii_uppercase();
                attached.rtp.clock_rate = clock_rate;
                let caps = gst::Caps::builder("application/x-rtp")
                    .field("media", "video")
                    .field("clock-rate", clock_rate as i32)
                    .field("encoding-name", encoding.as_str())
                    .field("payload", i32::from(payload_type))
                    .build();
                self.announce(caps)?;
                attached.caps_sent = true;
                Ok(None)
            }
            Next::Track(Some(TrackItem::Packet(bytes))) => {
                if !attached.caps_sent || bytes.len() < 12 {
                    return Ok(None);
                }
                let ts = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                let Some(pts) = attached.rtp.pts(ts) else {
                    return Ok(None);
                };
                let mut buffer = gst::Buffer::from_slice(bytes);
                buffer.get_mut().unwrap().set_pts(gst::ClockTime::from_nseconds(pts));
                Ok(Some(CreateSuccess::NewBuffer(buffer)))
            }
        }
    }
}

/// After processing_complete, the track is read until it has been quiet
/// this long.
const TRACK_DRAIN_QUIET: Duration = Duration::from_millis(300);

pub fn pts_ns(frame: &FrameEvent) -> Option<u64> {
    frame.pts_seconds.and_then(crate::protocol::pts_seconds_to_ns)
}

/// The frame rate for caps: declared, measured by the server, or from the
/// pts step between the first two frames; 0/1 when unknown.
fn frame_rate(declared_fps: Option<f64>, first: &FrameEvent, second: Option<&FrameEvent>) -> gst::Fraction {
    let metadata = &first.json["video_metadata"];
    let declared = declared_fps
        .or_else(|| metadata["declared_fps"].as_f64())
        .filter(|fps| *fps > 0.0);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_takes_exact_then_nearest_within_tolerance() {
        let mut pairing = Pairing { tolerance: 16_000_000, ..Default::default() };
        pairing.insert(0, 1, "a".into());
        pairing.insert(33_333_333, 2, "b".into());
        pairing.insert(66_666_667, 3, "c".into());
        assert_eq!(pairing.take(0).unwrap().0, 1);
        assert_eq!(pairing.take(33_300_000).unwrap().0, 2);
        assert!(pairing.take(50_000_000).is_none(), "more than half a frame away");
        assert_eq!(pairing.take(66_666_667).unwrap().0, 3);
    }

    #[test]
    fn rtp_clock_unwraps_and_anchors_on_the_first_json() {
        let mut clock = RtpClock { clock_rate: 90_000, first_json_pts: Some(1.0), ..Default::default() };
        let origin = u32::MAX - 45_000;
        assert_eq!(clock.pts(origin.wrapping_add(90_000)), Some(1_000_000_000));
        // Crosses the 32-bit wrap.
        assert_eq!(clock.pts(origin.wrapping_add(180_000)), Some(2_000_000_000));
    }

    #[test]
    fn fractions_for_common_rates() {
        assert_eq!(fraction(30.0), gst::Fraction::new(30, 1));
        assert_eq!(fraction(29.97), gst::Fraction::new(30000, 1001));
        assert_eq!(fraction(12.5), gst::Fraction::new(25, 2));
    }
}
