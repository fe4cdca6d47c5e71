// roboflowuploadsink: a sink element that uploads whatever bytes it
// receives (a muxed video) to the server, then waits for every frame's
// result.
//
// Streamed mode: upstream reports its size in bytes (filesrc does), so the
// chunk count is known up front and chunks leave as buffers arrive.
// Spooled mode: otherwise the bytes go to a temporary file, honouring BYTES
// segments (muxers seek back to rewrite headers), and leave at EOS.
//
// A plain GstElement with its own chain, event and query functions, not a
// GstBaseSink: GstBaseSink runs render() and serialized events under its
// PREROLL_LOCK, which its state changes also take, so a render() waiting on
// the server held the pipeline's change to PLAYING (and a roboflowresultsrc
// of the same pipeline with it). Here only the pad's stream lock is held
// while the streaming thread waits, and a state change takes it only to
// stop, after cancelling every wait. The sink does not preroll: PAUSED holds
// the job at its next chunk or result (see `Gate`) and PLAYING resumes it.

use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use super::gate::Gate;
use super::live::{CapsMode, caps_mode, preferred_live_caps};
use super::live_job::LiveJob;
use super::spool::Spool;
use crate::bus::{inference_structure, progress_structure};
use crate::config::{
    self, SessionConfig, UploadMode, UploadSettings, VideoCodec,
};
use crate::stop::{Stop, waited};
use crate::session::{self, FrameEvent, ResultEvent, ResultStream, SessionError, SessionProbe, UploadWriter};

pub(super) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "roboflowuploadsink",
        gst::DebugColorFlags::empty(),
        Some("Roboflow upload sink"),
    )
});

const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Extra time granted to the connect wait beyond connect-timeout: the
/// session enforces the real limit and explains which step was late.
const CONNECT_GRACE: Duration = Duration::from_secs(5);
const EMPTY_INPUT: &str =
    "the input is empty: there is nothing to upload (the server never completes an upload of 0 chunks)";

impl From<super::gate::Cancelled> for Stop {
    fn from(_: super::gate::Cancelled) -> Self {
        Stop::Flushing
    }
}

struct Streamed {
    /// Bytes of the upload handed to the session so far.
    consumed: u64,
}

enum Mode {
    Undecided,
    Streamed(Box<Streamed>),
    Spooled(Spool),
}

#[derive(Default)]
struct Progress {
    started: Option<Instant>,
    last_post: Option<Instant>,
    last_percent: u64,
}

/// The upload in progress. The streaming thread takes it out of `State`
/// while it works, so that no lock is held while it waits or posts.
pub(super) struct Job {
    writer: UploadWriter,
    config: SessionConfig,
    mode: Mode,
    /// A BYTES segment that does not start at 0 arrived before any data:
    /// upstream will seek, so the bytes must be spooled.
    seeking_upstream: bool,
    progress: Progress,
    /// Every chunk was handed to the channel: an EOS handled again after a
    /// flush goes straight on to the results.
    uploaded: bool,
    /// The results, unless a roboflowresultsrc claimed them.
    results: Option<ResultStream>,
}

/// Settings validated at READY->PAUSED; the session starts once the caps
/// (or a first buffer without caps) tell a file upload from live video.
pub(super) struct Pending {
    name: String,
    config: SessionConfig,
    /// A BYTES segment that does not start at 0 arrived before any data.
    seeking_upstream: bool,
}

/// The element's work between READY->PAUSED and PAUSED->READY.
pub(super) enum Slot {
    Pending(Box<Pending>),
    File(Box<Job>),
    Live(Box<LiveJob>),
}

/// How the job ended, as far as the streaming thread is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// An ERROR was posted: nothing else is reported for this job.
    Failed,
    /// The EOS message was posted.
    Finished,
}

enum State {
    Stopped,
    /// `job` is None while the streaming thread holds it.
    Started { job: Option<Slot>, end: Option<End> },
}

pub struct UploadSink {
    sinkpad: gst::Pad,
    settings: Mutex<UploadSettings>,
    state: Mutex<State>,
    /// Kept apart from `state` so that `stats` never waits for the streaming thread.
    pub(super) session: Mutex<Option<SessionProbe>>,
    pub(super) gate: Gate,
    /// "undecided", "streamed", "spooled" or "live", for `stats`.
    pub(super) upload_mode: Mutex<&'static str>,
}

