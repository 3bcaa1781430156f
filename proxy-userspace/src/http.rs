//! A minimal HTTP/1.1 responder for the metrics and health endpoints: GET only, one response
//! per connection. Enough for Prometheus scrapes and kubelet probes without a web framework.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

/// An HTTP response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn not_found() -> Self {
        Self::new(404, "text/plain; charset=utf-8", "404 page not found\n")
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Routes a request path (query string removed) to a response.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

async fn answer(mut stream: TcpStream, handler: Handler) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read the request head (bounded), ignore any body.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&request);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or("/"),
    );
    let path = target.split('?').next().unwrap_or("/");
    let response = if method == "GET" || method == "HEAD" {
        handler(path)
    } else {
        Response::new(405, "text/plain; charset=utf-8", "method not allowed\n")
    };
    let body = if method == "HEAD" {
        ""
    } else {
        response.body.as_str()
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds `address` (failing at once if it cannot) and serves `handler` in the background.
pub async fn serve(
    address: SocketAddr,
    what: &'static str,
    handler: Handler,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    info!(%address, "serving {what}");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, handler).await {
                            debug!("{what} request failed: {error}");
                        }
                    });
                }
                Err(error) => debug!("{what} accept failed: {error}"),
            }
        }
    });
    Ok(())
}
