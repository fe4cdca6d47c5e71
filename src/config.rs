// What the user configures on roboflowuploadsink, and its validation into a
// session configuration. Pure functions: every check runs before any network.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};
use url::Url;

use crate::protocol::upload::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE};

pub const DEFAULT_API_URL: &str = "http://127.0.0.1:9001";
pub const API_KEY_ENV: &str = "ROBOFLOW_API_KEY";
pub const DEFAULT_IMAGE_INPUT_NAME: &str = "image";
pub const DEFAULT_TASK_TYPE: &str = "object-detection";
/// 128 KiB, not the reference client's 256 KiB: webrtc-rs counts bytes in
/// flight as well as queued ones, and with 256 KiB in flight aiortc's
/// socket overflowed on loopback (28-42 datagrams dropped per job, a 1.1 s
/// SCTP retransmission timeout at the end of every small upload, 20 MB/s on
/// 94 MB); with 128 KiB: no drop, no stall, 27 MB/s (scripts/bench.sh).
pub const DEFAULT_BUFFER_LIMIT: u32 = 128 * 1024;
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u32 = 5_000;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = 60_000;
pub const DEFAULT_STALL_TIMEOUT_MS: u32 = 120_000;
pub const DEFAULT_CHUNK_SIZE_U32: u32 = DEFAULT_CHUNK_SIZE as u32;
pub const MAX_CHUNK_SIZE_U32: u32 = MAX_CHUNK_SIZE as u32;
/// Smallest chunk worth sending: a keepalive is <= 1 byte, so a chunk message
/// must be longer than that, and tiny chunks only multiply per-message costs.
pub const MIN_CHUNK_SIZE: u32 = 1024;
pub const MIN_BUFFER_LIMIT: u32 = 64 * 1024;
/// `sctp-mtu` 0: chosen from the path (see [`SessionConfig::sctp_mtu`]).
pub const AUTO_SCTP_MTU: u32 = 0;
pub const MIN_SCTP_MTU: u32 = 512;
/// The largest SCTP packet the server takes: aiortc reads each DTLS record
/// with `recv(1500)` and loses what lies beyond.
pub const MAX_SCTP_MTU: u32 = 1500;
pub const DEFAULT_MAX_RESULT_SIZE: u64 = 64 << 20;
pub const MIN_MAX_RESULT_SIZE: u64 = 64 << 10;

/// The single-model block per task type, as the reference SDK builds it.
const TASK_TYPE_BLOCKS: &[(&str, &str)] = &[
    ("object-detection", "roboflow_core/roboflow_object_detection_model@v2"),
    ("instance-segmentation", "roboflow_core/roboflow_instance_segmentation_model@v2"),
    ("classification", "roboflow_core/roboflow_classification_model@v2"),
    ("multi-label-classification", "roboflow_core/roboflow_multi_label_classification_model@v2"),
    ("keypoint-detection", "roboflow_core/roboflow_keypoint_detection_model@v2"),
    ("semantic-segmentation", "roboflow_core/roboflow_semantic_segmentation_model@v2"),
];

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
    #[enum_value(name = "A returned WebRTC video track (VP8/H.264, may drop)", nick = "track")]
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
    #[enum_value(name = "Always spool to a temporary file and upload at EOS", nick = "spool")]
    Spool = 1,
}

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
            .finish_non_exhaustive()
    }
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            api_key: std::env::var(API_KEY_ENV).ok().filter(|key| !key.is_empty()),
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
        }
    }
}

/// A configuration error, naming the property the user has to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub property: &'static str,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "property '{}': {}", self.property, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn config_error(property: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        property,
        message: message.into(),
    }
}

