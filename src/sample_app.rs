//! A tiny receiving app: accepts `POST /transactions`, hands each body to a channel or
//! prints it. The demo and docker-compose use it to show what an app receives.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

/// One received transaction.
#[derive(Debug, Clone)]
pub struct Received {
    /// `Idempotency-Key` header.
    pub idempotency_key: String,
    /// Parsed body.
    pub body: serde_json::Value,
}

/// Serves `path` on `listener`; each transaction goes to `sink`. Ends on `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    path: &str,
    sink: UnboundedSender<Received>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new().route(path, post(receive)).with_state(sink);
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn receive(
    State(sink): State<UnboundedSender<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let _ = sink.send(Received {
        idempotency_key,
        body,
    });
    StatusCode::OK
}

/// Runs the app standalone, printing one JSON line per transaction to stdout.
pub async fn run_printing(
    addr: SocketAddr,
    path: &str,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "sample app listening on http://{}{path}",
        listener.local_addr()?
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Received>();
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let line =
                serde_json::json!({"idempotency_key": r.idempotency_key, "transaction": r.body});
            println!("{line}");
        }
    });
    serve(listener, path, tx, shutdown).await
}
