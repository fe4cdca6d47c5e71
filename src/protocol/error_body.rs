//! Turns the server's HTTP error answers (its own JSON, FastAPI's, or a
//! proxy's HTML page) into one line a person can act on.
//!
//! HTML is reduced to text by a few lines here rather than a crate: the
//! small one, nanohtml2text (zero dependencies, ~2,800 lines with its entity
//! table), drops `<head>` and with it the `<title>` that often holds the
//! only words of a proxy's error page; html2text and scraper bring a full
//! HTML5 parser (html5ever) for a one-line message.

use serde_json::{Map, Value};

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

/// The text of an HTML page, as a person would read it: tags become spaces,
/// `<script>` and `<style>` lose their contents, and the common entities are
/// decoded. Error pages are short proxy or server pages, so this does not
/// parse HTML (comments, attributes holding `>`, and rare entities pass as
/// they are); see the module documentation for the crates weighed.
fn strip_markup(html: &str) -> String {
    let mut pieces = html.split('<');
    let mut text = pieces.next().unwrap_or_default().to_owned();
    // Inside <script> or <style>: the closing tag that ends it.
    let mut skip_until: Option<&str> = None;
    for piece in pieces {
        // A '<' without a '>' is not a tag a page would show.
        let Some((tag, after)) = piece.split_once('>') else {
            continue;
        };
        let name = tag
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match skip_until {
            Some(end) if name != end => continue,
            Some(_) => skip_until = None,
            None if name == "script" => skip_until = Some("/script"),
            None if name == "style" => skip_until = Some("/style"),
            None => {}
        }
        text.push(' ');
        if skip_until.is_none() {
            text.push_str(after);
        }
    }
    // `&amp;` last, so that `&amp;lt;` reads `&lt;`.
    [
        ("&nbsp;", " "),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&amp;", "&"),
    ]
    .into_iter()
    .fold(text, |text, (entity, character)| {
        text.replace(entity, character)
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn markup_loses_scripts_and_keeps_text() {
        let page = "<!DOCTYPE html><HTML><Script type=x>if (a<b) { c(\"</p>\") }</SCRIPT >\
            <p class=\"m\">Bad&nbsp;gateway: a &amp;lt; b &quot;x&quot;</p><style>p{}</style>end <b";
        assert_eq!(
            collapse_whitespace(&strip_markup(page)),
            "Bad gateway: a &lt; b \"x\" end"
        );
    }
}
