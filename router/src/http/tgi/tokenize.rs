//! `POST /tokenize`: the prompt's tokens with their character spans.

use axum::extract::State;
use axum::Json;
use tessera_model::prompt::PromptEncoder;

use super::schema::{SimpleToken, TokenizeRequest};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::JsonBody;
use crate::http::AppState;

#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "TGI",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "Prompt tokens (BOS first where the model adds one)", body = Vec<SimpleToken>),
        (status = 422, description = "Invalid request", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<JsonBody<TokenizeRequest>, ApiError>,
) -> Result<Json<Vec<SimpleToken>>, ApiError> {
    let JsonBody(body) = body?;
    let encoder = state.validation.encoder().clone();
    let tokens = tokio::task::spawn_blocking(move || tokenize_with_offsets(&encoder, &body.inputs))
        .await
        .map_err(|e| ApiError::validation(format!("tokenizer: task failed: {e}")))??;
    Ok(Json(tokens))
}

/// Tokens of `inputs` as [`PromptEncoder::encode`] makes them, with spans in
/// characters; a token without a span (BOS) has its own text.
pub fn tokenize_with_offsets(
    encoder: &PromptEncoder,
    inputs: &str,
) -> Result<Vec<SimpleToken>, ApiError> {
    let encoding = encoder
        .tokenizer()
        .encode_char_offsets(inputs, false)
        .map_err(|e| ApiError::validation(format!("tokenizer: {e}")))?;
    let chars: Vec<char> = inputs.chars().collect();
    let mut tokens = Vec::with_capacity(encoding.len() + 1);
    let info = encoder.info();
    if info.add_bos_token {
        if let Some(bos) = info.bos_token_id {
            tokens.push(SimpleToken {
                id: bos,
                text: encoder.token_text(bos),
                start: 0,
                stop: 0,
            });
        }
    }
    for (&id, &(start, stop)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
        let text = match chars.get(start..stop) {
            Some(span) if !span.is_empty() => span.iter().collect(),
            _ => encoder.token_text(id),
        };
        tokens.push(SimpleToken {
            id,
            text,
            start,
            stop,
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::tests::tiny_encoder;

    #[test]
    fn character_offsets() {
        let encoder = tiny_encoder();
        let tokens = tokenize_with_offsets(&encoder, "héllo world").unwrap();
        assert_eq!(
            tokens[0],
            SimpleToken {
                id: 1,
                text: "<s>".into(),
                start: 0,
                stop: 0
            }
        );
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, encoder.encode("héllo world").unwrap());
        let last = tokens.last().unwrap();
        assert_eq!(
            (last.text.as_str(), last.start, last.stop),
            (" world", 5, 11)
        );
    }
}
