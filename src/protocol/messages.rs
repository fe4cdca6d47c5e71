//! JSON messages: the signalling request and answer (PROTOCOL.md section 2),
//! the server's error bodies, the per-frame result (section 5) and the
//! client's control messages (section 7).

use std::fmt;

use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Body of `POST {api_url}/initialise_webrtc_worker`.
///
/// `Debug` is written by hand so that the API key, TURN credentials and
/// workflow parameter values never reach a log.
#[derive(Clone, Serialize)]
pub struct InitialiseRequest {
    /// Serialized as `null` when absent (the key may travel as a Bearer header instead).
    pub api_key: Option<String>,
    pub workflow_configuration: WorkflowConfiguration,
    pub webrtc_offer: SessionDescriptionJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webrtc_config: Option<WebrtcConfig>,
    pub webrtc_realtime_processing: bool,
    /// `null`: the server picks the first image output as a video track;
    /// `[]`: no video track; `["name"]`: that output. Always serialized.
    pub stream_output: Option<Vec<String>>,
    /// `null` or `[]`: metadata only; `["*"]`: all non-image outputs;
    /// `["a","b"]`: those outputs. Always serialized.
    pub data_output: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub declared_fps: Option<f64>,
    /// Server-side session limit in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processing_timeout: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_plan: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_region: Option<String>,
    pub video_file_upload: bool,
}

impl InitialiseRequest {
    /// A request for a file upload with everything optional left out:
    /// no key, no ICE servers, batch processing (`webrtc_realtime_processing`
    /// false), `stream_output` and `data_output` null.
    pub fn new(
        workflow_configuration: WorkflowConfiguration,
        offer_sdp: impl Into<String>,
    ) -> Self {
        InitialiseRequest {
            api_key: None,
            workflow_configuration,
            webrtc_offer: SessionDescriptionJson::offer(offer_sdp),
            webrtc_config: None,
            webrtc_realtime_processing: false,
            stream_output: None,
            data_output: None,
            declared_fps: None,
            processing_timeout: None,
            requested_plan: None,
            requested_region: None,
            video_file_upload: true,
        }
    }
}

impl fmt::Debug for InitialiseRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitialiseRequest")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("workflow_configuration", &self.workflow_configuration)
            .field("webrtc_offer", &self.webrtc_offer)
            .field("webrtc_config", &self.webrtc_config)
            .field(
                "webrtc_realtime_processing",
                &self.webrtc_realtime_processing,
            )
            .field("stream_output", &self.stream_output)
            .field("data_output", &self.data_output)
            .field("declared_fps", &self.declared_fps)
            .field("processing_timeout", &self.processing_timeout)
            .field("requested_plan", &self.requested_plan)
            .field("requested_region", &self.requested_region)
            .field("video_file_upload", &self.video_file_upload)
            .finish()
    }
}

/// Which workflow the server runs.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkflowSource {
    /// An inline workflow definition (`workflow_specification`).
    Specification(Value),
    /// A workflow stored on the Roboflow platform.
    Stored {
        workspace_name: String,
        workflow_id: String,
        workflow_version_id: Option<String>,
    },
}

/// `workflow_configuration`: serialized with `"type":"WorkflowConfiguration"`
/// and either `workflow_specification` or `workspace_name` + `workflow_id`
/// (+ `workflow_version_id` when set).
#[derive(Clone, PartialEq)]
pub struct WorkflowConfiguration {
    pub source: WorkflowSource,
    /// The workflow input the frames are fed to (server default `"image"`).
    pub image_input_name: String,
    /// Skipped when `None`.
    pub workflows_parameters: Option<Map<String, Value>>,
}

pub const DEFAULT_IMAGE_INPUT_NAME: &str = "image";

impl WorkflowConfiguration {
    pub fn from_specification(specification: Value) -> Self {
        WorkflowConfiguration {
            source: WorkflowSource::Specification(specification),
            image_input_name: DEFAULT_IMAGE_INPUT_NAME.to_owned(),
            workflows_parameters: None,
        }
    }