pub use crate::protocol::messages::WorkflowSource;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub credential: Option<String>,
}

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
    /// Non-video outputs the user wants in the per-frame JSON.
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

    /// `data_output` as sent to the server.
    pub fn request_data_output(&self) -> Vec<String> {
        let mut outputs = self.data_output.clone();
        if self.video_transport == VideoTransport::Datachannel {
            for name in &self.stream_output {
                if !outputs.contains(name) && !outputs.iter().any(|o| o == "*") {
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

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// Splits a comma-separated list property into its trimmed, non-empty items.
pub fn split_list(value: &Option<String>) -> Vec<String> {
    non_empty(value)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Builds the single-model workflow the reference SDK builds for a model id.
pub fn model_workflow(model_id: &str, task_type: &str) -> Result<Value, ConfigError> {
    let block = TASK_TYPE_BLOCKS
        .iter()
        .find(|(name, _)| *name == task_type)
        .map(|(_, block)| *block)
        .ok_or_else(|| {
            let known: Vec<&str> = TASK_TYPE_BLOCKS.iter().map(|(name, _)| *name).collect();
            config_error(
                "task-type",
                format!("unknown task type '{task_type}'; use one of: {}", known.join(", ")),
            )
        })?;
    Ok(serde_json::json!({
        "version": "1.0",
        "inputs": [{"type": "InferenceImage", "name": "image"}],
        "steps": [{
            "type": block,
            "name": "model",
            "images": "$inputs.image",
            "model_id": model_id,
        }],
        "outputs": [
            {"type": "JsonField", "name": "predictions", "coordinates_system": "own",
             "selector": "$steps.model.predictions"},
            {"type": "JsonField", "name": "image", "selector": "$inputs.image"},
        ],
    }))
}

fn parse_json_object(property: &'static str, text: &str) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(config_error(
            property,
            format!("must be a JSON object, got {}", json_kind(&other)),
        )),
        Err(err) => Err(config_error(property, format!("is not valid JSON: {err}"))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `ice-servers`: a comma-separated list of `stun:host:port`,
/// `turn:host:port`, `turns:...`, optionally with credentials written as
/// `turn://user:password@host:port?transport=udp`.
pub fn parse_ice_servers(value: &Option<String>) -> Result<Vec<IceServer>, ConfigError> {
    let mut servers = Vec::new();
    for item in split_list(value) {
        let (scheme, rest) = item.split_once(':').ok_or_else(|| {
            config_error("ice-servers", format!("'{item}' is not a stun:, turn: or turns: URI"))
        })?;
        let scheme = scheme.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "stun" | "stuns" | "turn" | "turns") {
            return Err(config_error(
                "ice-servers",
                format!("'{item}' has scheme '{scheme}'; use stun:, stuns:, turn: or turns:"),
            ));
        }
        let rest = rest.trim_start_matches("//");
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials), address),
            None => (None, rest),
        };
        if address.is_empty() {
            return Err(config_error("ice-servers", format!("'{scheme}:' URI without a host")));
        }
        let (username, credential) = match credentials {
            Some(credentials) => {
                let (user, password) = credentials.split_once(':').ok_or_else(|| {
                    config_error(
                        "ice-servers",
                        format!("credentials of a {scheme}: server must be written user:password@host"),
                    )
                })?;
                (Some(percent_decode(user)), Some(percent_decode(password)))
            }
            None => (None, None),
        };
        if scheme.starts_with("turn") && username.is_none() {
            return Err(config_error(
                "ice-servers",
                format!("the {scheme}: server {address} needs credentials: {scheme}://user:password@{address}"),
            ));
        }
        servers.push(IceServer {
            urls: vec![format!("{scheme}:{address}")],
            username,
            credential,
        });
    }
    Ok(servers)
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, value)| value.into_owned())
        .unwrap_or_else(|| text.to_owned())
}

