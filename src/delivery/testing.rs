//! Fixtures shared by the delivery unit tests: a task record, and a hand-written HTTP/1.1
//! app on a loopback port.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::Record;

pub(super) fn task(offset: i64, value: &[u8]) -> Record {
    let h: [(&[u8], Option<&[u8]>); 3] = [
        (b"txn-id", Some(b"order-42")),
        (b"txn-type", Some(b"task")),
        (b"h", Some(b"v")),
    ];
    Record::new(offset, None, Some(b"order-42"), Some(value), &h)
}

/// What the raw test app does with a request, given its connection and request number.
#[derive(Clone, Copy)]
pub(super) enum Reply {
    Answer(&'static str),
    /// Answer, then close the connection.
    AnswerAndClose(&'static str),
    Close,
    Hang,
}

pub(super) const OK: Reply = Reply::Answer("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");

pub(super) struct RawApp {
    pub(super) url: url::Url,
    /// Connections accepted.
    pub(super) accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Request heads, in arrival order.
    pub(super) heads: Arc<Mutex<Vec<String>>>,
}

/// A hand-written HTTP/1.1 app on a loopback port, so tests control exactly when
/// a connection is answered, closed or left hanging.
pub(super) async fn raw_app(script: fn(usize, usize) -> Reply) -> RawApp {
    raw_app_on("127.0.0.1:0".parse().unwrap(), script).await
}

/// [`raw_app`] listening on `addr`.
pub(super) async fn raw_app_on(addr: SocketAddr, script: fn(usize, usize) -> Reply) -> RawApp {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (acc, hs) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let c = acc.fetch_add(1, Ordering::SeqCst);
            let hs = hs.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for r in 0.. {
                    // One request: head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    hs.lock().unwrap().push(head);
                    match script(c, r) {
                        Reply::Answer(a) => {
                            if sock.write_all(a.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        Reply::AnswerAndClose(a) => {
                            let _ = sock.write_all(a.as_bytes()).await;
                            return;
                        }
                        Reply::Close => return,
                        Reply::Hang => std::future::pending::<()>().await,
                    }
                }
            });
        }
    });
    RawApp {
        url: format!("http://{addr}/txns?v=1").parse().unwrap(),
        accepted,
        heads,
    }
}

pub(super) const MS: fn(u64) -> Duration = Duration::from_millis;
