// The properties of roboflowuploadsink as the user sets them, their
// defaults and limits, and their validation into a SessionConfig.

use std::path::PathBuf;
use std::time::Duration;

use url::Url;

use super::camera::{CameraKind, CameraSource};
use super::network::{self, AUTO_SCTP_MTU};
use super::workflow::{self, DEFAULT_TASK_TYPE};
use super::{ConfigError, DEFAULT_IMAGE_INPUT_NAME, SessionConfig, config_error, non_empty};
use crate::protocol::DEFAULT_KEEPALIVE_INTERVAL;
use crate::protocol::live::LiveCodec;
use crate::protocol::upload::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE};

pub const DEFAULT_API_URL: &str = "http://127.0.0.1:9001";
pub const API_KEY_ENV: &str = "ROBOFLOW_API_KEY";
/// 128 KiB, not the reference client's 256 KiB: webrtc-rs counts bytes in
/// flight as well as queued ones, and with 256 KiB in flight aiortc's
/// socket overflowed on loopback (28-42 datagrams dropped per job, a 1.1 s
/// SCTP retransmission timeout at the end of every small upload, 20 MB/s on
/// 94 MB); with 128 KiB: no drop, no stall, 27 MB/s (scripts/bench.sh).
pub const DEFAULT_BUFFER_LIMIT: u32 = 128 * 1024;
/// The protocol's default, as the property's milliseconds.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u32 = DEFAULT_KEEPALIVE_INTERVAL.as_millis() as u32;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 60_000;
pub const DEFAULT_STALL_TIMEOUT_MS: u32 = 120_000;
pub const DEFAULT_CHUNK_SIZE_U32: u32 = DEFAULT_CHUNK_SIZE as u32;
pub const MAX_CHUNK_SIZE_U32: u32 = MAX_CHUNK_SIZE as u32;
/// Smallest chunk worth sending: a keepalive is <= 1 byte, so a chunk message
/// must be longer than that, and tiny chunks only multiply per-message costs.
pub const MIN_CHUNK_SIZE: u32 = 1024;
pub const MIN_BUFFER_LIMIT: u32 = 64 * 1024;
pub const DEFAULT_MAX_RESULT_SIZE: u64 = 64 << 20;
pub const MIN_MAX_RESULT_SIZE: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstRoboflowApiKeyTransport")]
pub enum ApiKeyTransport {
    #[enum_value(name = "In the JSON body (api_key)", nick = "body")]
    Body = 0,
    #[enum_value(name = "In an Authorization: Bearer header", nick = "header")]
    Header = 1,
    #[enum_value(name = "In both the body and the header", nick = "both")]
    Both = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstRoboflowVideoTransport")]
pub enum VideoTransport {
    #[enum_value(
        name = "Image outputs as JPEG on the data channel: lossless, every frame",
        nick = "datachannel"
    )]
    Datachannel = 0,
    #[enum_value(
        name = "A returned WebRTC video track (VP8/H.264, may drop)",
        nick = "track"
    )]
    Track = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstRoboflowUploadMode")]
pub enum UploadMode {
    #[enum_value(
        name = "Stream when upstream reports its size in bytes, else spool",
        nick = "auto"
    )]
    Auto = 0,
    #[enum_value(
        name = "Always spool to a temporary file and upload at EOS",
        nick = "spool"
    )]
    Spool = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstRoboflowVideoCodec")]
pub enum VideoCodec {
    #[enum_value(name = "VP8 (libvpx vp8enc, realtime settings)", nick = "vp8")]
    Vp8 = 0,
    #[enum_value(
        name = "H.264 constrained baseline (x264enc or openh264enc, zero latency)",
        nick = "h264"
    )]
    H264 = 1,
}

impl VideoCodec {
    pub fn live_codec(self) -> LiveCodec {
        match self {
            VideoCodec::Vp8 => LiveCodec::Vp8,
            VideoCodec::H264 => LiveCodec::H264,
        }
    }
}

/// Why an RTSP camera needs realtime processing (checked on Roboflow
/// Inference Server 1.8.3, PROTOCOL.md §11).
pub const RTSP_NEEDS_REALTIME: &str = "an RTSP camera needs realtime-processing=true: without it the server reads RTSP \
     with its own decoder thread, which stops at the first frame that has no timestamp, and FFmpeg gives the \
     first frame of an RTSP stream none, so the session would end after 0 results";

