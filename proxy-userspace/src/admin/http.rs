//! The HTTP endpoints (metrics, health, health-check node ports), served by hyper: one
//! response per connection, enough for Prometheus scrapes, kubelet probes and load-balancer
//! health checks. Abusive clients cannot wedge them:
//! - at most [`MAX_CONNECTIONS`] connections per listener; when a new one arrives at the cap,
//!   the oldest open connection is closed (slow clients hold the oldest ones; a probe is
//!   answered in microseconds), so a fresh request is always answered;
//! - the whole request head must arrive within [`HEAD_DEADLINE`], however slowly it trickles;
//! - a failing `accept` (EMFILE when file descriptors run out) backs off, from 10 ms doubling
//!   to 1 s, instead of spinning a core.
use std::{collections::VecDeque, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode, body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

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

/// Connections one listener keeps open at most.
pub const MAX_CONNECTIONS: usize = 64;
/// The time a client has to send its whole request head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// The time a connection may live at all (head, handler and response).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

fn to_hyper(response: Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("Content-Type", response.content_type)
        .header("X-Content-Type-Options", "nosniff")
        .header("Connection", "close");
    for (name, value) in &response.headers {
        builder = builder.header(*name, value.as_str());
    }
    builder
        .body(Full::new(Bytes::from(response.body)))
        .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new())))
}

fn answer(request: &Request<Incoming>, handler: &Handler, methods: Methods) -> Response {
    let method = request.method();
    if methods == Methods::Any || method == Method::GET || method == Method::HEAD {
        handler(request.uri().path())
    } else {
        Response::new(405, "text/plain; charset=utf-8", "method not allowed\n")
    }
}

/// The open connections of one listener, oldest first.
#[derive(Default)]
struct Connections(VecDeque<JoinHandle<()>>);

impl Connections {
    /// Makes room for one more connection: forgets finished ones and, at the cap, closes the
    /// oldest open one.
    fn make_room(&mut self, what: &str) {
        self.0.retain(|connection| !connection.is_finished());
        while self.0.len() >= MAX_CONNECTIONS {
            if let Some(oldest) = self.0.pop_front() {
                oldest.abort();
                debug!("{what}: {MAX_CONNECTIONS} connections open, closed the oldest");
            }
        }
    }
}

fn serve_connection(
    stream: tokio::net::TcpStream,
    what: &'static str,
    handler: Handler,
    methods: Methods,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = to_hyper(answer(&request, &handler, methods));
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_DEADLINE)
            .keep_alive(false)
            .title_case_headers(true)
            .max_buf_size(16 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!("{what} request failed: {error}"),
            Err(_) => debug!("{what} connection closed after {CONNECTION_DEADLINE:?}"),
        }
    })
}

/// Accepts connections on `listener` in a task that owns it: the socket closes when the task
/// ends or is aborted (and with it every connection it accepted).
fn accept_loop(
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    methods: Methods,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = Connections::default();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut failing = false;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if failing {
                        info!("{what}: accepting connections again");
                        failing = false;
                    }
                    backoff = ACCEPT_BACKOFF_MIN;
                    connections.make_room(what);
                    connections.0.push_back(serve_connection(
                        stream,
                        what,
                        handler.clone(),
                        methods,
                    ));
                }
                Err(error) => {
                    if !failing {
                        warn!(
                            "{what}: accept failed: {error}; backing off (up to {ACCEPT_BACKOFF_MAX:?}) until it works again"
                        );
                        failing = true;
                    }
                    // Connections of our own may be what holds the descriptors.
                    connections.0.retain(|connection| !connection.is_finished());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
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
