//! The deployment in `deploy/`: every manifest is a Kubernetes object whose every field
//! k8s-openapi knows (a typo such as `hostNetwrok` would be silently dropped by the API
//! server), the DaemonSet has the shape README's "Replacing kube-proxy" promises, and its args
//! are flags `switchyard run --help` lists. As root, against the test API server: the
//! ClusterRole grants exactly the (verb, resource) pairs the real agent requests, and the
//! agent works with exactly the DaemonSet's capabilities and args.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, PodSpec, Probe, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sched::{CloneFlags, setns};
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_tests::agent::switchyard_bin;
use switchyard_tests::client::testkit::{ClientProto, ClientRequest};
use switchyard_tests::env::bpffs::PrivateBpffs;
use switchyard_tests::env::cgroup::TestCgroup;
use switchyard_tests::env::netns::Topology;
use switchyard_tests::env::process::{ChildGuard, wait_until};
use switchyard_tests::env::tempdir::TempDir;
use switchyard_tests::k8s::apiserver::{ApiServer, Kind};
use switchyard_tests::k8s::objects;
use switchyard_tests::world::harness::{BACKEND_PORT, Harness, backend_name};
use switchyard_tests::{require_root, testkit};

const IMAGE: &str = "ghcr.io/switchyard-dev/switchyard:0.1.0";
const AGENT_CONTAINER: &str = "switchyard";
const HEALTHZ_PORT: i32 = 10256;
/// kube-apiserver admits the `system-node-critical` class in this namespace only by default.
const NAMESPACE: &str = "kube-system";
const NODE: &str = "node-a";

/// What the agent container adds, and why; the DaemonSet's comments and README say the same.
/// A capability added to the manifest must be added here, with its reason.
const AGENT_CAPABILITIES: [(&str, &str); 5] = [
    ("BPF", "bpf(): maps, programs, pins"),
    (
        "PERFMON",
        "the verifier's pointer rules for perfmon_capable() loaders",
    ),
    (
        "NET_ADMIN",
        "cgroup sock_addr programs; sock_diag SOCK_DESTROY",
    ),
    ("SYS_ADMIN", "setns() into pods' network namespaces"),
    ("SYS_PTRACE", "/proc/PID/ns/net of other users' processes"),
];
/// The init container's: open /proc/1/ns/*, setns() into the host's mount namespace, mount.
const INIT_CAPABILITIES: [&str; 3] = ["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"];

/// Bit numbers of include/uapi/linux/capability.h, for reading /proc/PID/status.
const CAPABILITY_BITS: [(&str, u32); 41] = [
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

// ---------------------------------------------------------------------------------------------
// Loading deploy/ into typed objects.

/// Every object of `deploy/`, typed.
#[derive(Debug, Default)]
struct Deploy {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package is inside the workspace")
        .join("deploy")
}

fn is<K: Resource>(document: &Value) -> bool {
    document["apiVersion"] == K::API_VERSION && document["kind"] == K::KIND
}

/// Where `written` and its typed round trip `read_back` differ, one line per path.
fn differences(path: &str, written: &Value, read_back: &Value, found: &mut Vec<String>) {
    match (written, read_back) {
        (Value::Object(written), Value::Object(read_back)) => {
            for (key, value) in written {
                let here = format!("{path}.{key}");
                match read_back.get(key) {
                    Some(back) => differences(&here, value, back, found),
                    None => found.push(format!("{here}: not a field of this type (a typo?)")),
                }
            }
            for key in read_back.keys().filter(|key| !written.contains_key(*key)) {
                found.push(format!("{path}.{key}: added when read back"));
            }
        }
        (Value::Array(written), Value::Array(read_back)) if written.len() == read_back.len() => {
            for (index, (value, back)) in written.iter().zip(read_back).enumerate() {
                differences(&format!("{path}[{index}]"), value, back, found);
            }
        }
        _ if written != read_back => {
            found.push(format!("{path}: {written} reads back as {read_back}"));
        }
        _ => {}
    }
}

/// The document as `K`, and what a round trip through `K` loses or changes: k8s-openapi
/// ignores unknown fields, so comparing the round trip with the document is what rejects them.
fn round_trip<K: Serialize + DeserializeOwned>(
    document: &Value,
) -> Result<(K, Vec<String>), String> {
    let object: K = serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&object).map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    differences("", document, &back, &mut found);
    Ok((object, found))
}

