//! Command-line interface. Flag names follow kube-proxy's where the meaning is the same.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use proxy_common::map_table::CapacitySetting;

use crate::bpf::sizing::Capacities;

/// Switchyard: a Kubernetes Service dataplane on eBPF, replacing kube-proxy.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    /// Log level or tracing filter (error, warn, info, debug, trace, or e.g. `switchyard=debug`).
    #[arg(long, global = true, default_value = "info", env = "SWITCHYARD_LOG")]
    pub log_level: String,

    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A listen address; empty (`None`) disables the endpoint, as in kube-proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddress(pub Option<SocketAddr>);

fn listen_address(text: &str) -> Result<ListenAddress, String> {
    if text.is_empty() {
        return Ok(ListenAddress(None));
    }
    text.parse()
        .map(|address| ListenAddress(Some(address)))
        .map_err(|error| format!("{text:?} is not an address:port: {error}"))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: follow Services and EndpointSlices and keep the BPF maps exact.
    Run(Box<RunArgs>),
    /// Detach every program and remove every pinned map Switchyard installed.
    Cleanup(PinArgs),
    /// Print what the pinned maps hold, readably (works with the agent stopped).
    Dump(PinArgs),
    /// Inspect the pinned dataplane by Service: frontends, backends, socket translations and
    /// TC flows, or counters (works with the agent stopped).
    Inspect(InspectArgs),
    /// Stream the datapath's decisions live: socket translations, TC flows and NAT, REJECT and
    /// DROP with their reason (the datapath writes them only while a monitor runs).
    Monitor(MonitorArgs),
}

/// Which decisions `monitor` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Verdict {
    /// Socket connect/sendmsg sent to a backend.
    Translated,
    /// TC: a new flow tracked and translated (DNAT, masquerade).
    NewFlow,
    /// Refused: ECONNREFUSED at the socket, TCP RST or ICMP unreachable on TC.
    Refused,
    /// Dropped: EHOSTUNREACH/EPERM at the socket, packet dropped on TC.
    Dropped,
    /// A host process sent to an externalIP that is a node or API server address: left alone.
    Untranslated,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Only events of this Service (`namespace/name`, or `namespace/name:port-name`).
    #[arg(long, value_name = "NAMESPACE/NAME[:PORT]")]
    pub service: Option<String>,

    /// Only events whose client, frontend, translated source or backend is this address.
    #[arg(long, value_name = "IP")]
    pub address: Option<std::net::IpAddr>,

    /// Only events with these verdicts (repeat or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub verdict: Vec<Verdict>,

    /// Output format: a table row or one JSON object per event.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Stop after this many events were shown.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,

    /// Stop after this long.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Option<Duration>,

    #[command(flatten)]
    pub pins: PinArgs,
}

