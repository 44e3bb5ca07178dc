//! The OpenAPI 3 document of every route (`GET /api-doc/openapi.json`) and a
//! self-contained HTML index of it (`GET /docs`, no CDN needed).

use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use utoipa::OpenApi;

use super::error::ErrorBody;
use super::info::{self, ServerInfo};
use super::openai::{self, schema as oai};
use super::tgi::{self, schema as tgi_schema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tessera",
        description = "LLM serving: TGI- and OpenAI-compatible HTTP API. Errors are `{\"error\": ..., \"error_type\": ...}`. When the server has an API key, send `Authorization: Bearer <key>` (not needed for /health and /metrics)."
    ),
    paths(
        tgi::generate,
        tgi::generate_stream,
        tgi::compat_generate,
        tgi::tokenize,
        openai::chat_completions,
        openai::completions,
        openai::models,
        openai::model,
        info::info,
        info::health,
        info::metrics,
    ),
    components(schemas(
        ErrorBody,
        ServerInfo,
        tgi_schema::GenerateRequest,
        tgi_schema::TgiParameters,
        tgi_schema::GenerateResponse,
        tgi_schema::Details,
        tgi_schema::BestOfSequence,
        tgi_schema::TokenInfo,
        tgi_schema::PrefillToken,
        tgi_schema::StreamResponse,
        tgi_schema::StreamDetails,
        tgi_schema::TokenizeRequest,
        tgi_schema::SimpleToken,
        oai::ChatCompletionRequest,
        oai::CompletionRequest,
        oai::SamplingFields,
        oai::ChatRequestMessage,
        oai::MessageContent,
        oai::ContentPart,
        oai::StopSpec,
        oai::PromptSpec,
        oai::StreamOptions,
        oai::ChatCompletion,
        oai::ChatChoice,
        oai::ChatMessageOut,
        oai::ChatCompletionChunk,
        oai::ChatChunkChoice,
        oai::ChatDelta,
        oai::ChatLogprobs,
        oai::ChatTokenLogprob,
        oai::TopLogprob,
        oai::Completion,
        oai::CompletionChoice,
        oai::CompletionLogprobs,
        oai::Usage,
        oai::PromptTokensDetails,
        oai::ModelList,
        oai::ModelCard,
    )),
    tags(
        (name = "TGI", description = "Text Generation Inference's API"),
        (name = "OpenAI", description = "OpenAI's chat and text completion API"),
        (name = "Server", description = "Probes and information"),
    )
)]
pub struct ApiDoc;

/// The document, with the crate version.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

#[tracing::instrument(skip_all)]
pub async fn openapi_json() -> Response {
    Json(openapi()).into_response()
}

#[tracing::instrument(skip_all)]
pub async fn docs_page() -> Html<String> {
    Html(render_docs(&openapi()))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An HTML table of the routes of `doc`.
fn render_docs(doc: &utoipa::openapi::OpenApi) -> String {
    let mut rows = String::new();
    for (path, item) in &doc.paths.paths {
        let operations = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
        ];
        for (method, operation) in operations {
            let Some(op) = operation else { continue };
            let tag = op.tags.as_ref().map(|t| t.join(", ")).unwrap_or_default();
            let summary = op
                .summary
                .clone()
                .or_else(|| op.description.clone())
                .unwrap_or_default();
            rows.push_str(&format!(
                "<tr><td>{}</td><td><code>{method}</code></td><td><code>{}</code></td><td>{}</td></tr>\n",
                escape(&tag),
                escape(path),
                escape(&summary)
            ));
        }
    }
    let description = doc.info.description.clone().unwrap_or_default();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title} API</title>\
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.3em .8em;text-align:left;border-bottom:1px solid #ddd}}</style>\
</head><body><h1>{title} {version}</h1><p>{description}</p>\
<p>Full schemas: <a href=\"/api-doc/openapi.json\">/api-doc/openapi.json</a> (OpenAPI 3).</p>\
<table><tr><th>Group</th><th>Method</th><th>Path</th><th>Summary</th></tr>\n{rows}</table></body></html>\n",
        title = escape(&doc.info.title),
        version = escape(&doc.info.version),
        description = escape(&description),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_every_route() {
        let json = serde_json::to_value(openapi()).unwrap();
        assert!(json["openapi"].as_str().unwrap().starts_with("3."));
        let paths = json["paths"].as_object().unwrap();
        for (path, method) in [
            ("/generate", "post"),
            ("/generate_stream", "post"),
            ("/", "post"),
            ("/tokenize", "post"),
            ("/v1/chat/completions", "post"),
            ("/v1/completions", "post"),
            ("/v1/models", "get"),
            ("/v1/models/{model}", "get"),
            ("/info", "get"),
            ("/health", "get"),
            ("/metrics", "get"),
        ] {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path}"
            );
        }
        let schemas = json["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("ChatCompletionRequest"));
        assert!(schemas.contains_key("GenerateResponse"));
    }

    #[test]
    fn html_lists_routes() {
        let html = render_docs(&openapi());
        assert!(html.contains("<code>/v1/chat/completions</code>"));
        assert!(html.contains("/api-doc/openapi.json"));
    }
}
