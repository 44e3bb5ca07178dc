//! `JsonBody<T>`: like axum's `Json`, but every rejection is the error JSON:
//! 413 over the payload limit, 422 for malformed JSON or wrong field types
//! (naming the field). The content type is not checked, so `curl -d` works.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "request body is larger than the limit of {} bytes",
                        state.validation.limits().payload_limit
                    ),
                )
            } else {
                ApiError::new(rejection.status(), "validation", rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a request body; the error names the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            ApiError::validation(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::validation(format!("invalid JSON body: `{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::validation(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        inputs: String,
        #[serde(default)]
        parameters: Params,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[allow(dead_code)]
    struct Params {
        temperature: Option<f32>,
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse_json::<Body>(br#"{"inputs":"a","parameters":{"temperature":"hot"}}"#)
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.error_type, "validation");
        assert!(
            e.message.contains("`parameters.temperature`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn malformed_and_missing_fields() {
        let e = parse_json::<Body>(b"{not json").unwrap_err();
        assert!(e.message.starts_with("invalid JSON body"), "{}", e.message);
        let e = parse_json::<Body>(b"{}").unwrap_err();
        assert!(
            e.message.contains("missing field `inputs`"),
            "{}",
            e.message
        );
        let e = parse_json::<Body>(br#"{"inputs":"a"} x"#).unwrap_err();
        assert!(e.message.contains("trailing"), "{}", e.message);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let b = parse_json::<Body>(br#"{"inputs":"a","whatever":[1,2]}"#).unwrap();
        assert_eq!(b.inputs, "a");
    }
}