/// The highest aya-log level the eBPF programs log at (`--bpf-log-level`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BpfLogLevel {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl BpfLogLevel {
    /// The tracing directive that lets the forwarded records through whatever `--log-level`
    /// says (they are logged under the target `switchyard::bpf`); `None` when off.
    pub fn tracing_directive(self) -> Option<&'static str> {
        match self {
            Self::Off => None,
            Self::Error => Some("switchyard::bpf=error"),
            Self::Warn => Some("switchyard::bpf=warn"),
            Self::Info => Some("switchyard::bpf=info"),
            Self::Debug => Some("switchyard::bpf=debug"),
            Self::Trace => Some("switchyard::bpf=trace"),
        }
    }

    /// aya-log's numbering (`aya_log_common::Level`; 0 = off).
    pub fn aya_level(self) -> u8 {
        match self {
            Self::Off => 0,
            Self::Error => 1,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
            Self::Trace => 5,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InspectTarget {
    /// Each frontend (VIP:port/protocol) with its Service, flags and backends.
    Services,
    /// Each backend with the Services that use it.
    Backends,
    /// Socket translations (which socket was sent to which backend of which Service) and the
    /// TC path's live flows.
    Conntrack,
    /// Datapath reason counters and map fill.
    Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// What to show.
    #[arg(value_enum)]
    pub target: InspectTarget,

    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    #[command(flatten)]
    pub pins: PinArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory holding Switchyard's pinned maps and links (mounted if needed).
    #[arg(long, default_value = "/sys/fs/bpf/switchyard")]
    pub bpffs: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Read Services and EndpointSlices (and this node's Node) from this multi-document YAML
    /// (or JSON) file of real Kubernetes objects instead of an API server; re-read within a
    /// second of any change.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,

    /// Kubeconfig of the API server to follow. Without this and without --manifests, the
    /// in-cluster service account (or $KUBECONFIG) is used, as kube-proxy does.
    #[arg(long, value_name = "PATH", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,

    /// Name of this node, as in endpoints' `nodeName` (from the downward API in a DaemonSet).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Also handle Services labelled `service.kubernetes.io/service-proxy-name` with this value
    /// (Services labelled with any other value belong to another proxy and are skipped;
    /// unlabelled Services are always handled).
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,

    /// Node addresses NodePorts (and health-check node ports) open on (kube-proxy's flag):
    /// comma-separated CIDRs and keywords. A CIDR selects the node addresses inside it (with
    /// only CIDRs, a family without any CIDR listed opens on all its addresses); `all` every
    /// node address; `primary` the node's primary address of each family from its Node
    /// object; `localhost` 127.0.0.1 and ::1 (served by the socket hooks). Empty: `all`.
    /// Node addresses are those of the agent's network namespace, loopback and IPv6
    /// link-local excluded, re-read at every sync.
    #[arg(long, default_value = "", value_parser = crate::node::parse_nodeport_addresses, value_name = "CIDRS|primary|all|localhost")]
    pub nodeport_addresses: crate::node::NodePortAddresses,

    /// cgroup v2 directory the socket hooks attach to (default: the root of the cgroup2
    /// hierarchy; one is mounted privately if none is). Sockets of processes in this cgroup
    /// and below are load-balanced.
    #[arg(long, value_name = "DIR")]
    pub cgroup_path: Option<PathBuf>,

    #[command(flatten)]
    pub pins: PinArgs,

    /// Shortest interval between two syncs: bursts of changes coalesce into one sync.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub min_sync_period: Duration,

    /// Address of the Prometheus `/metrics` endpoint (empty: disabled).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = listen_address, value_name = "ADDRESS")]
    pub metrics_bind_address: ListenAddress,

    /// Address of the health endpoints `/healthz`, `/livez` and `/readyz` (empty: disabled).
    #[arg(long, default_value = "0.0.0.0:10256", value_parser = listen_address, value_name = "ADDRESS")]
    pub healthz_bind_address: ListenAddress,

    /// Log rare events of the eBPF programs (failed map writes, unexpected states) into the
    /// agent's log at up to this level; off by default. Never per packet: decisions are
    /// counted, and shown by `switchyard monitor`.
    #[arg(long, value_enum, default_value_t = BpfLogLevel::Off, value_name = "LEVEL")]
    pub bpf_log_level: BpfLogLevel,

    /// Program `spec.externalIPs` (kube-proxy's `AllowServiceExternalIPs`); `false` ignores
    /// the field entirely. Upstream deprecates it (KEP-5707).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub allow_service_external_ips: bool,

    /// Longest interval between two syncs: the maps are then re-read and any drift repaired.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub sync_period: Duration,

    #[command(flatten)]
    pub north_south: NorthSouthArgs,

    #[command(flatten)]
    pub map_sizes: MapSizeArgs,

    #[command(flatten)]
    pub maglev: MaglevArgs,
}

impl RunArgs {
    /// The capacity of every group of maps, the Maglev tables' included.
    pub fn capacities(&self) -> Capacities {
        let dsr_flows =
            self.map_sizes
                .bpf_dsr_rev_map_max
                .unwrap_or(match self.north_south.lb_mode {
                    LbMode::Snat => CapacitySetting::DsrReverse.default_capacity(),
                    LbMode::Dsr | LbMode::Hybrid => proxy_common::map_table::DSR_FLOWS_WHEN_DEFAULT,
                });
        self.map_sizes
            .capacities()
            .with(
                CapacitySetting::Maglev,
                self.maglev.bpf_maglev_tables_max * self.maglev.maglev_table_size,
            )
            .with(CapacitySetting::DsrReverse, dsr_flows)
    }
}

fn maglev_seed(text: &str) -> Result<String, String> {
    crate::maglev::parse_seed(text).map(|_| text.to_owned())
}

fn lb_algorithm(text: &str) -> Result<crate::model::LbAlgorithm, String> {
    crate::model::LbAlgorithm::parse(text)
        .ok_or_else(|| format!("{text:?} is not an algorithm (random or maglev)"))
}

/// How north-south flows choose their backend, and the Maglev tables' shape. The table size
/// and the seed must be identical on every node, or nodes pick different backends for the
/// same flow.
#[derive(Debug, Args)]
pub struct MaglevArgs {
    /// Backend choice of north-south flows (NodePorts, externalIPs, LoadBalancer IPs through
    /// the TC path) for Services without a `switchyard.dev/lb-algorithm` annotation: `random`
    /// (kube-proxy's) or `maglev` (consistent hashing: every node picks the same backend for
    /// a flow). Socket-level (east-west) choices are always random.
    #[arg(long, default_value = "random", value_parser = lb_algorithm, value_name = "random|maglev")]
    pub lb_algorithm: crate::model::LbAlgorithm,

    /// Slots of each Maglev lookup table: a prime from 251 to 131071 (each backend's share is
    /// within about 1 % of even up to a hundredth of this many backends). Same on every node.
    #[arg(long, default_value_t = proxy_common::maglev::DEFAULT_TABLE_SIZE,
          value_parser = crate::maglev::parse_table_size, value_name = "PRIME")]
    pub maglev_table_size: u32,

    /// Any text; its MurmurHash3 seeds the Maglev hashes. Must be identical on every node
    /// (put it in the DaemonSet's configuration, never generate it per node).
    #[arg(long, default_value = crate::maglev::DEFAULT_SEED, value_parser = maglev_seed, value_name = "TEXT")]
    pub maglev_hash_seed: String,

    /// Maglev tables the agent can hold (one per distinct backend set of a Maglev Service's
    /// external frontends, plus one free while a set changes). Preallocated: each takes
    /// 4 bytes per slot (64 KiB at the default table size).
    #[arg(long, default_value_t = proxy_common::map_table::DEFAULT_MAGLEV_TABLES,
          value_parser = clap::value_parser!(u32).range(2..=MAX_MAGLEV_TABLES), value_name = "TABLES")]
    pub bpf_maglev_tables_max: u32,
}

