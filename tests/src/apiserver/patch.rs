//! PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).
//!
//! Strategic merge patch and server-side apply are approximated by the merge patch in
//! the caller (lists are replaced, not merged by key).

use serde_json::{Map, Value};

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
}