    pub fn from_stored(
        workspace_name: impl Into<String>,
        workflow_id: impl Into<String>,
        workflow_version_id: Option<String>,
    ) -> Self {
        WorkflowConfiguration {
            source: WorkflowSource::Stored {
                workspace_name: workspace_name.into(),
                workflow_id: workflow_id.into(),
                workflow_version_id,
            },
            image_input_name: DEFAULT_IMAGE_INPUT_NAME.to_owned(),
            workflows_parameters: None,
        }
    }
}

impl Serialize for WorkflowConfiguration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", "WorkflowConfiguration")?;
        match &self.source {
            WorkflowSource::Specification(spec) => {
                map.serialize_entry("workflow_specification", spec)?;
            }
            WorkflowSource::Stored {
                workspace_name,
                workflow_id,
                workflow_version_id,
            } => {
                map.serialize_entry("workspace_name", workspace_name)?;
                map.serialize_entry("workflow_id", workflow_id)?;
                if let Some(version) = workflow_version_id {
                    map.serialize_entry("workflow_version_id", version)?;
                }
            }
        }
        map.serialize_entry("image_input_name", &self.image_input_name)?;
        if let Some(parameters) = &self.workflows_parameters {
            map.serialize_entry("workflows_parameters", parameters)?;
        }
        map.end()
    }
}

impl fmt::Debug for WorkflowConfiguration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parameters may carry secrets (keys for other services): names only.
        let parameter_names = self
            .workflows_parameters
            .as_ref()
            .map(|p| p.keys().map(String::as_str).collect::<Vec<_>>());
        f.debug_struct("WorkflowConfiguration")
            .field("source", &self.source)
            .field("image_input_name", &self.image_input_name)
            .field("workflows_parameters (names)", &parameter_names)
            .finish()
    }
}

/// `{"type":"offer","sdp":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDescriptionJson {
    #[serde(rename = "type")]
    pub kind: String,
    pub sdp: String,
}

impl SessionDescriptionJson {
    pub fn offer(sdp: impl Into<String>) -> Self {
        SessionDescriptionJson {
            kind: "offer".to_owned(),
            sdp: sdp.into(),
        }
    }
}

/// `webrtc_config`: the ICE servers the server should use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebrtcConfig {
    #[serde(rename = "iceServers")]
    pub ice_servers: Vec<IceServer>,
}

/// One STUN or TURN server. `Debug` hides the credential.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl fmt::Debug for IceServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IceServer")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The server's answer (HTTP 200). `Serialize` is for test servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitialiseAnswer {
    #[serde(default)]
    pub status: Option<Value>,
    #[serde(default)]
    pub context: Option<Value>,
    pub sdp: String,
    /// `"answer"`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// Longest piece of a non-JSON error body quoted in a message, in characters.
const ERROR_TEXT_MAX_CHARS: usize = 300;
/// Most validation or block errors listed before "and N more".
const ERROR_ITEMS_MAX: usize = 8;

/// Turns an HTTP error answer into one line a person can act on, always
/// with the status code: the server's `message` (with `error_type`, the
/// inner error and `blocks_errors`), FastAPI's `detail` (list or string), or
/// the start of a non-JSON body.
pub fn describe_error_body(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => describe_error_object(status, &object),
        Ok(Value::String(text)) if !text.trim().is_empty() => {
            format!("HTTP {status}: {}", shorten(&collapse_whitespace(&text)))
        }
        Ok(Value::Null) => format!("HTTP {status} with a null body"),
        Ok(other) => format!("HTTP {status}: {}", shorten(&other.to_string())),
        Err(_) => describe_text_body(status, body),
    }
}

fn describe_error_object(status: u16, object: &Map<String, Value>) -> String {
    let error_type = object.get("error_type").and_then(Value::as_str);
    let mut out = match error_type {
        Some(kind) if !kind.is_empty() => format!("HTTP {status} {kind}"),
        _ => format!("HTTP {status}"),
    };
    let message = object.get("message").and_then(text_of);
    let detail = object.get("detail").and_then(describe_detail);
    match (message, detail) {
        (Some(message), _) => {
            out.push_str(": ");
            out.push_str(&message);
        }
        (None, Some(detail)) => {
            out.push_str(": ");
            out.push_str(&detail);
        }
        (None, None) => {
            out.push_str(": ");
            out.push_str(&shorten(&Value::Object(object.clone()).to_string()));
            return out;
        }
    }
    if let Some(inner) = object.get("inner_error_message").and_then(text_of)
        && !out.contains(&inner)
    {
        out.push_str(" (");
        out.push_str(&inner);
        out.push(')');
    }
    if let Some(Value::Array(blocks)) = object.get("blocks_errors")
        && !blocks.is_empty()
    {
        out.push_str("; block errors: ");
        out.push_str(&join_limited(blocks.iter().map(describe_block_error)));
    }
    out
}