/// The most Maglev tables: 256 at the largest table size stay within the largest capacity.
const MAX_MAGLEV_TABLES: i64 = 256;

impl MaglevArgs {
    /// The seed and table size.
    pub fn settings(&self) -> crate::maglev::Settings {
        crate::maglev::Settings {
            table_size: self.maglev_table_size,
            seed: proxy_common::maglev::seed_of(&self.maglev_hash_seed),
        }
    }
}

fn capacity() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(crate::bpf::sizing::MAX_CAPACITY))
}

/// Capacities of the BPF maps (Cilium's flag names where the meaning is the same). A pinned
/// map left with another capacity is migrated at start: a new map is filled from it and the
/// programs switch over without a gap.
#[derive(Debug, Args)]
pub struct MapSizeArgs {
    /// Entries of each family's services map (one per frontend, plus one per backend of each
    /// frontend); each family's backends and reverse-NAT maps, and the service-names map,
    /// get the same capacity. Not preallocated: memory follows the entries in use.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES",
          default_value_t = CapacitySetting::LoadBalancer.default_capacity())]
    pub bpf_lb_map_max: u32,

    /// Entries of each family's TC connection-tracking map (two per north-south flow: forward
    /// and reply). Preallocated LRU: when full, the least recently used flow gives way.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES",
          default_value_t = CapacitySetting::Conntrack.default_capacity())]
    pub bpf_ct_global_max: u32,

    /// Entries of each family's map of TC flows not yet confirmed by both sides (two per flow
    /// until the client acknowledges the backend's SYN-ACK, or a UDP flow's first reply).
    /// Preallocated LRU of its own: a flood of unanswered flows evicts only its own kind,
    /// never an established flow.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES",
          default_value_t = CapacitySetting::ConntrackUnreplied.default_capacity())]
    pub bpf_ct_unreplied_max: u32,

    /// Entries of each family's socket reverse-NAT map (one per connected socket to a
    /// Service, one per Service backend of an unconnected UDP socket). Preallocated LRU.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES",
          default_value_t = CapacitySetting::SockRevNat.default_capacity())]
    pub bpf_sock_rev_map_max: u32,

    /// Entries of the session-affinity map (one per client network namespace and Service port
    /// with `sessionAffinity: ClientIP`). Preallocated LRU.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES",
          default_value_t = CapacitySetting::Affinity.default_capacity())]
    pub bpf_affinity_map_max: u32,

    /// Prefixes of each family's source-ranges trie (loadBalancerSourceRanges of every
    /// Service together). Not preallocated.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES",
          default_value_t = CapacitySetting::SourceRanges.default_capacity())]
    pub bpf_lb_source_range_map_max: u32,

    /// Entries of each family's Direct Server Return reply map: one per DSR flow whose
    /// endpoint is on this node. Preallocated LRU. Default: 16384 with `--lb-mode snat` (only
    /// Services annotated for DSR use it), 65536 with `dsr` or `hybrid`.
    #[arg(long, value_parser = capacity(), value_name = "ENTRIES")]
    pub bpf_dsr_rev_map_max: Option<u32>,
}

