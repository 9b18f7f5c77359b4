//! The OpenAPI v2 document kubectl reads for client-side validation and for the
//! patch metadata of `kubectl apply`: the schemas of Service and EndpointSlice (and
//! what they refer to), and one PATCH path per resource.
//!
//! kubectl asks for it as protobuf (`application/com.github.proto-openapi.spec.v2@v1.0+protobuf`,
//! the messages of gnostic's `openapi_v2` package) and nothing else, so the document is
//! kept as swagger JSON (served as is to JSON clients) and encoded to those messages by
//! [`to_protobuf`]. No `/openapi/v3` is served: kubectl >= 1.27 tries it first, gets
//! 404 and falls back to v2, as against a server from before v3.
//!
//! The PATCH paths do not list the `fieldValidation` parameter, so kubectl does not
//! leave validation to the server (which stores untyped JSON and could not honour
//! `fieldValidation=Strict`) but validates on the client against these schemas, as it
//! does against a server without server-side field validation. The merging lists carry
//! the real patch strategy and merge key (`kubectl apply` computes its strategic merge
//! patches from them), the same the server merges by (`patch.rs`).

use serde_json::{json, Map, Value};

use super::resource::ResourceKind;

/// The media type the protobuf document is served as: what kubectl asks for, with
/// the `@` (which Go's media type parser, and so client-go, refuses) spelled `.`.
pub const PROTOBUF_MEDIA_TYPE: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

const META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1";
const CORE: &str = "io.k8s.api.core.v1";
const DISCOVERY: &str = "io.k8s.api.discovery.v1";

fn string() -> Value {
    json!({"type": "string"})
}

fn int32() -> Value {
    json!({"type": "integer", "format": "int32"})
}

fn int64() -> Value {
    json!({"type": "integer", "format": "int64"})
}

fn boolean() -> Value {
    json!({"type": "boolean"})
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/definitions/{name}")})
}

