//! Builders for the Kubernetes objects the agent reads, rendered as multi-document YAML and
//! written atomically so the agent never sees half a file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use serde_yaml::{Mapping, Value};

use crate::client::testkit::BACKEND_PORT;

pub const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_k8s(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A named port, resolved through the `EndpointSlice` port of the same name.
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(port: u16) -> Self {
        Self::Number(port)
    }
}

impl From<&str> for TargetPort {
    fn from(name: &str) -> Self {
        Self::Name(name.to_owned())
    }
}

#[derive(Debug, Clone)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    /// Set, the Service is rendered as type NodePort (externalTrafficPolicy Cluster).
    pub node_port: Option<u16>,
}

impl ServicePort {
    pub fn new(
        name: &str,
        protocol: Protocol,
        port: u16,
        target_port: impl Into<TargetPort>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            protocol,
            port,
            target_port: target_port.into(),
            node_port: None,
        }
    }

    #[must_use]
    pub fn node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }

    fn to_yaml(&self) -> Value {
        let target = match &self.target_port {
            TargetPort::Number(n) => Value::from(*n),
            TargetPort::Name(name) => Value::from(name.as_str()),
        };
        let mut yaml = map([
            ("name", self.name.as_str().into()),
            ("protocol", self.protocol.as_k8s().into()),
            ("port", self.port.into()),
            ("targetPort", target),
        ]);
        if let (Some(node_port), Value::Mapping(fields)) = (self.node_port, &mut yaml) {
            fields.insert("nodePort".into(), node_port.into());
        }
        yaml
    }
}

/// A `v1 Service` of type `ClusterIP`, or `NodePort` when a port has a nodePort; the IP
/// families follow from the cluster IPs given.
#[derive(Debug, Clone)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    pub fn cluster_ip(name: &str, cluster_ips: &[IpAddr]) -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            name: name.to_owned(),
            cluster_ips: cluster_ips.to_vec(),
            ports: Vec::new(),
        }
    }

    #[must_use]
    pub fn port(mut self, port: ServicePort) -> Self {
        self.ports.push(port);
        self
    }

    fn to_yaml(&self) -> Value {
        let ips: Vec<Value> = self
            .cluster_ips
            .iter()
            .map(|ip| ip.to_string().into())
            .collect();
        let families: Vec<Value> = self
            .cluster_ips
            .iter()
            .map(|ip| family_name(ip).into())
            .collect();
        let policy = if self.cluster_ips.len() > 1 {
            "RequireDualStack"
        } else {
            "SingleStack"
        };
        let node_ports = self.ports.iter().any(|port| port.node_port.is_some());
        let mut spec = map([
            (
                "type",
                if node_ports { "NodePort" } else { "ClusterIP" }.into(),
            ),
            ("clusterIP", ips.first().cloned().unwrap_or(Value::Null)),
            ("clusterIPs", Value::Sequence(ips)),
            ("ipFamilies", Value::Sequence(families)),
            ("ipFamilyPolicy", policy.into()),
            (
                "ports",
                Value::Sequence(self.ports.iter().map(ServicePort::to_yaml).collect()),
            ),
            ("selector", map([("app", self.name.as_str().into())])),
        ]);
        if let (true, Value::Mapping(fields)) = (node_ports, &mut spec) {
            fields.insert("externalTrafficPolicy".into(), "Cluster".into());
        }
        map([
            ("apiVersion", "v1".into()),
            ("kind", "Service".into()),
            ("metadata", metadata(&self.namespace, &self.name, None)),
            ("spec", spec),
        ])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    IPv4,
    IPv6,
}

impl AddressType {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::IPv4 } else { Self::IPv6 }
    }

    fn as_k8s(self) -> &'static str {
        match self {
            Self::IPv4 => "IPv4",
            Self::IPv6 => "IPv6",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// `None` leaves `conditions.ready` unset, which Kubernetes treats as ready.
    pub ready: Option<bool>,
    pub node_name: Option<String>,
}

