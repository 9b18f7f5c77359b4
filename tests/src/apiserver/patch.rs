//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic
//! merge patch.
//!
//! Server-side apply is approximated by the merge patch in the caller (lists are
//! replaced, no field ownership).

use serde_json::{Map, Value};

/// How a list field merges in a strategic merge patch (the `patchStrategy` and
/// `patchMergeKey` of the Go types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStrategy {
    /// Replaced whole (atomic lists, and every list the table does not name).
    Replace,
    /// Objects merged by the value of this key.
    MergeByKey(&'static str),
    /// A set of primitive values (`finalizers`).
    MergePrimitives,
}

/// The merging lists of the served kinds, by path of field names (`*` for any map
/// key); every other list is atomic, as are EndpointSlice's `endpoints` and `ports`.
const MERGING_LISTS: &[(&[&str], ListStrategy)] = &[
    (&["metadata", "finalizers"], ListStrategy::MergePrimitives),
    (
        &["metadata", "ownerReferences"],
        ListStrategy::MergeByKey("uid"),
    ),
    (&["spec", "ports"], ListStrategy::MergeByKey("port")),
    (&["spec", "taints"], ListStrategy::MergeByKey("key")),
    (&["spec", "podCIDRs"], ListStrategy::MergePrimitives),
    (&["status", "conditions"], ListStrategy::MergeByKey("type")),
    (&["status", "addresses"], ListStrategy::MergeByKey("type")),
];

fn list_strategy(path: &[String]) -> ListStrategy {
    MERGING_LISTS
        .iter()
        .find(|(p, _)| {
            p.len() == path.len() && p.iter().zip(path).all(|(a, b)| *a == "*" || a == b)
        })
        .map_or(ListStrategy::Replace, |(_, s)| *s)
}

/// Applies a strategic merge patch: a merge patch whose lists of the table above merge
/// by key, with the directives kubectl sends (`$patch: replace|delete|merge`,
/// `$retainKeys`, `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`).
///
/// # Errors
/// A malformed directive.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    strategic_map(target, patch, &mut Vec::new())
}

fn strategic_map(target: &mut Value, patch: &Value, path: &mut Vec<String>) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match patch.get("$patch").map(|v| v.as_str()) {
        None | Some(Some("merge")) => {}
        Some(Some("replace")) => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            *target = Value::Object(replaced);
            return Ok(());
        }
        Some(Some("delete")) => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => return Err(format!("unknown $patch directive {other:?}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let gone = value
                .as_array()
                .ok_or("$deleteFromPrimitiveList wants a list")?;
            if let Some(Value::Array(items)) = t.get_mut(list) {
                items.retain(|item| !gone.contains(item));
            }
            continue;
        }
        if value.is_null() || value.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(key);
            continue;
        }
        path.push(key.clone());
        let slot = t.entry(key.clone()).or_insert(Value::Null);
        match value {
            Value::Array(items) => merge_list(slot, items, list_strategy(path), path)?,
            Value::Object(_) => strategic_map(slot, value, path)?,
            _ => *slot = value.clone(),
        }
        path.pop();
    }
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            let order = value.as_array().ok_or("$setElementOrder wants a list")?;
            if let Some(Value::Array(items)) = t.get_mut(list) {
                let mut path = path.clone();
                path.push(list.to_owned());
                reorder(items, order, list_strategy(&path));
            }
        }
    }
    if let Some(keep) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep
            .as_array()
            .ok_or("$retainKeys wants a list")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(())
}

