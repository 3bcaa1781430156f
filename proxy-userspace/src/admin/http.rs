//! A minimal HTTP/1.1 responder for the metrics, health and health-check node port endpoints:
//! one response per connection. Enough for Prometheus scrapes, kubelet probes and load-balancer
//! health checks without a web framework.
use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::{debug, info};

/// An HTTP response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Headers beyond the standard ones, as (name, value).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header to the standard ones.
    #[must_use]
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
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

/// Which request methods reach the handler; the others are answered 405.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Methods {
    /// GET and HEAD: the metrics and health endpoints.
    GetAndHead,
    /// Any method, as kube-proxy's health-check node ports answer (their handler never looks
    /// at the method); HEAD still gets no body.
    Any,
}

async fn answer(mut stream: TcpStream, handler: Handler, methods: Methods) -> std::io::Result<()> {
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
    let response = if methods == Methods::Any || method == "GET" || method == "HEAD" {
        handler(path)
    } else {
        Response::new(405, "text/plain; charset=utf-8", "method not allowed\n")
    };
    let body = if method == "HEAD" {
        ""
    } else {
        response.body.as_str()
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Accepts connections on `listener` in a task that owns it: the socket closes when the task
/// ends or is aborted.
fn accept_loop(
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    methods: Methods,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(error) = answer(stream, handler, methods).await {
                            debug!("{what} request failed: {error}");
                        }
                    });
                }
                Err(error) => debug!("{what} accept failed: {error}"),
            }
        }
    })
}

/// A server started by [`spawn`]. Closing or dropping it closes its listening socket; requests
/// already accepted are still answered.
#[derive(Debug)]
pub struct Server {
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Stops accepting and returns once the listening socket is closed, so that the port
    /// refuses connections and can be bound again.
    pub async fn close(mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            // An aborted task's JoinHandle resolves only after its future (which owns the
            // listener) has been dropped.
            let _ = accept.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(accept) = &self.accept {
            accept.abort();
        }
    }
}

/// Serves `handler` on an already bound `listener` until the returned [`Server`] is closed or
/// dropped.
pub fn spawn(
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    methods: Methods,
) -> Server {
    Server {
        accept: Some(accept_loop(listener, what, handler, methods)),
    }
}

/// Binds `address` (failing at once if it cannot) and serves `handler` (GET and HEAD) in the
/// background for the life of the process.
pub async fn serve(
    address: SocketAddr,
    what: &'static str,
    handler: Handler,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(address).await?;
    info!(%address, "serving {what}");
    // Detached on purpose: these endpoints live as long as the agent.
    drop(accept_loop(listener, what, handler, Methods::GetAndHead));
    Ok(())
}