impl Endpoint {
    pub fn ready(address: IpAddr) -> Self {
        Self {
            addresses: vec![address],
            ready: Some(true),
            node_name: Some("node-1".to_owned()),
        }
    }

    pub fn not_ready(address: IpAddr) -> Self {
        Self {
            ready: Some(false),
            ..Self::ready(address)
        }
    }

    fn to_yaml(&self) -> Value {
        let mut fields = Mapping::new();
        fields.insert(
            "addresses".into(),
            Value::Sequence(
                self.addresses
                    .iter()
                    .map(|ip| ip.to_string().into())
                    .collect(),
            ),
        );
        let conditions = match self.ready {
            Some(ready) => map([("ready", ready.into())]),
            None => Value::Mapping(Mapping::new()),
        };
        fields.insert("conditions".into(), conditions);
        if let Some(node) = &self.node_name {
            fields.insert("nodeName".into(), node.as_str().into());
        }
        Value::Mapping(fields)
    }
}

#[derive(Debug, Clone)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

impl EndpointPort {
    pub fn new(name: &str, protocol: Protocol, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            protocol,
            port,
        }
    }

    fn to_yaml(&self) -> Value {
        map([
            ("name", self.name.as_str().into()),
            ("protocol", self.protocol.as_k8s().into()),
            ("port", self.port.into()),
        ])
    }
}

/// A `discovery.k8s.io/v1 EndpointSlice` tied to its Service by the
/// `kubernetes.io/service-name` label.
#[derive(Debug, Clone)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub address_type: AddressType,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

impl EndpointSlice {
    pub fn new(name: &str, service: &str, address_type: AddressType) -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            name: name.to_owned(),
            service: service.to_owned(),
            address_type,
            endpoints: Vec::new(),
            ports: Vec::new(),
        }
    }

    #[must_use]
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    /// One ready endpoint per address.
    #[must_use]
    pub fn ready_endpoints(self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        addresses
            .into_iter()
            .fold(self, |slice, ip| slice.endpoint(Endpoint::ready(ip)))
    }

    #[must_use]
    pub fn port(mut self, port: EndpointPort) -> Self {
        self.ports.push(port);
        self
    }

    fn to_yaml(&self) -> Value {
        let labels = map([("kubernetes.io/service-name", self.service.as_str().into())]);
        map([
            ("apiVersion", "discovery.k8s.io/v1".into()),
            ("kind", "EndpointSlice".into()),
            (
                "metadata",
                metadata(&self.namespace, &self.name, Some(labels)),
            ),
            ("addressType", self.address_type.as_k8s().into()),
            (
                "endpoints",
                Value::Sequence(self.endpoints.iter().map(Endpoint::to_yaml).collect()),
            ),
            (
                "ports",
                Value::Sequence(self.ports.iter().map(EndpointPort::to_yaml).collect()),
            ),
        ])
    }
}

#[derive(Debug, Clone)]
pub enum Document {
    Service(Service),
    EndpointSlice(EndpointSlice),
    /// Verbatim text, for documents the builders refuse to produce (malformed ones).
    Raw(String),
}

impl From<Service> for Document {
    fn from(service: Service) -> Self {
        Self::Service(service)
    }
}

impl From<EndpointSlice> for Document {
    fn from(slice: EndpointSlice) -> Self {
        Self::EndpointSlice(slice)
    }
}

/// The content of a manifests file: documents separated by `---`.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub documents: Vec<Document>,
}

impl Manifests {
    pub fn new() -> Self {
        Self::default()
    }

    #[must_use]
    pub fn with(mut self, document: impl Into<Document>) -> Self {
        self.documents.push(document.into());
        self
    }

    #[must_use]
    pub fn raw(self, text: &str) -> Self {
        self.with(Document::Raw(text.to_owned()))
    }

