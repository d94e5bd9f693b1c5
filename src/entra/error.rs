//! What a failed call to Microsoft Graph or the token endpoint says: which call, the HTTP status,
//! Graph's error code and message, and how long Graph asked to wait (`Retry-After`).

use std::time::Duration;

use crate::token::Token;

/// The calls the operator makes, named as the condition and the metrics name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// The Microsoft identity platform's token endpoint (an access token for Graph).
    Token,
    ValidateCredentials,
    PutSecrets,
    GetSecrets,
    ListJobs,
    Restart,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Token => "token",
            Call::ValidateCredentials => "validateCredentials",
            Call::PutSecrets => "PUT synchronization/secrets",
            Call::GetSecrets => "GET synchronization/secrets",
            Call::ListJobs => "GET synchronization/jobs",
            Call::Restart => "restart",
        }
    }
}

/// Longest message kept from an error answer.
const MAX_MESSAGE_CHARS: usize = 300;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct GraphError {
    pub call: Call,
    /// `None` when no answer came (connection, TLS, timeout) or the call was never made.
    pub status: Option<u16>,
    /// Graph's `error.code` (or the token endpoint's `error`).
    pub code: Option<String>,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for GraphError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed", self.call.as_str())?;
        match (self.status, &self.code) {
            (Some(status), Some(code)) => write!(f, ": HTTP {status}, {code}")?,
            (Some(status), None) => write!(f, ": HTTP {status}")?,
            (None, Some(code)) => write!(f, ": {code}")?,
            (None, None) => {}
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// Graph's error shape: `{"error": {"code": "...", "message": "..."}}`; the token endpoint's:
/// `{"error": "invalid_client", "error_description": "..."}`.
#[derive(serde::Deserialize)]
struct Answer {
    error: Option<serde_json::Value>,
    error_description: Option<String>,
}

impl GraphError {
    /// A call that got no answer, or could not be made.
    pub fn without_answer(call: Call, message: impl Into<String>) -> GraphError {
        GraphError { call, status: None, code: None, message: cut(&message.into()), retry_after: None }
    }

    /// An error answer.
    pub fn from_answer(call: Call, status: u16, retry_after: Option<Duration>, body: &[u8]) -> GraphError {
        let (code, message) = match serde_json::from_slice::<Answer>(body) {
            Ok(Answer { error: Some(serde_json::Value::Object(e)), .. }) => (
                e.get("code").and_then(|c| c.as_str()).map(str::to_owned),
                e.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_owned(),
            ),
            Ok(Answer { error: Some(serde_json::Value::String(code)), error_description }) => {
                (Some(code), error_description.unwrap_or_default())
            }
            _ => (None, String::new()),
        };
        GraphError { call, status: Some(status), code: code.map(|c| cut(&c)), message: cut(&message), retry_after }
    }

    /// Graph's error code, else the HTTP status, else "NoAnswer": what the condition and metrics show.
    pub fn code_or_status(&self) -> String {
        match (&self.code, self.status) {
            (Some(code), _) => code.clone(),
            (None, Some(status)) => format!("HTTP{status}"),
            (None, None) => "NoAnswer".to_owned(),
        }
    }

    /// The error of a call that carried `token`, with the token removed from whatever came back.
    pub fn redacted(mut self, token: &Token) -> GraphError {
        self.message = token.redact_from(&self.message);
        self.code = self.code.map(|c| token.redact_from(&c));
        self
    }

    /// The error with `secrets` (each a form of a credential the call carried: the client secret,
    /// the client assertion, the access token) removed from whatever came back.
    pub fn without(mut self, secrets: &[&str]) -> GraphError {
        for secret in secrets.iter().filter(|s| !s.is_empty()) {
            self.message = self.message.replace(secret, "[redacted]");
            self.code = self.code.map(|c| c.replace(secret, "[redacted]"));
        }
        self
    }

    /// Whether a fresh access token might help (the cached one expired or was revoked).
    pub fn is_unauthorized(&self) -> bool {
        self.status == Some(401)
    }
}

fn cut(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_MESSAGE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_graphs_shape_and_the_token_endpoints() {
        let graph = br#"{"error":{"code":"Authorization_RequestDenied","message":"Insufficient privileges.","innerError":{"request-id":"x"}}}"#;
        let e = GraphError::from_answer(Call::PutSecrets, 403, None, graph);
        assert_eq!(e.code.as_deref(), Some("Authorization_RequestDenied"));
        assert_eq!(
            e.to_string(),
            "PUT synchronization/secrets failed: HTTP 403, Authorization_RequestDenied: Insufficient privileges."
        );
        let oauth =
            br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#;
        let e = GraphError::from_answer(Call::Token, 401, None, oauth);
        assert_eq!(e.code_or_status(), "invalid_client");
        let e = GraphError::from_answer(Call::ListJobs, 429, Some(Duration::from_secs(7)), b"<html>busy</html>");
        assert_eq!((e.code_or_status(), e.retry_after), ("HTTP429".to_owned(), Some(Duration::from_secs(7))));
        assert_eq!(GraphError::without_answer(Call::Restart, "timed out").code_or_status(), "NoAnswer");
    }

    #[test]
    fn a_token_echoed_in_an_error_is_removed() {
        let token = Token::generate();
        let body = format!(r#"{{"error":{{"code":"BadRequest","message":"value {} refused"}}}}"#, token.expose());
        let e = GraphError::from_answer(Call::ValidateCredentials, 400, None, body.as_bytes()).redacted(&token);
        assert!(!format!("{e} {e:?}").contains(token.expose()));
    }
}
