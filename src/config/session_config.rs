// The validated configuration of one session, and how its outputs read in
// the signalling request.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Map, Value};
use url::Url;

use crate::protocol::live::LiveCodec;

use super::camera::CameraSource;
use super::{ApiKeyTransport, IceServer, VideoTransport, WorkflowSource};

/// Everything a session needs, validated.
#[derive(Clone)]
pub struct SessionConfig {
    pub api_url: Url,
    pub api_key: Option<String>,
    pub api_key_transport: ApiKeyTransport,
    pub workflow: WorkflowSource,
    pub image_input_name: String,
    pub workflow_parameters: Option<Map<String, Value>>,
    /// Image outputs the user wants back as video.
    pub stream_output: Vec<String>,
    /// Outputs the user wants in the per-frame JSON. `*` is either the
    /// whole list or already expanded into the Workflow's output names (see
    /// `workflow::requested_outputs`).
    pub data_output: Vec<String>,
    pub video_transport: VideoTransport,
    pub realtime_processing: bool,
    pub declared_fps: Option<f64>,
    pub processing_timeout: Option<u32>,
    pub requested_plan: Option<String>,
    pub requested_region: Option<String>,
    pub ice_servers: Vec<IceServer>,
    pub udp_bind_address: SocketAddr,
    pub connect_timeout: Duration,
    pub stall_timeout: Duration,
    pub chunk_size: usize,
    pub buffer_limit: usize,
    /// Size of the SCTP packets we send; None: webrtc-rs's default (1191
    /// bytes, safe on any path, TURN and IPv6 included).
    pub sctp_mtu: Option<u32>,
    pub keepalive_interval: Duration,
    /// Largest reassembled result of one frame (gzip inflates to at most 4x).
    pub max_result_size: usize,
    /// The codec raw video is encoded to (`video-codec`).
    pub video_codec: LiveCodec,
    pub max_frames_in_flight: u32,
    /// Live video in: the track's codec. None: a file upload. Decided by
    /// the sink's caps, once the session starts.
    pub live: Option<LiveCodec>,
    /// A camera the server reads (roboflowresultsrc's source-url): no
    /// upload, no track of ours.
    pub camera: Option<CameraSource>,
}

impl std::fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionConfig")
            .field("api_url", &self.api_url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("video_transport", &self.video_transport)
            .field("stream_output", &self.stream_output)
            .field("data_output", &self.data_output)
            .field("udp_bind_address", &self.udp_bind_address)
            .field("live", &self.live)
            .field("camera", &self.camera)
            .finish_non_exhaustive()
    }
}

impl SessionConfig {
    /// `stream_output` as sent to the server: in datachannel mode the images
    /// travel as data, so no track is asked for; in track mode an empty list
    /// means "auto-detect" (null).
    pub fn request_stream_output(&self) -> Option<Vec<String>> {
        match self.video_transport {
            VideoTransport::Datachannel => Some(Vec::new()),
            VideoTransport::Track if self.stream_output.is_empty() => None,
            VideoTransport::Track => Some(self.stream_output.clone()),
        }
    }

    /// `data_output` as sent to the server: in datachannel mode, the stream
    /// outputs are data outputs too.
    pub fn request_data_output(&self) -> Vec<String> {
        let mut outputs = self.data_output.clone();
        if self.video_transport == VideoTransport::Datachannel {
            for name in &self.stream_output {
                if !outputs.contains(name) {
                    outputs.push(name.clone());
                }
            }
        }
        outputs
    }

    pub fn wants_video_track(&self) -> bool {
        self.video_transport == VideoTransport::Track
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadSettings;
    use crate::config::test_support::with_spec;

    #[test]
    fn outputs_per_transport() {
        let spec = r#"{"version":"1.0","steps":[],"outputs":[
            {"type":"JsonField","name":"rgb_color","selector":"$steps.color.rgb_color"},
            {"type":"JsonField","name":"blurred","selector":"$steps.blur.image"}]}"#;
        let datachannel = UploadSettings {
            workflow_spec: Some(spec.into()),
            stream_output: Some("blurred".into()),
            data_output: Some("rgb_color, ".into()),
            ..with_spec()
        }
        .validate()
        .unwrap();
        assert_eq!(datachannel.request_stream_output(), Some(vec![]));
        assert_eq!(
            datachannel.request_data_output(),
            vec!["rgb_color", "blurred"]
        );

        let track = UploadSettings {
            video_transport: VideoTransport::Track,
            ..with_spec()
        }
        .validate()
        .unwrap();
        assert_eq!(track.request_stream_output(), None);
        assert!(track.wants_video_track());
    }
}
