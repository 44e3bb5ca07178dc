//! `GET /v1/models`: the one model this server runs.

use axum::extract::State;
use axum::Json;

use super::common::unix_now;
use super::schema::{ModelCard, ModelList};
use crate::http::AppState;

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
        data: vec![ModelCard {
            id: state.info.model_id.clone(),
            object: "model".into(),
            created: unix_now(),
            owned_by: "tessera".into(),
        }],
    })
}
