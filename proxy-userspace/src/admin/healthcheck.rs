//! The healthCheckNodePort listeners. For every Service of type LoadBalancer with
//! externalTrafficPolicy Local, kube-proxy serves HTTP on the Service's healthCheckNodePort so
//! that the cloud load balancer sends traffic only to nodes with a local ready endpoint: any
//! request is answered 200 when this node has one (and the proxy itself is healthy), 503
//! otherwise, with a JSON body naming the Service and the count. [`HealthCheckServer::reconcile`]
//! makes the open ports match the model's desired map after each sync: it opens missing
//! listeners, updates the counts of open ones in place (the socket stays open, so a probe never
//! sees a refused connection because a count changed) and closes the ones no longer wanted.
//! A port that cannot be bound is reported and retried at the next reconcile, never fatal.
use std::{
    collections::BTreeMap,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{Mutex, watch},
};
use tracing::{debug, info, warn};

use super::http;
use crate::model::HealthCheck;

/// Where the listeners bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindTo {
    /// Every address of the node, IPv4 and IPv6, as kube-proxy does by default: one dual-stack
    /// `[::]` socket, or `0.0.0.0` where the kernel has no IPv6.
    AllAddresses,
    /// One address only (the unit tests use loopback).
    Address(IpAddr),
    /// Each address `--nodeport-addresses` selects, as given by
    /// [`HealthCheckServer::set_addresses`] after every sync (kube-proxy binds its health-check
    /// node ports to its NodePort addresses). Listeners move when the addresses change.
    NodePortAddresses,
}

/// Whether the proxy itself is healthy (kube-proxy's `serviceProxyHealthy`): a node whose syncs
/// stopped fails every health check, so the load balancer moves away from a broken dataplane.
pub type ProxyHealth = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the metrics endpoint reports about the listeners, read at scrape time.
#[derive(Debug, Default)]
pub struct HealthCheckCounters {
    listeners: AtomicU64,
    bind_failures: AtomicU64,
}

impl HealthCheckCounters {
    /// Health-check node ports open now.
    pub fn listeners(&self) -> u64 {
        self.listeners.load(Ordering::Relaxed)
    }

    /// Attempts to open a health-check node port that failed, since the start.
    pub fn bind_failures_total(&self) -> u64 {
        self.bind_failures.load(Ordering::Relaxed)
    }
}

/// A health-check node port that could not be opened this time.
#[derive(Debug)]
pub struct BindFailure {
    pub port: u16,
    /// `namespace/name` of the Service that wants the port.
    pub service: String,
    pub error: io::Error,
}

impl fmt::Display for BindFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot open health-check node port {} of Service {}: {} (retried at the next sync)",
            self.port, self.service, self.error
        )
    }
}

/// What one reconcile did, port by port.
#[derive(Debug, Default)]
pub struct Reconciled {
    pub opened: Vec<u16>,
    /// Open ports whose Service or count changed (answered from the same socket).
    pub updated: Vec<u16>,
    pub closed: Vec<u16>,
    pub failed: Vec<BindFailure>,
}

/// One open port: the state its handler answers from, and its server.
struct Listener {
    check: watch::Sender<HealthCheck>,
    /// One server per address it listens on.
    servers: Vec<http::Server>,
    /// The addresses it was bound to (`NodePortAddresses` only).
    addresses: Vec<IpAddr>,
}

/// The set of open health-check listeners. Cheap to clone: the sync runner reconciles it after
/// each sync and the agent closes it on shutdown.
#[derive(Clone)]
pub struct HealthCheckServer {
    bind: BindTo,
    proxy_healthy: ProxyHealth,
    // A tokio mutex: closing a listener waits for its socket to be released.
    listeners: Arc<Mutex<BTreeMap<u16, Listener>>>,
    /// Where `NodePortAddresses` listeners bind.
    addresses: Arc<std::sync::Mutex<Vec<IpAddr>>>,
    counters: Arc<HealthCheckCounters>,
}

impl fmt::Debug for HealthCheckServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthCheckServer")
            .field("bind", &self.bind)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn service_name(check: &HealthCheck) -> String {
    format!("{}/{}", check.namespace, check.name)
}

