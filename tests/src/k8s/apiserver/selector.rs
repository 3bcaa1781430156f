//! Label and field selectors with kube-apiserver's syntax and semantics
//! (k8s.io/apimachinery/pkg/labels and pkg/fields).

use serde_json::Value;

/// What a list or watch asked for: a namespace (from the path) and both selectors.
#[derive(Debug, Default)]
pub(super) struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(namespace) = &self.namespace
            && meta["namespace"].as_str().unwrap_or_default() != namespace
        {
            return false;
        }
        self.labels.matches(object) && self.fields.matches(object)
    }
}

#[derive(Debug)]
enum LabelOp {
    Exists,
    NotExists,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
}

#[derive(Debug)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

/// A `labelSelector`: comma-joined requirements, all of which must hold.
#[derive(Debug, Default)]
pub(super) struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(term)?);
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.requirements.iter().all(|requirement| {
            let value = labels[requirement.key.as_str()].as_str();
            // As in apimachinery, `!=` and `notin` also match objects without the label.
            match &requirement.op {
                LabelOp::Exists => value.is_some(),
                LabelOp::NotExists => value.is_none(),
                LabelOp::Equals(want) => value == Some(want.as_str()),
                LabelOp::NotEquals(want) => value != Some(want.as_str()),
                LabelOp::In(set) => value.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => value.is_none_or(|v| set.iter().all(|s| s != v)),
            }
        })
    }
}

/// Splits at commas outside parentheses (`a in (x,y),b` is two terms).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0_u32;
    let mut start = 0;
    for (index, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_requirement(term: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement {
            key: checked_key(key.trim())?,
            op: LabelOp::NotExists,
        });
    }
    if let Some((head, values)) = term.split_once('(') {
        let values = values
            .strip_suffix(')')
            .ok_or_else(|| format!("unable to parse requirement: missing ')' in {term:?}"))?;
        let mut words = head.split_whitespace();
        let (Some(key), Some(op), None) = (words.next(), words.next(), words.next()) else {
            return Err(format!("unable to parse requirement: {term:?}"));
        };
        let values = values
            .split(',')
            .map(|value| checked_value(value.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        let op = match op {
            "in" => LabelOp::In(values),
            "notin" => LabelOp::NotIn(values),
            other => {
                return Err(format!(
                    "unable to parse requirement: unknown operator {other:?}"
                ));
            }
        };
        return Ok(LabelRequirement {
            key: checked_key(key)?,
            op,
        });
    }
    let (key, op) = if let Some((key, value)) = term.split_once("!=") {
        (key, LabelOp::NotEquals(checked_value(value.trim())?))
    } else if let Some((key, value)) = term.split_once("==") {
        (key, LabelOp::Equals(checked_value(value.trim())?))
    } else if let Some((key, value)) = term.split_once('=') {
        (key, LabelOp::Equals(checked_value(value.trim())?))
    } else {
        (term, LabelOp::Exists)
    };
    Ok(LabelRequirement {
        key: checked_key(key.trim())?,
        op,
    })
}

fn checked_key(key: &str) -> Result<String, String> {
    let valid = !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if valid {
        Ok(key.to_owned())
    } else {
        Err(format!("invalid label key {key:?}"))
    }
}

fn checked_value(value: &str) -> Result<String, String> {
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!("invalid label value {value:?}"))
    }
}

#[derive(Debug)]
struct FieldRequirement {
    field: Field,
    value: String,
    equal: bool,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Name,
    Namespace,
}

/// A `fieldSelector`. Like the real server for these kinds, only `metadata.name` and
/// `metadata.namespace` are selectable; anything else is a 400.
#[derive(Debug, Default)]
pub(super) struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) = term.split_once("==") {
                (field, value, true)
            } else if let Some((field, value)) = term.split_once('=') {
                (field, value, true)
            } else {
                return Err(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                ));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field label not supported: {other}")),
            };
            requirements.push(FieldRequirement {
                field,
                value: value.trim().to_owned(),
                equal,
            });
        }
        Ok(Self { requirements })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        self.requirements.iter().all(|requirement| {
            let actual = match requirement.field {
                Field::Name => meta["name"].as_str(),
                Field::Namespace => meta["namespace"].as_str(),
            }
            .unwrap_or_default();
            (actual == requirement.value) == requirement.equal
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(labels: &Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "prod", "labels": labels}})
    }

    #[test]
    fn label_operators_match_like_apimachinery() {
        let obj = object(&json!({"app": "web", "tier": "front"}));
        let cases = [
            ("", true),
            ("app", true),
            ("!app", false),
            ("!service.kubernetes.io/headless", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("missing!=x", true),
            ("app=web,tier=back", false),
            ("app in (web, api),tier", true),
            ("app notin (web)", false),
            ("missing notin (web)", true),
            ("service.kubernetes.io/service-proxy-name", false),
        ];
        for (selector, want) in cases {
            let parsed = LabelSelector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&obj), want, "selector {selector:?}");
        }
        assert!(LabelSelector::parse("app in (web").is_err());
        assert!(LabelSelector::parse("a=b=c").is_err());
    }

    #[test]
    fn field_selectors_support_metadata_only() {
        let obj = object(&json!({}));
        assert!(
            FieldSelector::parse("metadata.name=web")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            !FieldSelector::parse("metadata.name!=web")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            FieldSelector::parse("metadata.namespace==prod,metadata.name=web")
                .unwrap()
                .matches(&obj)
        );
        assert!(FieldSelector::parse("spec.clusterIP=None").is_err());
    }
}
