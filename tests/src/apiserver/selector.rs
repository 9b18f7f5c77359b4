//! Label and field selectors, as `labelSelector` / `fieldSelector` query parameters.
//!
//! Label selectors follow `k8s.io/apimachinery/pkg/labels.Parse`: comma-separated
//! requirements `key`, `!key`, `key=value`, `key==value`, `key!=value`,
//! `key in (a,b)`, `key notin (a,b)`, `key>N`, `key<N`. Field selectors follow
//! `fields.ParseSelector`: `path=value`, `path==value`, `path!=value`, where the path
//! is any dotted JSON path into the object (a real API server accepts only a few
//! paths per resource; this one is lenient). A missing field compares as `""`.

use serde_json::Value;

/// A parse error, reported to the client as a 400 `BadRequest` Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Exists,
    DoesNotExist,
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    GreaterThan(i64),
    LessThan(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(rest: &str, whole: &str) -> Result<Vec<String>, SelectorError> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            SelectorError(format!(
                "expected '(...)' set in label selector term {whole:?}"
            ))
        })?;
    let mut values = Vec::new();
    for v in inner.split(',') {
        let v = v.trim();
        if !valid_value(v) {
            return Err(SelectorError(format!(
                "invalid label value {v:?} in {whole:?}"
            )));
        }
        values.push(v.to_owned());
    }
    Ok(values)
}

fn parse_requirement(term: &str) -> Result<LabelRequirement, SelectorError> {
    let t = term.trim();
    if let Some(key) = t.strip_prefix('!') {
        let key = key.trim();
        if !valid_key(key) {
            return Err(SelectorError(format!("invalid label key {key:?}")));
        }
        return Ok(LabelRequirement {
            key: key.to_owned(),
            op: LabelOp::DoesNotExist,
        });
    }
    // Operators made of symbols, longest first.
    for (sym, kind) in [("!=", 0u8), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
        if let Some(idx) = t.find(sym) {
            let key = t[..idx].trim();
            let value = t[idx + sym.len()..].trim();
            if !valid_key(key) {
                return Err(SelectorError(format!("invalid label key {key:?} in {t:?}")));
            }
            let op = match kind {
                0 | 1 => {
                    if !valid_value(value) {
                        return Err(SelectorError(format!(
                            "invalid label value {value:?} in {t:?}"
                        )));
                    }
                    if kind == 0 {
                        LabelOp::NotEquals(value.to_owned())
                    } else {
                        LabelOp::Equals(value.to_owned())
                    }
                }
                _ => {
                    let n: i64 = value
                        .parse()
                        .map_err(|_| SelectorError(format!("expected an integer in {t:?}")))?;
                    if kind == 2 {
                        LabelOp::GreaterThan(n)
                    } else {
                        LabelOp::LessThan(n)
                    }
                }
            };
            return Ok(LabelRequirement {
                key: key.to_owned(),
                op,
            });
        }
    }
    // Word operators: `key in (...)`, `key notin (...)`, or a bare key.
    let mut words = t.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default().trim();
    let rest = words.next().unwrap_or_default().trim_start();
    if !valid_key(key) {
        return Err(SelectorError(format!("invalid label key {key:?} in {t:?}")));
    }
    if rest.is_empty() {
        return Ok(LabelRequirement {
            key: key.to_owned(),
            op: LabelOp::Exists,
        });
    }
    if let Some(set) = rest.strip_prefix("notin") {
        return Ok(LabelRequirement {
            key: key.to_owned(),
            op: LabelOp::NotIn(parse_set(set, t)?),
        });
    }
    if let Some(set) = rest.strip_prefix("in") {
        return Ok(LabelRequirement {
            key: key.to_owned(),
            op: LabelOp::In(parse_set(set, t)?),
        });
    }
    Err(SelectorError(format!(
        "unable to parse label selector term {t:?}"
    )))
}

impl LabelSelector {
    /// Parses a `labelSelector` query value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let requirements = split_top_level(s)
            .into_iter()
            .map(parse_requirement)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { requirements })
    }

    /// Whether it has no requirement (matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.requirements.iter().all(|r| {
            let v = get(&r.key);
            match &r.op {
                LabelOp::Exists => v.is_some(),
                LabelOp::DoesNotExist => v.is_none(),
                LabelOp::Equals(want) => v == Some(want.as_str()),
                LabelOp::NotEquals(want) => v != Some(want.as_str()),
                LabelOp::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => !v.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::GreaterThan(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::LessThan(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldRequirement {
    path: Vec<String>,
    value: String,
    negate: bool,
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses a `fieldSelector` query value.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut requirements = Vec::new();
        for term in s.split(',') {
            let term = term.trim();
            let (field, value, negate) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(SelectorError(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            let field = field.trim();
            if field.is_empty() || field.split('.').any(str::is_empty) {
                return Err(SelectorError(format!("invalid field path in {term:?}")));
            }
            requirements.push(FieldRequirement {
                path: field.split('.').map(str::to_owned).collect(),
                value: value.trim().to_owned(),
                negate,
            });
        }
        Ok(Self { requirements })
    }

    /// Whether it has no requirement (matches everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether the object's fields satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let mut cur = Some(object);
            for seg in &r.path {
                cur = cur.and_then(|c| c.get(seg.as_str()));
            }
            let actual = match cur {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == r.value) != r.negate
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"type": "NodePort"}})
    }

    #[test]
    fn label_selector_table() {
        let o = obj(json!({"app": "web", "tier": "front", "n": "5"}));
        let cases = [
            ("", true),
            ("app", true),
            ("!app", false),
            ("!service.kubernetes.io/service-proxy-name", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app in (web, db)", true),
            ("app in (db)", false),
            ("app notin (db)", true),
            ("missing notin (db)", true),
            ("app=web,tier=front", true),
            ("app=web,tier in (back,x)", false),
            ("n>4", true),
            ("n<4", false),
            (" app = web , !other ", true),
        ];
        for (sel, want) in cases {
            let s = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e:?}"));
            assert_eq!(s.matches(&o), want, "{sel}");
        }
    }

    #[test]
    fn label_selector_errors() {
        for bad in ["app in db", "=x", "a b c", "app in (a b)", "n>x", "!"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn field_selector_table() {
        let o = obj(json!({}));
        let cases = [
            ("metadata.name=a", true),
            ("metadata.name==a", true),
            ("metadata.name!=a", false),
            ("metadata.name=a,metadata.namespace=ns", true),
            ("metadata.namespace=other", false),
            ("spec.type=NodePort", true),
            ("spec.clusterIP=", true),
        ];
        for (sel, want) in cases {
            let s = FieldSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e:?}"));
            assert_eq!(s.matches(&o), want, "{sel}");
        }
        for bad in ["metadata.name", "=a", "metadata..name=a"] {
            assert!(FieldSelector::parse(bad).is_err(), "{bad}");
        }
    }
}