/// Frames sent whose result has not come back, by default: one being
/// processed and one waiting, so the server never idles and never queues.
pub const DEFAULT_MAX_FRAMES_IN_FLIGHT: u32 = 2;
pub const MAX_MAX_FRAMES_IN_FLIGHT: u32 = 64;

/// The properties of roboflowuploadsink, as set by the user.
#[derive(Clone)]
pub struct UploadSettings {
    pub api_url: String,
    pub api_key: Option<String>,
    pub api_key_transport: ApiKeyTransport,
    pub workspace: Option<String>,
    pub workflow_id: Option<String>,
    pub workflow_version_id: Option<String>,
    pub workflow_spec: Option<String>,
    pub workflow_spec_file: Option<String>,
    pub model_id: Option<String>,
    pub task_type: String,
    pub image_input_name: String,
    pub workflow_parameters: Option<String>,
    pub stream_output: Option<String>,
    pub data_output: Option<String>,
    pub video_transport: VideoTransport,
    pub realtime_processing: bool,
    pub declared_fps: f64,
    pub processing_timeout: u32,
    pub requested_plan: Option<String>,
    pub requested_region: Option<String>,
    pub ice_servers: Option<String>,
    pub udp_bind_address: Option<String>,
    pub connect_timeout_ms: u32,
    pub stall_timeout_ms: u32,
    pub chunk_size: u32,
    pub buffer_limit: u32,
    pub sctp_mtu: u32,
    pub keepalive_interval_ms: u32,
    pub spool_dir: Option<String>,
    pub max_spool_size: u64,
    pub max_result_size: u64,
    pub upload_mode: UploadMode,
    pub session: Option<String>,
    /// Live video: the codec raw video is encoded to.
    pub video_codec: VideoCodec,
    /// Live video: frames sent whose result has not come back.
    pub max_frames_in_flight: u32,
    /// roboflowresultsrc: a camera the server reads (no upload).
    pub source_url: Option<String>,
}

impl std::fmt::Debug for UploadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hand-written so that the API key can never reach a log.
        f.debug_struct("UploadSettings")
            .field("api_url", &self.api_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("workflow_id", &self.workflow_id)
            .field("model_id", &self.model_id)
            .field("video_transport", &self.video_transport)
            .field("session", &self.session)
            .field("source_url", &self.source_url.as_deref().and_then(|url| CameraSource::parse(url).ok()))
            .finish_non_exhaustive()
    }
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            api_key: std::env::var(API_KEY_ENV)
                .ok()
                .filter(|key| !key.is_empty()),
            api_key_transport: ApiKeyTransport::Body,
            workspace: None,
            workflow_id: None,
            workflow_version_id: None,
            workflow_spec: None,
            workflow_spec_file: None,
            model_id: None,
            task_type: DEFAULT_TASK_TYPE.to_owned(),
            image_input_name: DEFAULT_IMAGE_INPUT_NAME.to_owned(),
            workflow_parameters: None,
            stream_output: None,
            data_output: None,
            video_transport: VideoTransport::Datachannel,
            realtime_processing: false,
            declared_fps: 0.0,
            processing_timeout: 0,
            requested_plan: None,
            requested_region: None,
            ice_servers: None,
            udp_bind_address: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            stall_timeout_ms: DEFAULT_STALL_TIMEOUT_MS,
            chunk_size: DEFAULT_CHUNK_SIZE_U32,
            buffer_limit: DEFAULT_BUFFER_LIMIT,
            sctp_mtu: AUTO_SCTP_MTU,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
            spool_dir: None,
            max_spool_size: 0,
            max_result_size: DEFAULT_MAX_RESULT_SIZE,
            upload_mode: UploadMode::Auto,
            session: None,
            video_codec: VideoCodec::Vp8,
            max_frames_in_flight: DEFAULT_MAX_FRAMES_IN_FLIGHT,
            source_url: None,
        }
    }
}