fn typed<K: Resource + Serialize + DeserializeOwned>(origin: &str, document: &Value) -> K {
    let (object, found) = round_trip::<K>(document)
        .unwrap_or_else(|e| panic!("{origin}: not a valid {}: {e}", K::KIND));
    assert!(
        found.is_empty(),
        "{origin}: {} fields that k8s-openapi does not read as written:\n  {}",
        K::KIND,
        found.join("\n  ")
    );
    object
}

impl Deploy {
    fn add(&mut self, origin: &str, document: &Value) {
        if is::<DaemonSet>(document) {
            self.daemon_sets.push(typed(origin, document));
        } else if is::<ServiceAccount>(document) {
            self.service_accounts.push(typed(origin, document));
        } else if is::<ClusterRole>(document) {
            self.cluster_roles.push(typed(origin, document));
        } else if is::<ClusterRoleBinding>(document) {
            self.bindings.push(typed(origin, document));
        } else if is::<ConfigMap>(document) {
            self.config_maps.push(typed(origin, document));
        } else {
            panic!(
                "{origin}: {} {} is not a kind this test checks (DaemonSet, ServiceAccount, \
                 ClusterRole, ClusterRoleBinding, ConfigMap): teach it the new kind",
                document["apiVersion"], document["kind"]
            );
        }
    }

    /// The one DaemonSet and its agent container.
    fn agent(&self) -> (&DaemonSet, &PodSpec, &Container) {
        let [daemon_set] = self.daemon_sets.as_slice() else {
            panic!("deploy/ must hold exactly one DaemonSet");
        };
        let pod = pod_spec(daemon_set);
        let agent = pod
            .containers
            .iter()
            .find(|c| c.name == AGENT_CONTAINER)
            .unwrap_or_else(|| panic!("the DaemonSet has no container {AGENT_CONTAINER:?}"));
        (daemon_set, pod, agent)
    }
}

fn load() -> Deploy {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("listing deploy/")
        .map(|entry| entry.expect("reading deploy/").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "deploy/ is empty");
    let mut deploy = Deploy::default();
    for path in files {
        // Anything else there would be a manifest this test never looks at.
        assert!(
            matches!(
                path.extension().and_then(OsStr::to_str),
                Some("yaml" | "yml")
            ),
            "{}: deploy/ holds only Kubernetes manifests (*.yaml)",
            path.display()
        );
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let origin = format!("{} (document {})", path.display(), index + 1);
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin}: not a YAML document JSON can hold: {e}"));
            // An empty document, e.g. after a trailing `---`.
            if !value.is_null() {
                deploy.add(&origin, &value);
            }
        }
    }
    deploy
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod template spec")
}

fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or_default()
}

fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

fn capabilities(container: &Container) -> (BTreeSet<&str>, BTreeSet<&str>) {
    let capabilities = container
        .security_context
        .as_ref()
        .and_then(|sc| sc.capabilities.as_ref())
        .unwrap_or_else(|| panic!("container {} sets no capabilities", container.name));
    (
        names(capabilities.add.as_deref()),
        names(capabilities.drop.as_deref()),
    )
}

fn names(list: Option<&[String]>) -> BTreeSet<&str> {
    list.into_iter().flatten().map(String::as_str).collect()
}

fn privileged(container: &Container) -> bool {
    container
        .security_context
        .as_ref()
        .and_then(|sc| sc.privileged)
        .unwrap_or(false)
}

/// `--name=value` and `--name value` alike, in order. `switchyard run` has no positional
/// argument, so a word that is not a flag is the previous flag's value.
fn flags(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut flags: Vec<(String, Option<String>)> = Vec::new();
    for arg in args {
        if let Some(flag) = arg.strip_prefix("--") {
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            flags.push((name.to_owned(), value));
        } else {
            match flags.last_mut() {
                Some((_, value @ None)) => *value = Some(arg.clone()),
                _ => panic!("{arg:?} is neither a flag nor a flag's value"),
            }
        }
    }
    flags
}

/// The agent's args after the `run` subcommand.
fn run_flags(agent: &Container) -> Vec<(String, Option<String>)> {
    let args = agent.args.as_deref().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "the agent's args start with the `run` subcommand"
    );
    flags(&args[1..])
}

fn flag_value<'a>(flags: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .rev()
        .find(|(flag, _)| flag == name)
        .and_then(|(_, value)| value.as_deref())
}