impl UploadSettings {
    /// Validates every property before any network activity.
    pub fn validate(&self) -> Result<SessionConfig, ConfigError> {
        let api_url = Url::parse(self.api_url.trim())
            .map_err(|err| config_error("api-url", format!("'{}' is not a URL: {err}", self.api_url)))?;
        if !matches!(api_url.scheme(), "http" | "https") || api_url.host().is_none() {
            return Err(config_error(
                "api-url",
                format!("'{}' must be an http:// or https:// URL with a host", self.api_url),
            ));
        }

        let workflow = self.validate_workflow()?;

        let workflow_parameters = non_empty(&self.workflow_parameters)
            .map(|text| parse_json_object("workflow-parameters", text))
            .transpose()?;

        let image_input_name = self.image_input_name.trim().to_owned();
        if image_input_name.is_empty() {
            return Err(config_error("image-input-name", "must not be empty"));
        }

        let mut stream_output = split_list(&self.stream_output);
        let mut data_output = split_list(&self.data_output);
        if self.model_id.is_some() {
            // The model workflow's outputs, as the reference SDK defaults them.
            if data_output.is_empty() {
                data_output.push("predictions".to_owned());
            }
            if stream_output.is_empty() && self.video_transport == VideoTransport::Track {
                stream_output.push("image".to_owned());
            }
        }
        if stream_output.iter().any(|name| name == "*") {
            return Err(config_error("stream-output", "'*' is not allowed: name the image output"));
        }

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
        if self.sctp_mtu != AUTO_SCTP_MTU && !(MIN_SCTP_MTU..=MAX_SCTP_MTU).contains(&self.sctp_mtu) {
            return Err(config_error(
                "sctp-mtu",
                format!(
                    "{} is out of range {MIN_SCTP_MTU}..={MAX_SCTP_MTU} (0: automatic); the server reads at most {MAX_SCTP_MTU} bytes of each packet",
                    self.sctp_mtu
                ),
            ));
        }
        if self.max_result_size < MIN_MAX_RESULT_SIZE {
            return Err(config_error(
                "max-result-size",
                format!("{} is too small: at least {MIN_MAX_RESULT_SIZE} bytes", self.max_result_size),
            ));
        }
        if self.connect_timeout_ms == 0 {
            return Err(config_error("connect-timeout", "must be > 0 ms"));
        }
        if self.stall_timeout_ms == 0 {
            return Err(config_error("stall-timeout", "must be > 0 ms"));
        }

        let ice_servers = parse_ice_servers(&self.ice_servers)?;
        let udp_bind_address = match non_empty(&self.udp_bind_address) {
            Some(text) => parse_bind_address(text)?,
            None if is_loopback_host(&api_url) => SocketAddr::from(([127, 0, 0, 1], 0)),
            None => SocketAddr::from(([0, 0, 0, 0], 0)),
        };

        // A loopback path carries datagrams far larger than any Ethernet
        // MTU, and a loopback host candidate can only reach the loopback
        // (unless a TURN relay, from ice-servers, stands between): there,
        // the largest packet the server takes cuts the packet count by a
        // fifth, and with it both sides' per-packet work.
        let sctp_mtu = match self.sctp_mtu {
            AUTO_SCTP_MTU if udp_bind_address.ip().is_loopback() && ice_servers.is_empty() => Some(MAX_SCTP_MTU),
            AUTO_SCTP_MTU => None,
            mtu => Some(mtu),
        };

        if let Some(dir) = non_empty(&self.spool_dir) {
            let path = PathBuf::from(dir);
            if !path.is_dir() {
                return Err(config_error("spool-dir", format!("'{dir}' is not a directory")));
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
        })
    }

    fn validate_workflow(&self) -> Result<WorkflowSource, ConfigError> {
        let spec = non_empty(&self.workflow_spec);
        let spec_file = non_empty(&self.workflow_spec_file);
        let workflow_id = non_empty(&self.workflow_id);
        let model_id = non_empty(&self.model_id);
        let sources = [
            spec.map(|_| "workflow-spec"),
            spec_file.map(|_| "workflow-spec-file"),
            workflow_id.map(|_| "workflow-id"),
            model_id.map(|_| "model-id"),
        ];
        let given: Vec<&str> = sources.into_iter().flatten().collect();
        match given.len() {
            0 => {
                return Err(config_error(
                    "workflow-spec",
                    "no workflow given: set exactly one of workflow-spec, workflow-spec-file, workflow-id (with workspace) or model-id",
                ));
            }
            1 => {}
            _ => {
                return Err(config_error(
                    "workflow-spec",
                    format!("set exactly one workflow source, not {}", given.join(" and ")),
                ));
            }
        }
        if non_empty(&self.workflow_version_id).is_some() && workflow_id.is_none() {
            return Err(config_error("workflow-version-id", "only applies together with workflow-id"));
        }

        if let Some(text) = spec {
            return parse_json_object("workflow-spec", text).map(|map| WorkflowSource::Specification(Value::Object(map)));
        }
        if let Some(path) = spec_file {
            let text = std::fs::read_to_string(path).map_err(|err| {
                config_error("workflow-spec-file", format!("cannot read '{path}': {err}"))
            })?;
            return parse_json_object("workflow-spec-file", &text).map(|map| {
                // A file saved from the Roboflow app wraps the spec in
                // {"specification": {...}}; accept both forms.
                match map.get("specification") {
                    Some(Value::Object(inner)) if !map.contains_key("steps") => {
                        WorkflowSource::Specification(Value::Object(inner.clone()))
                    }
                    _ => WorkflowSource::Specification(Value::Object(map)),
                }
            });
        }
        if let Some(workflow_id) = workflow_id {
            let workspace = non_empty(&self.workspace).ok_or_else(|| {
                config_error("workspace", format!("workflow-id '{workflow_id}' needs the workspace it belongs to"))
            })?;
            return Ok(WorkflowSource::Stored {
                workspace_name: workspace.to_owned(),
                workflow_id: workflow_id.to_owned(),
                workflow_version_id: non_empty(&self.workflow_version_id).map(str::to_owned),
            });
        }
        let model_id = model_id.expect("one source is set");
        model_workflow(model_id, self.task_type.trim()).map(WorkflowSource::Specification)
    }
}