impl MapSizeArgs {
    /// The capacity of every group of maps.
    pub fn capacities(&self) -> Capacities {
        Capacities::default()
            .with(CapacitySetting::LoadBalancer, self.bpf_lb_map_max)
            .with(CapacitySetting::Conntrack, self.bpf_ct_global_max)
            .with(
                CapacitySetting::ConntrackUnreplied,
                self.bpf_ct_unreplied_max,
            )
            .with(CapacitySetting::SockRevNat, self.bpf_sock_rev_map_max)
            .with(CapacitySetting::Affinity, self.bpf_affinity_map_max)
            .with(
                CapacitySetting::SourceRanges,
                self.bpf_lb_source_range_map_max,
            )
    }
}

/// Settings of the north-south (TC) datapath: traffic reaching the node from outside.
#[derive(Debug, Args)]
pub struct NorthSouthArgs {
    /// The node's external interfaces, whose incoming traffic to NodePorts, externalIPs and
    /// LoadBalancer IPs is load-balanced by the TC program: names, prefixes (`eth+`) or globs
    /// (`bond*`). Default: every interface of the agent's network namespace that carries a
    /// node address, loopback excluded. The interfaces endpoints' replies arrive on (pod
    /// veths with /32 routes, bridges and overlays inside --cluster-cidr) are added either way;
    /// a named interface that does not exist yet is attached when it appears.
    #[arg(long, value_delimiter = ',', value_name = "IF[,IF...]")]
    pub interfaces: Vec<String>,

    /// The pod CIDR(s), at most one per family (kube-proxy's flag): sources inside are pods,
    /// which reach externalTrafficPolicy=Local services unmasqueraded and ClusterIPs
    /// unmasqueraded; other sources reaching a ClusterIP through the node are masqueraded.
    #[arg(long, value_delimiter = ',', value_parser = cidr, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Vec<crate::model::Cidr>,