/// Long flags listed by `switchyard run --help`.
fn run_help_flags() -> BTreeSet<String> {
    let output = Command::new(switchyard_bin())
        .args(["run", "--help"])
        .output()
        .expect("running switchyard run --help");
    assert!(output.status.success(), "switchyard run --help failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.trim_start().starts_with('-'))
        .flat_map(|line| {
            line.split_whitespace()
                .take_while(|word| word.starts_with('-'))
                .filter_map(|word| word.strip_prefix("--"))
                .map(|word| {
                    word.chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn http_get(probe: Option<&Probe>) -> (&str, i32) {
    let action = probe
        .and_then(|probe| probe.http_get.as_ref())
        .expect("an HTTP probe");
    let IntOrString::Int(port) = action.port else {
        panic!("probe port {:?} is not a number", action.port);
    };
    (action.path.as_deref().unwrap_or_default(), port)
}

// ---------------------------------------------------------------------------------------------
// The manifests themselves.

#[test]
fn every_manifest_parses_into_its_kubernetes_type_without_unknown_fields() {
    let deploy = load();
    assert_eq!(deploy.daemon_sets.len(), 1, "one DaemonSet");
    assert_eq!(deploy.service_accounts.len(), 1, "one ServiceAccount");
    assert_eq!(deploy.cluster_roles.len(), 1, "one ClusterRole");
    assert_eq!(deploy.bindings.len(), 1, "one ClusterRoleBinding");
}

#[test]
fn the_round_trip_catches_a_misspelt_field() {
    let deploy = load();
    let mut document = serde_json::to_value(&deploy.daemon_sets[0]).expect("serializes");
    let (_, clean) = round_trip::<DaemonSet>(&document).expect("the DaemonSet parses");
    assert!(clean.is_empty(), "{clean:?}");
    document["spec"]["template"]["spec"]["hostNetwrok"] = Value::Bool(true);
    let (_, found) = round_trip::<DaemonSet>(&document).expect("still parses: typos are ignored");
    assert_eq!(
        found,
        [".spec.template.spec.hostNetwrok: not a field of this type (a typo?)"]
    );
}

#[test]
fn the_daemon_set_runs_on_every_linux_node_in_the_host_network() {
    let deploy = load();
    let (daemon_set, pod, _) = deploy.agent();
    assert_eq!(namespace(&daemon_set.metadata), NAMESPACE);
    let spec = daemon_set.spec.as_ref().expect("a DaemonSet spec");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.as_ref().and_then(|labels| labels.get(key)),
            Some(value),
            "the selector matches the pod template's labels"
        );
    }
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    // The agent walks /proc/*/ns/net for every pod's network namespace.
    assert_eq!(pod.host_pid, Some(true), "hostPID");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerates_everything = pod.tolerations.iter().flatten().any(|t| {
        t.operator.as_deref() == Some("Exists")
            && t.key.as_deref().unwrap_or_default().is_empty()
            && t.effect.as_deref().unwrap_or_default().is_empty()
    });
    assert!(
        tolerates_everything,
        "a toleration with operator Exists and no key or effect (every taint, control plane included)"
    );
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os")),
        Some(&"linux".to_owned()),
        "Linux nodes only"
    );
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert_eq!(
            container.image.as_deref(),
            Some(IMAGE),
            "{}",
            container.name
        );
    }
}

#[test]
fn the_agent_gets_its_node_name_probes_and_api_server_address() {
    let deploy = load();
    let (daemon_set, _, agent) = deploy.agent();
    let env = agent.env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|var| var.name == "NODE_NAME")
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref());
    assert_eq!(
        node_name.map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );
    assert_eq!(
        http_get(agent.readiness_probe.as_ref()),
        ("/readyz", HEALTHZ_PORT)
    );
    assert_eq!(
        http_get(agent.liveness_probe.as_ref()),
        ("/livez", HEALTHZ_PORT)
    );
    let flags = run_flags(agent);
    if let Some(address) = flag_value(&flags, "healthz-bind-address") {
        let address: SocketAddr = address.parse().expect("an address:port");
        assert_eq!(
            i32::from(address.port()),
            HEALTHZ_PORT,
            "probes and listener agree"
        );
        // The kubelet probes the pod IP, which with hostNetwork is the node's address.
        assert!(
            !address.ip().is_loopback(),
            "the probes must reach {address}"
        );
    }
    // Every ConfigMap value the agent reads exists (the kubelet would not start it otherwise).
    for var in env {
        let Some(key_ref) = var
            .value_from
            .as_ref()
            .and_then(|f| f.config_map_key_ref.as_ref())
        else {
            continue;
        };
        let config_map = deploy
            .config_maps
            .iter()
            .find(|cm| {
                name(&cm.metadata) == key_ref.name
                    && namespace(&cm.metadata) == namespace(&daemon_set.metadata)
            })
            .unwrap_or_else(|| panic!("{}: no ConfigMap {} in deploy/", var.name, key_ref.name));
        assert!(
            config_map
                .data
                .as_ref()
                .is_some_and(|data| data.contains_key(&key_ref.key)),
            "{}: ConfigMap {} has no key {}",
            var.name,
            key_ref.name,
            key_ref.key
        );
    }
}