fn parse_bind_address(text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| {
            config_error(
                "udp-bind-address",
                format!("'{text}' is not an IP address or IP:port (e.g. 127.0.0.1:0)"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_spec() -> UploadSettings {
        UploadSettings {
            api_key: None,
            workflow_spec: Some(r#"{"version":"1.0","steps":[]}"#.into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_with_a_spec_validate() {
        let config = with_spec().validate().unwrap();
        assert_eq!(config.api_url.as_str(), "http://127.0.0.1:9001/");
        assert_eq!(config.chunk_size, 49152);
        assert_eq!(config.buffer_limit, 131072);
        assert_eq!(config.udp_bind_address, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
        assert_eq!(config.request_stream_output(), Some(vec![]));
        assert!(config.request_data_output().is_empty());
    }

    #[test]
    fn exactly_one_workflow_source() {
        let none = UploadSettings { api_key: None, ..Default::default() };
        assert_eq!(none.validate().unwrap_err().property, "workflow-spec");
        let two = UploadSettings { model_id: Some("m/1".into()), ..with_spec() };
        let err = two.validate().unwrap_err();
        assert!(err.message.contains("workflow-spec and model-id"), "{err}");
        let id_without_workspace = UploadSettings {
            api_key: None,
            workflow_id: Some("wf".into()),
            ..Default::default()
        };
        assert_eq!(id_without_workspace.validate().unwrap_err().property, "workspace");
    }

    #[test]
    fn malformed_json_names_the_property() {
        let bad = UploadSettings { workflow_spec: Some("{nope".into()), ..with_spec() };
        let err = bad.validate().unwrap_err();
        assert_eq!(err.property, "workflow-spec");
        assert!(err.message.contains("not valid JSON"));
        let params = UploadSettings { workflow_parameters: Some("[1]".into()), ..with_spec() };
        let err = params.validate().unwrap_err();
        assert_eq!(err.property, "workflow-parameters");
        assert!(err.message.contains("an array"));
    }

    #[test]
    fn sctp_mtu_is_the_servers_largest_only_on_a_loopback_path() {
        let mtu = |settings: UploadSettings| settings.validate().unwrap().sctp_mtu;
        // The default: a loopback server, so a loopback bind address.
        assert_eq!(mtu(with_spec()), Some(MAX_SCTP_MTU));
        assert_eq!(mtu(UploadSettings { udp_bind_address: Some("127.0.0.1:0".into()), ..with_spec() }), Some(MAX_SCTP_MTU));
        // A path that may leave the host keeps webrtc-rs's safe default.
        assert_eq!(mtu(UploadSettings { api_url: "https://example.com".into(), ..with_spec() }), None);
        assert_eq!(mtu(UploadSettings { udp_bind_address: Some("0.0.0.0:0".into()), ..with_spec() }), None);
        assert_eq!(mtu(UploadSettings { ice_servers: Some("turn://user:password@127.0.0.1:3478".into()), ..with_spec() }), None);
        // An explicit value wins, either way.
        assert_eq!(mtu(UploadSettings { sctp_mtu: 1200, ..with_spec() }), Some(1200));
        assert_eq!(mtu(UploadSettings { sctp_mtu: 1400, api_url: "https://example.com".into(), ..with_spec() }), Some(1400));
    }

    #[test]
    fn numbers_out_of_range_name_the_property() {
        for (settings, property) in [
            (UploadSettings { chunk_size: 65529, ..with_spec() }, "chunk-size"),
            (UploadSettings { chunk_size: 10, ..with_spec() }, "chunk-size"),
            (UploadSettings { buffer_limit: 1000, ..with_spec() }, "buffer-limit"),
            (UploadSettings { connect_timeout_ms: 0, ..with_spec() }, "connect-timeout"),
            (UploadSettings { stall_timeout_ms: 0, ..with_spec() }, "stall-timeout"),
            (UploadSettings { declared_fps: f64::NAN, ..with_spec() }, "declared-fps"),
            (UploadSettings { api_url: "ftp://x".into(), ..with_spec() }, "api-url"),
            (UploadSettings { udp_bind_address: Some("nope".into()), ..with_spec() }, "udp-bind-address"),
            (UploadSettings { spool_dir: Some("/nonexistent/dir".into()), ..with_spec() }, "spool-dir"),
            (UploadSettings { sctp_mtu: 1501, ..with_spec() }, "sctp-mtu"),
            (UploadSettings { sctp_mtu: 100, ..with_spec() }, "sctp-mtu"),
        ] {
            assert_eq!(settings.validate().unwrap_err().property, property);
        }
        assert!(UploadSettings { chunk_size: 65528, ..with_spec() }.validate().is_ok());
    }

    #[test]
    fn bind_address_follows_the_server_host() {
        for (url, expected) in [
            ("http://localhost:9001", "127.0.0.1:0"),
            ("http://127.0.0.7:9001", "127.0.0.1:0"),
            ("http://[::1]:9001", "127.0.0.1:0"),
            ("https://serverless.roboflow.com", "0.0.0.0:0"),
        ] {
            let config = UploadSettings { api_url: url.into(), ..with_spec() }.validate().unwrap();
            assert_eq!(config.udp_bind_address, expected.parse::<SocketAddr>().unwrap(), "{url}");
        }
        let explicit = UploadSettings { udp_bind_address: Some("127.0.0.1".into()), ..with_spec() };
        assert_eq!(explicit.validate().unwrap().udp_bind_address, "127.0.0.1:0".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn model_id_builds_the_single_model_workflow() {
        let settings = UploadSettings {
            api_key: None,
            model_id: Some("rfdetr-nano".into()),
            ..Default::default()
        };
        let config = settings.validate().unwrap();
        let WorkflowSource::Specification(spec) = &config.workflow else { panic!() };
        assert_eq!(spec["steps"][0]["type"], "roboflow_core/roboflow_object_detection_model@v2");
        assert_eq!(spec["steps"][0]["model_id"], "rfdetr-nano");
        assert_eq!(spec["outputs"][0]["name"], "predictions");
        assert_eq!(config.data_output, vec!["predictions"]);
        let bad = UploadSettings { task_type: "vlm".into(), model_id: Some("x".into()), api_key: None, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().property, "task-type");
    }

    #[test]
    fn outputs_per_transport() {
        let datachannel = UploadSettings {
            stream_output: Some("blurred".into()),
            data_output: Some("rgb_color, ".into()),
            ..with_spec()
        }
        .validate()
        .unwrap();
        assert_eq!(datachannel.request_stream_output(), Some(vec![]));
        assert_eq!(datachannel.request_data_output(), vec!["rgb_color", "blurred"]);

        let track = UploadSettings { video_transport: VideoTransport::Track, ..with_spec() }
            .validate()
            .unwrap();
        assert_eq!(track.request_stream_output(), None);
        assert!(track.wants_video_track());
    }

    #[test]
    fn ice_servers_parse_with_credentials() {
        let servers = parse_ice_servers(&Some(
            "stun:stun.example.com:3478, turn://user:p%40ss@turn.example.com:3478?transport=udp".into(),
        ))
        .unwrap();
        assert_eq!(servers[0].urls, vec!["stun:stun.example.com:3478"]);
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].urls, vec!["turn:turn.example.com:3478?transport=udp"]);
        assert_eq!(servers[1].username.as_deref(), Some("user"));
        assert_eq!(servers[1].credential.as_deref(), Some("p@ss"));
        assert!(parse_ice_servers(&Some("turn:turn.example.com".into())).is_err());
        assert!(parse_ice_servers(&Some("http://x".into())).is_err());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let settings = UploadSettings { api_key: Some("SECRET-KEY-123".into()), ..with_spec() };
        assert!(!format!("{settings:?}").contains("SECRET-KEY-123"));
        let config = settings.validate().unwrap();
        assert!(!format!("{config:?}").contains("SECRET-KEY-123"));
    }
}
