// Which Workflow the server runs (an inline specification, a file, a saved
// Workflow or a single model), and which of its outputs come back.

use serde_json::{Map, Value};

use super::{
    ConfigError, UploadSettings, VideoTransport, WorkflowSource, config_error, non_empty,
    split_list,
};

pub const DEFAULT_TASK_TYPE: &str = "object-detection";

/// The single-model block per task type, as the reference SDK builds it.
const TASK_TYPE_BLOCKS: &[(&str, &str)] = &[
    (
        "object-detection",
        "roboflow_core/roboflow_object_detection_model@v2",
    ),
    (
        "instance-segmentation",
        "roboflow_core/roboflow_instance_segmentation_model@v2",
    ),
    (
        "classification",
        "roboflow_core/roboflow_classification_model@v2",
    ),
    (
        "multi-label-classification",
        "roboflow_core/roboflow_multi_label_classification_model@v2",
    ),
    (
        "keypoint-detection",
        "roboflow_core/roboflow_keypoint_detection_model@v2",
    ),
    (
        "semantic-segmentation",
        "roboflow_core/roboflow_semantic_segmentation_model@v2",
    ),
];

/// `data-output` item that asks for every non-image output (PROTOCOL.md §2).
const ALL_OUTPUTS: &str = "*";

/// Builds the single-model workflow the reference SDK builds for a model id.
pub(super) fn model_workflow(model_id: &str, task_type: &str) -> Result<Value, ConfigError> {
    let block = TASK_TYPE_BLOCKS
        .iter()
        .find(|(name, _)| *name == task_type)
        .map(|(_, block)| *block)
        .ok_or_else(|| {
            let known: Vec<&str> = TASK_TYPE_BLOCKS.iter().map(|(name, _)| *name).collect();
            config_error(
                "task-type",
                format!(
                    "unknown task type '{task_type}'; use one of: {}",
                    known.join(", ")
                ),
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

pub(super) fn parse_json_object(
    property: &'static str,
    text: &str,
) -> Result<Map<String, Value>, ConfigError> {
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

/// The Workflow from exactly one of workflow-spec, workflow-spec-file,
/// workflow-id (with workspace) and model-id.
pub(super) fn workflow_source(settings: &UploadSettings) -> Result<WorkflowSource, ConfigError> {
    let spec = non_empty(&settings.workflow_spec);
    let spec_file = non_empty(&settings.workflow_spec_file);
    let workflow_id = non_empty(&settings.workflow_id);
    let model_id = non_empty(&settings.model_id);
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
                format!(
                    "set exactly one workflow source, not {}",
                    given.join(" and ")
                ),
            ));
        }
    }
    if non_empty(&settings.workflow_version_id).is_some() && workflow_id.is_none() {
        return Err(config_error(
            "workflow-version-id",
            "only applies together with workflow-id",
        ));
    }

    if let Some(text) = spec {
        return parse_json_object("workflow-spec", text)
            .map(|map| WorkflowSource::Specification(Value::Object(map)));
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
        let workspace = non_empty(&settings.workspace).ok_or_else(|| {
            config_error(
                "workspace",
                format!("workflow-id '{workflow_id}' needs the workspace it belongs to"),
            )
        })?;
        return Ok(WorkflowSource::Stored {
            workspace_name: workspace.to_owned(),
            workflow_id: workflow_id.to_owned(),
            workflow_version_id: non_empty(&settings.workflow_version_id).map(str::to_owned),
        });
    }
    let model_id = model_id.expect("one source is set");
    model_workflow(model_id, settings.task_type.trim()).map(WorkflowSource::Specification)
}

/// The names of a specification's outputs, as the server reads them
/// (`outputs[].name`; none when `outputs` is missing). `None` for a saved
/// Workflow, whose specification only the server sees.
fn specification_outputs(workflow: &WorkflowSource) -> Option<Vec<String>> {
    let WorkflowSource::Specification(spec) = workflow else {
        return None;
    };
    let outputs = spec.get("outputs").and_then(Value::as_array);
    Some(
        outputs
            .into_iter()
            .flatten()
            .filter_map(|output| output.get("name")?.as_str().map(str::to_owned))
            .collect(),
    )
}

/// The outputs a session asks for: `(stream_output, data_output)`.
///
/// Names that a known specification lacks are refused here, as the server
/// would refuse them, but before any network and naming the property.
///
/// The server reads `data_output` `["*"]` as "every output but the images"
/// and `"*"` among other names as an output called `*` (streamvision's
/// webrtc worker, 1.8.3: only the exact list `["*"]` selects all). So when
/// `*` has company (other data outputs, or image outputs that travel as
/// data in datachannel transport), it is expanded into the specification's
/// output names; images among them then come back too, named. For a saved
/// Workflow that expansion is impossible, and the combination is refused.
pub(super) fn requested_outputs(
    settings: &UploadSettings,
    workflow: &WorkflowSource,
) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let mut stream_output = split_list(&settings.stream_output);
    let mut data_output = split_list(&settings.data_output);
    if non_empty(&settings.model_id).is_some() {
        // The model workflow's outputs, as the reference SDK defaults them.
        if data_output.is_empty() {
            data_output.push("predictions".to_owned());
        }
        if stream_output.is_empty() && settings.video_transport == VideoTransport::Track {
            stream_output.push("image".to_owned());
        }
    }
    if stream_output.iter().any(|name| name == ALL_OUTPUTS) {
        return Err(config_error(
            "stream-output",
            "'*' is not allowed: name the image output",
        ));
    }

    let known = specification_outputs(workflow);
    if let Some(outputs) = &known {
        check_named_outputs("stream-output", &stream_output, outputs)?;
        check_named_outputs("data-output", &data_output, outputs)?;
    }

    let stream_as_data =
        settings.video_transport == VideoTransport::Datachannel && !stream_output.is_empty();
    let all_with_company = data_output.iter().any(|name| name == ALL_OUTPUTS)
        && (data_output.len() > 1 || stream_as_data);
    if all_with_company {
        let Some(outputs) = known else {
            return Err(all_outputs_of_a_saved_workflow(
                &stream_output,
                &data_output,
                stream_as_data,
            ));
        };
        let mut expanded: Vec<String> = Vec::with_capacity(outputs.len() + data_output.len());
        for name in data_output {
            let names = if name == ALL_OUTPUTS {
                outputs.clone()
            } else {
                vec![name]
            };
            for name in names {
                if !expanded.contains(&name) {
                    expanded.push(name);
                }
            }
        }
        data_output = expanded;
    }
    Ok((stream_output, data_output))
}