fn array(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

/// A list that strategic merge patches merge: by `merge_key`, or as a set.
fn merging(mut list: Value, merge_key: Option<&str>) -> Value {
    list["x-kubernetes-patch-strategy"] = json!("merge");
    match merge_key {
        Some(key) => {
            list["x-kubernetes-patch-merge-key"] = json!(key);
            list["x-kubernetes-list-type"] = json!("map");
            list["x-kubernetes-list-map-keys"] = json!([key]);
        }
        None => list["x-kubernetes-list-type"] = json!("set"),
    }
    list
}

fn string_map() -> Value {
    json!({"type": "object", "additionalProperties": string()})
}

fn object(properties: &[(&str, Value)], required: &[&str]) -> Value {
    let props: Map<String, Value> = properties
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let mut schema = json!({"type": "object", "properties": props});
    if !required.is_empty() {
        schema["required"] = json!(required);
    }
    schema
}

/// A top-level resource: apiVersion, kind, metadata plus `fields`, tagged with its GVK.
fn resource(kind: ResourceKind, fields: &[(&str, Value)], required: &[&str]) -> Value {
    let mut properties = vec![
        ("apiVersion", string()),
        ("kind", string()),
        ("metadata", reference(&format!("{META}.ObjectMeta"))),
    ];
    properties.extend(fields.iter().cloned());
    let mut schema = object(&properties, required);
    schema["x-kubernetes-group-version-kind"] = json!([gvk(kind)]);
    schema
}

fn gvk(kind: ResourceKind) -> Value {
    let version = kind.api_version().rsplit('/').next().unwrap_or_default();
    json!({"group": kind.group(), "kind": kind.kind(), "version": version})
}

/// The schema definitions, named as the real server names them.
fn definitions() -> Map<String, Value> {
    let time = reference(&format!("{META}.Time"));
    let defs = [
        (
            format!("{META}.Time"),
            json!({"type": "string", "format": "date-time"}),
        ),
        (
            "io.k8s.apimachinery.pkg.util.intstr.IntOrString".to_owned(),
            json!({"type": "string", "format": "int-or-string"}),
        ),
        (format!("{META}.FieldsV1"), json!({"type": "object"})),
        (
            format!("{META}.ManagedFieldsEntry"),
            object(
                &[
                    ("apiVersion", string()),
                    ("fieldsType", string()),
                    ("fieldsV1", reference(&format!("{META}.FieldsV1"))),
                    ("manager", string()),
                    ("operation", string()),
                    ("subresource", string()),
                    ("time", time.clone()),
                ],
                &[],
            ),
        ),
        (
            format!("{META}.OwnerReference"),
            object(
                &[
                    ("apiVersion", string()),
                    ("blockOwnerDeletion", boolean()),
                    ("controller", boolean()),
                    ("kind", string()),
                    ("name", string()),
                    ("uid", string()),
                ],
                &["apiVersion", "kind", "name", "uid"],
            ),
        ),
        (
            format!("{META}.ObjectMeta"),
            object(
                &[
                    ("annotations", string_map()),
                    ("creationTimestamp", time.clone()),
                    ("deletionGracePeriodSeconds", int64()),
                    ("deletionTimestamp", time.clone()),
                    ("finalizers", merging(array(string()), None)),
                    ("generateName", string()),
                    ("generation", int64()),
                    ("labels", string_map()),
                    (
                        "managedFields",
                        array(reference(&format!("{META}.ManagedFieldsEntry"))),
                    ),
                    ("name", string()),
                    ("namespace", string()),
                    (
                        "ownerReferences",
                        merging(
                            array(reference(&format!("{META}.OwnerReference"))),
                            Some("uid"),
                        ),
                    ),
                    ("resourceVersion", string()),
                    ("selfLink", string()),
                    ("uid", string()),
                ],
                &[],
            ),
        ),
        (
            format!("{META}.Condition"),
            object(
                &[
                    ("lastTransitionTime", time),
                    ("message", string()),
                    ("observedGeneration", int64()),
                    ("reason", string()),
                    ("status", string()),
                    ("type", string()),
                ],
                &["type", "status", "lastTransitionTime", "reason", "message"],
            ),
        ),
        (
            format!("{CORE}.Service"),
            resource(
                ResourceKind::Service,
                &[
                    ("spec", reference(&format!("{CORE}.ServiceSpec"))),
                    ("status", reference(&format!("{CORE}.ServiceStatus"))),
                ],
                &[],
            ),
        ),
        (
            format!("{CORE}.ServiceSpec"),
            object(
                &[
                    ("allocateLoadBalancerNodePorts", boolean()),
                    ("clusterIP", string()),
                    ("clusterIPs", array(string())),
                    ("externalIPs", array(string())),
                    ("externalName", string()),
                    ("externalTrafficPolicy", string()),
                    ("healthCheckNodePort", int32()),
                    ("internalTrafficPolicy", string()),
                    ("ipFamilies", array(string())),
                    ("ipFamilyPolicy", string()),
                    ("loadBalancerClass", string()),
                    ("loadBalancerIP", string()),
                    ("loadBalancerSourceRanges", array(string())),
                    (
                        "ports",
                        merging(
                            array(reference(&format!("{CORE}.ServicePort"))),
                            Some("port"),
                        ),
                    ),
                    ("publishNotReadyAddresses", boolean()),
                    ("selector", string_map()),
                    ("sessionAffinity", string()),
                    (
                        "sessionAffinityConfig",
                        reference(&format!("{CORE}.SessionAffinityConfig")),
                    ),
                    ("trafficDistribution", string()),
                    ("type", string()),
                ],
                &[],
            ),
        ),
        (
            format!("{CORE}.ServicePort"),
            object(
                &[
                    ("appProtocol", string()),
                    ("name", string()),
                    ("nodePort", int32()),
                    ("port", int32()),
                    ("protocol", string()),
                    (
                        "targetPort",
                        reference("io.k8s.apimachinery.pkg.util.intstr.IntOrString"),
                    ),
                ],
                &["port"],
            ),
        ),
        (
            format!("{CORE}.SessionAffinityConfig"),
            object(
                &[("clientIP", reference(&format!("{CORE}.ClientIPConfig")))],
                &[],
            ),
        ),
        (
            format!("{CORE}.ClientIPConfig"),
            object(&[("timeoutSeconds", int32())], &[]),
        ),
        (
            format!("{CORE}.ServiceStatus"),
            object(
                &[
                    (
                        "conditions",
                        merging(array(reference(&format!("{META}.Condition"))), Some("type")),
                    ),
                    (
                        "loadBalancer",
                        reference(&format!("{CORE}.LoadBalancerStatus")),
                    ),
                ],
                &[],
            ),
        ),
        (
            format!("{CORE}.LoadBalancerStatus"),
            object(
                &[(
                    "ingress",
                    array(reference(&format!("{CORE}.LoadBalancerIngress"))),
                )],
                &[],
            ),
        ),
        (
            format!("{CORE}.LoadBalancerIngress"),
            object(
                &[
                    ("hostname", string()),
                    ("ip", string()),
                    ("ipMode", string()),
                    ("ports", array(reference(&format!("{CORE}.PortStatus")))),
                ],
                &[],
            ),
        ),
        (
            format!("{CORE}.PortStatus"),
            object(
                &[
                    ("error", string()),
                    ("port", int32()),
                    ("protocol", string()),
                ],
                &["port", "protocol"],
            ),
        ),
        (
            format!("{CORE}.ObjectReference"),
            object(
                &[
                    ("apiVersion", string()),
                    ("fieldPath", string()),
                    ("kind", string()),
                    ("name", string()),
                    ("namespace", string()),
                    ("resourceVersion", string()),
                    ("uid", string()),
                ],
                &[],
            ),
        ),
        (
            format!("{DISCOVERY}.EndpointSlice"),
            resource(
                ResourceKind::EndpointSlice,
                &[
                    ("addressType", string()),
                    (
                        "endpoints",
                        array(reference(&format!("{DISCOVERY}.Endpoint"))),
                    ),
                    (
                        "ports",
                        array(reference(&format!("{DISCOVERY}.EndpointPort"))),
                    ),
                ],
                &["addressType", "endpoints"],
            ),
        ),
        (
            format!("{DISCOVERY}.Endpoint"),
            object(
                &[
                    ("addresses", array(string())),
                    (
                        "conditions",
                        reference(&format!("{DISCOVERY}.EndpointConditions")),
                    ),
                    ("deprecatedTopology", string_map()),
                    ("hints", reference(&format!("{DISCOVERY}.EndpointHints"))),
                    ("hostname", string()),
                    ("nodeName", string()),
                    ("targetRef", reference(&format!("{CORE}.ObjectReference"))),
                    ("zone", string()),
                ],
                &["addresses"],
            ),
        ),
        (
            format!("{DISCOVERY}.EndpointConditions"),
            object(
                &[
                    ("ready", boolean()),
                    ("serving", boolean()),
                    ("terminating", boolean()),
                ],
                &[],
            ),
        ),
        (
            format!("{DISCOVERY}.EndpointHints"),
            object(
                &[
                    (
                        "forNodes",
                        array(reference(&format!("{DISCOVERY}.ForNode"))),
                    ),
                    (
                        "forZones",
                        array(reference(&format!("{DISCOVERY}.ForZone"))),
                    ),
                ],
                &[],
            ),
        ),
        (
            format!("{DISCOVERY}.ForNode"),
            object(&[("name", string())], &["name"]),
        ),
        (
            format!("{DISCOVERY}.ForZone"),
            object(&[("name", string())], &["name"]),
        ),
        (
            format!("{DISCOVERY}.EndpointPort"),
            object(
                &[
                    ("appProtocol", string()),
                    ("name", string()),
                    ("port", int32()),
                    ("protocol", string()),
                ],
                &[],
            ),
        ),
    ];
    defs.into_iter().collect()
}

/// One PATCH path per namespaced resource, tagged with its GVK: kubectl looks there
/// for the `fieldValidation` parameter before it validates.
fn paths() -> Map<String, Value> {
    [ResourceKind::Service, ResourceKind::EndpointSlice]
        .into_iter()
        .map(|kind| {
            let prefix = if kind.group().is_empty() {
                format!("/api/{}", kind.api_version())
            } else {
                format!("/apis/{}", kind.api_version())
            };
            let path = format!(
                "{prefix}/namespaces/{{namespace}}/{}/{{name}}",
                kind.plural()
            );
            let op = json!({
                "operationId": format!("patchNamespaced{}", kind.kind()),
                "consumes": [
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                    "application/apply-patch+yaml",
                ],
                "produces": ["application/json"],
                "parameters": [
                    {"name": "fieldManager", "in": "query", "type": "string", "uniqueItems": true},
                    {"name": "force", "in": "query", "type": "boolean", "uniqueItems": true},
                ],
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk(kind),
            });
            (path, json!({"patch": op}))
        })
        .collect()
}

/// The whole document as swagger 2.0 JSON.
pub fn document(kube_minor: &str) -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": format!("v1.{kube_minor}.0-kpr-test")},
        "paths": paths(),
        "definitions": definitions(),
    })
}