impl HealthCheckServer {
    pub fn new(bind: BindTo, proxy_healthy: ProxyHealth) -> Self {
        Self {
            bind,
            proxy_healthy,
            listeners: Arc::default(),
            addresses: Arc::default(),
            counters: Arc::default(),
        }
    }

    /// The addresses `BindTo::NodePortAddresses` listeners bind to (from the next reconcile
    /// on); returns whether they changed.
    pub fn set_addresses(&self, addresses: &[IpAddr]) -> bool {
        let mut current = self
            .addresses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = current.as_slice() != addresses;
        if changed {
            *current = addresses.to_vec();
        }
        changed
    }

    fn wanted_addresses(&self) -> Vec<IpAddr> {
        match self.bind {
            BindTo::NodePortAddresses => self
                .addresses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            BindTo::AllAddresses | BindTo::Address(_) => Vec::new(),
        }
    }

    /// The counters, for the metrics endpoint.
    pub fn counters(&self) -> Arc<HealthCheckCounters> {
        self.counters.clone()
    }

    /// Makes the open listeners match `desired` (healthCheckNodePort → what it reports).
    pub async fn reconcile(&self, desired: &BTreeMap<u16, HealthCheck>) -> Reconciled {
        let mut listeners = self.listeners.lock().await;
        let mut done = Reconciled::default();
        let addresses = self.wanted_addresses();
        // Close first, so a port handed from one Service to another within one sync is free;
        // listeners on addresses no longer selected close too (and reopen below).
        let removed: Vec<u16> = listeners
            .iter()
            .filter(|(port, listener)| {
                !desired.contains_key(port) || listener.addresses != addresses
            })
            .map(|(port, _)| *port)
            .collect();
        for port in removed {
            if let Some(listener) = listeners.remove(&port) {
                let service = service_name(&listener.check.borrow());
                for server in listener.servers {
                    server.close().await;
                }
                info!(port, %service, "closed health-check node port");
                done.closed.push(port);
            }
        }
        for (&port, check) in desired {
            if let Some(listener) = listeners.get(&port) {
                let changed = listener.check.send_if_modified(|current| {
                    let changed = current != check;
                    if changed {
                        current.clone_from(check);
                    }
                    changed
                });
                if changed {
                    debug!(port, service = %service_name(check), local_endpoints = check.local_endpoints, "health check updated");
                    done.updated.push(port);
                }
                continue;
            }
            match bind(self.bind, &addresses, port) {
                Ok(sockets) => {
                    let (sender, receiver) = watch::channel(check.clone());
                    let servers = sockets
                        .into_iter()
                        .map(|socket| {
                            http::spawn(
                                socket,
                                "health-check node port",
                                handler(receiver.clone(), self.proxy_healthy.clone()),
                                http::Methods::Any,
                            )
                        })
                        .collect();
                    info!(port, service = %service_name(check), local_endpoints = check.local_endpoints, "opened health-check node port");
                    listeners.insert(
                        port,
                        Listener {
                            check: sender,
                            servers,
                            addresses: addresses.clone(),
                        },
                    );
                    done.opened.push(port);
                }
                Err(error) => {
                    let failure = BindFailure {
                        port,
                        service: service_name(check),
                        error,
                    };
                    warn!("{failure}");
                    done.failed.push(failure);
                }
            }
        }
        self.counters
            .listeners
            .store(listeners.len() as u64, Ordering::Relaxed);
        self.counters
            .bind_failures
            .fetch_add(done.failed.len() as u64, Ordering::Relaxed);
        done
    }

    /// Closes every listener (agent shutdown); returns once their ports are released.
    pub async fn close_all(&self) {
        let closed = self.reconcile(&BTreeMap::new()).await.closed.len();
        if closed > 0 {
            info!(closed, "closed every health-check node port");
        }
    }
}

/// The answer to any request on a health-check node port, as kube-proxy gives it.
pub fn respond(check: &HealthCheck, proxy_healthy: bool) -> http::Response {
    let status = if check.local_endpoints > 0 && proxy_healthy {
        200
    } else {
        503
    };
    // kube-proxy's layout, so anything that parses it loosely keeps working; the names are
    // escaped as JSON strings.
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        serde_json::Value::from(check.namespace.as_str()),
        serde_json::Value::from(check.name.as_str()),
        check.local_endpoints,
        proxy_healthy
    );
    // The weight header lets load balancers that support it (GCE's WEIGHTED_MAGLEV) spread
    // traffic by local endpoint count.
    http::Response::new(status, "application/json", body).with_header(
        "X-Load-Balancing-Endpoint-Weight",
        check.local_endpoints.to_string(),
    )
}