fn merge_list(
    slot: &mut Value,
    items: &[Value],
    strategy: ListStrategy,
    path: &mut Vec<String>,
) -> Result<(), String> {
    let replace = || {
        Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        )
    };
    match strategy {
        ListStrategy::Replace => *slot = replace(),
        _ if items
            .iter()
            .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace")) =>
        {
            *slot = replace();
        }
        ListStrategy::MergePrimitives => {
            if !slot.is_array() {
                *slot = Value::Array(Vec::new());
            }
            if let Value::Array(existing) = slot {
                for item in items {
                    if !existing.contains(item) {
                        existing.push(item.clone());
                    }
                }
            }
        }
        ListStrategy::MergeByKey(merge_key) => {
            if !slot.is_array() {
                *slot = Value::Array(Vec::new());
            }
            let Value::Array(existing) = slot else {
                return Ok(());
            };
            for item in items {
                let key = item
                    .get(merge_key)
                    .ok_or_else(|| format!("list item without its merge key {merge_key:?}"))?;
                let found = existing.iter().position(|e| e.get(merge_key) == Some(key));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (found, delete) {
                    (Some(i), true) => {
                        existing.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic_map(&mut existing[i], item, path)?,
                    (None, false) => {
                        let mut new = Value::Null;
                        strategic_map(&mut new, item, path)?;
                        existing.push(new);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Orders `items` as `order` names them (by merge key, or by value); items it does not
/// name keep their relative order after the named ones.
fn reorder(items: &mut [Value], order: &[Value], strategy: ListStrategy) {
    let rank = |item: &Value| {
        order
            .iter()
            .position(|o| match strategy {
                ListStrategy::MergeByKey(k) => o.get(k).is_some() && o.get(k) == item.get(k),
                _ => o == item,
            })
            .unwrap_or(order.len())
    };
    items.sort_by_key(rank);
}

/// Applies an RFC 7386 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Splits an RFC 6901 JSON pointer into unescaped reference tokens.
fn tokens(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {pointer:?}"));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let idx: usize = token
        .parse()
        .map_err(|_| format!("invalid array index {token:?}"))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if idx > max || (!allow_end && len == 0) {
        return Err(format!("array index {idx} out of bounds"));
    }
    Ok(idx)
}

/// The parent container of the pointer's last token, and that token.
fn parent_mut<'a>(doc: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let mut toks = tokens(path)?;
    let Some(last) = toks.pop() else {
        return Err("the root cannot be the target of this operation".to_owned());
    };
    let mut cur = doc;
    for t in &toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("path {path:?} not found"))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                a.get_mut(i)
                    .ok_or_else(|| format!("path {path:?} not found"))?
            }
            _ => return Err(format!("path {path:?} not found")),
        };
    }
    Ok((cur, last))
}

fn get<'a>(doc: &'a Value, path: &str) -> Result<&'a Value, String> {
    let mut cur = doc;
    for t in tokens(path)? {
        cur = match cur {
            Value::Object(m) => m.get(&t),
            Value::Array(a) => a.get(array_index(&t, a.len(), false)?),
            _ => None,
        }
        .ok_or_else(|| format!("path {path:?} not found"))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = parent_mut(doc, path)?;
    match parent {
        Value::Object(m) => {
            m.insert(last, value);
            Ok(())
        }
        Value::Array(a) => {
            let i = array_index(&last, a.len(), true)?;
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("parent of {path:?} is not a container")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = parent_mut(doc, path)?;
    match parent {
        Value::Object(m) => m
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} not found")),
        Value::Array(a) => {
            let i = array_index(&last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(format!("path {path:?} not found")),
    }
}

fn str_field<'a>(op: &'a Value, name: &str) -> Result<&'a str, String> {
    op.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("JSON patch operation lacks string field {name:?}"))
}

fn value_field(op: &Value) -> Result<Value, String> {
    op.get("value")
        .cloned()
        .ok_or_else(|| "JSON patch operation lacks field \"value\"".to_owned())
}