/// A non-empty, whitespace-collapsed string, or the compact JSON of a non-string.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => {
            let s = collapse_whitespace(s);
            (!s.is_empty()).then_some(s)
        }
        other => Some(other.to_string()),
    }
}

/// FastAPI's `detail`: a string, or a list of `{loc, msg, type}`.
fn describe_detail(detail: &Value) -> Option<String> {
    match detail {
        Value::Array(items) if !items.is_empty() => {
            Some(join_limited(items.iter().map(describe_validation_item)))
        }
        Value::Array(_) => None,
        other => text_of(other),
    }
}

fn describe_validation_item(item: &Value) -> String {
    let Value::Object(object) = item else {
        return text_of(item).unwrap_or_default();
    };
    let location = match object.get("loc") {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join("."),
        Some(other) => text_of(other).unwrap_or_default(),
        None => String::new(),
    };
    let message = object
        .get("msg")
        .and_then(text_of)
        .or_else(|| object.get("type").and_then(text_of))
        .unwrap_or_else(|| "invalid".to_owned());
    if location.is_empty() {
        message
    } else {
        format!("{location}: {message}")
    }
}

/// One entry of `blocks_errors`: `{block_id, block_type, property_name,
/// property_details, block_details}`, any of them possibly missing.
fn describe_block_error(item: &Value) -> String {
    let Value::Object(object) = item else {
        return text_of(item).unwrap_or_default();
    };
    let field = |name: &str| object.get(name).and_then(text_of);
    let mut out = match (field("block_id"), field("block_type")) {
        (Some(id), Some(kind)) => format!("step {id} ({kind})"),
        (Some(id), None) => format!("step {id}"),
        (None, Some(kind)) => format!("block {kind}"),
        (None, None) => "workflow".to_owned(),
    };
    if let Some(property) = field("property_name") {
        out.push_str(&format!(" property {property}"));
    }
    let details = field("property_details")
        .or_else(|| field("block_details"))
        .or_else(|| field("message"))
        .or_else(|| field("msg"));
    if let Some(details) = details {
        out.push_str(": ");
        out.push_str(&details);
    }
    out
}

fn join_limited(items: impl ExactSizeIterator<Item = String>) -> String {
    let total = items.len();
    let mut parts: Vec<String> = items.take(ERROR_ITEMS_MAX).collect();
    if total > ERROR_ITEMS_MAX {
        parts.push(format!("and {} more", total - ERROR_ITEMS_MAX));
    }
    parts.join("; ")
}

fn describe_text_body(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = if text.trim_start().starts_with('<') {
        strip_markup(&text)
    } else {
        text.into_owned()
    };
    let text = collapse_whitespace(&text);
    if text.is_empty() {
        format!("HTTP {status} with an empty body")
    } else {
        format!("HTTP {status}: {}", shorten(&text))
    }
}

/// Drops tags (and the contents of `<script>`/`<style>`) from an HTML page,
/// keeping its text, which is what a person would read.
fn strip_markup(html: &str) -> String {
    let mut out = String::with_capacity(html.len().min(4096));
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        out.push(' ');
        let after = &rest[open..];
        let Some(close) = after.find('>') else {
            rest = "";
            break;
        };
        let tag = after[1..close].trim_start().to_ascii_lowercase();
        rest = &after[close + 1..];
        for skipped in ["script", "style"] {
            if tag.starts_with(skipped) {
                let end_tag = format!("</{skipped}");
                rest = match rest.to_ascii_lowercase().find(&end_tag) {
                    Some(end) => &rest[end..],
                    None => "",
                };
            }
        }
    }
    out.push_str(rest);
    out.replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(ERROR_TEXT_MAX_CHARS) {
        Some((cut, _)) => format!("{}...", text[..cut].trim_end()),
        None => text.to_owned(),
    }
}