    /// Masquerade every ClusterIP flow that reaches the node from outside, pods included
    /// (kube-proxy's flag).
    #[arg(long)]
    pub masquerade_all: bool,

    /// Source ports of masqueraded north-south flows (a client's own port is kept when it
    /// lies in the range and is free). The agent reserves the range in
    /// net.ipv4.ip_local_reserved_ports so the node's own connections never pick these
    /// ports; if it cannot, a range overlapping net.ipv4.ip_local_port_range is refused.
    #[arg(long, default_value = "46000-65535", value_parser = port_range, value_name = "MIN-MAX")]
    pub snat_port_range: crate::bpf::north_south::PortRange,

    /// How external traffic (NodePort, externalIPs, LoadBalancer IPs) with
    /// externalTrafficPolicy Cluster reaches an endpoint on another node: `snat` masquerades
    /// it to this node's address (replies come back through this node); `dsr` keeps the
    /// client's address and carries the frontend to the endpoint's node in an IP option,
    /// whose Switchyard answers the client directly (Direct Server Return); `hybrid` is DSR
    /// for TCP and SNAT for UDP. A Service's `switchyard.dev/forwarding-mode: snat|dsr`
    /// annotation overrides it. DSR needs Switchyard with DSR support on every node.
    #[arg(long, value_enum, default_value_t = LbMode::Snat)]
    pub lb_mode: LbMode,

    /// The XDP fast path on the interfaces the TC program is attached to: `off` (TC only);
    /// `native` attaches it in driver mode on each of them, or fails naming the interface and
    /// the reason; `best-effort` attaches it where the driver has native XDP and leaves the
    /// other interfaces on TC with a warning. XDP forwards the packets of flows TC has set
    /// up and passes everything else to TC (see the README). Redirecting into a veth needs
    /// its peer to run XDP or have GRO enabled.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Off)]
    pub xdp_mode: XdpModeArg,
}

/// `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeArg {
    Off,
    Native,
    BestEffort,
}

/// `--lb-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LbMode {
    Snat,
    Dsr,
    Hybrid,
}

fn cidr(text: &str) -> Result<crate::model::Cidr, String> {
    crate::model::parse_cidr_lenient(text)
        .ok_or_else(|| format!("{text:?} is not a CIDR like 10.0.0.0/8 or fd00::/48"))
}