#[glib::object_subclass]
impl ObjectSubclass for UploadSink {
    const NAME: &'static str = "GstRoboflowUploadSink";
    type Type = super::UploadSink;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let template = klass.pad_template("sink").expect("the sink pad template exists");
        let sinkpad = gst::Pad::builder_from_template(&template)
            .chain_function(|_pad, parent, buffer| {
                UploadSink::catch_panic_pad_function(parent, || Err(gst::FlowError::Error), |sink| sink.chain(buffer))
            })
            .event_function(|pad, parent, event| {
                UploadSink::catch_panic_pad_function(parent, || false, |sink| sink.sink_event(pad, event))
            })
            .query_function(|pad, parent, query| {
                UploadSink::catch_panic_pad_function(parent, || false, |sink| sink.sink_query(pad, query))
            })
            .build();
        Self {
            sinkpad,
            settings: Mutex::new(UploadSettings::default()),
            state: Mutex::new(State::Stopped),
            session: Mutex::new(None),
            gate: Gate::default(),
            upload_mode: Mutex::new("undecided"),
        }
    }
}

impl ObjectImpl for UploadSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let mut properties = config::session_properties();
            properties.extend([
                glib::ParamSpecUInt::builder("chunk-size")
                    .nick("Chunk size")
                    .blurb("Payload bytes per upload message (8-byte header plus payload must fit 65536)")
                    .minimum(config::MIN_CHUNK_SIZE)
                    .maximum(config::MAX_CHUNK_SIZE_U32)
                    .default_value(config::DEFAULT_CHUNK_SIZE_U32)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("buffer-limit")
                    .nick("Buffer limit")
                    .blurb("Most bytes queued in the video_upload channel at any time (backpressure)")
                    .minimum(config::MIN_BUFFER_LIMIT)
                    .default_value(config::DEFAULT_BUFFER_LIMIT)
                    .mutable_ready()
                    .build(),
                config::ms_property("keepalive-interval", "Keepalive interval", "Milliseconds between 1-byte keepalives during the upload (0: off)", 0, config::DEFAULT_KEEPALIVE_INTERVAL_MS),
                glib::ParamSpecUInt64::builder("max-spool-size")
                    .nick("Max spool size")
                    .blurb("Most bytes a spooled upload may take in spool-dir (0: no limit but the disk)")
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                config::string_property("spool-dir", "Spool directory", "Directory for the temporary file of spooled uploads (empty: the system's temp dir)", None),
                glib::ParamSpecEnum::builder_with_default("upload-mode", UploadMode::Auto)
                    .nick("Upload mode")
                    .blurb("auto: stream when upstream reports its size in bytes, else spool; spool: always spool")
                    .mutable_ready()
                    .build(),
                config::string_property("session", "Session", "Name under which roboflowresultsrc finds this session (empty: a unique name)", None),
                glib::ParamSpecEnum::builder_with_default("video-codec", VideoCodec::Vp8)
                    .nick("Video codec")
                    .blurb("Live video: the codec raw video (video/x-raw) is encoded to for the server. VP8 and constrained-baseline H.264 arrive as they are")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-frames-in-flight")
                    .nick("Max frames in flight")
                    .blurb("Live video: most frames sent whose result has not come back. When full: with realtime-processing=false the sink blocks upstream (every frame is processed), with true it drops the frame before encoding it (counted in stats)")
                    .minimum(1)
                    .maximum(config::MAX_MAX_FRAMES_IN_FLIGHT)
                    .default_value(config::DEFAULT_MAX_FRAMES_IN_FLIGHT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoxed::builder::<gst::Structure>("stats")
                    .nick("Statistics")
                    .blurb("Bytes and chunks sent, keepalives sent and echoed, last echo RTT, frames received, phase, upload-mode (undecided, streamed, spooled, live); live video: frames-sent, frames-dropped, frames-skipped, frames-in-flight, results-unpaired")
                    .read_only()
                    .build(),
            ]);
            properties
        });
        PROPERTIES.as_ref()
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add_pad(&self.sinkpad).expect("the sink pad is added once");
        // A sink for the bins: they wait for its EOS message to end.
        obj.set_element_flags(gst::ElementFlags::SINK);
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        if matches!(*self.state.lock().unwrap(), State::Started { .. }) {
            gst::warning!(CAT, imp = self, "property '{}' cannot change while the element is running", pspec.name());
            return;
        }
        let mut settings = self.settings.lock().unwrap();
        let text = || value.get::<Option<String>>().expect("type checked upstream");
        if config::set_session_property(&mut settings, pspec.name(), value) {
            return;
        }
        match pspec.name() {
            "chunk-size" => settings.chunk_size = value.get().expect("type checked upstream"),
            "buffer-limit" => settings.buffer_limit = value.get().expect("type checked upstream"),
            "keepalive-interval" => settings.keepalive_interval_ms = value.get().expect("type checked upstream"),
            "spool-dir" => settings.spool_dir = text(),
            "max-spool-size" => settings.max_spool_size = value.get().expect("type checked upstream"),
            "upload-mode" => settings.upload_mode = value.get().expect("type checked upstream"),
            "session" => settings.session = text(),
            "video-codec" => settings.video_codec = value.get().expect("type checked upstream"),
            "max-frames-in-flight" => settings.max_frames_in_flight = value.get().expect("type checked upstream"),
            name => unreachable!("unknown property {name}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        if pspec.name() == "stats" {
            return self.stats().to_value();
        }
        let settings = self.settings.lock().unwrap();
        if let Some(value) = config::session_property(&settings, pspec.name()) {
            return value;
        }
        match pspec.name() {
            "chunk-size" => settings.chunk_size.to_value(),
            "buffer-limit" => settings.buffer_limit.to_value(),
            "keepalive-interval" => settings.keepalive_interval_ms.to_value(),
            "spool-dir" => settings.spool_dir.to_value(),
            "max-spool-size" => settings.max_spool_size.to_value(),
            "upload-mode" => settings.upload_mode.to_value(),
            "session" => settings.session.to_value(),
            "video-codec" => settings.video_codec.to_value(),
            "max-frames-in-flight" => settings.max_frames_in_flight.to_value(),
            name => unreachable!("unknown readable property {name}"),
        }
    }
}