    /// Adds a ClusterIP Service `name` at `vips` with one port per `(name, protocol, port)`
    /// of `ports`, each targeting [`BACKEND_PORT`], and per family of `vips` the EndpointSlice
    /// `<name>-v4` or `<name>-v6` listing that family's `backends` as ready on
    /// [`BACKEND_PORT`] under the same port names.
    #[must_use]
    pub fn backed_service(
        self,
        name: &str,
        vips: &[IpAddr],
        ports: &[(&str, Protocol, u16)],
        backends: &[IpAddr],
    ) -> Self {
        let service = ports.iter().fold(
            Service::cluster_ip(name, vips),
            |service, &(port_name, protocol, port)| {
                service.port(ServicePort::new(port_name, protocol, port, BACKEND_PORT))
            },
        );
        let mut manifests = self.with(service);
        for family in [AddressType::IPv4, AddressType::IPv6] {
            if !vips.iter().any(|vip| AddressType::of(vip) == family) {
                continue;
            }
            let suffix = match family {
                AddressType::IPv4 => "v4",
                AddressType::IPv6 => "v6",
            };
            let ready = backends
                .iter()
                .copied()
                .filter(|backend| AddressType::of(backend) == family);
            let slice = ports.iter().fold(
                EndpointSlice::new(&format!("{name}-{suffix}"), name, family)
                    .ready_endpoints(ready),
                |slice, &(port_name, protocol, _)| {
                    slice.port(EndpointPort::new(port_name, protocol, BACKEND_PORT))
                },
            );
            manifests = manifests.with(slice);
        }
        manifests
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for document in &self.documents {
            out.push_str("---\n");
            let text = match document {
                Document::Service(s) => to_text(&s.to_yaml()),
                Document::EndpointSlice(s) => to_text(&s.to_yaml()),
                Document::Raw(text) => text.clone(),
            };
            out.push_str(&text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }

    /// Writes the file through a temporary sibling and a rename, so a reader sees either the
    /// old or the new content, never a mix.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        static WRITES: AtomicU32 = AtomicU32::new(0);
        let dir = path.parent().context("manifests path has no parent")?;
        let file_name = path
            .file_name()
            .context("manifests path has no file name")?
            .to_string_lossy();
        let mut temp_name = String::new();
        write!(
            temp_name,
            ".{file_name}.{}.{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        )?;
        let temp = dir.join(temp_name);
        let mut file =
            std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
        file.write_all(self.render().as_bytes())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)
            .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))
    }
}

fn family_name(ip: &IpAddr) -> &'static str {
    AddressType::of(ip).as_k8s()
}