/// A protobuf writer for the few wire types the document needs.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire_type));
    }

    fn bytes(&mut self, field: u32, data: &[u8]) {
        self.key(field, 2);
        self.varint(data.len() as u64);
        self.0.extend_from_slice(data);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }

    fn boolean(&mut self, field: u32, b: bool) {
        self.key(field, 0);
        self.varint(u64::from(b));
    }

    fn message(&mut self, field: u32, build: impl FnOnce(&mut Proto)) {
        let mut inner = Proto::default();
        build(&mut inner);
        self.bytes(field, &inner.0);
    }

    /// `NamedAny{name, value: Any{yaml}}` for each `x-` key of `obj`.
    fn vendor_extensions(&mut self, field: u32, obj: &Map<String, Value>) {
        for (name, value) in obj.iter().filter(|(k, _)| k.starts_with("x-")) {
            let yaml = serde_yaml::to_string(value).unwrap_or_default();
            self.message(field, |named| {
                named.string(1, name);
                named.message(2, |any| any.string(2, &yaml));
            });
        }
    }

    fn strings(&mut self, field: u32, list: Option<&Value>) {
        for s in list.and_then(Value::as_array).into_iter().flatten() {
            if let Some(s) = s.as_str() {
                self.string(field, s);
            }
        }
    }
}