impl GstObjectImpl for UploadSink {}

impl ElementImpl for UploadSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Roboflow upload sink",
                "Sink/Network",
                "Sends video to a Roboflow Inference Server over WebRTC and reports every frame's Workflow result: a muxed file's bytes (any caps but elementary video) are uploaded on a data channel; raw video (encoded to video-codec), VP8 or constrained-baseline H.264 goes as a live WebRTC video track",
                "gst-roboflow developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &gst::Caps::new_any(),
                )
                .expect("valid sink template"),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(&self, transition: gst::StateChange) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        gst::debug!(CAT, imp = self, "state change {transition:?}");
        match transition {
            gst::StateChange::ReadyToPaused => {
                if let Err(message) = self.start() {
                    self.post_error_message(message);
                    return Err(gst::StateChangeError);
                }
                // Before the pad activates: its first buffer may come at once.
                self.gate.start();
            }
            gst::StateChange::PausedToPlaying => self.gate.set_playing(true),
            gst::StateChange::PlayingToPaused => self.gate.set_playing(false),
            // Every wait ends first, so that the pad's deactivation, which
            // takes the stream lock, finds the streaming thread returning.
            gst::StateChange::PausedToReady => self.gate.stop(),
            _ => {}
        }
        let result = self.parent_change_state(transition);
        match transition {
            gst::StateChange::ReadyToPaused if result.is_err() => {
                self.gate.stop();
                self.stop();
            }
            gst::StateChange::PausedToReady => self.stop(),
            _ => {}
        }
        result
    }

    fn query(&self, query: &mut gst::QueryRef) -> bool {
        if Self::answer_latency(query) {
            return true;
        }
        // Position, duration and the rest: asked of upstream, as a sink does.
        self.parent_query(query)
    }

    fn send_event(&self, event: gst::Event) -> bool {
        // A bin sends seeks and its latency to its sinks: they go upstream.
        if event.is_upstream() {
            return self.sinkpad.push_event(event);
        }
        self.parent_send_event(event)
    }
}

