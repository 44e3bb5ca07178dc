//! The one error type of the load generator.

use std::path::PathBuf;

/// Everything that can go wrong while configuring a run or sending one request.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// The command line or the environment asked for something that cannot run.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Connecting, sending or reading the body failed (includes timeouts).
    #[error("http error: {}", with_causes(.0))]
    Http(#[from] reqwest::Error),
    /// The server answered with a status other than 2xx.
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
    /// The server sent an error event inside the stream.
    #[error("server sent an error event: {0}")]
    StreamError(String),
    /// An event's data could not be parsed as the JSON the API promises.
    #[error("malformed stream event: {0}")]
    MalformedEvent(String),
    /// The stream ended without a single token.
    #[error("the stream ended without any token")]
    NoTokens,
    /// Writing the JSON report failed.
    #[error("cannot write {path}: {source}")]
    WriteReport {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Serialising the JSON report failed.
    #[error("cannot serialise the report: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// The error followed by its causes, e.g. "error sending request: client
/// error (Connect): Connection refused (os error 111)".
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
