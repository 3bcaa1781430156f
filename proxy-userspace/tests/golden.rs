//! Golden tests: Kubernetes YAML in, a readable dump of the maps out (ids normalised).
//!
//! Each `golden/NAME.yaml` goes through the whole agent pipeline (manifest parsing, model,
//! plan, writes into in-memory maps, restore from those maps) and the dump must equal
//! `golden/NAME.dump`. Set `UPDATE_GOLDEN=1` to rewrite the expected files after a deliberate
//! change, then review the diff.
use std::{fmt::Write as _, path::Path};

use proxy_userspace::{
    dump,
    model::{self, ModelConfig},
    plan::plan,
    source::manifest,
    sync,
    writer::{self, FakeMaps},
};

fn render(yaml: &str) -> String {
    let parsed = manifest::parse(yaml);
    let output = model::build(
        &parsed.snapshot,
        &ModelConfig {
            node_name: Some("node-a".into()),
            ..ModelConfig::default()
        },
    );
    let mut fake = FakeMaps::default();
    let mut mirror = sync::restore(&fake).expect("empty fake maps");
    let ops = plan(&mirror, &output.desired);
    writer::apply(&mut fake, &mut mirror, &ops).expect("fake writes succeed");
    let restored = sync::restore(&fake).expect("fake maps read back");
    assert_eq!(
        restored, mirror,
        "the maps read back equal what the agent believes it wrote"
    );
    let mut text = dump::render(&restored);
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