/// One frame's result document from the `inference` channel.
///
/// Lenient: unknown fields are ignored and every field may be missing or null.
/// `Serialize` (all fields, absent ones as null) is for test servers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FrameResult {
    pub video_metadata: Option<VideoMetadata>,
    /// Requested outputs by name; null when none were requested.
    pub serialized_output_data: Option<Value>,
    /// Per-frame workflow errors; empty when fine (null reads as empty,
    /// non-string entries as their JSON text).
    #[serde(deserialize_with = "lenient_strings")]
    pub errors: Vec<String>,
    /// True on the final message; null reads as false.
    #[serde(deserialize_with = "null_as_default")]
    pub processing_complete: bool,
    pub termination_reason: Option<String>,
}

impl FrameResult {
    /// Parses a reassembled (decompressed) result document.
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// The server's frame number (1-based), if present.
    pub fn frame_id(&self) -> Option<u64> {
        self.video_metadata.as_ref().and_then(|m| m.frame_id)
    }
}

/// `video_metadata` of a frame result. Every field may be missing or null.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VideoMetadata {
    /// 1-based frame number.
    pub frame_id: Option<u64>,
    /// ISO 8601 time the server received the frame.
    pub received_at: Option<String>,
    pub pts: Option<i64>,
    /// Seconds per pts unit.
    pub time_base: Option<f64>,
    pub declared_fps: Option<f64>,
    pub measured_fps: Option<f64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

impl VideoMetadata {
    /// The frame's presentation time in seconds (`pts * time_base`).
    pub fn pts_seconds(&self) -> Option<f64> {
        Some(self.pts? as f64 * self.time_base?)
    }
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn lenient_strings<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let values = Option::<Vec<Value>>::deserialize(deserializer)?.unwrap_or_default();
    Ok(values
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .collect())
}

/// The base64 text of an image value `{"type":"base64","value":"..."}`.
fn image_base64(value: &Value) -> Option<&str> {
    let object = value.as_object()?;
    if object.get("type")?.as_str()? != "base64" {
        return None;
    }
    object.get("value")?.as_str()
}

/// Bytes that a base64 text decodes to (padding and whitespace discounted).
fn base64_decoded_len(text: &str) -> usize {
    let symbols = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .count();
    symbols * 3 / 4
}

fn image_kind(base64: &str) -> &'static str {
    let start = base64.trim_start();
    if start.starts_with("/9j/") {
        "jpeg"
    } else if start.starts_with("iVBORw0KGgo") {
        "png"
    } else {
        "image"
    }
}

/// A copy of `value` in which every `{"type":"base64","value":"..."}` object,
/// at any depth, has its `value` replaced by a short placeholder such as
/// `"<jpeg base64, 12345 bytes>"` (the decoded size). Other keys, such as an
/// image's `video_metadata`, are kept. For logs and debug output.
pub fn redact_images(value: &Value) -> Value {
    match value {
        Value::Object(object) => {
            if let Some(base64) = image_base64(value) {
                let mut copy = Map::with_capacity(object.len());
                for (key, item) in object {
                    let item = if key == "value" {
                        Value::String(format!(
                            "<{} base64, {} bytes>",
                            image_kind(base64),
                            base64_decoded_len(base64)
                        ))
                    } else {
                        redact_images(item)
                    };
                    copy.insert(key.clone(), item);
                }
                Value::Object(copy)
            } else {
                Value::Object(
                    object
                        .iter()
                        .map(|(key, item)| (key.clone(), redact_images(item)))
                        .collect(),
                )
            }
        }
        Value::Array(items) => Value::Array(items.iter().map(redact_images).collect()),
        other => other.clone(),
    }
}

/// The base64 text of the image output `output_name`. `value` is either
/// `serialized_output_data` itself or a whole frame result holding it.
pub fn find_image<'a>(value: &'a Value, output_name: &str) -> Option<&'a str> {
    let outputs = match value.get("serialized_output_data") {
        Some(data) if value.get("video_metadata").is_some() || value.get("errors").is_some() => {
            data
        }
        _ => value,
    };
    image_base64(outputs.get(output_name)?)
}

