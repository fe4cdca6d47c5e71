//! The signalling exchange's JSON (PROTOCOL.md section 2): the body of
//! `POST /initialise_webrtc_worker` and the server's answer.

use std::fmt;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
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
    /// True for a file upload on `video_upload`; left out for live video
    /// and for a camera the server reads.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub video_file_upload: bool,
    /// A camera the server reads over RTSP (§11); may hold credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtsp_url: Option<String>,
    /// A camera the server reads as MJPEG over HTTP (§11); may hold credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mjpeg_url: Option<String>,
}

impl InitialiseRequest {
    /// A request for a file upload with everything optional left out:
    /// no key, no ICE servers, batch processing (`webrtc_realtime_processing`
    /// false), `stream_output` and `data_output` null.
    #[cfg(test)]
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
            rtsp_url: None,
            mjpeg_url: None,
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
            .field("rtsp_url", &self.rtsp_url.as_ref().map(|_| "<redacted>"))
            .field("mjpeg_url", &self.mjpeg_url.as_ref().map(|_| "<redacted>"))
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
    #[cfg(test)]
    pub fn from_specification(specification: Value) -> Self {
        WorkflowConfiguration {
            source: WorkflowSource::Specification(specification),
            image_input_name: DEFAULT_IMAGE_INPUT_NAME.to_owned(),
            workflows_parameters: None,
        }
    }

    #[cfg(test)]
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
            rtsp_url: None,
            mjpeg_url: None,
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

        // A camera the server reads: its URL, no upload.
        let camera = InitialiseRequest {
            video_file_upload: false,
            rtsp_url: Some("rtsp://user:pw@cam/s".to_owned()),
            ..request.clone()
        };
        let text = serde_json::to_string(&camera).unwrap();
        assert!(text.ends_with(r#""requested_region":"us","rtsp_url":"rtsp://user:pw@cam/s"}"#), "{text}");
        assert!(!format!("{camera:?}").contains("pw@"), "Debug shows no camera credentials");

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
    fn answer_serializes_for_test_servers() {
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
}