#[test]
fn the_containers_are_not_privileged_and_add_only_the_documented_capabilities() {
    let deploy = load();
    let (_, pod, agent) = deploy.agent();
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert!(!privileged(container), "{} is privileged", container.name);
        let (_, drop) = capabilities(container);
        assert_eq!(
            drop,
            BTreeSet::from(["ALL"]),
            "{} drops ALL first",
            container.name
        );
        // The API server only admits Bidirectional propagation in privileged containers.
        for mount in container.volume_mounts.iter().flatten() {
            assert_ne!(
                mount.mount_propagation.as_deref(),
                Some("Bidirectional"),
                "{}: {}",
                container.name,
                mount.mount_path
            );
        }
    }
    let (add, _) = capabilities(agent);
    let documented: BTreeSet<&str> = AGENT_CAPABILITIES.iter().map(|(cap, _)| *cap).collect();
    assert_eq!(add, documented, "the agent's capabilities");
    let init: Vec<&Container> = pod.init_containers.iter().flatten().collect();
    let [init] = init.as_slice() else {
        panic!("one init container (mounting bpffs and cgroup2 in the host)");
    };
    assert_eq!(capabilities(init).0, BTreeSet::from(INIT_CAPABILITIES));
}

#[test]
fn bpffs_and_cgroup2_are_host_mounts_the_init_container_prepares() {
    let deploy = load();
    let (_, pod, agent) = deploy.agent();
    let flags = run_flags(agent);
    let host_mount = |path: &str| {
        let mount = agent
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| Path::new(path).starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{path} is not on a volume of the agent"));
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name));
        let host = volume.host_path.as_ref().map(|h| h.path.clone());
        assert_eq!(
            host.as_deref(),
            Some(mount.mount_path.as_str()),
            "{path}: the host's own path, mounted at the same place"
        );
        mount.mount_path.clone()
    };
    let cgroup = flag_value(&flags, "cgroup-path").expect("--cgroup-path: the host's cgroup2");
    assert_eq!(
        host_mount(cgroup),
        cgroup,
        "--cgroup-path is the mount itself"
    );
    let bpffs = flag_value(&flags, "bpffs").unwrap_or("/sys/fs/bpf/switchyard");
    assert_eq!(host_mount(bpffs), "/sys/fs/bpf");
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .next()
        .expect("an init container");
    let script = init
        .command
        .iter()
        .flatten()
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    for mount in [
        "nsenter --target 1 --mount -- mount -t bpf bpf /sys/fs/bpf".to_owned(),
        format!("nsenter --target 1 --mount --cgroup -- mount -t cgroup2 none {cgroup}"),
    ] {
        assert!(script.contains(&mount), "the init container runs `{mount}`");
    }
}

