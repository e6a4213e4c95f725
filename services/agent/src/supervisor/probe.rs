//! Readiness and health probes: an HTTP/1 GET that must answer 200 within a timeout, or a TCP
//! connection that must be accepted.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// GETs `path` on `host:port`; `Ok` on a 200.
pub async fn get(host: &str, port: u16, path: &str, timeout: Duration) -> Result<(), String> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let mut conn = std::pin::pin!(conn);
        let response = tokio::select! {
            r = sender.send_request(request) => r.map_err(|e| e.to_string())?,
            r = &mut conn => return Err(match r {
                Ok(()) => "connection closed".to_owned(),
                Err(e) => e.to_string(),
            }),
        };
        match response.status() {
            hyper::StatusCode::OK => Ok(()),
            status => Err(format!("answered {status}")),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("GET http://{authority}{path}: {e}")),
        Err(_) => Err(format!(
            "GET http://{authority}{path}: no answer within {timeout:?}"
        )),
    }
}

/// GETs each path in turn; the first failure is the answer.
pub async fn all(host: &str, port: u16, paths: &[String], timeout: Duration) -> Result<(), String> {
    for path in paths {
        get(host, port, path, timeout).await?;
    }
    Ok(())
}

/// Whether the server is ready by `check`: its paths answer 200, or it accepts a TCP
/// connection (closed at once).
pub async fn ready(
    host: &str,
    port: u16,
    check: &crate::backend::Probe,
    timeout: Duration,
) -> Result<(), String> {
    match check {
        crate::backend::Probe::Http(paths) => all(host, port, paths, timeout).await,
        crate::backend::Probe::Listening => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect {host}:{port}: {e}")),
                Err(_) => Err(format!(
                    "connect {host}:{port}: no answer within {timeout:?}"
                )),
            }
        }
    }
}