/// gnostic `Schema`.
fn schema(w: &mut Proto, s: &Value) {
    let Some(obj) = s.as_object() else { return };
    for (field, key) in [(1, "$ref"), (2, "format"), (3, "title"), (4, "description")] {
        if let Some(v) = obj.get(key).and_then(Value::as_str) {
            w.string(field, v);
        }
    }
    w.strings(19, obj.get("required"));
    match obj.get("additionalProperties") {
        Some(Value::Bool(b)) => w.message(21, |item| item.boolean(2, *b)),
        Some(inner @ Value::Object(_)) => {
            w.message(21, |item| item.message(1, |s| schema(s, inner)))
        }
        _ => {}
    }
    if let Some(ty) = obj.get("type").and_then(Value::as_str) {
        w.message(22, |item| item.string(1, ty));
    }
    if let Some(items) = obj.get("items") {
        w.message(23, |item| item.message(1, |s| schema(s, items)));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        w.message(25, |p| {
            for (name, value) in props {
                p.message(1, |named| {
                    named.string(1, name);
                    named.message(2, |s| schema(s, value));
                });
            }
        });
    }
    w.vendor_extensions(31, obj);
}

/// gnostic `Operation`.
fn operation(w: &mut Proto, op: &Map<String, Value>) {
    if let Some(id) = op.get("operationId").and_then(Value::as_str) {
        w.string(5, id);
    }
    w.strings(6, op.get("produces"));
    w.strings(7, op.get("consumes"));
    for param in op
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // ParametersItem.parameter > Parameter.non_body_parameter >
        // NonBodyParameter.query_parameter_sub_schema
        w.message(8, |item| {
            item.message(1, |p| {
                p.message(2, |nb| {
                    nb.message(3, |q| {
                        if let Some(v) = param.get("in").and_then(Value::as_str) {
                            q.string(2, v);
                        }
                        if let Some(v) = param.get("name").and_then(Value::as_str) {
                            q.string(4, v);
                        }
                        if let Some(v) = param.get("type").and_then(Value::as_str) {
                            q.string(6, v);
                        }
                        if param.get("uniqueItems") == Some(&Value::Bool(true)) {
                            q.boolean(20, true);
                        }
                    });
                });
            });
        });
    }
    w.vendor_extensions(13, op);
}

/// [`document`] as gnostic's `openapi.v2.Document` protobuf message.
pub fn to_protobuf(doc: &Value) -> Vec<u8> {
    let mut w = Proto::default();
    if let Some(v) = doc.get("swagger").and_then(Value::as_str) {
        w.string(1, v);
    }
    if let Some(info) = doc.get("info") {
        w.message(2, |i| {
            for (field, key) in [(1, "title"), (2, "version")] {
                if let Some(v) = info.get(key).and_then(Value::as_str) {
                    i.string(field, v);
                }
            }
        });
    }
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        w.message(8, |p| {
            for (name, item) in paths {
                p.message(2, |named| {
                    named.string(1, name);
                    named.message(2, |path_item| {
                        // PathItem fields: get 2, put 3, post 4, delete 5, patch 8.
                        for (field, verb) in [
                            (2, "get"),
                            (3, "put"),
                            (4, "post"),
                            (5, "delete"),
                            (8, "patch"),
                        ] {
                            if let Some(op) = item.get(verb).and_then(Value::as_object) {
                                path_item.message(field, |o| operation(o, op));
                            }
                        }
                    });
                });
            }
        });
    }
    if let Some(defs) = doc.get("definitions").and_then(Value::as_object) {
        w.message(9, |d| {
            for (name, value) in defs {
                d.message(1, |named| {
                    named.string(1, name);
                    named.message(2, |s| schema(s, value));
                });
            }
        });
    }
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_nesting() {
        let mut w = Proto::default();
        w.varint(300);
        assert_eq!(w.0, [0xac, 0x02]);
        let mut w = Proto::default();
        w.message(2, |m| m.string(1, "ab"));
        // field 2 length 4: (field 1, length 2, "ab")
        assert_eq!(w.0, [0x12, 4, 0x0a, 2, b'a', b'b']);
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document("34");
        let defs = doc["definitions"].as_object().unwrap();
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                        out.push(r.trim_start_matches("#/definitions/").to_owned());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        for r in all {
            assert!(defs.contains_key(&r), "dangling $ref {r}");
        }
    }
}
