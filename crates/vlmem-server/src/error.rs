//! Every failure a client sees: OpenAI's error object
//! `{"error": {"message", "type", "param", "code"}}` with its HTTP status (and `Retry-After`
//! when the queue is full).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One error as the client receives it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type` (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// OpenAI's `code` (`model_not_found`, `invalid_api_key`, ...), when there is one.
    pub code: Option<&'static str>,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// What went wrong, for a person.
    pub message: String,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 400: a request the server cannot run as written.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.param = Some(param.into());
        e
    }

    /// 400 for a feature this server does not offer (`n` > 1, tools, logprobs).
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::invalid_param(param, message);
        e.code = Some("unsupported_parameter");
        e
    }

    /// 400: a prompt and `max_tokens` longer than the context the engine was built for.
    pub fn context_too_long(message: impl Into<String>) -> Self {
        let mut e = Self::bad_request(message);
        e.code = Some("context_length_exceeded");
        e
    }

    /// 401: no API key, or the wrong one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    /// 404: a model this server does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model '{asked}' does not exist: this server serves '{served}'"),
        );
        e.code = Some("model_not_found");
        e.param = Some("model".into());
        e
    }

    /// 404: no such route.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {method} {path}"),
        )
    }

    /// 405: a route asked with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{path} does not take {method}"),
        )
    }

    /// 413: a body or an image over the server's limits.
    pub fn too_large(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        );
        e.code = Some("request_too_large");
        e
    }

    /// 429: the queue is full; retry after `retry_after_s`.
    pub fn queue_full(queued: usize, retry_after_s: u64) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the server is busy: {queued} request(s) already wait for the engine (--max-queue); retry later"
            ),
        );
        e.code = Some("rate_limit_exceeded");
        e.retry_after_s = Some(retry_after_s);
        e
    }

    /// 503: the model is still loading, or the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.retry_after_s = Some(1);
        e
    }

    /// 500: the server failed (never for bad input).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_default()
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// `value` as a JSON response with `status`.
pub(crate) fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the response could not be written as JSON: {e}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_openai_shaped() {
        let e = ApiError::model_not_found("gpt-4", "qwen3-vl-tiny");
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"].as_str().unwrap().contains("gpt-4"));
        let e = ApiError::bad_request("x");
        assert!(e.body()["error"]["param"].is_null());
        assert!(e.body()["error"]["code"].is_null());
    }
}