fn port_range(text: &str) -> Result<crate::bpf::north_south::PortRange, String> {
    let invalid = || format!("{text:?} is not a port range like 61000-65535");
    let (min, max) = text.split_once('-').ok_or_else(invalid)?;
    let min: u16 = min.trim().parse().map_err(|_| invalid())?;
    let max: u16 = max.trim().parse().map_err(|_| invalid())?;
    if min == 0 || min > max {
        return Err(format!(
            "{text:?}: the range must be non-empty and start above 0"
        ));
    }
    Ok(crate::bpf::north_south::PortRange { min, max })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::bpf::north_south::PortRange;

    #[test]
    fn xdp_mode_takes_off_native_and_best_effort_and_refuses_the_rest() {
        let parse = |value: &str| {
            Cli::try_parse_from(["switchyard", "run", "--manifests", "m", "--xdp-mode", value]).map(
                |cli| match cli.command {
                    Command::Run(args) => args.north_south.xdp_mode,
                    _ => panic!("expected run"),
                },
            )
        };
        assert_eq!(parse("off").unwrap(), XdpModeArg::Off);
        assert_eq!(parse("native").unwrap(), XdpModeArg::Native);
        assert_eq!(parse("best-effort").unwrap(), XdpModeArg::BestEffort);
        assert!(parse("generic").is_err(), "skb-mode XDP is not offered");
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let cli = Cli::parse_from(["switchyard", "run", "--manifests", "m.yaml"]);
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.pins.bpffs, PathBuf::from("/sys/fs/bpf/switchyard"));
        assert_eq!(args.min_sync_period, Duration::from_millis(100));
        assert_eq!(args.sync_period, Duration::from_secs(30));
        assert_eq!(cli.log_level, "info");
        assert_eq!(cli.log_format, LogFormat::Text);
        assert_eq!(
            args.metrics_bind_address.0,
            Some("127.0.0.1:10249".parse().unwrap())
        );
        assert_eq!(
            args.healthz_bind_address.0,
            Some("0.0.0.0:10256".parse().unwrap())
        );
        let disabled = Cli::parse_from([
            "switchyard",
            "run",
            "--manifests",
            "m",
            "--metrics-bind-address",
            "",
        ]);
        let Command::Run(disabled) = disabled.command else {
            panic!("expected run")
        };
        assert_eq!(disabled.metrics_bind_address.0, None);
        assert_eq!(
            args.nodeport_addresses,
            crate::node::NodePortAddresses::default()
        );
        assert!(args.north_south.interfaces.is_empty());
        assert!(args.north_south.cluster_cidr.is_empty());
        assert!(!args.north_south.masquerade_all);
        assert_eq!(args.north_south.lb_mode, LbMode::Snat);
        assert_eq!(args.north_south.xdp_mode, XdpModeArg::Off);
        assert_eq!(
            args.north_south.snat_port_range,
            PortRange {
                min: proxy_common::DEFAULT_SNAT_PORTS.0,
                max: proxy_common::DEFAULT_SNAT_PORTS.1
            }
        );
    }

    fn run_args(extra: &[&str]) -> Result<Box<RunArgs>, clap::Error> {
        let mut command_line = vec!["switchyard", "run", "--manifests", "m"];
        command_line.extend_from_slice(extra);
        match Cli::try_parse_from(command_line)?.command {
            Command::Run(args) => Ok(args),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn map_capacities_default_to_the_table_and_parse_per_group() {
        let defaults = run_args(&[]).expect("parses");
        assert_eq!(defaults.map_sizes.capacities(), Capacities::default());
        let sized = run_args(&[
            "--bpf-lb-map-max",
            "1024",
            "--bpf-ct-global-max",
            "4096",
            "--bpf-ct-unreplied-max",
            "1024",
            "--bpf-sock-rev-map-max",
            "2048",
            "--bpf-affinity-map-max",
            "512",
            "--bpf-lb-source-range-map-max",
            "64",
        ])
        .expect("parses");
        let capacities = sized.map_sizes.capacities();
        for (setting, entries) in [
            (CapacitySetting::LoadBalancer, 1024),
            (CapacitySetting::Conntrack, 4096),
            (CapacitySetting::ConntrackUnreplied, 1024),
            (CapacitySetting::SockRevNat, 2048),
            (CapacitySetting::Affinity, 512),
            (CapacitySetting::SourceRanges, 64),
        ] {
            assert_eq!(capacities.setting(setting), entries, "{setting:?}");
        }
        for bad in ["0", "-1", "many", "33554433"] {
            assert!(
                run_args(&["--bpf-lb-map-max", bad]).is_err(),
                "--bpf-lb-map-max {bad} must be refused"
            );
        }
    }

    #[test]
    fn dsr_reply_maps_are_small_unless_dsr_is_the_nodes_mode() {
        let dsr_flows = |extra: &[&str]| {
            run_args(extra)
                .expect("parses")
                .capacities()
                .setting(CapacitySetting::DsrReverse)
        };
        assert_eq!(dsr_flows(&[]), 16_384);
        assert_eq!(dsr_flows(&["--lb-mode", "dsr"]), 65_536);
        assert_eq!(dsr_flows(&["--lb-mode", "hybrid"]), 65_536);
        assert_eq!(dsr_flows(&["--bpf-dsr-rev-map-max", "1000"]), 1000);
        assert_eq!(
            dsr_flows(&["--lb-mode", "dsr", "--bpf-dsr-rev-map-max", "1000"]),
            1000
        );
        assert!(run_args(&["--bpf-dsr-rev-map-max", "0"]).is_err());
    }

    #[test]
    fn maglev_flags_default_to_random_and_refuse_nonsense_by_name() {
        let defaults = run_args(&[]).expect("parses");
        assert_eq!(
            defaults.maglev.lb_algorithm,
            crate::model::LbAlgorithm::Random
        );
        assert_eq!(
            defaults.maglev.settings(),
            crate::maglev::Settings::default()
        );
        assert_eq!(
            defaults.capacities().setting(CapacitySetting::Maglev),
            CapacitySetting::Maglev.default_capacity()
        );
        let set = run_args(&[
            "--lb-algorithm",
            "maglev",
            "--maglev-table-size",
            "251",
            "--maglev-hash-seed",
            "cluster-7",
            "--bpf-maglev-tables-max",
            "8",
        ])
        .expect("parses");
        assert_eq!(set.maglev.lb_algorithm, crate::model::LbAlgorithm::Maglev);
        assert_eq!(
            set.maglev.settings(),
            crate::maglev::Settings {
                table_size: 251,
                seed: proxy_common::maglev::seed_of("cluster-7"),
            }
        );
        assert_eq!(set.capacities().setting(CapacitySetting::Maglev), 8 * 251);
        for (flag, bad, says) in [
            ("--lb-algorithm", "ring-hash", "not an algorithm"),
            ("--maglev-table-size", "16383", "not a prime"),
            ("--maglev-table-size", "13", "outside 251..=131071"),
            ("--maglev-hash-seed", "", "must not be empty"),
            ("--bpf-maglev-tables-max", "1", "1"),
            ("--bpf-maglev-tables-max", "257", "257"),
        ] {
            let error = run_args(&[flag, bad]).expect_err(bad).to_string();
            assert!(
                error.contains(flag) && error.contains(says),
                "{flag} {bad}: {error}"
            );
        }
    }

    #[test]
    fn messages_name_the_flags_that_exist() {
        let command = Cli::command();
        let run = command
            .get_subcommands()
            .find(|sub| sub.get_name() == "run")
            .expect("a run subcommand");
        let longs: Vec<String> = run
            .get_arguments()
            .filter_map(|arg| arg.get_long().map(|long| format!("--{long}")))
            .collect();
        for setting in CapacitySetting::ALL {
            let flag = crate::bpf::sizing::flag(setting);
            assert!(
                longs.iter().any(|long| long == flag),
                "{flag} is not a flag of run"
            );
        }
    }

    #[test]
    fn north_south_flags_parse_and_reject_nonsense() {
        let cli = Cli::parse_from([
            "switchyard",
            "run",
            "--manifests",
            "m",
            "--interfaces",
            "eth0,eth1",
            "--cluster-cidr",
            "10.0.0.0/8,fd00::/48",
            "--masquerade-all",
            "--snat-port-range",
            "40000-40100",
        ]);
        let Command::Run(args) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(args.north_south.interfaces, ["eth0", "eth1"]);
        let cidrs: Vec<String> = args
            .north_south
            .cluster_cidr
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "fd00::/48"]);
        assert!(args.north_south.masquerade_all);
        assert_eq!(
            args.north_south.snat_port_range,
            PortRange {
                min: 40_000,
                max: 40_100
            }
        );
        for bad in [
            ["--snat-port-range", "5-1"],
            ["--snat-port-range", "0-10"],
            ["--snat-port-range", "x"],
            ["--cluster-cidr", "10.0.0.0"],
        ] {
            let parsed =
                Cli::try_parse_from(["switchyard", "run", "--manifests", "m", bad[0], bad[1]]);
            assert!(parsed.is_err(), "{bad:?} must be refused");
        }
    }
}
