//! TGI's routes: `/generate`, `/generate_stream`, `/` and `/tokenize`.

mod generate;
pub mod schema;
mod stream;
mod tokenize;

pub use generate::{__path_generate, generate};
pub use stream::{__path_generate_stream, generate_stream};
pub use tokenize::{__path_tokenize, tokenize};

use axum::extract::State;
use axum::response::Response;

use super::error::{ApiError, ErrorBody};
use super::extract::JsonBody;
use super::AppState;
use crate::infer::ValidGenerateRequest;
use schema::{is_any_json_object, GenerateRequest, GenerateResponse, StreamResponse};

/// TGI's compatibility route: `/generate`, or `/generate_stream` when `stream` is true.
#[utoipa::path(
    post,
    path = "/",
    tag = "TGI",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text (JSON), or SSE events when `stream` is true", content(
            (GenerateResponse = "application/json"),
            (StreamResponse = "text/event-stream"),
        )),
        (status = 422, description = "Invalid request", body = ErrorBody),
        (status = 424, description = "Generation error", body = ErrorBody),
        (status = 429, description = "Too many requests", body = ErrorBody),
        (status = 503, description = "Model not ready", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn compat_generate(
    state: State<AppState>,
    body: Result<JsonBody<GenerateRequest>, ApiError>,
) -> Response {
    let streaming = matches!(&body, Ok(JsonBody(request)) if request.stream);
    if streaming {
        generate_stream(state, body).await
    } else {
        generate(state, body).await
    }
}

/// A TGI request after validation.
pub(crate) struct PreparedRequest {
    pub request: ValidGenerateRequest,
    pub best_of: u32,
    pub details: bool,
    pub decoder_input_details: bool,
    /// Prepended to the generated text (`return_full_text`).
    pub prefix: Option<String>,
}

pub(crate) async fn prepare(
    state: &AppState,
    body: GenerateRequest,
    stream: bool,
) -> Result<PreparedRequest, ApiError> {
    let parameters = body.parameters;
    if parameters.watermark {
        return Err(crate::validation::ValidationError::Watermark.into());
    }
    if let Some(grammar) = &parameters.grammar {
        if !grammar.is_null() && !is_any_json_object(grammar) {
            return Err(crate::validation::ValidationError::Unsupported(
                "`grammar` other than `{\"type\": \"json\", \"value\": {\"type\": \"object\"}}`"
                    .into(),
            )
            .into());
        }
    }
    if stream && parameters.decoder_input_details {
        return Err(crate::validation::ValidationError::DecoderInputDetailsStream.into());
    }
    let generic = parameters.to_generate_parameters();
    let best_of = state
        .validation
        .validate_best_of(parameters.best_of, &generic, stream)?;
    let mut request = state.validation.validate(body.inputs, generic).await?;
    request.prompt_logprobs = parameters.decoder_input_details;
    let prefix = parameters
        .return_full_text
        .unwrap_or(false)
        .then(|| request.inputs.clone());
    Ok(PreparedRequest {
        request,
        best_of,
        details: parameters.details,
        decoder_input_details: parameters.decoder_input_details,
        prefix,
    })
}

/// `prefix` (the prompt, with `return_full_text`) followed by `text`.
pub(crate) fn full_text(prefix: Option<&str>, text: &str) -> String {
    match prefix {
        Some(prefix) => format!("{prefix}{text}"),
        None => text.to_string(),
    }
}
