//! Health probes: an HTTP GET of the spec's `health.path` (2xx and 3xx pass) or, without a
//! path, a TCP connect. A failure says what was seen, since it becomes the app's status
//! message ("why is it not healthy?").

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

/// Probes `addr` once within `timeout`. `Err` holds the evidence of the failure.
pub async fn probe(addr: SocketAddr, path: Option<&str>, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_inner(addr, path)).await {
        Ok(result) => result,
        Err(_) => Err(match path {
            Some(path) => format!("GET {path}: no answer within {timeout:?}"),
            None => format!("connect {addr}: no answer within {timeout:?}"),
        }),
    }
}

async fn probe_inner(addr: SocketAddr, path: Option<&str>) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let Some(path) = path else {
        return Ok(());
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "berth-agent")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        conn.abort();
        return Ok(());
    }
    // The start of the body is often the best evidence ("database unreachable").
    let mut body = response.into_body();
    let mut snippet = Vec::new();
    while snippet.len() < 200 {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    snippet.extend_from_slice(data);
                }
            }
            _ => break,
        }
    }
    conn.abort();
    snippet.truncate(200);
    let text = String::from_utf8_lossy(&snippet);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    Err(if text.is_empty() {
        format!("GET {path}: {status}")
    } else {
        format!("GET {path}: {status}: {text}")
    })
}
