//! The Services a scale point programs: N ClusterIP services of one TCP port, each backed by
//! the same M endpoints (the backend namespaces), in the order kube-proxy's chains list them.
//! Where a mode measures NodePorts, the last services (as many as kube-apiserver's default
//! NodePort range holds) are type NodePort too.

use std::net::{Ipv4Addr, SocketAddr};

/// Service port as clients see it.
pub const SERVICE_PORT: u16 = 80;
/// Port every backend listens on (TCP and UDP).
pub const BACKEND_PORT: u16 = 8080;
/// The port's name, as in the Service and the EndpointSlice.
pub const PORT_NAME: &str = "http";
pub const NAMESPACE: &str = "bench";
/// Where ClusterIPs are allocated (kube-proxy's `--service-cluster-ip-range` equivalent).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
const SERVICE_BASE: u32 = u32::from_be_bytes([10, 96, 0, 0]);
/// The pod network: backends and the client all live in it, so service traffic is not
/// masqueraded (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.240.0.0/16";
/// kube-apiserver's default `--service-node-port-range`.
const NODE_PORT_FIRST: u16 = 30_000;
const NODE_PORT_LAST: u16 = 32_767;
/// A pod IP no backend has: the endpoint that replaces another in the one-endpoint update.
pub const REPLACEMENT_ENDPOINT: Ipv4Addr = Ipv4Addr::new(10, 240, 251, 2);

#[derive(Debug, Clone)]
pub struct ServiceSet {
    pub count: usize,
    /// Endpoints of every service, in order.
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServiceSet {
    pub fn new(count: usize, endpoints: Vec<Ipv4Addr>) -> Self {
        assert!(count >= 1 && !endpoints.is_empty());
        Self { count, endpoints }
    }

    pub fn name(index: usize) -> String {
        format!("svc-{index}")
    }

    pub fn vip(index: usize) -> Ipv4Addr {
        let offset = u32::try_from(index).expect("at most a million services") + 1;
        Ipv4Addr::from(SERVICE_BASE + offset)
    }

    /// The service every data-plane measurement targets: the last one, which is the
    /// worst-placed in kube-proxy's linear KUBE-SERVICES chain.
    pub fn measured(&self) -> usize {
        self.count - 1
    }

    pub fn measured_target(&self) -> SocketAddr {
        SocketAddr::from((Self::vip(self.measured()), SERVICE_PORT))
    }

    /// The nodePort of service `index`, if it has one: counting back from the measured
    /// service (which gets the first port of the range) until the range is used up, as
    /// kube-apiserver could allocate no more.
    pub fn node_port(&self, index: usize) -> Option<u16> {
        let from_last = u16::try_from(self.measured().checked_sub(index)?).ok()?;
        NODE_PORT_FIRST
            .checked_add(from_last)
            .filter(|&port| port <= NODE_PORT_LAST)
    }

    /// Endpoints of `index` once the one-endpoint update applied: the measured service's first
    /// endpoint is replaced (a pod replaced by a new one with another IP).
    pub fn updated_endpoints(&self, index: usize) -> Vec<Ipv4Addr> {
        let mut endpoints = self.endpoints.clone();
        if index == self.measured() {
            endpoints[0] = REPLACEMENT_ENDPOINT;
        }
        endpoints
    }

    /// "bench/svc-7:http", kube-proxy's service port name.
    pub fn port_name(index: usize) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", Self::name(index))
    }
}

/// How many of `services` services have a nodePort.
pub fn node_port_count(services: usize) -> usize {
    services.min(usize::from(NODE_PORT_LAST - NODE_PORT_FIRST) + 1)
}

/// A short, stable, base32 hash like the ones kube-proxy puts in chain names (it uses SHA-256;
/// only the shape matters here: same length, same alphabet).
pub fn chain_hash(input: &str, length: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        input.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (mut high, mut low) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    (0..length)
        .map(|_| {
            let index = usize::try_from(low & 31).expect("five bits");
            low = (low >> 5) | (high << 59);
            high >>= 5;
            char::from(ALPHABET[index])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_are_distinct_and_in_the_service_range() {
        assert_eq!(ServiceSet::vip(0), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(ServiceSet::vip(99_999), Ipv4Addr::new(10, 97, 134, 160));
        let set = ServiceSet::new(3, vec![Ipv4Addr::new(10, 240, 1, 2)]);
        assert_eq!(set.measured_target().to_string(), "10.96.0.3:80");
    }

    #[test]
    fn chain_hashes_are_stable_and_distinct() {
        let a = chain_hash("bench/svc-1:httptcp", 16);
        assert_eq!(a.len(), 16);
        assert_eq!(a, chain_hash("bench/svc-1:httptcp", 16));
        assert_ne!(a, chain_hash("bench/svc-2:httptcp", 16));
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
    }

    #[test]
    fn node_ports_go_to_the_last_services_while_the_range_lasts() {
        let endpoints = vec![Ipv4Addr::new(10, 240, 1, 2)];
        let small = ServiceSet::new(3, endpoints.clone());
        assert_eq!(
            (0..3).map(|i| small.node_port(i)).collect::<Vec<_>>(),
            [Some(30_002), Some(30_001), Some(30_000)]
        );
        assert_eq!(small.node_port(3), None);
        assert_eq!(node_port_count(3), 3);
        let large = ServiceSet::new(10_000, endpoints);
        assert_eq!(large.node_port(9_999), Some(30_000));
        let with_ports: Vec<u16> = (0..10_000).filter_map(|i| large.node_port(i)).collect();
        assert_eq!(with_ports.len(), node_port_count(10_000));
        assert_eq!(with_ports.len(), 2_768);
        assert_eq!(with_ports.first(), Some(&32_767));
        assert_eq!(large.node_port(10_000 - 2_769), None);
    }

    #[test]
    fn the_update_replaces_one_endpoint_of_the_measured_service() {
        let set = ServiceSet::new(2, vec![Ipv4Addr::new(10, 240, 1, 2)]);
        assert_eq!(set.updated_endpoints(0), set.endpoints);
        assert_eq!(set.updated_endpoints(1), vec![REPLACEMENT_ENDPOINT]);
    }
}
