//! A one-shot HTTP/1.1 client for tests that talk to a model server (no client library: the
//! tests need a status and a body, nothing more).

use crate::HarnessError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request with a JSON `body` to `endpoint` (`host:port`) and reads the answer
/// until the server closes; its status code and body.
pub async fn http(
    endpoint: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), HarnessError> {
    let failed = |detail: String| HarnessError::Failed {
        what: format!("{method} http://{endpoint}{path}"),
        detail,
    };
    let mut s = tokio::net::TcpStream::connect(endpoint)
        .await
        .map_err(|e| failed(format!("connect: {e}")))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| failed(format!("send: {e}")))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .await
        .map_err(|e| failed(format!("receive: {e}")))?;
    Ok(parse_response(&String::from_utf8_lossy(&out)))
}

/// The status code (0 if none) and body of a whole HTTP/1.1 answer read until close.
pub fn parse_response(text: &str) -> (u16, String) {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
