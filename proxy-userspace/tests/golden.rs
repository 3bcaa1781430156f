//! Golden tests: Kubernetes YAML in, a readable dump of the maps out (ids normalised).
//!
//! Each `golden/NAME.yaml` goes through the whole agent pipeline (manifest parsing, the
//! sources' complete lists, the incremental model, plan and writes into in-memory maps, restore
//! from those maps) and the dump must equal
//! `golden/NAME.dump`, followed by the health checks the model asked for. Set
//! `UPDATE_GOLDEN=1` to rewrite the expected files after a deliberate change, then review the
//! diff.
//!
//! The harness runs as node `node-a`. A YAML file may give the node's addresses and the
//! `--nodeport-addresses` flag in header comments (through the agent's own selection code):
//!
//! ```yaml
//! # golden: node-addresses=192.168.0.2,fd00:192::2
//! # golden: nodeport-addresses=192.168.0.0/24
//! ```
use std::{fmt::Write as _, net::IpAddr, path::Path};

use proxy_userspace::{
    maps::{FakeMaps, Shared},
    model::{self, ModelConfig},
    node::{self as node_addresses, NodePortAddresses},
    reconcile::{self, Reconciler},
    render::dump,
    source::manifest,
};

/// The value of a `# golden: NAME=VALUE` header line.
fn header<'a>(yaml: &'a str, name: &str) -> Option<&'a str> {
    yaml.lines()
        .filter_map(|line| line.strip_prefix("# golden: "))
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
}

fn config(yaml: &str, snapshot: &model::ClusterSnapshot) -> ModelConfig {
    let node_addresses: Vec<IpAddr> = header(yaml, "node-addresses")
        .map(|list| {
            list.split(',')
                .map(|ip| ip.trim().parse().expect("node address"))
                .collect()
        })
        .unwrap_or_default();
    let nodeport = header(yaml, "nodeport-addresses")
        .map_or(NodePortAddresses::default(), |flag| {
            node_addresses::parse_nodeport_addresses(flag).expect("--nodeport-addresses")
        });
    let primary = node_addresses::primary_addresses(model::cluster_of(snapshot).node("node-a"));
    ModelConfig {
        node_name: Some("node-a".into()),
        nodeport_addresses: nodeport.select(&node_addresses, &primary),
        node_addresses,
        ..ModelConfig::default()
    }
}

fn render(yaml: &str) -> String {
    let parsed = manifest::parse(yaml);
    let config = config(yaml, &parsed.snapshot);
    let output = model::build(&parsed.snapshot, &config);
    let maps = Shared::new(FakeMaps::default());
    let mut agent = Reconciler::new(Box::new(maps.clone())).expect("empty fake maps");
    let report = agent.sync_snapshot(&parsed.snapshot, &config);
    assert!(agent.not_programmed().is_empty(), "{report:?}");
    let restored = reconcile::restore(&*maps.lock()).expect("fake maps read back");
    assert_eq!(
        &restored,
        agent.mirror(),
        "the maps read back equal what the agent believes it wrote"
    );
    let mut text = dump::render(&restored);
    text.push_str(&dump::render_guard(agent.guard()));
    for (port, check) in &output.desired.health_checks {
        let _ = writeln!(
            text,
            "health_check {port}: {}/{} local_endpoints={}",
            check.namespace, check.name, check.local_endpoints
        );
    }
    for skipped in &parsed.skipped {
        let _ = writeln!(text, "skipped {skipped}");
    }
    for problem in &output.problems {
        let _ = writeln!(text, "problem {problem}");
    }
    text
}

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let yaml = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).expect("golden input");
    let actual = render(&yaml);
    let expected_path = dir.join(format!("{name}.dump"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &actual).expect("write golden output");
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
        panic!(
            "missing {}; run with UPDATE_GOLDEN=1",
            expected_path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "golden {name} differs (UPDATE_GOLDEN=1 rewrites it)"
    );
}

#[test]
fn multi_port_service_with_named_ports_and_several_slices() {
    check("multi-port");
}

#[test]
fn traffic_policies_conditions_topology_and_affinity() {
    check("policies");
}

#[test]
fn dual_stack_service() {
    check("dual-stack");
}

#[test]
fn services_the_dataplane_ignores_or_refuses() {
    check("ignored-and-empty");
}

#[test]
fn bad_documents_and_bad_fields_are_reported_and_skipped() {
    check("bad-input");
}

#[test]
fn nodeports_on_the_selected_node_addresses_of_both_families() {
    check("nodeport");
}

#[test]
fn external_ips() {
    check("external-ips");
}

#[test]
fn load_balancer_ips_local_traffic_policy_and_health_checks() {
    check("load-balancer");
}

#[test]
fn load_balancer_source_ranges() {
    check("source-ranges");
}

#[test]
fn the_shipped_demo_manifests() {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-services.yaml"),
    )
    .expect("examples/demo-services.yaml");
    let text = render(&yaml);
    assert!(
        !text.contains("skipped") && !text.contains("problem"),
        "the demo file is clean:\n{text}"
    );
    assert!(text.contains("frontend [fd00:96::10]:80/TCP"), "{text}");
}

#[test]
fn service_cidr_guard_localhost_nodeports_and_host_external_ips() {
    check("service-cidr");
}
