//! Server-sent events: `data: <json>\n\n` frames sent from a channel, so a
//! producer task writes plain async code and learns when the client left.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ErrorBody;

/// Frames buffered between the producer and the connection.
const CHANNEL_CAPACITY: usize = 64;

/// One `data:` event holding `value` as JSON.
pub fn data_event<T: Serialize>(value: &T) -> Bytes {
    match serde_json::to_string(value) {
        Ok(json) => Bytes::from(format!("data: {json}\n\n")),
        Err(e) => error_event(&ErrorBody {
            error: format!("serializing an event: {e}"),
            error_type: "internal".into(),
        }),
    }
}

/// An error event: `data: {"error": ..., "error_type": ...}`.
pub fn error_event(error: &ErrorBody) -> Bytes {
    let json = serde_json::to_string(error).unwrap_or_else(|_| {
        r#"{"error":"unserializable error","error_type":"internal"}"#.to_string()
    });
    Bytes::from(format!("data: {json}\n\n"))
}

/// OpenAI's end of stream.
pub fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The sending side of an SSE response.
pub struct SseSender {
    tx: mpsc::Sender<Bytes>,
}

impl SseSender {
    /// Sends a frame; `false` once the client has gone away.
    pub async fn send(&self, frame: Bytes) -> bool {
        self.tx.send(frame).await.is_ok()
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A `text/event-stream` response and the sender that feeds it.
pub fn sse_channel() -> (SseSender, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(CHANNEL_CAPACITY);
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<_, Infallible>));
    let response = (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    (SseSender { tx }, response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_data_events() {
        #[derive(Serialize)]
        struct Event {
            index: u32,
            generated_text: Option<String>,
        }
        let frame = data_event(&Event {
            index: 1,
            generated_text: None,
        });
        assert_eq!(
            &frame[..],
            b"data: {\"index\":1,\"generated_text\":null}\n\n"
        );
        assert_eq!(&done_event()[..], b"data: [DONE]\n\n");
        let err = error_event(&ErrorBody {
            error: "boom".into(),
            error_type: "generation".into(),
        });
        assert_eq!(
            &err[..],
            b"data: {\"error\":\"boom\",\"error_type\":\"generation\"}\n\n"
        );
    }

    #[tokio::test]
    async fn channel_streams_frames_in_order() {
        let (tx, response) = sse_channel();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        tokio::spawn(async move {
            tx.send(data_event(&1)).await;
            tx.send(done_event()).await;
        });
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        assert_eq!(&body[..], b"data: 1\n\ndata: [DONE]\n\n");
    }
}