#[test]
fn the_agent_args_are_flags_that_switchyard_run_lists() {
    let deploy = load();
    let (_, _, agent) = deploy.agent();
    let known = run_help_flags();
    assert!(known.contains("bpffs"), "parsed `run --help`: {known:?}");
    assert_eq!(
        agent.command.as_deref(),
        Some(["switchyard".to_owned()].as_slice())
    );
    let flags = run_flags(agent);
    let unknown: Vec<&str> = flags
        .iter()
        .map(|(flag, _)| flag.as_str())
        .filter(|flag| !known.contains(*flag))
        .collect();
    assert!(
        unknown.is_empty(),
        "flags `switchyard run --help` does not list: {unknown:?} (it lists {known:?})"
    );
    for source in ["kubeconfig", "manifests"] {
        assert!(
            flag_value(&flags, source).is_none(),
            "--{source}: the agent uses its service account in the cluster"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC.

/// (API group, resource, verb).
type Access = (String, String, String);

/// The pairs `role` grants. Wildcards, resource names and non-resource URLs are refused so the
/// grant is an explicit list.
fn granted(role: &ClusterRole) -> BTreeSet<Access> {
    assert!(role.aggregation_rule.is_none(), "no aggregated role");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "{rule:?}: resourceNames");
        assert!(
            rule.non_resource_urls.is_none(),
            "{rule:?}: nonResourceURLs"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for word in [group, resource, verb] {
                        assert_ne!(word, "*", "{rule:?}: no wildcards");
                    }
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

/// Paths every authenticated client may read through the default `system:discovery` and
/// `system:public-info-viewer` bindings: not the agent's ClusterRole's business.
fn is_discovery(path: &str) -> bool {
    [
        "/api", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi",
    ]
    .iter()
    .any(|prefix| path == *prefix || path.starts_with(&format!("{prefix}/")))
}

/// What one line of the test API server's request log (`METHOD /path?query`) asks for, as
/// RBAC sees it; `None` for discovery paths.
fn access(line: &str) -> Option<Access> {
    let (method, target) = line.split_once(' ').expect("METHOD TARGET");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ if is_discovery(path) => return None,
        _ => panic!("{line}: neither a resource nor a discovery path"),
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [plural] => ((*plural).to_owned(), false),
        [plural, _name] => ((*plural).to_owned(), true),
        [plural, _name, subresource] => (format!("{plural}/{subresource}"), true),
        _ => panic!("{line}: unexpected resource path"),
    };
    let watch = form_urlencoded::parse(query.as_bytes())
        .any(|(key, value)| key == "watch" && matches!(&*value, "true" | "1"));
    let verb = match (method, named, watch) {
        ("GET", true, _) => "get",
        ("GET", false, true) => "watch",
        ("GET", false, false) => "list",
        ("POST", ..) => "create",
        ("PUT", ..) => "update",
        ("PATCH", ..) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        _ => panic!("{line}: unexpected method"),
    };
    Some((group.to_owned(), resource, verb.to_owned()))
}

fn access_of(group: &str, resource: &str, verb: &str) -> Access {
    (group.to_owned(), resource.to_owned(), verb.to_owned())
}

#[test]
fn request_log_lines_read_as_rbac_verbs() {
    let cases = [
        ("GET /api/v1/services?limit=500", ("", "services", "list")),
        (
            "GET /apis/discovery.k8s.io/v1/endpointslices?allowWatchBookmarks=true&watch=true",
            ("discovery.k8s.io", "endpointslices", "watch"),
        ),
        (
            "GET /api/v1/nodes?fieldSelector=metadata.name%3Dnode-a&watch=1",
            ("", "nodes", "watch"),
        ),
        (
            "GET /api/v1/namespaces/shop/services/web",
            ("", "services", "get"),
        ),
        ("GET /api/v1/nodes/node-a", ("", "nodes", "get")),
        (
            "POST /api/v1/namespaces/shop/events",
            ("", "events", "create"),
        ),
    ];
    for (line, (group, resource, verb)) in cases {
        assert_eq!(
            access(line),
            Some(access_of(group, resource, verb)),
            "{line}"
        );
    }
    assert_eq!(access("GET /version"), None);
    assert_eq!(access("GET /apis/discovery.k8s.io/v1"), None);
}

#[test]
fn the_role_is_read_only_on_what_the_agent_follows_and_bound_to_its_service_account() {
    let deploy = load();
    let (daemon_set, pod, _) = deploy.agent();
    let account = &deploy.service_accounts[0];
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(name(&account.metadata)),
        "the DaemonSet runs as the ServiceAccount"
    );
    assert_eq!(
        namespace(&account.metadata),
        namespace(&daemon_set.metadata)
    );
    let role = &deploy.cluster_roles[0];
    let binding = &deploy.bindings[0];
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, name(&role.metadata));
    let bound = binding.subjects.iter().flatten().any(|subject| {
        subject.kind == "ServiceAccount"
            && subject.name == name(&account.metadata)
            && subject.namespace.as_deref() == Some(namespace(&account.metadata))
    });
    assert!(bound, "the binding names the ServiceAccount");
    let granted = granted(role);
    let resources: BTreeSet<(String, String)> = granted
        .iter()
        .map(|(group, resource, _)| (group.clone(), resource.clone()))
        .collect();
    // The kinds the agent follows are the ones the test API server serves.
    let followed: BTreeSet<(String, String)> = Kind::ALL
        .iter()
        .map(|kind| {
            let group = kind.api_version().rsplit_once('/').map_or("", |(g, _)| g);
            (group.to_owned(), kind.plural().to_owned())
        })
        .collect();
    assert_eq!(resources, followed);
    for (_, resource, verb) in &granted {
        assert!(
            ["get", "list", "watch"].contains(&verb.as_str()),
            "{verb} {resource}: the agent only reads"
        );
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 40, 10)), 80)
}

