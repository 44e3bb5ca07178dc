//! OpenAI's routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

mod chat;
mod common;
mod completions;
mod models;
pub mod schema;
mod stream;

pub use chat::{__path_chat_completions, chat_completions};
pub use completions::{__path_completions, completions};
pub use models::{__path_model, __path_models, model, models};
