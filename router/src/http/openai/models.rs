//! `GET /v1/models` and `GET /v1/models/{model}`: the one model this server runs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::common::unix_now;
use super::schema::{ModelCard, ModelList};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::AppState;

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.info.model_id.clone(),
        object: "model".into(),
        created: unix_now(),
        owned_by: "tessera".into(),
    }
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "OpenAI",
    responses((status = 200, description = "The served model", body = ModelList))
)]
#[tracing::instrument(skip_all)]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![card(&state)],
    })
}

/// OpenAI's model retrieval (`client.models.retrieve(id)`): the served model by its
/// id, 404 for any other.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "OpenAI",
    params(("model" = String, Path, description = "The served model's id")),
    responses(
        (status = 200, description = "The served model", body = ModelCard),
        (status = 404, description = "Not the served model", body = ErrorBody),
    )
)]
#[tracing::instrument(skip_all)]
pub async fn model(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    if model != state.info.model_id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "model `{model}` does not exist: this server runs `{}`",
                state.info.model_id
            ),
        ));
    }
    Ok(Json(card(&state)))
}