/// `{"ack":N}`: "the client has fully handled frames <= N" (cumulative).
pub fn ack_message(frame_id: u64) -> String {
    format!("{{\"ack\":{frame_id}}}")
}

/// `{"stream_output":[...]}`: changes the video-track output mid-session.
pub fn stream_output_message(outputs: &[String]) -> String {
    serde_json::json!({ "stream_output": outputs }).to_string()
}

/// `{"data_output":[...]}`: changes the data outputs mid-session.
pub fn data_output_message(outputs: &[String]) -> String {
    serde_json::json!({ "data_output": outputs }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Keys in alphabetical order, so the serialized text is the same whether
    // or not serde_json's `preserve_order` feature is on in the final build.
    fn spec() -> Value {
        json!({
            "inputs": [{"name": "image", "type": "InferenceImage"}],
            "outputs": [{"name": "image", "selector": "$steps.blur.image", "type": "JsonField"}],
            "steps": [{"image": "$inputs.image", "name": "blur", "type": "roboflow_core/image_blur@v1"}],
            "version": "1.0"
        })
    }

    #[test]
    fn spec_request_serializes_exactly() {
        let mut request =
            InitialiseRequest::new(WorkflowConfiguration::from_specification(spec()), "v=0\r\n");
        request.api_key = Some("secret-key".to_owned());
        request.data_output = Some(vec!["image".to_owned()]);
        let text = serde_json::to_string(&request).unwrap();
        let expected = concat!(
            r#"{"api_key":"secret-key","#,
            r#""workflow_configuration":{"type":"WorkflowConfiguration","#,
            r#""workflow_specification":{"inputs":[{"name":"image","type":"InferenceImage"}],"#,
            r#""outputs":[{"name":"image","selector":"$steps.blur.image","type":"JsonField"}],"#,
            r#""steps":[{"image":"$inputs.image","name":"blur","type":"roboflow_core/image_blur@v1"}],"#,
            r#""version":"1.0"},"image_input_name":"image"},"#,
            r#""webrtc_offer":{"type":"offer","sdp":"v=0\r\n"},"#,
            r#""webrtc_realtime_processing":false,"#,
            r#""stream_output":null,"data_output":["image"],"#,
            r#""video_file_upload":true}"#
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn stored_request_serializes_exactly() {
        let mut configuration = WorkflowConfiguration::from_stored("my-space", "detect", None);
        configuration.image_input_name = "frame".to_owned();
        let mut parameters = Map::new();
        parameters.insert("confidence".to_owned(), json!(0.5));
        configuration.workflows_parameters = Some(parameters);
        let request = InitialiseRequest {
            api_key: None,
            workflow_configuration: configuration,
            webrtc_offer: SessionDescriptionJson::offer("sdp"),
            webrtc_config: Some(WebrtcConfig {
                ice_servers: vec![
                    IceServer {
                        urls: vec!["turn:turn.example:3478".to_owned()],
                        username: Some("u".to_owned()),
                        credential: Some("p".to_owned()),
                    },
                    IceServer {
                        urls: vec!["stun:stun.example:3478".to_owned()],
                        username: None,
                        credential: None,
                    },
                ],
            }),
            webrtc_realtime_processing: true,
            stream_output: Some(vec![]),
            data_output: None,
            declared_fps: Some(29.97),
            processing_timeout: Some(600),
            requested_plan: Some("webrtc-gpu-small".to_owned()),
            requested_region: Some("us".to_owned()),
            video_file_upload: true,
        };
        let text = serde_json::to_string(&request).unwrap();
        let expected = concat!(
            r#"{"api_key":null,"#,
            r#""workflow_configuration":{"type":"WorkflowConfiguration","#,
            r#""workspace_name":"my-space","workflow_id":"detect","#,
            r#""image_input_name":"frame","workflows_parameters":{"confidence":0.5}},"#,
            r#""webrtc_offer":{"type":"offer","sdp":"sdp"},"#,
            r#""webrtc_config":{"iceServers":[{"urls":["turn:turn.example:3478"],"username":"u","credential":"p"},"#,
            r#"{"urls":["stun:stun.example:3478"]}]},"#,
            r#""webrtc_realtime_processing":true,"#,
            r#""stream_output":[],"data_output":null,"#,
            r#""declared_fps":29.97,"processing_timeout":600,"#,
            r#""requested_plan":"webrtc-gpu-small","requested_region":"us","#,
            r#""video_file_upload":true}"#
        );
        assert_eq!(text, expected);

        let versioned = WorkflowConfiguration::from_stored("w", "f", Some("3".to_owned()));
        assert_eq!(
            serde_json::to_string(&versioned).unwrap(),
            r#"{"type":"WorkflowConfiguration","workspace_name":"w","workflow_id":"f","workflow_version_id":"3","image_input_name":"image"}"#
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let mut configuration = WorkflowConfiguration::from_stored("w", "f", None);
        let mut parameters = Map::new();
        parameters.insert("openai_key".to_owned(), json!("sk-parameter-secret"));
        configuration.workflows_parameters = Some(parameters);
        let mut request = InitialiseRequest::new(configuration, "sdp");
        request.api_key = Some("rf_SECRET_KEY".to_owned());
        request.webrtc_config = Some(WebrtcConfig {
            ice_servers: vec![IceServer {
                urls: vec!["turn:t".to_owned()],
                username: Some("user".to_owned()),
                credential: Some("turn-secret".to_owned()),
            }],
        });
        let debug = format!("{request:?}");
        let pretty = format!("{request:#?}");
        for text in [&debug, &pretty] {
            assert!(!text.contains("SECRET"), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
        assert!(debug.contains(r#"api_key: Some("<redacted>")"#), "{debug}");
        assert!(debug.contains("openai_key"), "{debug}");
        request.api_key = None;
        assert!(format!("{request:?}").contains("api_key: None"));
    }

    #[test]
    fn answer_parses() {
        let body = br#"{"status":"success","context":{"request_id":"abc","pipeline_id":null},
            "sdp":"v=0\r\no=- 3921 3921 IN IP4 0.0.0.0\r\ns=-\r\n","type":"answer","extra":1}"#;
        let answer: InitialiseAnswer = serde_json::from_slice(body).unwrap();
        assert_eq!(answer.kind, "answer");
        assert!(answer.sdp.starts_with("v=0\r\n"));
        assert_eq!(answer.status, Some(json!("success")));
        assert_eq!(answer.context.unwrap()["request_id"], "abc");

        let minimal: InitialiseAnswer =
            serde_json::from_str(r#"{"sdp":"v=0","type":"answer"}"#).unwrap();
        assert_eq!(minimal.status, None);
        assert!(serde_json::from_str::<InitialiseAnswer>(r#"{"type":"answer"}"#).is_err());
    }

    #[test]
    fn error_body_workflow_syntax_error() {
        let body = json!({
            "message": "Could not parse workflow definition.",
            "error_type": "WorkflowSyntaxError",
            "context": "workflow_compilation | workflow_definition_parsing",
            "inner_error_type": "ValidationError",
            "inner_error_message": "1 validation error for WorkflowSpecification",
            "blocks_errors": [{
                "block_id": "blur",
                "block_type": "roboflow_core/image_blur@v1",
                "block_details": null,
                "property_name": "kernel_size",
                "property_details": "Input should be a valid integer"
            }]
        });
        assert_eq!(
            describe_error_body(400, body.to_string().as_bytes()),
            "HTTP 400 WorkflowSyntaxError: Could not parse workflow definition. \
             (1 validation error for WorkflowSpecification); block errors: \
             step blur (roboflow_core/image_blur@v1) property kernel_size: Input should be a valid integer"
        );
    }

    #[test]
    fn error_body_fastapi_422_detail_list() {
        let body = br#"{"detail":[
            {"type":"missing","loc":["body","webrtc_offer"],"msg":"Field required","input":{}},
            {"type":"literal_error","loc":["body","workflow_configuration","type"],"msg":"Input should be 'WorkflowConfiguration'"},
            {"type":"int_parsing","loc":["body","stream_output",0],"msg":"Input should be a valid string"}
        ]}"#;
        assert_eq!(
            describe_error_body(422, body),
            "HTTP 422: body.webrtc_offer: Field required; \
             body.workflow_configuration.type: Input should be 'WorkflowConfiguration'; \
             body.stream_output.0: Input should be a valid string"
        );
        assert_eq!(
            describe_error_body(404, br#"{"detail":"Not Found"}"#),
            "HTTP 404: Not Found"
        );
        let many: Vec<Value> = (0..10)
            .map(|i| json!({"loc": ["body", format!("f{i}")], "msg": "bad"}))
            .collect();
        let text = describe_error_body(422, json!({ "detail": many }).to_string().as_bytes());
        assert!(text.ends_with("body.f7: bad; and 2 more"), "{text}");
    }

    #[test]
    fn error_body_500_with_message() {
        assert_eq!(
            describe_error_body(
                500,
                br#"{"message":"Internal error.","error_type":"RuntimeError","inner_error_message":null}"#
            ),
            "HTTP 500 RuntimeError: Internal error."
        );
        assert_eq!(
            describe_error_body(503, br#"{"message":"  Worker\n  unavailable  "}"#),
            "HTTP 503: Worker unavailable"
        );
        assert_eq!(
            describe_error_body(500, br#"{"weird":true}"#),
            r#"HTTP 500: {"weird":true}"#
        );
    }

    #[test]
    fn error_body_html_and_plain_text() {
        let html = b"<html>\r\n<head><title>502 Bad Gateway</title><style>body{color:red}</style></head>\r\n\
            <body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
        assert_eq!(
            describe_error_body(502, html),
            "HTTP 502: 502 Bad Gateway 502 Bad Gateway nginx"
        );
        assert_eq!(
            describe_error_body(500, b"  Internal Server Error\n"),
            "HTTP 500: Internal Server Error"
        );
        assert_eq!(describe_error_body(504, b""), "HTTP 504 with an empty body");
        let long = "x".repeat(1000);
        let text = describe_error_body(500, long.as_bytes());
        assert_eq!(text, format!("HTTP 500: {}...", "x".repeat(300)));
        let lossy = describe_error_body(500, b"bad \xff byte");
        assert_eq!(lossy, "HTTP 500: bad \u{fffd} byte");
        // Multi-byte characters are never cut in half.
        let wide = "é".repeat(400);
        assert!(describe_error_body(500, wide.as_bytes()).ends_with("é..."));
    }

    #[test]
    fn frame_result_full_example() {
        let json = br#"{
            "video_metadata": {"frame_id": 17, "received_at": "2025-01-01T12:00:00.123456",
                "pts": 51200, "time_base": 7.8125e-05, "declared_fps": 30.0, "measured_fps": 29.5,
                "width": 1280, "height": 720, "comment": "unknown field"},
            "serialized_output_data": {"rgb_color": [10, 20, 30],
                "image": {"type": "base64", "value": "/9j/4AAQ", "video_metadata": {"frame_id": 17}}},
            "errors": ["step x failed"],
            "processing_complete": false,
            "termination_reason": null,
            "other": 5
        }"#;
        let result = FrameResult::from_json(json).unwrap();
        let metadata = result.video_metadata.clone().unwrap();
        assert_eq!(
            metadata,
            VideoMetadata {
                frame_id: Some(17),
                received_at: Some("2025-01-01T12:00:00.123456".to_owned()),
                pts: Some(51200),
                time_base: Some(7.8125e-05),
                declared_fps: Some(30.0),
                measured_fps: Some(29.5),
                width: Some(1280),
                height: Some(720),
            }
        );
        assert_eq!(metadata.pts_seconds(), Some(4.0));
        assert_eq!(result.frame_id(), Some(17));
        assert_eq!(result.errors, vec!["step x failed".to_owned()]);
        assert!(!result.processing_complete);
        assert_eq!(result.termination_reason, None);
        let outputs = result.serialized_output_data.as_ref().unwrap();
        assert_eq!(outputs["rgb_color"], json!([10, 20, 30]));
        assert_eq!(find_image(outputs, "image"), Some("/9j/4AAQ"));
    }

    #[test]
    fn frame_result_minimal_with_nulls() {
        let result = FrameResult::from_json(
            br#"{"video_metadata":{"frame_id":null,"pts":null,"time_base":null},
                 "serialized_output_data":null,"errors":null,"processing_complete":null,
                 "termination_reason":null}"#,
        )
        .unwrap();
        assert_eq!(result.video_metadata, Some(VideoMetadata::default()));
        assert_eq!(result.serialized_output_data, None);
        assert!(result.errors.is_empty());
        assert!(!result.processing_complete);
        assert_eq!(result.frame_id(), None);

        let empty = FrameResult::from_json(b"{}").unwrap();
        assert_eq!(empty, FrameResult::default());

        let end = FrameResult::from_json(
            br#"{"video_metadata":null,"processing_complete":true,"termination_reason":"end_of_stream","errors":[1,null,"x"]}"#,
        )
        .unwrap();
        assert!(end.processing_complete);
        assert_eq!(end.termination_reason.as_deref(), Some("end_of_stream"));
        assert_eq!(end.errors, vec!["1".to_owned(), "x".to_owned()]);

        let partial = VideoMetadata {
            pts: Some(3),
            ..VideoMetadata::default()
        };
        assert_eq!(partial.pts_seconds(), None);
    }

    #[test]
    fn frame_result_round_trips() {
        let result = FrameResult {
            video_metadata: Some(VideoMetadata {
                frame_id: Some(2),
                pts: Some(1000),
                time_base: Some(0.001),
                ..VideoMetadata::default()
            }),
            serialized_output_data: Some(json!({"n": 1})),
            errors: vec![],
            processing_complete: false,
            termination_reason: None,
        };
        let text = serde_json::to_string(&result).unwrap();
        assert_eq!(FrameResult::from_json(text.as_bytes()).unwrap(), result);
        let answer = InitialiseAnswer {
            status: None,
            context: None,
            sdp: "v=0".to_owned(),
            kind: "answer".to_owned(),
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"status":null,"context":null,"sdp":"v=0","type":"answer"}"#
        );
    }

    #[test]
    fn redact_images_replaces_only_image_values() {
        let jpeg = "/9j/".to_owned() + &"A".repeat(1996); // 2000 symbols -> 1500 bytes
        let value = json!({
            "video_metadata": {"frame_id": 3},
            "serialized_output_data": {
                "image": {"type": "base64", "value": jpeg, "video_metadata": {"frame_id": 3}},
                "crops": [{"type": "base64", "value": "iVBORw0KGgoAAA=="}],
                "label": {"type": "text", "value": "kept"},
                "value": "kept too"
            }
        });
        let redacted = redact_images(&value);
        assert_eq!(
            redacted,
            json!({
                "video_metadata": {"frame_id": 3},
                "serialized_output_data": {
                    "image": {"type": "base64", "value": "<jpeg base64, 1500 bytes>",
                              "video_metadata": {"frame_id": 3}},
                    "crops": [{"type": "base64", "value": "<png base64, 10 bytes>"}],
                    "label": {"type": "text", "value": "kept"},
                    "value": "kept too"
                }
            })
        );
        // The original is untouched.
        assert_eq!(find_image(&value, "image"), Some(jpeg.as_str()));
    }

    #[test]
    fn find_image_lookups() {
        let outputs = json!({"image": {"type": "base64", "value": "abc"}, "n": 1,
                             "t": {"type": "text", "value": "no"}});
        assert_eq!(find_image(&outputs, "image"), Some("abc"));
        assert_eq!(find_image(&outputs, "n"), None);
        assert_eq!(find_image(&outputs, "t"), None);
        assert_eq!(find_image(&outputs, "missing"), None);
        let whole = json!({"video_metadata": {}, "serialized_output_data": outputs, "errors": []});
        assert_eq!(find_image(&whole, "image"), Some("abc"));
        assert_eq!(find_image(&json!(null), "image"), None);
    }

    #[test]
    fn control_messages() {
        assert_eq!(ack_message(0), r#"{"ack":0}"#);
        assert_eq!(ack_message(42), r#"{"ack":42}"#);
        assert_eq!(ack_message(u64::MAX), format!("{{\"ack\":{}}}", u64::MAX));
        let parsed: Value = serde_json::from_str(&ack_message(7)).unwrap();
        assert_eq!(parsed, json!({"ack": 7}));
        assert_eq!(
            stream_output_message(&["image".to_owned()]),
            r#"{"stream_output":["image"]}"#
        );
        assert_eq!(data_output_message(&[]), r#"{"data_output":[]}"#);
    }
}
