//! Parsing a manifests file: multi-document YAML (or JSON) holding `v1 Service`,
//! `discovery.k8s.io/v1 EndpointSlice`, `v1 Node` (a Node named like this node gives its zone)
//! and `networking.k8s.io/v1 ServiceCIDR` objects, and `v1 List`s of them. A document that cannot
//! be used is reported (with kind, namespace/name and reason) and skipped; the rest still apply.
use std::{fmt, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use serde_yaml::Value;

use crate::model::ClusterSnapshot;

/// A document (or list item) that was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedDocument {
    /// 1-based position of the document in the file.
    pub document: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

impl fmt::Display for SkippedDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "document {}: {} {}/{}: {}",
            self.document, self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// What a manifests file yielded.
#[derive(Clone, Debug, Default)]
pub struct ParsedManifests {
    pub snapshot: ClusterSnapshot,
    pub skipped: Vec<SkippedDocument>,
}

/// Splits a YAML stream at document markers, so that a syntax error in one document cannot
/// take the others down with it.
pub fn split_documents(text: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in text.lines() {
        let marker = line.trim_end();
        if marker == "---" || marker.starts_with("--- ") || marker == "..." {
            documents.push(String::new());
            if let Some(rest) = marker.strip_prefix("--- ") {
                documents.last_mut().expect("never empty").push_str(rest);
                documents.last_mut().expect("never empty").push('\n');
            }
            continue;
        }
        let current = documents.last_mut().expect("never empty");
        current.push_str(line);
        current.push('\n');
    }
    documents
}

fn field<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(value, |value, key| value.get(key))?
        .as_str()
}

/// Identity of a document for reports, as far as it can be read.
fn identity(value: &Value) -> (String, String, String) {
    (
        field(value, &["kind"]).unwrap_or("<no kind>").to_owned(),
        field(value, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_owned(),
        field(value, &["metadata", "name"])
            .unwrap_or("<unnamed>")
            .to_owned(),
    )
}

fn add_object(value: Value, document: usize, parsed: &mut ParsedManifests) {
    let (kind, namespace, name) = identity(&value);
    let skip = |reason: String| SkippedDocument {
        document,
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        reason,
    };
    let api_version = field(&value, &["apiVersion"])
        .unwrap_or_default()
        .to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => match serde_yaml::from_value::<Service>(value) {
            Ok(service) => parsed.snapshot.services.push(Arc::new(service)),
            Err(error) => parsed.skipped.push(skip(format!("not a valid v1 Service: {error}"))),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match serde_yaml::from_value::<EndpointSlice>(value) {
            Ok(slice) => parsed.snapshot.endpoint_slices.push(Arc::new(slice)),
            Err(error) => parsed.skipped.push(skip(format!("not a valid discovery.k8s.io/v1 EndpointSlice: {error}"))),
        },
        ("v1", "Node") => match serde_yaml::from_value::<Node>(value) {
            Ok(node) => parsed.snapshot.nodes.push(Arc::new(node)),
            Err(error) => parsed.skipped.push(skip(format!("not a valid v1 Node: {error}"))),
        },
        ("networking.k8s.io/v1", "ServiceCIDR") => match serde_yaml::from_value::<ServiceCIDR>(value) {
            Ok(object) => parsed.snapshot.service_cidrs.push(Arc::new(object)),
            Err(error) => parsed.skipped.push(skip(format!("not a valid networking.k8s.io/v1 ServiceCIDR: {error}"))),
        },
        ("v1", "List") => match value.get("items").and_then(Value::as_sequence) {
            Some(items) => {
                for item in items.clone() {
                    add_object(item, document, parsed);
                }
            }
            None => parsed.skipped.push(skip("a List without items".into())),
        },
        _ => parsed.skipped.push(skip(format!(
            "unsupported object (apiVersion {api_version:?}, kind {kind:?}); only v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node and networking.k8s.io/v1 ServiceCIDR are read"
        ))),
    }
}

/// Parses one document of a manifests file (`number`: its 1-based position, for reports).
pub fn parse_document(document: &str, number: usize) -> ParsedManifests {
    let mut parsed = ParsedManifests::default();
    let unknown = |reason: String| SkippedDocument {
        document: number,
        kind: "<unknown>".into(),
        namespace: "<unknown>".into(),
        name: "<unknown>".into(),
        reason,
    };
    match serde_yaml::from_str::<Value>(document) {
        Ok(Value::Null) => {}
        Ok(value @ Value::Mapping(_)) => add_object(value, number, &mut parsed),
        Ok(_) => parsed
            .skipped
            .push(unknown("the document is not an object".into())),
        Err(error) => parsed
            .skipped
            .push(unknown(format!("invalid YAML/JSON: {error}"))),
    }
    parsed
}

/// Parses the text of a manifests file.
pub fn parse(text: &str) -> ParsedManifests {
    let mut parsed = ParsedManifests::default();
    for (index, document) in split_documents(text).iter().enumerate() {
        let one = parse_document(document, index + 1);
        parsed.snapshot.services.extend(one.snapshot.services);
        parsed
            .snapshot
            .endpoint_slices
            .extend(one.snapshot.endpoint_slices);
        parsed.snapshot.nodes.extend(one.snapshot.nodes);
        parsed
            .snapshot
            .service_cidrs
            .extend(one.snapshot.service_cidrs);
        parsed.skipped.extend(one.skipped);
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n";

    #[test]
    fn reads_services_and_slices_from_multi_document_yaml() {
        let text = format!(
            "{GOOD_SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{{addresses: [10.0.0.1]}}]\nports: [{{name: http, port: 8080}}]\n"
        );
        let parsed = parse(&text);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        assert_eq!(parsed.snapshot.services.len(), 1);
        assert_eq!(parsed.snapshot.endpoint_slices.len(), 1);
    }

    #[test]
    fn json_and_lists_are_accepted() {
        let text = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.1","ports":[{"port":53,"protocol":"UDP"}]}}]}"#;
        let parsed = parse(text);
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        assert_eq!(parsed.snapshot.services.len(), 1);
    }

    #[test]
    fn a_broken_document_is_reported_by_kind_and_name_and_the_others_survive() {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: shop}}\nspec:\n  ports: [{{port: not-a-number}}]\n---\n{GOOD_SERVICE}---\nkind: [unclosed\n"
        );
        let parsed = parse(&text);
        assert_eq!(parsed.snapshot.services.len(), 1);
        assert_eq!(parsed.skipped.len(), 2, "{:?}", parsed.skipped);
        let bad = &parsed.skipped[0];
        assert_eq!(
            (
                bad.document,
                bad.kind.as_str(),
                bad.namespace.as_str(),
                bad.name.as_str()
            ),
            (1, "Service", "shop", "bad")
        );
        assert!(
            bad.reason.contains("not a valid v1 Service"),
            "{}",
            bad.reason
        );
        assert_eq!(parsed.skipped[1].document, 3);
        assert!(parsed.skipped[1].reason.contains("invalid YAML"));
    }

    #[test]
    fn unsupported_kinds_are_reported() {
        let parsed = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        assert_eq!(parsed.skipped.len(), 1);
        assert!(parsed.skipped[0].reason.contains("unsupported object"));
    }
}