fn check_named_outputs(
    property: &'static str,
    names: &[String],
    outputs: &[String],
) -> Result<(), ConfigError> {
    let Some(missing) = names
        .iter()
        .find(|name| *name != ALL_OUTPUTS && !outputs.contains(name))
    else {
        return Ok(());
    };
    let listed = if outputs.is_empty() {
        "it declares no outputs".to_owned()
    } else {
        format!("its outputs are: {}", outputs.join(", "))
    };
    Err(config_error(
        property,
        format!(
            "'{missing}' is not an output of the Workflow specification ({listed}); name one of them, or add the output to the specification"
        ),
    ))
}

fn all_outputs_of_a_saved_workflow(
    stream_output: &[String],
    data_output: &[String],
    stream_as_data: bool,
) -> ConfigError {
    let company = if stream_as_data {
        format!(
            "with stream-output={} in video-transport=datachannel (there the image outputs travel as data, and '*' alone leaves the images out)",
            stream_output.join(",")
        )
    } else {
        format!(
            "next to other names in data-output={} (the server then looks for an output called '*')",
            data_output.join(",")
        )
    };
    config_error(
        "data-output",
        format!(
            "'*' (every non-image output) cannot be combined {company}: a saved Workflow (workspace + workflow-id) has outputs unknown before the session, so '*' cannot be expanded into their names; list the data outputs by name in data-output, or use video-transport=track for the stream output"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::with_spec;

    const BLUR_SPEC: &str = r#"{"version":"1.0","steps":[],"outputs":[
        {"type":"JsonField","name":"rgb_color","selector":"$steps.color.rgb_color"},
        {"type":"JsonField","name":"blurred","selector":"$steps.blur.image"},
        {"type":"JsonField","name":"count","selector":"$steps.count.value"}]}"#;

    fn blur_spec(stream_output: &str, data_output: &str) -> UploadSettings {
        UploadSettings {
            workflow_spec: Some(BLUR_SPEC.into()),
            stream_output: Some(stream_output.into()),
            data_output: Some(data_output.into()),
            ..with_spec()
        }
    }

    fn saved_workflow(stream_output: &str, data_output: &str) -> UploadSettings {
        UploadSettings {
            workflow_spec: None,
            workspace: Some("my-space".into()),
            workflow_id: Some("blur".into()),
            stream_output: Some(stream_output.into()),
            data_output: Some(data_output.into()),
            ..with_spec()
        }
    }

    #[test]
    fn exactly_one_workflow_source() {
        let none = UploadSettings {
            api_key: None,
            ..Default::default()
        };
        assert_eq!(none.validate().unwrap_err().property, "workflow-spec");
        let two = UploadSettings {
            model_id: Some("m/1".into()),
            ..with_spec()
        };
        let err = two.validate().unwrap_err();
        assert!(err.message.contains("workflow-spec and model-id"), "{err}");
        let id_without_workspace = UploadSettings {
            api_key: None,
            workflow_id: Some("wf".into()),
            ..Default::default()
        };
        assert_eq!(
            id_without_workspace.validate().unwrap_err().property,
            "workspace"
        );
    }

    #[test]
    fn malformed_json_names_the_property() {
        let bad = UploadSettings {
            workflow_spec: Some("{nope".into()),
            ..with_spec()
        };
        let err = bad.validate().unwrap_err();
        assert_eq!(err.property, "workflow-spec");
        assert!(err.message.contains("not valid JSON"));
        let params = UploadSettings {
            workflow_parameters: Some("[1]".into()),
            ..with_spec()
        };
        let err = params.validate().unwrap_err();
        assert_eq!(err.property, "workflow-parameters");
        assert!(err.message.contains("an array"));
    }

    #[test]
    fn model_id_builds_the_single_model_workflow() {
        let settings = UploadSettings {
            api_key: None,
            model_id: Some("rfdetr-nano".into()),
            ..Default::default()
        };
        let config = settings.validate().unwrap();
        let WorkflowSource::Specification(spec) = &config.workflow else {
            panic!()
        };
        assert_eq!(
            spec["steps"][0]["type"],
            "roboflow_core/roboflow_object_detection_model@v2"
        );
        assert_eq!(spec["steps"][0]["model_id"], "rfdetr-nano");
        assert_eq!(spec["outputs"][0]["name"], "predictions");
        assert_eq!(config.data_output, vec!["predictions"]);
        let bad = UploadSettings {
            task_type: "vlm".into(),
            model_id: Some("x".into()),
            api_key: None,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().property, "task-type");
    }

    #[test]
    fn all_data_outputs_with_a_datachannel_stream_are_named_from_the_spec() {
        let config = blur_spec("blurred", "*").validate().unwrap();
        assert_eq!(config.request_stream_output(), Some(vec![]));
        // Every output by name: the server sends named images too.
        assert_eq!(
            config.request_data_output(),
            vec!["rgb_color", "blurred", "count"]
        );

        let config = blur_spec("blurred", "count, *").validate().unwrap();
        assert_eq!(
            config.request_data_output(),
            vec!["count", "rgb_color", "blurred"]
        );

        // The model workflow's outputs are known as well.
        let config = UploadSettings {
            workflow_spec: None,
            model_id: Some("rfdetr-nano".into()),
            stream_output: Some("image".into()),
            data_output: Some("*".into()),
            ..with_spec()
        }
        .validate()
        .unwrap();
        assert_eq!(config.request_data_output(), vec!["predictions", "image"]);
    }

    #[test]
    fn all_data_outputs_alone_stay_the_servers_star() {
        // No image travels as data: '*' means what the server says.
        let config = blur_spec("", "*").validate().unwrap();
        assert_eq!(config.request_data_output(), vec!["*"]);
        let track = UploadSettings {
            video_transport: VideoTransport::Track,
            ..blur_spec("blurred", "*")
        }
        .validate()
        .unwrap();
        assert_eq!(track.request_data_output(), vec!["*"]);
        assert_eq!(
            track.request_stream_output(),
            Some(vec!["blurred".to_owned()])
        );
        let saved = saved_workflow("", "*").validate().unwrap();
        assert_eq!(saved.request_data_output(), vec!["*"]);
    }

    #[test]
    fn all_data_outputs_of_a_saved_workflow_with_a_datachannel_stream_are_refused() {
        let err = saved_workflow("blurred", "*").validate().unwrap_err();
        assert_eq!(err.property, "data-output");
        for part in [
            "stream-output=blurred",
            "video-transport=datachannel",
            "workflow-id",
            "list the data outputs by name",
            "video-transport=track",
        ] {
            assert!(err.message.contains(part), "{part}: {err}");
        }
        let err = saved_workflow("", "*,count").validate().unwrap_err();
        assert_eq!(err.property, "data-output");
        assert!(err.message.contains("data-output=*,count"), "{err}");

        // Named outputs of a saved Workflow are the server's to check.
        let named = saved_workflow("blurred", "rgb_color").validate().unwrap();
        assert_eq!(named.request_data_output(), vec!["rgb_color", "blurred"]);
        let track = UploadSettings {
            video_transport: VideoTransport::Track,
            ..saved_workflow("blurred", "*")
        };
        assert!(track.validate().is_ok());
    }

    #[test]
    fn outputs_missing_from_the_spec_are_refused_with_the_spec_outputs() {
        let err = blur_spec("image", "").validate().unwrap_err();
        assert_eq!(err.property, "stream-output");
        assert!(err.message.contains("'image' is not an output"), "{err}");
        assert!(
            err.message
                .contains("its outputs are: rgb_color, blurred, count"),
            "{err}"
        );
        let track = UploadSettings {
            video_transport: VideoTransport::Track,
            ..blur_spec("image", "")
        };
        assert_eq!(track.validate().unwrap_err().property, "stream-output");

        let err = blur_spec("blurred", "rgb_color,colour")
            .validate()
            .unwrap_err();
        assert_eq!(err.property, "data-output");
        assert!(err.message.contains("'colour'"), "{err}");

        let err = UploadSettings {
            stream_output: Some("image".into()),
            ..with_spec()
        }
        .validate()
        .unwrap_err();
        assert!(err.message.contains("it declares no outputs"), "{err}");
    }
}