/// A Service at [`vip`] served by `backends`, and this node.
fn apply_objects(api: &ApiServer, backends: &[IpAddr]) {
    let vip = vip();
    api.apply(&objects::cluster_ip_service("shop", "web", vip));
    api.apply(&objects::endpoint_slice("shop", "web", backends));
    api.apply(&Node {
        metadata: ObjectMeta {
            name: Some(NODE.to_owned()),
            labels: Some(BTreeMap::from([(
                "topology.kubernetes.io/zone".to_owned(),
                "zone-a".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..Node::default()
    });
}

fn wait_for_watches(api: &ApiServer) {
    for kind in Kind::ALL {
        assert!(
            api.wait_for_watches(kind, 1, Duration::from_secs(10)),
            "the agent watches {kind:?}"
        );
    }
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_requests() {
    require_root!();
    let role = granted(&load().cluster_roles[0]);
    let mut harness = Harness::new(testkit!(), 1);
    let api =
        ApiServer::start_in_netns(harness.topology().node_namespace()).expect("test API server");
    apply_objects(&api, &harness.backend_ipv4s());
    let kubeconfig_dir = TempDir::new().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(kubeconfig_dir.path());
    harness.start_agent_with_kubeconfig(&kubeconfig, &["--node-name", NODE]);
    harness.wait_until_translated(ClientProto::Tcp, vip());
    wait_for_watches(&api);
    // Recovery too: watches resumed after a cut, then relists after 410 Gone.
    api.drop_watches();
    wait_for_watches(&api);
    let lists: Vec<u64> = Kind::ALL.iter().map(|k| api.list_requests(*k)).collect();
    api.set_outage(true);
    apply_objects(&api, &harness.backend_ipv4s());
    api.compact();
    api.set_outage(false);
    let relisted = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        Kind::ALL
            .iter()
            .zip(&lists)
            .all(|(kind, before)| api.list_requests(*kind) > *before)
            .then_some(())
    });
    assert!(relisted.is_some(), "the agent relists after 410 Gone");
    wait_for_watches(&api);
    let log = api.request_log();
    let requested: BTreeSet<Access> = log.iter().filter_map(|line| access(line)).collect();
    assert_eq!(
        requested,
        role,
        "the ClusterRole must grant exactly what the agent requests; requests:\n{}",
        log.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Capabilities.

fn capability_mask<'a>(names: impl IntoIterator<Item = &'a str>) -> u64 {
    names.into_iter().fold(0, |mask, name| {
        let (_, bit) = CAPABILITY_BITS
            .iter()
            .find(|(known, _)| *known == name)
            .unwrap_or_else(|| panic!("unknown capability {name}"));
        mask | (1 << bit)
    })
}

/// CapPrm, CapEff and CapBnd of `pid`, once it runs the agent (after `ip` and `setpriv`).
fn agent_capabilities(pid: u32) -> Option<[u64; 3]> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim() != "switchyard" {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    };
    Some([field("CapPrm:")?, field("CapEff:")?, field("CapBnd:")?])
}

/// The status code of `GET path` on `address` from inside network namespace `netns`.
fn http_status(netns: &str, address: SocketAddr, path: &str) -> Option<u16> {
    let namespace = format!("/run/netns/{netns}");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    // setns() changes only the calling thread, so use a thread of its own.
    std::thread::spawn(move || {
        setns(File::open(namespace).ok()?, CloneFlags::CLONE_NEWNET).ok()?;
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut head = Vec::new();
        let mut buffer = [0; 512];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let read = stream.read(&mut buffer).ok().filter(|n| *n > 0)?;
            head.extend_from_slice(&buffer[..read]);
        }
        let head = String::from_utf8_lossy(&head);
        head.split_whitespace().nth(1)?.parse().ok()
    })
    .join()
    .ok()
    .flatten()
}

/// The agent started by [`the_agent_works_with_only_the_daemon_set_capabilities_and_args`];
/// dropping it stops it and, when the test fails, prints its log.
struct RestrictedAgent {
    child: ChildGuard,
    log: PathBuf,
}

impl Drop for RestrictedAgent {
    fn drop(&mut self) {
        let _ = self
            .child
            .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(3));
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- agent log -----\n{log}\n----- end of agent log -----");
        }
    }
}

#[test]
fn the_agent_works_with_only_the_daemon_set_capabilities_and_args() {
    require_root!();
    let deploy = load();
    let (_, _, container) = deploy.agent();
    let (capabilities, _) = capabilities(container);
    let testkit = testkit!();
    // Declared so that they drop in a safe order: agent, API server, cgroup, bpffs, namespaces.
    let topology = Topology::new(1).expect("test topology");
    let backend = topology.backends()[0].clone();
    let bpffs = PrivateBpffs::new().expect("private bpffs");
    let cgroup = TestCgroup::new().expect("test cgroup");
    let _server = testkit
        .serve(&backend.namespace, &backend_name(0), &[BACKEND_PORT])
        .expect("backend server");
    let api = ApiServer::start_in_netns(topology.node_namespace()).expect("test API server");
    apply_objects(&api, &[IpAddr::V4(backend.ipv4)]);
    let dir = TempDir::new().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(dir.path());

    // The DaemonSet's args, with this test's cgroup and bpffs, and the test API server in
    // place of the in-cluster service account.
    let mut args = vec!["run".to_owned()];
    for (flag, value) in run_flags(container) {
        let value = match flag.as_str() {
            "cgroup-path" => Some(cgroup.path().display().to_string()),
            "bpffs" => Some(bpffs.agent_dir().display().to_string()),
            _ => value,
        };
        args.push(value.map_or_else(|| format!("--{flag}"), |v| format!("--{flag}={v}")));
    }
    args.push(format!("--kubeconfig={}", kubeconfig.display()));
    // As a container runtime does for root: the bounding set is what the agent gets.
    let bounding = capabilities
        .iter()
        .map(|cap| format!("+{}", cap.to_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let log = dir.path().join("agent.log");
    let log_file = File::create(&log).expect("agent log");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", topology.node_namespace(), "setpriv"])
        .args(["--inh-caps=-all", "--ambient-caps=-all"])
        .arg(format!("--bounding-set=-all,{bounding}"))
        .arg("--")
        .arg(switchyard_bin())
        .args(&args)
        .env("NODE_NAME", NODE)
        .env_remove("SWITCHYARD_LOG")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file);
    let mut agent = RestrictedAgent {
        child: ChildGuard::spawn(&mut command, "restricted agent").expect("starting the agent"),
        log,
    };
    eprintln!("agent: {args:?} with {capabilities:?}");

    let expected = capability_mask(capabilities.iter().copied());
    let pid = agent.child.id();
    let seen = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
        agent_capabilities(pid)
    })
    .expect("the agent's capabilities");
    assert_eq!(
        seen, [expected; 3],
        "CapPrm, CapEff, CapBnd: exactly the DaemonSet's"
    );

    let request = ClientRequest::new(ClientProto::Tcp, vip()).timeout(Duration::from_millis(300));
    let translated = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        assert!(
            agent.child.try_wait().expect("agent status").is_none(),
            "the agent exited"
        );
        let attempts = testkit
            .client(topology.node_namespace(), cgroup.path(), &request)
            .expect("client");
        attempts
            .iter()
            .any(|a| a.ok && a.backend.as_deref() == Some(backend_name(0).as_str()))
            .then_some(())
    });
    assert!(
        translated.is_some(),
        "the service is served through the hooks"
    );

    // The probes, as the kubelet sends them: to the node's address, not loopback.
    for probe in [&container.readiness_probe, &container.liveness_probe] {
        let (path, port) = http_get(probe.as_ref());
        let port = u16::try_from(port).expect("a port");
        let address = SocketAddr::new(IpAddr::V4(backend.node_ipv4), port);
        let status = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            http_status(topology.node_namespace(), address, path).filter(|s| *s == 200)
        });
        assert_eq!(status, Some(200), "GET {path} on {address}");
    }
    assert!(agent.child.try_wait().expect("agent status").is_none());
}