fn handler(check: watch::Receiver<HealthCheck>, proxy_healthy: ProxyHealth) -> http::Handler {
    // Every path is the health check, as in kube-proxy.
    Arc::new(move |_path| {
        let healthy = proxy_healthy();
        respond(&check.borrow(), healthy)
    })
}

/// Whether binding `[::]` failed because this kernel or namespace has no usable IPv6.
fn ipv6_unavailable(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

fn bind(bind: BindTo, addresses: &[IpAddr], port: u16) -> io::Result<Vec<TcpListener>> {
    match bind {
        BindTo::Address(ip) => Ok(vec![listen(SocketAddr::new(ip, port))?]),
        BindTo::AllAddresses => {
            let socket = match listen(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)) {
                Err(error) if ipv6_unavailable(&error) => {
                    debug!(
                        port,
                        "no IPv6 ({error}): health-check node port on IPv4 only"
                    );
                    listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
                }
                other => other,
            }?;
            Ok(vec![socket])
        }
        BindTo::NodePortAddresses => {
            let mut sockets = Vec::new();
            for ip in addresses {
                match listen(SocketAddr::new(*ip, port)) {
                    Ok(socket) => sockets.push(socket),
                    // A primary address of the Node object need not be on an interface (NAT):
                    // nothing can arrive there.
                    Err(error) if error.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                        debug!(port, %ip, "not a local address: no health-check listener there");
                    }
                    Err(error) => return Err(error),
                }
            }
            if sockets.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    "no address selected by --nodeport-addresses is on this node",
                ));
            }
            Ok(sockets)
        }
    }
}

fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let socket = TcpSocket::new_v6()?;
        // `[::]` must take IPv4 too (as `::ffff:a.b.c.d`), whatever net.ipv6.bindv6only says.
        setsockopt(&socket, sockopt::Ipv6V6Only, &false)?;
        socket
    };
    // As Go's listeners (kube-proxy's) do: a port just closed, with connections still in
    // TIME_WAIT, can be opened again at once. A port another socket listens on stays refused.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::atomic::AtomicBool, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn check(namespace: &str, name: &str, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            local_endpoints,
        }
    }

    fn desired(checks: &[(u16, HealthCheck)]) -> BTreeMap<u16, HealthCheck> {
        checks.iter().cloned().collect()
    }

    fn server() -> HealthCheckServer {
        HealthCheckServer::new(BindTo::Address(LOOPBACK), Arc::new(|| true))
    }

    /// A loopback port nobody listens on right now.
    fn free_port() -> u16 {
        std::net::TcpListener::bind((LOOPBACK, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    struct Reply {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    }

    fn parse(raw: &str) -> Reply {
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete head");
        let mut lines = head.lines();
        let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(": ").unwrap();
                (name.to_ascii_lowercase(), value.to_owned())
            })
            .collect();
        Reply {
            status: status.parse().unwrap(),
            headers,
            body: body.to_owned(),
        }
    }

    async fn send(mut stream: TcpStream, head: &str) -> Reply {
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut raw))
            .await
            .expect("answered in time")
            .unwrap();
        parse(&raw)
    }

    async fn request(port: u16, method: &str, path: &str) -> Reply {
        let stream = TcpStream::connect((LOOPBACK, port)).await.unwrap();
        send(
            stream,
            &format!("{method} {path} HTTP/1.1\r\nHost: lb\r\nUser-Agent: probe\r\n\r\n"),
        )
        .await
    }

    async fn request_to(ip: IpAddr, port: u16) -> Reply {
        let stream = TcpStream::connect((ip, port)).await.unwrap();
        send(stream, "GET / HTTP/1.1\r\nHost: lb\r\n\r\n").await
    }

    fn json(reply: &Reply) -> serde_json::Value {
        serde_json::from_str(&reply.body).expect("a JSON body")
    }

    #[tokio::test]
    async fn a_node_with_local_endpoints_answers_200_with_kube_proxys_body_and_headers() {
        let health = server();
        let port = free_port();
        let done = health
            .reconcile(&desired(&[(port, check("shop", "web", 2))]))
            .await;
        assert_eq!(done.opened, [port]);
        assert_eq!(health.counters().listeners(), 1);
        let reply = request(port, "GET", "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["content-type"], "application/json");
        assert_eq!(reply.headers["x-content-type-options"], "nosniff");
        assert_eq!(reply.headers["x-load-balancing-endpoint-weight"], "2");
        assert_eq!(
            json(&reply),
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        health.close_all().await;
    }

    #[test]
    fn the_body_has_kube_proxys_layout() {
        let response = respond(&check("shop", "web", 1), true);
        assert_eq!(
            response.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": true\n}"
        );
    }

    #[tokio::test]
    async fn a_node_without_local_endpoints_answers_503() {
        let health = server();
        let port = free_port();
        health
            .reconcile(&desired(&[(port, check("shop", "web", 0))]))
            .await;
        let reply = request(port, "GET", "/").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.headers["x-load-balancing-endpoint-weight"], "0");
        assert_eq!(json(&reply)["localEndpoints"], 0);
        assert_eq!(json(&reply)["serviceProxyHealthy"], true);
        health.close_all().await;
    }

    #[tokio::test]
    async fn an_unhealthy_proxy_fails_every_health_check() {
        let healthy = Arc::new(AtomicBool::new(false));
        let flag = healthy.clone();
        let health = HealthCheckServer::new(
            BindTo::Address(LOOPBACK),
            Arc::new(move || flag.load(Ordering::Relaxed)),
        );
        let port = free_port();
        health
            .reconcile(&desired(&[(port, check("shop", "web", 3))]))
            .await;
        let reply = request(port, "GET", "/").await;
        assert_eq!(reply.status, 503);
        assert_eq!(json(&reply)["serviceProxyHealthy"], false);
        assert_eq!(json(&reply)["localEndpoints"], 3);
        healthy.store(true, Ordering::Relaxed);
        assert_eq!(request(port, "GET", "/").await.status, 200);
        health.close_all().await;
    }

    #[tokio::test]
    async fn counts_and_services_change_in_place_without_reopening_the_socket() {
        let health = server();
        let port = free_port();
        health
            .reconcile(&desired(&[(port, check("shop", "web", 0))]))
            .await;
        // A connection accepted before the change: a reopened socket would leave it with the
        // old listener's (stale) state; an update in place answers it with the new count.
        let mut early = TcpStream::connect((LOOPBACK, port)).await.unwrap();
        early.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();

        let done = health
            .reconcile(&desired(&[(port, check("shop", "web", 1))]))
            .await;
        assert!(done.opened.is_empty() && done.closed.is_empty(), "{done:?}");
        assert_eq!(done.updated, [port]);
        let reply = send(early, "Host: lb\r\n\r\n").await;
        assert_eq!(reply.status, 200);
        assert_eq!(json(&reply)["localEndpoints"], 1);

        // The port handed to another Service keeps its socket too.
        let done = health
            .reconcile(&desired(&[(port, check("shop", "api", 4))]))
            .await;
        assert_eq!((done.updated, done.opened), (vec![port], vec![]));
        let reply = request(port, "GET", "/").await;
        assert_eq!(json(&reply)["service"]["name"], "api");
        assert_eq!(reply.headers["x-load-balancing-endpoint-weight"], "4");

        // Nothing changed: nothing done.
        let done = health
            .reconcile(&desired(&[(port, check("shop", "api", 4))]))
            .await;
        assert!(
            done.updated.is_empty() && done.opened.is_empty(),
            "{done:?}"
        );
        health.close_all().await;
    }

    #[tokio::test]
    async fn node_port_address_listeners_bind_only_the_selected_addresses_and_follow_them() {
        let health = HealthCheckServer::new(BindTo::NodePortAddresses, Arc::new(|| true));
        let port = free_port();
        let first: IpAddr = Ipv4Addr::LOCALHOST.into();
        let second: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        assert!(health.set_addresses(&[first]));
        health
            .reconcile(&desired(&[(port, check("shop", "web", 1))]))
            .await;
        assert_eq!(request_to(first, port).await.status, 200);
        let refused = TcpStream::connect((second, port)).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "{second}");
        assert!(!health.set_addresses(&[first]), "unchanged");
        // The selection moves: so does the listener, on the same port.
        assert!(health.set_addresses(&[second]));
        let done = health
            .reconcile(&desired(&[(port, check("shop", "web", 1))]))
            .await;
        assert_eq!((done.closed, done.opened), (vec![port], vec![port]));
        assert_eq!(request_to(second, port).await.status, 200);
        let refused = TcpStream::connect((first, port)).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "{first}");
        // An address that is not local is skipped; with none left the port is a failure.
        assert!(health.set_addresses(&["192.0.2.1".parse().unwrap()]));
        let done = health
            .reconcile(&desired(&[(port, check("shop", "web", 1))]))
            .await;
        assert_eq!(done.failed.len(), 1, "{done:?}");
        health.close_all().await;
    }

    #[tokio::test]
    async fn a_removed_health_check_closes_its_port() {
        let health = server();
        let (kept, removed) = (free_port(), free_port());
        health
            .reconcile(&desired(&[
                (kept, check("shop", "web", 1)),
                (removed, check("shop", "old", 1)),
            ]))
            .await;
        assert_eq!(request(removed, "GET", "/").await.status, 200);
        let done = health
            .reconcile(&desired(&[(kept, check("shop", "web", 1))]))
            .await;
        assert_eq!(done.closed, [removed]);
        let refused = TcpStream::connect((LOOPBACK, removed))
            .await
            .expect_err("the port is closed when reconcile returns");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(request(kept, "GET", "/").await.status, 200);
        assert_eq!(health.counters().listeners(), 1);

        health.close_all().await;
        assert_eq!(health.counters().listeners(), 0);
        let refused = TcpStream::connect((LOOPBACK, kept)).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_counted_and_retried_without_stopping_the_others() {
        let health = server();
        let taken = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let other = free_port();
        let wanted = desired(&[
            (port, check("shop", "web", 1)),
            (other, check("shop", "api", 1)),
        ]);

        let done = health.reconcile(&wanted).await;
        assert_eq!(done.opened, [other], "the other port still opens");
        let [failure] = done.failed.as_slice() else {
            panic!("one failure expected: {done:?}");
        };
        assert_eq!((failure.port, failure.service.as_str()), (port, "shop/web"));
        assert_eq!(failure.error.kind(), io::ErrorKind::AddrInUse);
        let message = failure.to_string();
        assert!(
            message.contains(&port.to_string()) && message.contains("shop/web"),
            "{message}"
        );
        assert_eq!(health.counters().bind_failures_total(), 1);
        assert_eq!(health.counters().listeners(), 1);

        // Still taken: retried and counted again.
        assert_eq!(health.reconcile(&wanted).await.failed.len(), 1);
        assert_eq!(health.counters().bind_failures_total(), 2);

        // Released: the next reconcile opens it.
        drop(taken);
        let done = health.reconcile(&wanted).await;
        assert_eq!(done.opened, [port]);
        assert!(done.failed.is_empty());
        assert_eq!(request(port, "GET", "/").await.status, 200);
        assert_eq!(health.counters().listeners(), 2);
        health.close_all().await;
    }

    #[tokio::test]
    async fn any_path_and_method_get_the_health_check_and_head_gets_no_body() {
        let health = server();
        let port = free_port();
        health
            .reconcile(&desired(&[(port, check("shop", "web", 1))]))
            .await;
        for (method, path) in [
            ("GET", "/healthz"),
            ("GET", "/some/path?probe=1"),
            ("POST", "/"),
        ] {
            let reply = request(port, method, path).await;
            assert_eq!(reply.status, 200, "{method} {path}");
            assert_eq!(json(&reply)["localEndpoints"], 1, "{method} {path}");
        }
        let head = request(port, "HEAD", "/").await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty(), "{}", head.body);
        assert_eq!(
            head.headers["content-length"],
            respond(&check("shop", "web", 1), true)
                .body
                .len()
                .to_string()
        );
        assert_eq!(head.headers["x-load-balancing-endpoint-weight"], "1");
        health.close_all().await;
    }
}
