//! Table responses (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`), what
//! `kubectl get` asks for: the columns and cells the real server's printers give.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{resource::ResourceKind, store::meta_str};

/// What a Table row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    /// The default: a `PartialObjectMetadata`.
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "None" => Some(Self::None),
            "Metadata" | "" => Some(Self::Metadata),
            "Object" => Some(Self::Object),
            _ => None,
        }
    }
}

/// The Table version the client accepts first (`v1` or `v1beta1`), or `None` when its
/// first acceptable media type is plain JSON (or it sent no `Accept`).
pub fn negotiate(accept: &str) -> Option<&'static str> {
    for media in accept.split(',') {
        let mut parts = media.split(';').map(str::trim);
        let base = parts.next().unwrap_or_default();
        if base != "application/json" && base != "*/*" {
            continue;
        }
        let (mut as_, mut v, mut g) = ("", "", "");
        for p in parts {
            match p.split_once('=') {
                Some(("as", x)) => as_ = x,
                Some(("v", x)) => v = x,
                Some(("g", x)) => g = x,
                _ => {}
            }
        }
        if as_.is_empty() {
            return None;
        }
        if as_ == "Table" && g == "meta.k8s.io" {
            match v {
                "v1" => return Some("v1"),
                "v1beta1" => return Some("v1beta1"),
                _ => {}
            }
        }
    }
    None
}