/// Applies an RFC 6902 JSON patch (an array of operations) to `doc`, atomically: on
/// error `doc` is left untouched.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or_else(|| "a JSON patch must be an array of operations".to_owned())?;
    let mut work = doc.clone();
    for op in ops {
        let path = str_field(op, "path")?;
        match str_field(op, "op")? {
            "add" => add(&mut work, path, value_field(op)?)?,
            "remove" => {
                remove(&mut work, path)?;
            }
            "replace" => {
                let value = value_field(op)?;
                if path.is_empty() {
                    work = value;
                } else {
                    remove(&mut work, path)?;
                    add(&mut work, path, value)?;
                }
            }
            "move" => {
                let from = str_field(op, "from")?;
                if path.starts_with(from) && path[from.len()..].starts_with('/') {
                    return Err(format!("cannot move {from:?} into its own child {path:?}"));
                }
                let value = remove(&mut work, from)?;
                add(&mut work, path, value)?;
            }
            "copy" => {
                let value = get(&work, str_field(op, "from")?)?.clone();
                add(&mut work, path, value)?;
            }
            "test" => {
                if get(&work, path)? != &value_field(op)? {
                    return Err(format!("test operation failed at {path:?}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    *doc = work;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_rfc7386_examples() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a"]), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut doc, patch, want) in cases {
            merge_patch(&mut doc, &patch);
            assert_eq!(doc, want);
        }
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({"a": {"b": [1, 2]}, "c": "x"});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "add", "path": "/a/b/0", "value": 0},
                {"op": "replace", "path": "/c", "value": "y"},
                {"op": "copy", "from": "/c", "path": "/d"},
                {"op": "move", "from": "/d", "path": "/e"},
                {"op": "remove", "path": "/a/b/1"},
                {"op": "test", "path": "/e", "value": "y"},
                {"op": "add", "path": "/f~1g", "value": true},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"a": {"b": [0, 2, 3]}, "c": "y", "e": "y", "f/g": true})
        );
    }

    #[test]
    fn json_patch_errors_leave_doc_untouched() {
        let orig = json!({"a": [1]});
        for bad in [
            json!({"op": "add"}),
            json!([{"op": "remove", "path": "/missing"}]),
            json!([{"op": "add", "path": "/a/5", "value": 1}]),
            json!([{"op": "remove", "path": "/a/x"}]),
            json!([{"op": "test", "path": "/a/0", "value": 2}]),
            json!([{"op": "add", "path": "/a/0"}]),
            json!([{"op": "frob", "path": "/a"}]),
            json!([{"op": "move", "from": "/a", "path": "/a/0"}]),
            json!([{"op": "add", "path": "a", "value": 1}]),
        ] {
            let mut doc = orig.clone();
            assert!(json_patch(&mut doc, &bad).is_err(), "{bad}");
            assert_eq!(doc, orig);
        }
    }

    #[test]
    fn strategic_merge_by_key_and_directives() {
        let mut svc = json!({
            "metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "spec": {
                "ports": [{"port": 80, "targetPort": 8080}, {"port": 53, "protocol": "UDP"}],
                "ipFamilies": ["IPv4"],
                "selector": {"app": "web", "tier": "front"},
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}},
            },
        });
        strategic_merge_patch(
            &mut svc,
            &json!({
                "metadata": {"finalizers": ["b", "a"], "labels": {"x": null}},
                "spec": {
                    "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
                    "ports": [{"port": 80, "targetPort": 9090}, {"port": 53, "$patch": "delete"}, {"port": 443}],
                    "ipFamilies": ["IPv6"],
                    "selector": {"$patch": "replace", "app": "api"},
                    "sessionAffinityConfig": {"$patch": "delete"},
                },
            }),
        )
        .unwrap();
        assert_eq!(
            svc,
            json!({
                "metadata": {"finalizers": ["a", "b"], "labels": {}},
                "spec": {
                    "ports": [{"port": 443}, {"port": 80, "targetPort": 9090}],
                    "ipFamilies": ["IPv6"],
                    "selector": {"app": "api"},
                },
            })
        );
        // $retainKeys, $deleteFromPrimitiveList, a list replaced whole.
        let mut obj =
            json!({"spec": {"a": 1, "b": 2, "c": 3}, "metadata": {"finalizers": ["a", "b"]}});
        strategic_merge_patch(
            &mut obj,
            &json!({
                "spec": {"$retainKeys": ["a", "d"], "d": 4},
                "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]},
            }),
        )
        .unwrap();
        assert_eq!(
            obj,
            json!({"spec": {"a": 1, "d": 4}, "metadata": {"finalizers": ["b"]}})
        );
        let mut obj = json!({"spec": {"ports": [{"port": 1}, {"port": 2}]}});
        strategic_merge_patch(
            &mut obj,
            &json!({"spec": {"ports": [{"$patch": "replace"}, {"port": 3}]}}),
        )
        .unwrap();
        assert_eq!(obj, json!({"spec": {"ports": [{"port": 3}]}}));
        // Errors: a merge-key list item without its key, an unknown directive.
        assert!(
            strategic_merge_patch(&mut obj, &json!({"spec": {"ports": [{"name": "x"}]}})).is_err()
        );
        assert!(strategic_merge_patch(&mut obj, &json!({"$patch": "frobnicate"})).is_err());
    }
}
