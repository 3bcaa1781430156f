//! What the model could not use, and the names it reports it under: Service identities, the
//! problem records and their collector, and the small parsers every part of the model shares.
use std::{collections::BTreeSet, fmt, sync::Arc};

use super::Protocol;

/// A Service's identity: namespace and name (cheap to clone; claims and statuses hold many).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceId {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Records a problem of this Service.
    pub(super) fn report(&self, problems: &mut Problems, reason: impl Into<String>) {
        problems.report(ObjectKind::Service, &self.namespace, &self.name, reason);
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Kind of object a problem refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
        })
    }
}

/// A part of an object the model could not use: reported, counted and skipped.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// Collects problems once each, in a stable order.
#[derive(Debug, Default)]
pub struct Problems(BTreeSet<Problem>);

impl Problems {
    pub fn report(
        &mut self,
        kind: ObjectKind,
        namespace: &str,
        name: &str,
        reason: impl Into<String>,
    ) {
        self.0.insert(Problem {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason: reason.into(),
        });
    }

    pub fn into_vec(self) -> Vec<Problem> {
        self.0.into_iter().collect()
    }
}

/// Parses a Kubernetes protocol name; `None` (unset) means TCP.
pub(super) fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("protocol SCTP is not supported by the socket datapath; port ignored".into()),
        other => Err(format!("unknown protocol {other:?}; port ignored")),
    }
}

/// A port number from the API: 1-65535, or `None`.
pub(super) fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|port| *port != 0)
}
