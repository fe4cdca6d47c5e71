// The HTTP offer/answer exchange with the server (PROTOCOL.md §2).

use std::sync::LazyLock;
use std::time::Duration;

use crate::config::{ApiKeyTransport, CameraKind, SessionConfig};
use crate::protocol::{
    InitialiseAnswer, InitialiseRequest, SessionDescriptionJson, WebrtcConfig,
    WorkflowConfiguration, describe_error_body,
};

static HTTP: LazyLock<reqwest::Client> = LazyLock::new(|| {
    reqwest::Client::builder()
        .user_agent(concat!("gst-roboflow/", env!("CARGO_PKG_VERSION")))
        // One POST per session: an idle pooled connection would only keep a
        // task alive on the plugin runtime for nothing.
        .pool_max_idle_per_host(0)
        .build()
        .expect("the roboflow plugin could not create its HTTP client")
});

pub const INITIALISE_PATH: &str = "initialise_webrtc_worker";

/// Builds the body of `POST /initialise_webrtc_worker`.
pub fn build_request(config: &SessionConfig, offer_sdp: String) -> InitialiseRequest {
    let body_key = match config.api_key_transport {
        ApiKeyTransport::Body | ApiKeyTransport::Both => config.api_key.clone(),
        ApiKeyTransport::Header => None,
    };
    InitialiseRequest {
        api_key: body_key,
        workflow_configuration: WorkflowConfiguration {
            source: config.workflow.clone(),
            image_input_name: config.image_input_name.clone(),
            workflows_parameters: config.workflow_parameters.clone(),
        },
        webrtc_offer: SessionDescriptionJson::offer(offer_sdp),
        webrtc_config: (!config.ice_servers.is_empty()).then(|| WebrtcConfig {
            ice_servers: config.ice_servers.clone(),
        }),
        webrtc_realtime_processing: config.realtime_processing,
        stream_output: config.request_stream_output(),
        data_output: Some(config.request_data_output()),
        declared_fps: config.declared_fps,
        processing_timeout: config.processing_timeout,
        requested_plan: config.requested_plan.clone(),
        requested_region: config.requested_region.clone(),
        video_file_upload: config.live.is_none() && config.camera.is_none(),
        rtsp_url: config.camera.as_ref().filter(|camera| camera.kind == CameraKind::Rtsp).map(|camera| camera.url().to_owned()),
        mjpeg_url: config.camera.as_ref().filter(|camera| camera.kind == CameraKind::Mjpeg).map(|camera| camera.url().to_owned()),
    }
}

pub fn endpoint(config: &SessionConfig) -> String {
    let base = config.api_url.as_str().trim_end_matches('/');
    format!("{base}/{INITIALISE_PATH}")
}

/// Why the offer/answer exchange failed; each a complete sentence for the
/// user, with the server's own explanation when it gave one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SignallingError {
    #[error(
        "the Roboflow Inference Server at {url} did not answer within {seconds:.1} s (raise connect-timeout if the server is slow to start its worker)"
    )]
    Timeout { url: String, seconds: f64 },
    #[error("could not connect to the Roboflow Inference Server at {url}: {detail}; is it running? (api-url)")]
    Unreachable { url: String, detail: String },
    #[error("the request to {url} failed: {detail}")]
    RequestFailed { url: String, detail: String },
    #[error("reading the answer of {url} failed: {detail}")]
    ReadFailed { url: String, detail: String },
    /// An HTTP error status; `description` holds the status and the body's message.
    #[error("the server at {url} refused the session: {description}")]
    Refused { url: String, status: u16, description: String },
    #[error("the server at {url} answered HTTP {status} without a usable SDP answer ({detail}): {description}")]
    NoAnswer { url: String, status: u16, detail: String, description: String },
    #[error("the server at {url} answered with type '{kind}' and {sdp_bytes} bytes of SDP, not an SDP answer")]
    NotAnAnswer { url: String, kind: String, sdp_bytes: usize },
}

