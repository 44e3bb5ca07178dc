//! The one error shape of every route: `{"error": "...", "error_type": "..."}`
//! with the HTTP status that fits the error.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::infer::InferError;
use crate::validation::ValidationError;

/// Body of every error response, and of SSE error events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the parameter or resource at fault.
    pub error: String,
    /// `validation`, `overloaded`, `unavailable`, `generation`,
    /// `incomplete_generation`, `authentication`, `payload_too_large`, `not_found`.
    pub error_type: String,
}

/// An error a handler returns; it renders as [`ErrorBody`] with `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub error_type: &'static str,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            error_type,
        }
    }

    /// 422 with `error_type: "validation"`.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.message.clone(),
            error_type: self.error_type.to_string(),
        }
    }
}

/// HTTP status of an inference error (TGI's choices).
pub fn infer_error_status(error: &InferError) -> StatusCode {
    match error {
        InferError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
        InferError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        InferError::Generation(_) => StatusCode::FAILED_DEPENDENCY,
        InferError::TooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        InferError::IncompleteGeneration => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<InferError> for ApiError {
    fn from(error: InferError) -> Self {
        Self::new(
            infer_error_status(&error),
            error.error_type(),
            error.to_string(),
        )
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        Self::validation(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_errors_map_to_tgi_statuses() {
        let cases = [
            (InferError::Overloaded(3), 429, "overloaded"),
            (InferError::Unavailable("x".into()), 503, "unavailable"),
            (InferError::Generation("x".into()), 424, "generation"),
            (
                InferError::TooLarge {
                    needed: 2,
                    capacity: 1,
                },
                422,
                "validation",
            ),
            (
                InferError::IncompleteGeneration,
                500,
                "incomplete_generation",
            ),
        ];
        for (error, status, error_type) in cases {
            let api = ApiError::from(error);
            assert_eq!(api.status.as_u16(), status);
            assert_eq!(api.error_type, error_type);
        }
    }

    #[test]
    fn body_json_shape() {
        let api = ApiError::from(ValidationError::EmptyInput);
        let json = serde_json::to_value(api.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": "`inputs` cannot be empty", "error_type": "validation"})
        );
    }
}