fn column(name: &str, ty: &str, format: &str, priority: u8, description: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

fn columns(kind: ResourceKind) -> Vec<Value> {
    let name = column(
        "Name",
        "string",
        "name",
        0,
        "Name must be unique within a namespace.",
    );
    let age = column(
        "Age",
        "string",
        "",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match kind {
        ResourceKind::Service => vec![
            name,
            column("Type", "string", "", 0, "The type of the service."),
            column(
                "Cluster-IP",
                "string",
                "",
                0,
                "The IP address of the service.",
            ),
            column(
                "External-IP",
                "string",
                "",
                0,
                "The external IP address of the service.",
            ),
            column(
                "Port(s)",
                "string",
                "",
                0,
                "The ports exposed by the service.",
            ),
            age,
            column(
                "Selector",
                "string",
                "",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        ResourceKind::EndpointSlice => vec![
            name,
            column(
                "AddressType",
                "string",
                "",
                0,
                "The type of address carried by this EndpointSlice.",
            ),
            column("Ports", "string", "", 0, "The ports of the EndpointSlice."),
            column(
                "Endpoints",
                "string",
                "",
                0,
                "The addresses of the endpoints in this EndpointSlice.",
            ),
            age,
        ],
        ResourceKind::Node => vec![
            name,
            column("Status", "string", "", 0, "The status of the node."),
            column("Roles", "string", "", 0, "The roles of the node."),
            age,
            column(
                "Version",
                "string",
                "",
                0,
                "Kubelet version reported by the node.",
            ),
        ],
    }
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn or_none(list: &[&str]) -> String {
    if list.is_empty() {
        "<none>".to_owned()
    } else {
        list.join(",")
    }
}

fn service_cells(obj: &Value) -> Vec<Value> {
    let spec = &obj["spec"];
    let ty = spec["type"].as_str().unwrap_or("ClusterIP");
    let cluster_ip = match spec["clusterIP"].as_str() {
        None | Some("") => "<none>",
        Some(ip) => ip,
    };
    let external_ips = strs(spec.get("externalIPs"));
    let external = match ty {
        "ExternalName" => spec["externalName"].as_str().unwrap_or_default().to_owned(),
        "LoadBalancer" => {
            let mut all: Vec<&str> = obj
                .pointer("/status/loadBalancer/ingress")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().or_else(|| i["hostname"].as_str()))
                .collect();
            all.extend(&external_ips);
            if all.is_empty() {
                "<pending>".to_owned()
            } else {
                all.join(",")
            }
        }
        _ => or_none(&external_ips),
    };
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let port = p["port"].as_i64().unwrap_or_default();
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64().filter(|n| *n != 0) {
                Some(node_port) => format!("{port}:{node_port}/{proto}"),
                None => format!("{port}/{proto}"),
            }
        })
        .collect();
    let ports = if ports.is_empty() {
        "<none>".to_owned()
    } else {
        ports.join(",")
    };
    let selector: Vec<String> = spec["selector"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let selector = if selector.is_empty() {
        "<none>".to_owned()
    } else {
        selector.join(",")
    };
    vec![
        json!(ty),
        json!(cluster_ip),
        json!(external),
        json!(ports),
        json!(age(obj)),
        json!(selector),
    ]
}

/// How many ports or addresses an EndpointSlice cell shows before "+ N more...".
const SHOWN: usize = 3;

/// `a,b,c + N more...`, or `<unset>` for none.
fn first_few(list: &[String]) -> String {
    match list.len() {
        0 => "<unset>".to_owned(),
        n if n <= SHOWN => list.join(","),
        n => format!("{} + {} more...", list[..SHOWN].join(","), n - SHOWN),
    }
}

fn endpoint_slice_cells(obj: &Value) -> Vec<Value> {
    let ports: Vec<String> = obj["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| match p["port"].as_i64() {
            Some(port) => port.to_string(),
            None => "<unset>".to_owned(),
        })
        .collect();
    let addresses: Vec<String> = obj["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| strs(e.get("addresses")))
        .map(str::to_owned)
        .collect();
    vec![
        json!(obj["addressType"].as_str().unwrap_or_default()),
        json!(first_few(&ports)),
        json!(first_few(&addresses)),
        json!(age(obj)),
    ]
}

fn node_cells(obj: &Value) -> Vec<Value> {
    let ready = obj
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .map(|c| c["status"] == "True");
    let status = match ready {
        Some(true) => "Ready",
        Some(false) => "NotReady",
        None => "Unknown",
    };
    let mut roles: Vec<&str> = obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    roles.sort_unstable();
    vec![
        json!(status),
        json!(or_none(&roles)),
        json!(age(obj)),
        json!(obj
            .pointer("/status/nodeInfo/kubeletVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()),
    ]
}

fn row(kind: ResourceKind, obj: &Value, include: IncludeObject, version: &str) -> Value {
    let mut cells = vec![json!(meta_str(obj, "name").unwrap_or_default())];
    cells.extend(match kind {
        ResourceKind::Service => service_cells(obj),
        ResourceKind::EndpointSlice => endpoint_slice_cells(obj),
        ResourceKind::Node => node_cells(obj),
    });
    let mut row = json!({"cells": cells});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            row["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": format!("meta.k8s.io/{version}"),
                "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
            });
        }
        IncludeObject::Object => row["object"] = obj.clone(),
    }
    row
}

/// A `Table` of `objects` (in order) at list resourceVersion `rv`.
pub fn table(
    kind: ResourceKind,
    objects: &[&Value],
    rv: Option<u64>,
    include: IncludeObject,
    version: &str,
) -> Value {
    let mut metadata = json!({});
    if let Some(rv) = rv {
        metadata["resourceVersion"] = json!(rv.to_string());
    }
    json!({
        "kind": "Table",
        "apiVersion": format!("meta.k8s.io/{version}"),
        "metadata": metadata,
        "columnDefinitions": columns(kind),
        "rows": objects.iter().map(|o| row(kind, o, include, version)).collect::<Vec<_>>(),
    })
}

/// The AGE cell: the time since `creationTimestamp`, or `<unknown>` without one.
fn age(obj: &Value) -> String {
    let Some(created) = meta_str(obj, "creationTimestamp").and_then(parse_rfc3339) else {
        return "<unknown>".to_owned();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    human_duration(i64::try_from(now).unwrap_or(i64::MAX) - created)
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2025-01-02T03:04:05Z`, a
/// fraction or a numeric offset allowed).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if s.get(4..5)? != "-" || s.get(7..8)? != "-" || !matches!(s.get(10..11)?, "T" | "t") {
        return None;
    }
    let mut rest = s.get(19..)?;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(0..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            if rest.len() != 6 {
                return None;
            }
            sign * (h * 3600 + m * 60)
        }
    };
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// A duration as kubectl's AGE column words it (apimachinery's `HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_owned();
    }
    let s = seconds.max(0);
    let (minutes, hours) = (s / 60, s / 3600);
    if s < 60 * 2 {
        format!("{s}s")
    } else if minutes < 10 {
        match s % 60 {
            0 => format!("{minutes}m"),
            rem => format!("{minutes}m{rem}s"),
        }
    } else if minutes < 60 * 3 {
        format!("{minutes}m")
    } else if hours < 8 {
        match minutes % 60 {
            0 => format!("{hours}h"),
            rem => format!("{hours}h{rem}m"),
        }
    } else if hours < 48 {
        format!("{hours}h")
    } else if hours < 24 * 8 {
        match hours % 24 {
            0 => format!("{}d", hours / 24),
            rem => format!("{}d{rem}h", hours / 24),
        }
    } else if hours < 24 * 365 * 2 {
        format!("{}d", hours / 24)
    } else if hours < 24 * 365 * 8 {
        match (hours / 24) % 365 {
            0 => format!("{}y", hours / 24 / 365),
            rem => format!("{}y{rem}d", hours / 24 / 365),
        }
    } else {
        format!("{}y", hours / 24 / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(negotiate(kubectl), Some("v1"));
        assert_eq!(
            negotiate("application/json;as=Table;v=v1beta1;g=meta.k8s.io, application/json"),
            Some("v1beta1")
        );
        assert_eq!(negotiate("application/json"), None);
        assert_eq!(negotiate(""), None);
        // A view the server does not offer is passed over for the next.
        assert_eq!(
            negotiate("application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1;g=meta.k8s.io"),
            Some("v1")
        );
    }

    #[test]
    fn durations_and_timestamps() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (600, "10m"),
            (179 * 60, "179m"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (47 * 3600, "47h"),
            (3 * 86_400 + 3600, "3d1h"),
            (100 * 86_400, "100d"),
            (3 * 365 * 86_400 + 2 * 86_400, "3y2d"),
            (9 * 365 * 86_400, "9y"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2000-03-01T01:00:00.25+01:00"),
            Some(951_868_800)
        );
        assert_eq!(parse_rfc3339("2000-03-01 00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2000-13-01T00:00:00Z"), None);
    }
}