/// Posts the offer and returns the server's SDP answer.
pub async fn exchange(
    config: &SessionConfig,
    offer_sdp: String,
    timeout: Duration,
) -> Result<String, SignallingError> {
    let url = endpoint(config);
    let request = build_request(config, offer_sdp);
    let mut post = HTTP.post(&url).timeout(timeout).json(&request);
    if let (Some(key), ApiKeyTransport::Header | ApiKeyTransport::Both) =
        (&config.api_key, config.api_key_transport)
    {
        post = post.bearer_auth(key);
    }

    let response = post.send().await.map_err(|err| {
        let url = url.clone();
        if err.is_timeout() {
            SignallingError::Timeout { url, seconds: timeout.as_secs_f64() }
        } else if err.is_connect() {
            SignallingError::Unreachable { url, detail: error_chain(&err) }
        } else {
            SignallingError::RequestFailed { url, detail: error_chain(&err) }
        }
    })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|err| SignallingError::ReadFailed { url: url.clone(), detail: error_chain(&err) })?;
    if !status.is_success() {
        return Err(SignallingError::Refused { url, status: status.as_u16(), description: describe_error_body(status.as_u16(), &body) });
    }
    let answer: InitialiseAnswer = serde_json::from_slice(&body).map_err(|err| SignallingError::NoAnswer {
        url: url.clone(),
        status: status.as_u16(),
        detail: err.to_string(),
        description: describe_error_body(status.as_u16(), &body),
    })?;
    if answer.kind != "answer" || answer.sdp.trim().is_empty() {
        return Err(SignallingError::NotAnAnswer { url, kind: answer.kind, sdp_bytes: answer.sdp.len() });
    }
    Ok(answer.sdp)
}

/// reqwest hides the useful part (e.g. "Connection refused") in its sources.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UploadSettings;

    #[test]
    fn request_body_for_a_spec_in_datachannel_mode() {
        let config = UploadSettings {
            api_key: Some("k".into()),
            workflow_spec: Some(
                r#"{"steps":[],"outputs":[{"name":"blurred","selector":"$steps.b.image"}]}"#.into(),
            ),
            stream_output: Some("blurred".into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let body = serde_json::to_value(build_request(&config, "v=0".into())).unwrap();
        assert_eq!(body["api_key"], "k");
        assert_eq!(
            body["webrtc_offer"],
            serde_json::json!({"type": "offer", "sdp": "v=0"})
        );
        assert_eq!(body["stream_output"], serde_json::json!([]));
        assert_eq!(body["data_output"], serde_json::json!(["blurred"]));
        assert_eq!(
            body["workflow_configuration"]["type"],
            "WorkflowConfiguration"
        );
        assert_eq!(body["workflow_configuration"]["image_input_name"], "image");
        assert_eq!(body["webrtc_realtime_processing"], false);
        assert_eq!(body["video_file_upload"], true);
        assert!(body.get("webrtc_config").is_none() || body["webrtc_config"].is_null());
    }

    #[test]
    fn header_transport_keeps_the_key_out_of_the_body() {
        let config = UploadSettings {
            api_key: Some("k".into()),
            api_key_transport: ApiKeyTransport::Header,
            workflow_spec: Some(r#"{"steps":[]}"#.into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let body = serde_json::to_value(build_request(&config, String::new())).unwrap();
        assert!(body["api_key"].is_null());
    }

    #[test]
    fn endpoint_joins_the_path() {
        let mut settings = UploadSettings {
            workflow_spec: Some("{}".into()),
            ..Default::default()
        };
        settings.api_url = "http://127.0.0.1:9001/".into();
        assert_eq!(
            endpoint(&settings.validate().unwrap()),
            "http://127.0.0.1:9001/initialise_webrtc_worker"
        );
    }

    #[test]
    fn a_camera_request_carries_its_url_and_no_upload() {
        let base = UploadSettings { workflow_spec: Some(r#"{"steps":[]}"#.into()), realtime_processing: true, ..Default::default() };
        let rtsp = UploadSettings { source_url: Some("rtsp://u:p@127.0.0.1:8554/cam".into()), ..base.clone() }.validate().unwrap();
        let body = serde_json::to_value(build_request(&rtsp, String::new())).unwrap();
        assert_eq!(body["rtsp_url"], "rtsp://u:p@127.0.0.1:8554/cam", "whole, credentials included");
        assert!(body.get("mjpeg_url").is_none() && body.get("video_file_upload").is_none(), "{body}");
        let mjpeg = UploadSettings { source_url: Some("https://cam.example/m".into()), ..base }.validate().unwrap();
        let body = serde_json::to_value(build_request(&mjpeg, String::new())).unwrap();
        assert_eq!(body["mjpeg_url"], "https://cam.example/m");
        assert!(body.get("rtsp_url").is_none() && body.get("video_file_upload").is_none(), "{body}");
    }

}