fn metadata(namespace: &str, name: &str, labels: Option<Value>) -> Value {
    let mut fields = Mapping::new();
    fields.insert("name".into(), name.into());
    fields.insert("namespace".into(), namespace.into());
    if let Some(labels) = labels {
        fields.insert("labels".into(), labels);
    }
    Value::Mapping(fields)
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Mapping(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn to_text(value: &Value) -> String {
    serde_yaml::to_string(value).expect("YAML values always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn documents(text: &str) -> Vec<Value> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(text)
            .map(|doc| Value::deserialize(doc).unwrap())
            .collect()
    }

    #[test]
    fn renders_service_and_slice_as_kubernetes_yaml() {
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let backend: IpAddr = "10.240.1.2".parse().unwrap();
        let text = Manifests::new()
            .with(Service::cluster_ip("web", &[vip]).port(ServicePort::new(
                "http",
                Protocol::Tcp,
                80,
                "http",
            )))
            .with(
                EndpointSlice::new("web-1", "web", AddressType::IPv4)
                    .ready_endpoints([backend])
                    .endpoint(Endpoint::not_ready("10.240.2.2".parse().unwrap()))
                    .port(EndpointPort::new("http", Protocol::Tcp, 8080)),
            )
            .raw("kind: Service\nmetadata: {name: broken")
            .render();
        let (good, broken) = text.rsplit_once("---\n").unwrap();
        assert!(broken.starts_with("kind: Service"));
        let docs = documents(good);
        assert_eq!(docs.len(), 2);
        let service = &docs[0];
        assert_eq!(service["kind"], "Service");
        assert_eq!(service["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(service["spec"]["clusterIPs"][0], "10.96.0.10");
        assert_eq!(service["spec"]["ipFamilies"][0], "IPv4");
        assert_eq!(service["spec"]["ports"][0]["port"], 80);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
        let slice = &docs[1];
        assert_eq!(slice["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "web"
        );
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.240.1.2");
        assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(slice["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(slice["ports"][0]["port"], 8080);
    }

    #[test]
    fn dual_stack_service_lists_both_families() {
        let text = Manifests::new()
            .with(
                Service::cluster_ip(
                    "dual",
                    &[
                        "10.96.0.20".parse().unwrap(),
                        "fd00:96::14".parse().unwrap(),
                    ],
                )
                .port(ServicePort::new("http", Protocol::Tcp, 80, 8080)),
            )
            .render();
        let docs = documents(&text);
        assert_eq!(docs[0]["spec"]["ipFamilies"][1], "IPv6");
        assert_eq!(docs[0]["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(docs[0]["spec"]["ports"][0]["targetPort"], 8080);
    }

    #[test]
    fn a_port_with_a_node_port_makes_a_node_port_service() {
        let vip: IpAddr = "10.96.0.30".parse().unwrap();
        let text = Manifests::new()
            .with(Service::cluster_ip("plain", &[vip]).port(ServicePort::new(
                "http",
                Protocol::Tcp,
                80,
                8080,
            )))
            .with(
                Service::cluster_ip("exposed", &[vip])
                    .port(ServicePort::new("http", Protocol::Tcp, 80, 8080).node_port(30080)),
            )
            .render();
        let docs = documents(&text);
        assert_eq!(docs[0]["spec"]["type"], "ClusterIP");
        assert!(docs[0]["spec"].get("externalTrafficPolicy").is_none());
        assert!(docs[0]["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(docs[1]["spec"]["type"], "NodePort");
        assert_eq!(docs[1]["spec"]["externalTrafficPolicy"], "Cluster");
        assert_eq!(docs[1]["spec"]["ports"][0]["nodePort"], 30080);
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = crate::env::tempdir::TempDir::new().unwrap();
        let path = dir.path().join("manifests.yaml");
        Manifests::new().raw("a: 1").write_atomic(&path).unwrap();
        Manifests::new().raw("b: 2").write_atomic(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "---\nb: 2\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_backed_service_has_one_slice_per_family_with_its_backends_under_the_port_names() {
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let v6: IpAddr = "fd00:96::10".parse().unwrap();
        let backends: Vec<IpAddr> =
            vec!["10.240.1.2".parse().unwrap(), "fd00:5e::2".parse().unwrap()];
        let ports = [("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 53)];
        let expected = Manifests::new()
            .with(
                Service::cluster_ip("web", &[v4, v6])
                    .port(ServicePort::new("http", Protocol::Tcp, 80, BACKEND_PORT))
                    .port(ServicePort::new("dns", Protocol::Udp, 53, BACKEND_PORT)),
            )
            .with(
                EndpointSlice::new("web-v4", "web", AddressType::IPv4)
                    .ready_endpoints([backends[0]])
                    .port(EndpointPort::new("http", Protocol::Tcp, BACKEND_PORT))
                    .port(EndpointPort::new("dns", Protocol::Udp, BACKEND_PORT)),
            )
            .with(
                EndpointSlice::new("web-v6", "web", AddressType::IPv6)
                    .ready_endpoints([backends[1]])
                    .port(EndpointPort::new("http", Protocol::Tcp, BACKEND_PORT))
                    .port(EndpointPort::new("dns", Protocol::Udp, BACKEND_PORT)),
            );
        let built = Manifests::new().backed_service("web", &[v4, v6], &ports, &backends);
        assert_eq!(built.render(), expected.render());
        let v4_only = Manifests::new().backed_service("web", &[v4], &ports[..1], &[]);
        assert_eq!(v4_only.documents.len(), 2, "{}", v4_only.render());
        assert!(
            v4_only.render().contains("name: web-v4"),
            "{}",
            v4_only.render()
        );
    }
}