impl UploadSettings {
    /// Validates every property before any network activity.
    pub fn validate(&self) -> Result<SessionConfig, ConfigError> {
        let api_url = Url::parse(self.api_url.trim()).map_err(|err| {
            config_error("api-url", format!("'{}' is not a URL: {err}", self.api_url))
        })?;
        if !matches!(api_url.scheme(), "http" | "https") || api_url.host().is_none() {
            return Err(config_error(
                "api-url",
                format!(
                    "'{}' must be an http:// or https:// URL with a host",
                    self.api_url
                ),
            ));
        }

        let workflow = workflow::workflow_source(self)?;

        let workflow_parameters = non_empty(&self.workflow_parameters)
            .map(|text| workflow::parse_json_object("workflow-parameters", text))
            .transpose()?;

        let image_input_name = self.image_input_name.trim().to_owned();
        if image_input_name.is_empty() {
            return Err(config_error("image-input-name", "must not be empty"));
        }

        let (stream_output, data_output) = workflow::requested_outputs(self, &workflow)?;

        if !(self.declared_fps.is_finite() && self.declared_fps >= 0.0) {
            return Err(config_error("declared-fps", "must be a finite number >= 0"));
        }

        let chunk_size = self.chunk_size;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE_U32).contains(&chunk_size) {
            return Err(config_error(
                "chunk-size",
                format!(
                    "{chunk_size} is out of range {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE_U32} (8-byte header plus payload must fit the server's 65536-byte message limit)"
                ),
            ));
        }
        if self.buffer_limit < MIN_BUFFER_LIMIT || self.buffer_limit < chunk_size + 8 {
            return Err(config_error(
                "buffer-limit",
                format!(
                    "{} is too small: it must hold at least one chunk message ({} bytes) and be >= {MIN_BUFFER_LIMIT}",
                    self.buffer_limit,
                    chunk_size + 8
                ),
            ));
        }
        network::check_sctp_mtu(self.sctp_mtu)?;
        if self.max_result_size < MIN_MAX_RESULT_SIZE {
            return Err(config_error(
                "max-result-size",
                format!(
                    "{} is too small: at least {MIN_MAX_RESULT_SIZE} bytes",
                    self.max_result_size
                ),
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(config_error("connect-timeout", "must be > 0 ms"));
        }
        if self.stall_timeout_ms == 0 {
            return Err(config_error("stall-timeout", "must be > 0 ms"));
        }

        if !(1..=MAX_MAX_FRAMES_IN_FLIGHT).contains(&self.max_frames_in_flight) {
            return Err(config_error(
                "max-frames-in-flight",
                format!("{} is out of range 1..={MAX_MAX_FRAMES_IN_FLIGHT}", self.max_frames_in_flight),
            ));
        }

        let camera = non_empty(&self.source_url).map(CameraSource::parse).transpose()?;
        if camera.as_ref().is_some_and(|camera| camera.kind == CameraKind::Rtsp) && !self.realtime_processing {
            return Err(config_error("realtime-processing", RTSP_NEEDS_REALTIME));
        }

        let ice_servers = network::parse_ice_servers(&self.ice_servers)?;
        let udp_bind_address = network::udp_bind_address(&self.udp_bind_address, &api_url)?;
        let sctp_mtu = network::sctp_mtu(self.sctp_mtu, udp_bind_address, &ice_servers);

        if let Some(dir) = non_empty(&self.spool_dir) {
            let path = PathBuf::from(dir);
            if !path.is_dir() {
                return Err(config_error(
                    "spool-dir",
                    format!("'{dir}' is not a directory"),
                ));
            }
        }

        Ok(SessionConfig {
            api_url,
            api_key: non_empty(&self.api_key).map(str::to_owned),
            api_key_transport: self.api_key_transport,
            workflow,
            image_input_name,
            workflow_parameters,
            stream_output,
            data_output,
            video_transport: self.video_transport,
            realtime_processing: self.realtime_processing,
            declared_fps: (self.declared_fps > 0.0).then_some(self.declared_fps),
            processing_timeout: (self.processing_timeout > 0).then_some(self.processing_timeout),
            requested_plan: non_empty(&self.requested_plan).map(str::to_owned),
            requested_region: non_empty(&self.requested_region).map(str::to_owned),
            ice_servers,
            udp_bind_address,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.into()),
            stall_timeout: Duration::from_millis(self.stall_timeout_ms.into()),
            chunk_size: chunk_size as usize,
            buffer_limit: self.buffer_limit as usize,
            sctp_mtu,
            keepalive_interval: Duration::from_millis(self.keepalive_interval_ms.into()),
            max_result_size: usize::try_from(self.max_result_size).unwrap_or(usize::MAX),
            video_codec: self.video_codec.live_codec(),
            max_frames_in_flight: self.max_frames_in_flight,
            live: None,
            camera,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::test_support::with_spec;

    #[test]
    fn defaults_with_a_spec_validate() {
        let config = with_spec().validate().unwrap();
        assert_eq!(config.api_url.as_str(), "http://127.0.0.1:9001/");
        assert_eq!(config.chunk_size, 49152);
        assert_eq!(config.buffer_limit, 131072);
        assert_eq!(config.keepalive_interval, DEFAULT_KEEPALIVE_INTERVAL);
        assert_eq!(DEFAULT_KEEPALIVE_INTERVAL_MS, 5_000);
        assert_eq!(
            config.udp_bind_address,
            "127.0.0.1:0".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.request_stream_output(), Some(vec![]));
        assert!(config.request_data_output().is_empty());
    }

    #[test]
    fn numbers_out_of_range_name_the_property() {
        for (settings, property) in [
            (
                UploadSettings {
                    chunk_size: 65529,
                    ..with_spec()
                },
                "chunk-size",
            ),
            (
                UploadSettings {
                    chunk_size: 10,
                    ..with_spec()
                },
                "chunk-size",
            ),
            (
                UploadSettings {
                    buffer_limit: 1000,
                    ..with_spec()
                },
                "buffer-limit",
            ),
            (
                UploadSettings {
                    connect_timeout_ms: 0,
                    ..with_spec()
                },
                "connect-timeout",
            ),
            (
                UploadSettings {
                    stall_timeout_ms: 0,
                    ..with_spec()
                },
                "stall-timeout",
            ),
            (
                UploadSettings {
                    declared_fps: f64::NAN,
                    ..with_spec()
                },
                "declared-fps",
            ),
            (
                UploadSettings {
                    api_url: "ftp://x".into(),
                    ..with_spec()
                },
                "api-url",
            ),
            (
                UploadSettings {
                    udp_bind_address: Some("nope".into()),
                    ..with_spec()
                },
                "udp-bind-address",
            ),
            (
                UploadSettings {
                    spool_dir: Some("/nonexistent/dir".into()),
                    ..with_spec()
                },
                "spool-dir",
            ),
            (
                UploadSettings {
                    sctp_mtu: 1501,
                    ..with_spec()
                },
                "sctp-mtu",
            ),
            (
                UploadSettings {
                    sctp_mtu: 100,
                    ..with_spec()
                },
                "sctp-mtu",
            ),
        ] {
            assert_eq!(settings.validate().unwrap_err().property, property);
        }
        assert!(
            UploadSettings {
                chunk_size: 65528,
                ..with_spec()
            }
            .validate()
            .is_ok()
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let settings = UploadSettings {
            api_key: Some("SECRET-KEY-123".into()),
            ..with_spec()
        };
        assert!(!format!("{settings:?}").contains("SECRET-KEY-123"));
        let config = settings.validate().unwrap();
        assert!(!format!("{config:?}").contains("SECRET-KEY-123"));
    }

    #[test]
    fn a_camera_is_validated_and_rtsp_needs_realtime() {
        let camera = UploadSettings {
            source_url: Some(" rtsps://u:p@cam.example:322/live ".into()),
            realtime_processing: true,
            ..with_spec()
        };
        let config = camera.validate().unwrap();
        let source = config.camera.as_ref().unwrap();
        assert_eq!(source.kind, CameraKind::Rtsp);
        assert_eq!(source.url(), "rtsps://u:p@cam.example:322/live");
        assert!(!format!("{config:?}").contains("u:p@"), "Debug shows no credentials");

        let error = UploadSettings { realtime_processing: false, ..camera.clone() }.validate().unwrap_err();
        assert_eq!(error.property, "realtime-processing");
        assert!(error.message.contains("no timestamp"), "{error}");

        // MJPEG works both ways.
        let mjpeg = UploadSettings { source_url: Some("http://cam.example/m.mjpg".into()), realtime_processing: false, ..with_spec() };
        assert_eq!(mjpeg.validate().unwrap().camera.unwrap().kind, CameraKind::Mjpeg);
        assert_eq!(
            UploadSettings { source_url: Some("file:///dev/video0".into()), ..with_spec() }.validate().unwrap_err().property,
            "source-url"
        );
        assert!(with_spec().validate().unwrap().camera.is_none(), "blank: no camera");
    }

}
