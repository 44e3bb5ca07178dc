//! Opening a gRPC channel to a shard rank at `unix:///path` or `http://host:port`.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::ClientError;

/// Connects to one rank. Unix sockets go through a connector that ignores the
/// placeholder authority tonic requires.
pub async fn connect(uri: &str) -> Result<Channel, ClientError> {
    let failed = |e: tonic::transport::Error| ClientError::Connect {
        uri: uri.to_string(),
        message: e.to_string(),
    };
    if let Some(path) = uri.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        Endpoint::try_from("http://[::1]:50051")
            .map_err(failed)?
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(failed)
    } else if uri.starts_with("http://") {
        Endpoint::try_from(uri.to_string())
            .map_err(failed)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(failed)
    } else {
        Err(ClientError::Connect {
            uri: uri.to_string(),
            message: "expected unix:///path or http://host:port".into(),
        })
    }
}