/// Waits up to `limit` for `future`; running out of time is `Ok(false)`.
impl UploadSink {
    /// READY->PAUSED: validates the settings and starts the session, which
    /// connects in the background while upstream produces the bytes.
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        let config = settings
            .validate()
            .map_err(|err| gst::error_msg!(gst::LibraryError::Settings, ("{}", err)))?;
        let name = settings
            .session
            .clone()
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| session::default_name(&self.obj().name()));
        *self.session.lock().unwrap() = None;
        *self.upload_mode.lock().unwrap() = "undecided";
        *self.state.lock().unwrap() = State::Started {
            job: Some(Slot::Pending(Box::new(Pending { name, config, seeking_upstream: false }))),
            end: None,
        };
        Ok(())
    }

    /// Starts the session in the mode the caps decided; it connects in the
    /// background while upstream goes on.
    fn start_session(&self, pending: &Pending, mode: CapsMode, caps: Option<&gst::Caps>) -> Result<Slot, Stop> {
        if mode.is_live() {
            let caps = caps.expect("live video has caps");
            return Ok(Slot::Live(Box::new(LiveJob::start(self, &pending.name, pending.config.clone(), mode, caps)?)));
        }
        let config = pending.config.clone();
        gst::info!(CAT, imp = self, "starting session '{}' with {}: a file upload", pending.name, config.api_url);
        let (writer, results) = self.start_named(&pending.name, config.clone())?;
        Ok(Slot::File(Box::new(Job {
            writer,
            config,
            mode: Mode::Undecided,
            seeking_upstream: pending.seeking_upstream,
            progress: Progress::default(),
            uploaded: false,
            results,
        })))
    }

    /// `session::start`, and the session's probe for `stats`.
    pub(super) fn start_named(&self, name: &str, config: SessionConfig) -> Result<(UploadWriter, Option<ResultStream>), Stop> {
        let (writer, results) = session::start(name.to_owned(), config)
            .map_err(|error| Stop::Error(gst::error_msg!(gst::LibraryError::Settings, ("{}", error))))?;
        if results.is_none() {
            gst::info!(CAT, imp = self, "a roboflowresultsrc reads the results of session '{}'", writer.name());
        }
        *self.session.lock().unwrap() = Some(writer.probe());
        Ok((writer, results))
    }

    /// PAUSED->READY, after the streaming thread returned: lets go of the
    /// session and drops the job (deleting any spool file).
    fn stop(&self) {
        // Dropping the job lets go of the session (it stays open for a
        // roboflowresultsrc still reading a complete upload's results) and
        // deletes any spool file.
        *self.state.lock().unwrap() = State::Stopped;
        if let Some(session) = self.session.lock().unwrap().as_ref() {
            gst::info!(CAT, imp = self, "stopped session '{}'", session.name());
        }
    }

    fn answer_latency(query: &mut gst::QueryRef) -> bool {
        match query.view_mut() {
            // Not live, no latency of its own: the sink does not sync.
            gst::QueryViewMut::Latency(latency) => {
                latency.set(false, gst::ClockTime::ZERO, gst::ClockTime::NONE);
                true
            }
            _ => false,
        }
    }

    fn sink_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        if Self::answer_latency(query) {
            return true;
        }
        if let gst::QueryViewMut::Caps(caps) = query.view_mut() {
            // Anything goes (a file's bytes), but an encoder asking what
            // video it may send is told what the server takes.
            let result = match caps.filter_owned() {
                Some(filter) if !filter.is_any() && filter.iter().all(|s| s.name().starts_with("video/x-")) => {
                    // In the sink's order of preference (I420 first).
                    let live = preferred_live_caps().intersect_with_mode(&filter, gst::CapsIntersectMode::First);
                    if live.is_empty() { filter } else { live }
                }
                Some(filter) => filter,
                None => gst::Caps::new_any(),
            };
            caps.set_result(&result);
            return true;
        }
        gst::Pad::query_default(pad, Some(&*self.obj()), query)
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        match event.view() {
            gst::EventView::FlushStart(_) => {
                self.gate.flush_start();
                true
            }
            gst::EventView::FlushStop(_) => {
                self.gate.flush_stop();
                true
            }
            gst::EventView::Segment(segment) => match self.on_segment(segment.segment()) {
                Ok(()) => true,
                Err(message) => {
                    self.fail(message);
                    false
                }
            },
            gst::EventView::Eos(eos) => self.on_eos(eos.seqnum()),
            gst::EventView::Caps(caps) => match self.on_caps(caps.caps_owned()) {
                Ok(()) => true,
                Err(Stop::Error(message)) => {
                    self.fail(message);
                    false
                }
                Err(_) => false,
            },
            // Messages a sink posts, as GstBaseSink does: a bin posts
            // STREAM_START once every sink of it did.
            gst::EventView::StreamStart(stream_start) => {
                let obj = self.obj();
                let mut message = gst::message::StreamStart::builder().src(&*obj).seqnum(stream_start.seqnum());
                if let Some(group) = stream_start.group_id() {
                    message = message.group_id(group);
                }
                let _ = obj.post_message(message.build());
                true
            }
            gst::EventView::Tag(tag) => {
                let obj = self.obj();
                let _ = obj.post_message(gst::message::Tag::builder(tag.tag_owned()).src(&*obj).build());
                true
            }
            gst::EventView::SinkMessage(sink_message) => {
                let _ = self.obj().post_message(sink_message.message());
                true
            }
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    /// Whether the job still takes data: Flushing when stopped or flushing,
    /// Error (silently: the ERROR was posted) after a failure, Eos after EOS.
    fn accepting(&self) -> Result<(), gst::FlowError> {
        match &*self.state.lock().unwrap() {
            State::Stopped => return Err(gst::FlowError::Flushing),
            State::Started { end: Some(End::Failed), .. } => return Err(gst::FlowError::Error),
            State::Started { end: Some(End::Finished), .. } => return Err(gst::FlowError::Eos),
            State::Started { end: None, .. } => {}
        }
        if self.gate.is_cancelled() {
            return Err(gst::FlowError::Flushing);
        }
        Ok(())
    }

    /// Posts `message` as the job's one ERROR; any later failure of the same
    /// job is a consequence of the first and is not reported.
    pub(super) fn fail(&self, message: gst::ErrorMessage) {
        let first = match &mut *self.state.lock().unwrap() {
            State::Started { end: end @ None, .. } => {
                *end = Some(End::Failed);
                true
            }
            _ => false,
        };
        if first {
            self.post_error_message(message);
        } else {
            gst::debug!(CAT, imp = self, "not reported, the job already ended: {message:?}");
        }
    }

    fn chain(&self, buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        self.accepting()?;
        let outcome = match self.take_job() {
            Some(slot) => {
                let (slot, outcome) = self.chain_slot(slot, buffer);
                self.give_back(slot);
                outcome
            }
            None => Err(Stop::Flushing),
        };
        self.post_warnings();
        match outcome {
            Ok(()) => Ok(gst::FlowSuccess::Ok),
            // A sink has no downstream to be unlinked from.
            Err(Stop::Flushing | Stop::NotLinked) => Err(gst::FlowError::Flushing),
            Err(Stop::Eos) => {
                self.finish(gst::Seqnum::next());
                Err(gst::FlowError::Eos)
            }
            Err(Stop::Error(message)) => {
                self.fail(message);
                Err(gst::FlowError::Error)
            }
        }
    }

    fn chain_slot(&self, slot: Slot, buffer: gst::Buffer) -> (Slot, Result<(), Stop>) {
        let mut slot = match slot {
            // Bytes without caps: a file's.
            Slot::Pending(pending) => match self.start_session(&pending, CapsMode::File, None) {
                Ok(slot) => slot,
                Err(stop) => return (Slot::Pending(pending), Err(stop)),
            },
            slot => slot,
        };
        let outcome = match &mut slot {
            Slot::File(job) => match buffer.map_readable() {
                Ok(map) => self.render_job(job, &map, buffer.offset()),
                Err(_) => Err(Stop::Error(gst::error_msg!(gst::ResourceError::Read, ("Failed to map the buffer")))),
            },
            Slot::Live(job) => job.chain(self, buffer),
            Slot::Pending(_) => unreachable!("started above"),
        };
        (slot, outcome)
    }

    /// New caps: the first ones decide the mode and start the session.
    fn on_caps(&self, caps: gst::Caps) -> Result<(), Stop> {
        let mode = caps_mode(&caps).map_err(|message| Stop::Error(gst::error_msg!(gst::StreamError::Format, ("{}", message))))?;
        let Some(slot) = self.take_job() else {
            return Err(Stop::Flushing);
        };
        let (slot, outcome) = match slot {
            Slot::Pending(pending) => match self.start_session(&pending, mode, Some(&caps)) {
                Ok(slot) => (slot, Ok(())),
                Err(stop) => (Slot::Pending(pending), Err(stop)),
            },
            Slot::File(job) if !mode.is_live() => (Slot::File(job), Ok(())),
            Slot::File(job) => (
                Slot::File(job),
                Err(Stop::failed(format!("the caps changed mid-stream from a file's bytes to video ({caps}): one job is either a file upload or live video"))),
            ),
            Slot::Live(mut job) => {
                let outcome = job.set_caps(mode, &caps);
                (Slot::Live(job), outcome)
            }
        };
        self.give_back(slot);
        outcome
    }

    /// Completes the job and posts the EOS message, once.
    fn on_eos(&self, seqnum: gst::Seqnum) -> bool {
        if let Err(flow) = self.accepting() {
            // After a failure upstream still sends EOS: its ERROR is posted.
            gst::debug!(CAT, imp = self, "EOS dropped: {flow:?}");
            return false;
        }
        match self.finish_job() {
            Ok(()) | Err(Stop::Eos) => {}
            Err(Stop::Flushing | Stop::NotLinked) => return false,
            Err(Stop::Error(message)) => {
                self.fail(message);
                return false;
            }
        }
        self.finish(seqnum);
        true
    }

    /// Posts the EOS message, once per job.
    fn finish(&self, seqnum: gst::Seqnum) {
        let first = match &mut *self.state.lock().unwrap() {
            State::Started { end: end @ None, .. } => {
                *end = Some(End::Finished);
                true
            }
            _ => false,
        };
        if first {
            gst::info!(CAT, imp = self, "the job is finished: posting EOS");
            let summary = crate::bus::upload_summary_structure(self.stats());
            let _ = self.obj().post_message(gst::message::Element::builder(summary).src(&*self.obj()).build());
            let _ = self.obj().post_message(gst::message::Eos::builder().src(&*self.obj()).seqnum(seqnum).build());
        }
    }

    fn stats(&self) -> gst::Structure {
        let mode = *self.upload_mode.lock().unwrap();
        match self.session.lock().unwrap().as_ref() {
            Some(session) => {
                let stats = session.stats();
                session::stats_structure(&stats, |s| {
                    s.set("upload-mode", mode);
                    if mode == "live" {
                        s.set("frames-sent", stats.frames_sent);
                        s.set("frames-dropped", stats.frames_dropped);
                        s.set("frames-skipped", stats.frames_skipped);
                        s.set("frames-in-flight", stats.frames_in_flight);
                        s.set("results-unpaired", stats.results_unpaired);
                        s.set("keyframe-requests", stats.keyframe_requests);
                    }
                })
            }
            None => {
                let started = matches!(*self.state.lock().unwrap(), State::Started { .. });
                let phase = if started { "waiting-for-data" } else { "stopped" };
                gst::Structure::builder("roboflow-stats").field("phase", phase).build()
            }
        }
    }

    fn take_job(&self) -> Option<Slot> {
        match &mut *self.state.lock().unwrap() {
            State::Started { job, .. } => job.take(),
            State::Stopped => None,
        }
    }

    /// Returns the job to the state, unless the element stopped meanwhile
    /// (then the job, and any spool file, is dropped here).
    fn give_back(&self, job: Slot) {
        if let State::Started { job: slot, .. } = &mut *self.state.lock().unwrap() {
            *slot = Some(job);
        }
    }

    pub(super) fn post_warnings(&self) {
        let session = self.session.lock().unwrap().clone();
        for warning in session.map(|s| s.take_warnings()).unwrap_or_default() {
            gst::element_imp_warning!(self, gst::ResourceError::Write, ("{}", warning));
        }
    }

    /// Every wait of the streaming thread on the server: on the plugin
    /// runtime, ended by a flush or a stop. It holds no lock but the pad's
    /// stream lock.
    pub(super) fn wait<T: Send, F: Future<Output = Result<T, SessionError>> + Send>(
        &self,
        timeout: Option<Duration>,
        timed_out: impl FnOnce() -> SessionError,
        future: F,
    ) -> Result<T, Stop> {
        Ok(waited(self.gate.run(timeout, future), timed_out)??)
    }

    pub(super) fn wait_connected(&self, writer: &UploadWriter, config: &SessionConfig) -> Result<(), Stop> {
        // The session enforces connect-timeout and names the step that was
        // late; this bound only guards against a session that never reports.
        let limit = config.connect_timeout + CONNECT_GRACE;
        self.wait(
            Some(limit),
            || SessionError::ConnectTimeout { url: config.api_url.to_string(), timeout: limit, stage: "connecting" },
            writer.connected(),
        )
    }

    fn on_segment(&self, segment: &gst::Segment) -> Result<(), gst::ErrorMessage> {
        let Some(segment) = segment.downcast_ref::<gst::format::Bytes>() else {
            return Ok(());
        };
        let start = segment.start().map(u64::from).unwrap_or(0);
        let mut state = self.state.lock().unwrap();
        let State::Started { job: Some(slot), end: None } = &mut *state else {
            return Ok(());
        };
        let job = match slot {
            Slot::Pending(pending) => {
                if start != 0 {
                    pending.seeking_upstream = true;
                }
                return Ok(());
            }
            Slot::Live(_) => return Ok(()),
            Slot::File(job) => job,
        };
        let Job { mode, seeking_upstream, .. } = &mut **job;
        match mode {
            Mode::Undecided => {
                if start != 0 {
                    *seeking_upstream = true;
                }
            }
            Mode::Spooled(spool) => {
                gst::debug!(CAT, imp = self, "spool: upstream seeks to byte {start}");
                spool.seek(start);
            }
            Mode::Streamed(streamed) => {
                let consumed = streamed.consumed;
                if start != consumed {
                    return Err(gst::error_msg!(
                        gst::StreamError::Failed,
                        ("upstream seeked to byte {} after {} bytes were already streamed to the server; set upload-mode=spool for this upstream", start, consumed)
                    ));
                }
            }
        }
        Ok(())
    }

    fn render_job(&self, job: &mut Job, data: &[u8], offset: u64) -> Result<(), Stop> {
        let Job { writer, config, mode, seeking_upstream, progress, .. } = job;
        if matches!(mode, Mode::Undecided) {
            *mode = self.choose_mode(writer, config, *seeking_upstream)?;
            *self.upload_mode.lock().unwrap() = match mode {
                Mode::Streamed(_) => "streamed",
                _ => "spooled",
            };
        }
        match mode {
            Mode::Undecided => unreachable!("decided above"),
            Mode::Spooled(spool) => spool.write(data),
            Mode::Streamed(streamed) => {
                let consumed = streamed.consumed;
                if offset != u64::MAX /* GST_BUFFER_OFFSET_NONE */ && offset != consumed {
                    return Err(Stop::failed(format!(
                        "upstream sent bytes at offset {offset} while {consumed} bytes were streamed; set upload-mode=spool for this upstream"
                    )));
                }
                writer.push(data)?;
                streamed.consumed += data.len() as u64;
                self.send_chunks(writer, config)?;
                self.progress_message(writer, progress, false);
                Ok(())
            }
        }
    }

    fn choose_mode(&self, writer: &mut UploadWriter, config: &SessionConfig, seeking_upstream: bool) -> Result<Mode, Stop> {
        let upload_mode = self.settings.lock().unwrap().upload_mode;
        let size = if upload_mode == UploadMode::Auto && !seeking_upstream && self.fed_by_byte_source() {
            self.sinkpad
                .peer_query_duration::<gst::format::Bytes>()
                .map(u64::from)
                .filter(|size| *size > 0)
        } else {
            None
        };
        match size {
            Some(size) => {
                gst::info!(CAT, imp = self, "upstream reports {size} bytes: streaming the upload");
                self.wait_connected(writer, config)?;
                writer.begin(size)?;
                Ok(Mode::Streamed(Box::new(Streamed { consumed: 0 })))
            }
            None => {
                let settings = self.settings.lock().unwrap();
                let spool_dir = settings
                    .spool_dir
                    .clone()
                    .filter(|dir| !dir.trim().is_empty())
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir);
                let spool = Spool::create(&spool_dir, settings.max_spool_size)?;
                gst::info!(CAT, imp = self, "upstream size unknown or upstream seeks: spooling to {}", spool.path().display());
                Ok(Mode::Spooled(spool))
            }
        }
    }

    /// True when the bytes arriving are exactly the bytes of a source
    /// element, so that its BYTES duration is the upload's size. Encoders
    /// and muxers forward duration queries upstream, where a BYTES answer
    /// describes other bytes entirely; only byte-preserving elements may
    /// stand between the source and this sink.
    fn fed_by_byte_source(&self) -> bool {
        const BYTE_PRESERVING: &[&str] = &["queue", "queue2", "identity", "capsfilter", "tee", "typefind"];
        let mut pad = Some(self.sinkpad.clone());
        for _ in 0..16 {
            let Some(element) = pad.and_then(|p| p.peer()).and_then(|peer| peer.parent_element()) else {
                return false;
            };
            if element.is::<gst_base::BaseSrc>() {
                return true;
            }
            let factory = element.factory().map(|f| f.name().to_string()).unwrap_or_default();
            if !BYTE_PRESERVING.contains(&factory.as_str()) {
                gst::debug!(CAT, imp = self, "{} ({factory}) may change the bytes: spooling", element.name());
                return false;
            }
            pad = element.sink_pads().into_iter().next();
        }
        false
    }

    /// Sends the chunks framed so far, once the element plays: a pause holds
    /// the upload here, and the stall timer only runs while a chunk waits
    /// for room in the channel.
    fn send_chunks(&self, writer: &mut UploadWriter, config: &SessionConfig) -> Result<(), Stop> {
        // Most buffers (filesrc reads 4 KiB) complete no chunk: no wait on
        // the runtime for them.
        if !writer.has_pending() {
            return Ok(());
        }
        self.gate.wait_playing()?;
        let stall = config.stall_timeout;
        let probe = writer.probe();
        self.wait(
            Some(stall),
            || {
                let stats = probe.stats();
                SessionError::UploadStalled { timeout: stall, sent: stats.chunks_sent, total: stats.total_chunks }
            },
            writer.flush(),
        )
    }

    fn progress_message(&self, writer: &UploadWriter, progress: &mut Progress, last: bool) {
        let now = Instant::now();
        let started = *progress.started.get_or_insert(now);
        let stats = writer.stats();
        let percent = (stats.bytes_sent * 100).checked_div(stats.total_bytes).unwrap_or(0);
        let due = last
            || percent > progress.last_percent
            || progress.last_post.is_none_or(|at| now.duration_since(at) >= PROGRESS_INTERVAL);
        if !due {
            return;
        }
        progress.last_post = Some(now);
        progress.last_percent = percent;
        let structure = progress_structure(&stats, percent, now.duration_since(started), last);
        let _ = self.obj().post_message(gst::message::Element::builder(structure).src(&*self.obj()).build());
    }

    /// At EOS: completes the upload, then reads every result unless a
    /// roboflowresultsrc does; returns once the EOS message may be posted.
    fn finish_job(&self) -> Result<(), Stop> {
        let mut job = match self.take_job() {
            None => return Err(Stop::Flushing),
            Some(Slot::File(job)) => job,
            Some(Slot::Live(mut job)) => {
                let outcome = job.finish(self);
                self.post_warnings();
                self.give_back(Slot::Live(job));
                return outcome;
            }
            Some(pending @ Slot::Pending(_)) => {
                self.give_back(pending);
                return Err(Stop::Error(gst::error_msg!(gst::StreamError::Failed, ("{}", EMPTY_INPUT))));
            }
        };
        let outcome = if job.uploaded { Ok(()) } else { self.finish_upload(&mut job) };
        self.post_warnings();
        let outcome = outcome
            .and_then(|()| self.collect_results(&mut job))
            // EOS in PAUSED waits for PLAYING, as any sink's does.
            .and_then(|()| Ok(self.gate.wait_playing()?));
        self.give_back(Slot::File(job));
        outcome
    }

    fn finish_upload(&self, job: &mut Job) -> Result<(), Stop> {
        let Job { writer, config, mode, progress, .. } = job;
        if let Mode::Spooled(spool) = mode
            && spool.size() > 0
        {
            // Connected before the spool leaves the job: a flush during
            // this wait keeps the bytes for the EOS that comes after it.
            self.wait_connected(writer, config)?;
        }
        match std::mem::replace(mode, Mode::Undecided) {
            Mode::Undecided => {
                return Err(Stop::Error(gst::error_msg!(gst::StreamError::Failed, ("{}", EMPTY_INPUT))));
            }
            Mode::Streamed(_) => writer.end()?,
            Mode::Spooled(spool) => self.upload_spool(writer, config, spool, progress)?,
        }
        self.send_chunks(writer, config)?;
        let stall = config.stall_timeout;
        let probe = writer.probe();
        self.wait(
            Some(stall),
            || {
                let stats = probe.stats();
                SessionError::UploadStalled { timeout: stall, sent: stats.chunks_sent, total: stats.total_chunks }
            },
            writer.sent(),
        )?;
        job.uploaded = true;
        self.progress_message(&job.writer, &mut job.progress, true);
        Ok(())
    }

    fn upload_spool(
        &self,
        writer: &mut UploadWriter,
        config: &SessionConfig,
        mut spool: Spool,
        progress: &mut Progress,
    ) -> Result<(), Stop> {
        let size = spool.size();
        if size == 0 {
            return Err(Stop::Error(gst::error_msg!(gst::StreamError::Failed, ("{}", EMPTY_INPUT))));
        }
        writer.begin(size)?;
        spool.read_blocks(config.chunk_size, |block| {
            writer.push(block)?;
            self.send_chunks(writer, config)?;
            self.progress_message(writer, progress, false);
            Ok(())
        })?;
        writer.end()?;
        // `spool` drops here: the temporary file is deleted.
        Ok(())
    }

    /// Posts every result, unless a roboflowresultsrc takes them: then the
    /// sink's job ends with the upload, and the pipeline ends when the
    /// source's branch reaches EOS.
    fn collect_results(&self, job: &mut Job) -> Result<(), Stop> {
        let Job { writer, config, results, .. } = job;
        let Some(results) = results else {
            return Ok(());
        };
        let stall = config.stall_timeout;
        loop {
            // A pause holds the results here; the stall timer only runs
            // while the element plays.
            self.gate.wait_playing()?;
            let event = self.wait(
                Some(stall),
                || SessionError::ResultsStalled { timeout: stall, results: writer.stats().frames_received },
                results.next(),
            )?;
            self.gate.wait_playing()?;
            match event {
                ResultEvent::Frame(frame) => self.post_inference(&frame),
                ResultEvent::Complete { frames, .. } => {
                    gst::info!(CAT, imp = self, "processing complete: {frames} frames");
                    return Ok(());
                }
            }
        }
    }

    /// Live video: asks upstream's encoder for a keyframe.
    pub(super) fn request_upstream_keyframe(&self, event: gst::Event) {
        if !self.sinkpad.push_event(event) {
            gst::debug!(CAT, imp = self, "upstream did not take the keyframe request");
        }
    }

    pub(super) fn post_inference(&self, frame: &FrameEvent) {
        let (structure, _skipped) = inference_structure(frame);
        let _ = self
            .obj()
            .post_message(gst::message::Element::builder(structure).src(&*self.obj()).build());
    }
}
