//! The object store: current objects, one global resourceVersion counter, and a
//! bounded history of change events that watches replay.

use std::{
    collections::{BTreeMap, VecDeque},
    hash::{BuildHasher, RandomState},
    ops::Bound,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Map, Value};

use super::{
    defaults,
    patch::{json_patch, merge_patch, strategic_merge_patch},
    resource::{ApiError, ResourceKind},
    selector::{FieldSelector, LabelSelector},
};

/// Type of a stored change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    /// The watch event `type`.
    pub fn wire(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the history.
#[derive(Clone, Debug)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    pub kind: ResourceKind,
    pub ty: EventType,
    /// The object after the change (for `Deleted`: the last state, with `rv`).
    pub object: Arc<Value>,
    /// For `Modified`: the object before the change (selectors may match only one).
    pub prev: Option<Arc<Value>>,
}

/// One page of a LIST ([`Store::list_page`]).
#[derive(Debug)]
pub struct Page {
    /// The store's resourceVersion.
    pub rv: u64,
    pub items: Vec<Arc<Value>>,
    /// Whether objects passing the filter follow the page.
    pub more: bool,
    /// How many, when known without selectors.
    pub remaining: Option<usize>,
}

/// Which objects a LIST or WATCH returns.
#[derive(Clone, Debug)]
pub struct Filter {
    pub kind: ResourceKind,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether `object` (of kind `self.kind`) passes the namespace and selectors.
    pub fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            if meta_str(object, "namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The watch event (type, object) this filtered watch sees for `ev`, if any.
    /// An object that stops matching is seen as DELETED (its previous state, with the
    /// event's resourceVersion), one that starts matching as ADDED, as the real
    /// watch cache does.
    pub fn view(&self, ev: &Event) -> Option<(EventType, Arc<Value>)> {
        if ev.kind != self.kind {
            return None;
        }
        let cur = self.matches(&ev.object);
        match (ev.ty, &ev.prev) {
            (EventType::Modified, Some(prev)) => match (self.matches(prev), cur) {
                (true, true) => Some((EventType::Modified, ev.object.clone())),
                (false, true) => Some((EventType::Added, ev.object.clone())),
                (true, false) => {
                    let mut gone = (**prev).clone();
                    set_meta(&mut gone, "resourceVersion", json!(ev.rv.to_string()));
                    Some((EventType::Deleted, Arc::new(gone)))
                }
                (false, false) => None,
            },
            (ty, _) => cur.then(|| (ty, ev.object.clone())),
        }
    }
}

/// How a PATCH body is interpreted (from its Content-Type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`, approximated by a merge patch.
    Strategic,
    /// `application/json-patch+json` (RFC 6902).
    Json,
    /// `application/apply-patch+yaml` (server-side apply), approximated by
    /// create-or-merge-patch, without field ownership.
    Apply,
}

/// Sizing and behaviour knobs of the store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub history_limit: usize,
    pub service_defaults: bool,
}

type Key = (String, String);

/// All state. Not thread-safe by itself: the server keeps it behind a mutex.
pub struct Store {
    /// The last resourceVersion issued.
    rv: u64,
    /// A new watch from resourceVersion N is served iff N >= `floor`.
    floor: u64,
    /// Events with rv <= `evicted_upto` are gone: an open watch positioned before it
    /// can no longer be served.
    evicted_upto: u64,
    objects: BTreeMap<ResourceKind, BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Event>,
    config: StoreConfig,
    rng: u64,
}

/// Reads a string from `metadata`.
pub fn meta_str<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object.get("metadata")?.get(key)?.as_str()
}

fn set_meta(object: &mut Value, key: &str, value: Value) {
    if let Some(obj) = object.as_object_mut() {
        let meta = obj.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        if let Some(m) = meta.as_object_mut() {
            m.insert(key.to_owned(), value);
        }
    }
}

fn remove_meta(object: &mut Value, key: &str) {
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove(key);
    }
}

/// RFC 3339 UTC timestamp with second precision, as metav1.Time serializes.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs, "")
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SS{fraction}Z`.
fn rfc3339(secs: u64, fraction: &str) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{fraction}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 3339 UTC timestamp with nanoseconds, as the EndpointSlice controller writes
/// `endpoints.kubernetes.io/last-change-trigger-time` (Go's RFC3339Nano).
pub fn now_rfc3339_nanos() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seconds = now_rfc3339();
    format!("{}.{nanos:09}Z", seconds.trim_end_matches('Z'))
}

/// The annotation the EndpointSlice controller sets to the time of the change that
/// produced a slice's state (kube-proxy measures network programming latency from it).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn trigger_time(obj: &Value) -> Option<&Value> {
    obj.get("metadata")?
        .get("annotations")?
        .get(TRIGGER_TIME_ANNOTATION)
}

fn set_trigger_time(obj: &mut Value, time: Option<Value>) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    match time {
        Some(time) => {
            let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
            if let Some(annotations) = annotations.as_object_mut() {
                annotations.insert(TRIGGER_TIME_ANNOTATION.to_owned(), time);
            }
        }
        None => {
            if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                annotations.remove(TRIGGER_TIME_ANNOTATION);
                if annotations.is_empty() {
                    meta.remove("annotations");
                }
            }
        }
    }
}

/// Stamps an EndpointSlice's trigger time as the EndpointSlice controller does: on
/// creation and on every change of its content, unless the writer set one of its own
/// (a test replaying a controller). An update that changes nothing else keeps the old
/// time, so it stays a no-op.
fn stamp_trigger_time(kind: ResourceKind, new: &mut Value, old: Option<&Value>) {
    if kind != ResourceKind::EndpointSlice {
        return;
    }
    let previous = old.and_then(trigger_time).cloned();
    let given = trigger_time(new).cloned();
    if given.is_some() && given != previous {
        return;
    }
    let changed = old.is_none_or(|old| {
        let (mut a, mut b) = (new.clone(), old.clone());
        set_trigger_time(&mut a, None);
        set_trigger_time(&mut b, None);
        a != b
    });
    let time = if changed {
        Some(json!(now_rfc3339_nanos()))
    } else {
        previous
    };
    set_trigger_time(new, time);
}

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        Self {
            rv: 1,
            floor: 1,
            evicted_upto: 0,
            objects: ResourceKind::ALL
                .into_iter()
                .map(|k| (k, BTreeMap::new()))
                .collect(),
            history: VecDeque::new(),
            config,
            rng: RandomState::new().hash_one(SystemTime::now()) | 1,
        }
    }

    /// The last resourceVersion issued.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn new_uid(&mut self) -> String {
        let a = self.next_random();
        let b = self.next_random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    fn random_suffix(&mut self) -> String {
        // The alphabet of k8s.io/apimachinery/pkg/util/rand (no vowels, no confusables).
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut r = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(r % ALPHABET.len() as u64) as usize];
                r /= ALPHABET.len() as u64;
                char::from(c)
            })
            .collect()
    }

    fn map(&self, kind: ResourceKind) -> impl Iterator<Item = (&Key, &Arc<Value>)> {
        self.objects.get(&kind).into_iter().flatten()
    }

    fn map_mut(&mut self, kind: ResourceKind) -> &mut BTreeMap<Key, Arc<Value>> {
        self.objects.entry(kind).or_default()
    }

    fn lookup(&self, kind: ResourceKind, key: &Key) -> Option<Arc<Value>> {
        self.objects.get(&kind)?.get(key).cloned()
    }

    fn record(&mut self, ev: Event) {
        self.history.push_back(ev);
        while self.history.len() > self.config.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.evicted_upto = old.rv;
                self.floor = self.floor.max(old.rv);
            }
        }
    }

    /// Objects passing `filter`, in (namespace, name) order, and the current
    /// resourceVersion.
    pub fn list(&self, filter: &Filter) -> (u64, Vec<Arc<Value>>) {
        let items = self
            .map(filter.kind)
            .filter(|(_, o)| filter.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        (self.rv, items)
    }

    /// One page of a LIST: up to `limit` objects (0: all) passing `filter` whose key
    /// comes after `after`, in (namespace, name) order. Costs the page and the objects
    /// after it in the namespace, not the whole collection per page (the agent lists
    /// 100 000 Services in pages of 500).
    pub fn list_page(&self, filter: &Filter, after: Option<&Key>, limit: usize) -> Page {
        let start = match (after, &filter.namespace) {
            (Some(key), _) => Bound::Excluded(key.clone()),
            (None, Some(namespace)) => Bound::Included((namespace.clone(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let selects = !filter.labels.is_empty() || !filter.fields.is_empty();
        let mut rest = self
            .objects
            .get(&filter.kind)
            .map(|objects| objects.range((start, Bound::Unbounded)))
            .into_iter()
            .flatten()
            .take_while(|(key, _)| filter.namespace.as_ref().is_none_or(|ns| &key.0 == ns))
            .filter(|(_, object)| !selects || filter.matches(object))
            .map(|(_, object)| object);
        let items: Vec<Arc<Value>> = if limit == 0 {
            rest.by_ref().cloned().collect()
        } else {
            rest.by_ref().take(limit).cloned().collect()
        };
        // As the real server: no remainingItemCount with selectors (it would cost
        // matching every object after the page).
        let (more, remaining) = if selects {
            (rest.next().is_some(), None)
        } else {
            let count = rest.count();
            (count > 0, Some(count))
        };
        Page {
            rv: self.rv,
            items,
            more,
            remaining,
        }
    }

    /// One object.
    pub fn get(
        &self,
        kind: ResourceKind,
        namespace: &str,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        self.lookup(kind, &(namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Checks that a new watch may start at resourceVersion `rv`.
    pub fn check_watch_start(&self, rv: u64) -> Result<(), ApiError> {
        if rv < self.floor {
            return Err(ApiError::expired(rv, self.floor));
        }
        if rv > self.rv {
            return Err(ApiError::too_large_resource_version(rv, self.rv));
        }
        Ok(())
    }

    /// The events after `position`, or the 410 error when some were forgotten.
    pub fn events_since(&self, position: u64) -> Result<Vec<Event>, ApiError> {
        if position < self.evicted_upto {
            return Err(ApiError::expired(position, self.floor));
        }
        let start = self.history.partition_point(|e| e.rv <= position);
        Ok(self.history.range(start..).cloned().collect())
    }

    /// Forgets all history: every resourceVersion issued so far becomes too old to
    /// start a watch from. Watches already open are unaffected (they are up to date),
    /// but one resumed from a resourceVersion they delivered gets 410.
    pub fn compact(&mut self) -> u64 {
        // Only events that were really forgotten count against open watches: one that
        // has seen the last of them is up to date, however many compactions follow.
        if let Some(last) = self.history.back() {
            self.evicted_upto = self.evicted_upto.max(last.rv);
        }
        self.history.clear();
        self.rv += 1;
        self.floor = self.rv;
        self.rv
    }

    /// Validates `obj` as a body for `kind`: a JSON object whose kind/apiVersion, if
    /// set, match; fills them in and makes `metadata` an object.
    fn prepare_body(kind: ResourceKind, obj: &mut Value) -> Result<(), ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        };
        for (field, want) in [("kind", kind.kind()), ("apiVersion", kind.api_version())] {
            match map.get(field) {
                None | Some(Value::Null) => {
                    map.insert(field.to_owned(), json!(want));
                }
                Some(Value::String(s)) if s.is_empty() => {
                    map.insert(field.to_owned(), json!(want));
                }
                Some(Value::String(s)) if s == want => {}
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {other} does not match the expected {want}"
                    )))
                }
            }
        }
        match map.get("metadata") {
            None | Some(Value::Null) => {
                map.insert("metadata".to_owned(), Value::Object(Map::new()));
            }
            Some(Value::Object(_)) => {}
            Some(_) => return Err(ApiError::bad_request("metadata must be an object")),
        }
        Ok(())
    }

    /// The namespace key of an object in a request to `path_ns`.
    fn namespace_key(
        kind: ResourceKind,
        path_ns: Option<&str>,
        obj: &mut Value,
    ) -> Result<String, ApiError> {
        if !kind.namespaced() {
            remove_meta(obj, "namespace");
            return Ok(String::new());
        }
        let Some(ns) = path_ns else {
            return Err(ApiError::method_not_allowed(format!(
                "{} are namespaced: use /namespaces/{{namespace}}/{}",
                kind.plural(),
                kind.plural()
            )));
        };
        match meta_str(obj, "namespace") {
            Some(body_ns) if !body_ns.is_empty() && body_ns != ns => Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            )),
            _ => {
                set_meta(obj, "namespace", json!(ns));
                Ok(ns.to_owned())
            }
        }
    }

    fn validate_name(kind: ResourceKind, name: &str) -> Result<(), ApiError> {
        let ok = !name.is_empty()
            && name.len() <= 253
            && name != "."
            && name != ".."
            && !name.contains(['/', '%']);
        if ok {
            Ok(())
        } else {
            Err(ApiError::invalid(
                kind,
                name,
                "metadata.name: Invalid value: may not contain '/' or '%'",
            ))
        }
    }

    fn apply_defaults(&self, kind: ResourceKind, obj: &mut Value, old: Option<&Value>, key: &Key) {
        match kind {
            ResourceKind::Service if self.config.service_defaults => {
                let mut allocated = defaults::Allocated::from_services(
                    self.map(kind).filter(|(k, _)| *k != key).map(|(_, o)| &**o),
                );
                defaults::service(obj, old, &mut allocated);
            }
            ResourceKind::EndpointSlice if self.config.service_defaults => {
                defaults::endpoint_slice(obj)
            }
            _ => {}
        }
    }

    /// POST: creates an object.
    pub fn create(
        &mut self,
        kind: ResourceKind,
        path_ns: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        Self::prepare_body(kind, &mut obj)?;
        let ns = Self::namespace_key(kind, path_ns, &mut obj)?;
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => {
                let prefix = prefix.to_owned();
                format!("{prefix}{}", self.random_suffix())
            }
            _ => {
                return Err(ApiError::invalid(
                    kind,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        };
        Self::validate_name(kind, &name)?;
        let key = (ns, name.clone());
        if self.lookup(kind, &key).is_some() {
            return Err(ApiError::already_exists(kind, &name));
        }
        self.apply_defaults(kind, &mut obj, None, &key);
        stamp_trigger_time(kind, &mut obj, None);
        self.rv += 1;
        let uid = self.new_uid();
        set_meta(&mut obj, "name", json!(name));
        set_meta(&mut obj, "uid", json!(uid));
        set_meta(&mut obj, "creationTimestamp", json!(now_rfc3339()));
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        remove_meta(&mut obj, "deletionTimestamp");
        let obj = Arc::new(obj);
        self.map_mut(kind).insert(key, obj.clone());
        self.record(Event {
            rv: self.rv,
            kind,
            ty: EventType::Added,
            object: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// PUT: replaces an existing object.
    pub fn replace(
        &mut self,
        kind: ResourceKind,
        path_ns: Option<&str>,
        name: &str,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        Self::prepare_body(kind, &mut obj)?;
        let ns = Self::namespace_key(kind, path_ns, &mut obj)?;
        let key = (ns, name.to_owned());
        let old = self
            .lookup(kind, &key)
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        self.update(kind, key, &old, obj)
    }

    /// Stores `new` over `old` (same key), after the checks an update makes.
    fn update(
        &mut self,
        kind: ResourceKind,
        key: Key,
        old: &Arc<Value>,
        mut new: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let name = key.1.clone();
        Self::prepare_body(kind, &mut new)?;
        let body_name = meta_str(&new, "name").unwrap_or_default();
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if kind.namespaced() && meta_str(&new, "namespace") != Some(key.0.as_str()) {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let old_rv = meta_str(old, "resourceVersion")
            .unwrap_or_default()
            .to_owned();
        match meta_str(&new, "resourceVersion") {
            Some(rv) if !rv.is_empty() && rv != old_rv => {
                return Err(ApiError::conflict(
                    kind,
                    &name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ))
            }
            _ => {}
        }
        let old_uid = meta_str(old, "uid").unwrap_or_default().to_owned();
        match meta_str(&new, "uid") {
            Some(uid) if !uid.is_empty() && uid != old_uid => {
                return Err(ApiError::conflict(
                    kind,
                    &name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"),
                ))
            }
            _ => {}
        }
        self.apply_defaults(kind, &mut new, Some(old), &key);
        set_meta(&mut new, "uid", json!(old_uid));
        set_meta(&mut new, "resourceVersion", json!(old_rv));
        match old.pointer("/metadata/creationTimestamp") {
            Some(ts) => set_meta(&mut new, "creationTimestamp", ts.clone()),
            None => remove_meta(&mut new, "creationTimestamp"),
        }
        if !kind.namespaced() {
            remove_meta(&mut new, "namespace");
        }
        stamp_trigger_time(kind, &mut new, Some(old));
        if new == **old {
            // A no-op update issues no resourceVersion and no event, like etcd3's store.
            return Ok(old.clone());
        }
        self.rv += 1;
        set_meta(&mut new, "resourceVersion", json!(self.rv.to_string()));
        let new = Arc::new(new);
        self.map_mut(kind).insert(key, new.clone());
        self.record(Event {
            rv: self.rv,
            kind,
            ty: EventType::Modified,
            object: new.clone(),
            prev: Some(old.clone()),
        });
        Ok(new)
    }

    /// PATCH. Returns the object and whether it was created (server-side apply only).
    pub fn patch(
        &mut self,
        kind: ResourceKind,
        path_ns: Option<&str>,
        name: &str,
        patch_type: PatchType,
        patch: Value,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let ns = if kind.namespaced() {
            path_ns
                .ok_or_else(|| {
                    ApiError::method_not_allowed(
                        "namespaced resources are patched under /namespaces/{namespace}",
                    )
                })?
                .to_owned()
        } else {
            String::new()
        };
        let key = (ns, name.to_owned());
        let Some(old) = self.lookup(kind, &key) else {
            if patch_type == PatchType::Apply {
                let mut obj = patch;
                if !obj.is_object() {
                    return Err(ApiError::bad_request("an apply patch must be an object"));
                }
                if meta_str(&obj, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object does not match the name on the URL ({name})"
                    )));
                }
                set_meta(&mut obj, "name", json!(name));
                return Ok((self.create(kind, path_ns, obj)?, true));
            }
            return Err(ApiError::not_found(kind, name));
        };
        let mut new = (*old).clone();
        match patch_type {
            PatchType::Strategic => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "a strategic merge patch must be a JSON object",
                    ));
                }
                strategic_merge_patch(&mut new, &patch).map_err(|e| {
                    ApiError::bad_request(format!("invalid strategic merge patch: {e}"))
                })?;
            }
            PatchType::Merge | PatchType::Apply => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                merge_patch(&mut new, &patch);
            }
            PatchType::Json => {
                json_patch(&mut new, &patch).map_err(|e| ApiError::invalid(kind, name, &e))?
            }
        }
        Ok((self.update(kind, key, &old, new)?, false))
    }

    /// DELETE, with optional `preconditions` (uid, resourceVersion) from DeleteOptions.
    pub fn delete(
        &mut self,
        kind: ResourceKind,
        path_ns: Option<&str>,
        name: &str,
        preconditions: Option<&Value>,
    ) -> Result<Arc<Value>, ApiError> {
        let ns = if kind.namespaced() {
            path_ns.unwrap_or_default()
        } else {
            ""
        };
        let key = (ns.to_owned(), name.to_owned());
        let old = self
            .lookup(kind, &key)
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        if let Some(pre) = preconditions {
            for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(want) = pre.get(field).and_then(Value::as_str) {
                    let have = meta_str(&old, field).unwrap_or_default();
                    if want != have {
                        return Err(ApiError::conflict(
                            kind,
                            name,
                            &format!("Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"),
                        ));
                    }
                }
            }
        }
        self.rv += 1;
        let mut gone = (*old).clone();
        set_meta(&mut gone, "resourceVersion", json!(self.rv.to_string()));
        let gone = Arc::new(gone);
        self.map_mut(kind).remove(&key);
        self.record(Event {
            rv: self.rv,
            kind,
            ty: EventType::Deleted,
            object: gone.clone(),
            prev: None,
        });
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(history_limit: usize) -> Store {
        Store::new(StoreConfig {
            history_limit,
            service_defaults: false,
        })
    }

    fn all(kind: ResourceKind) -> Filter {
        Filter {
            kind,
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
        }
    }

    fn svc(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"clusterIP": "10.0.0.1"}})
    }

    #[test]
    fn crud_bumps_resource_versions() {
        let mut s = store(100);
        let a = s
            .create(ResourceKind::Service, Some("ns"), svc("a"))
            .unwrap();
        assert_eq!(meta_str(&a, "resourceVersion"), Some("2"));
        assert_eq!(meta_str(&a, "namespace"), Some("ns"));
        assert_eq!(a["kind"], "Service");
        assert_eq!(meta_str(&a, "uid").map(str::len), Some(36));
        assert_eq!(
            s.create(ResourceKind::Service, Some("ns"), svc("a"))
                .unwrap_err()
                .code,
            409
        );
        let mut changed = (*a).clone();
        changed["spec"]["clusterIP"] = json!("10.0.0.2");
        let b = s
            .replace(ResourceKind::Service, Some("ns"), "a", changed.clone())
            .unwrap();
        assert_eq!(meta_str(&b, "resourceVersion"), Some("3"));
        // Stale resourceVersion.
        assert_eq!(
            s.replace(ResourceKind::Service, Some("ns"), "a", changed)
                .unwrap_err()
                .code,
            409
        );
        // No-op update: no new resourceVersion.
        let same = s
            .replace(ResourceKind::Service, Some("ns"), "a", (*b).clone())
            .unwrap();
        assert_eq!(meta_str(&same, "resourceVersion"), Some("3"));
        let (p, created) = s
            .patch(
                ResourceKind::Service,
                Some("ns"),
                "a",
                PatchType::Merge,
                json!({"metadata": {"labels": {"x": "y"}}}),
            )
            .unwrap();
        assert!(!created);
        assert_eq!(p["metadata"]["labels"]["x"], "y");
        let d = s
            .delete(ResourceKind::Service, Some("ns"), "a", None)
            .unwrap();
        assert_eq!(meta_str(&d, "resourceVersion"), Some("5"));
        assert_eq!(
            s.get(ResourceKind::Service, "ns", "a").unwrap_err().code,
            404
        );
        let evs = s.events_since(1).unwrap();
        let types: Vec<_> = evs.iter().map(|e| (e.rv, e.ty)).collect();
        assert_eq!(
            types,
            [
                (2, EventType::Added),
                (3, EventType::Modified),
                (4, EventType::Modified),
                (5, EventType::Deleted)
            ]
        );
        assert_eq!(s.events_since(4).unwrap().len(), 1);
    }

    #[test]
    fn history_bound_and_compaction() {
        let mut s = store(2);
        for n in ["a", "b", "c"] {
            s.create(ResourceKind::Node, None, svc(n)).unwrap();
        }
        // rv 2 (a) was evicted: watching from 1 misses it.
        assert_eq!(s.check_watch_start(1).unwrap_err().code, 410);
        assert!(s.check_watch_start(2).is_ok());
        assert_eq!(s.events_since(1).unwrap_err().code, 410);
        assert_eq!(s.check_watch_start(9).unwrap_err().code, 504);
        let rv = s.resource_version();
        let new_rv = s.compact();
        assert_eq!(new_rv, rv + 1);
        assert_eq!(s.check_watch_start(rv).unwrap_err().code, 410);
        assert!(s.check_watch_start(new_rv).is_ok());
        // An open watch that was up to date still is.
        assert!(s.events_since(rv).unwrap().is_empty());
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let mut s = store(100);
        let mut f = all(ResourceKind::Service);
        f.labels = LabelSelector::parse("app=web").unwrap();
        s.create(ResourceKind::Service, Some("ns"), svc("a"))
            .unwrap();
        s.patch(
            ResourceKind::Service,
            Some("ns"),
            "a",
            PatchType::Json,
            json!([{"op": "add", "path": "/metadata/labels", "value": {"app": "web"}}]),
        )
        .unwrap();
        s.patch(
            ResourceKind::Service,
            Some("ns"),
            "a",
            PatchType::Merge,
            json!({"metadata": {"labels": {"app": "db"}}}),
        )
        .unwrap();
        let seen: Vec<_> = s
            .events_since(1)
            .unwrap()
            .iter()
            .filter_map(|e| f.view(e))
            .map(|(t, o)| {
                (
                    t,
                    meta_str(&o, "resourceVersion")
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (EventType::Added, "3".to_owned()),
                (EventType::Deleted, "4".to_owned())
            ]
        );
    }

    #[test]
    fn bad_bodies_are_rejected() {
        let mut s = store(10);
        let k = ResourceKind::Service;
        assert_eq!(s.create(k, Some("ns"), json!([])).unwrap_err().code, 400);
        assert_eq!(
            s.create(k, Some("ns"), json!({"kind": "Pod"}))
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            s.create(k, Some("ns"), json!({"metadata": 5}))
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(s.create(k, Some("ns"), json!({})).unwrap_err().code, 422);
        assert_eq!(
            s.create(
                k,
                Some("ns"),
                json!({"metadata": {"name": "a", "namespace": "other"}})
            )
            .unwrap_err()
            .code,
            400
        );
        assert_eq!(s.create(k, None, svc("a")).unwrap_err().code, 405);
        let g = s
            .create(k, Some("ns"), json!({"metadata": {"generateName": "web-"}}))
            .unwrap();
        assert!(meta_str(&g, "name").is_some_and(|n| n.starts_with("web-") && n.len() == 9));
        let n = s
            .create(
                ResourceKind::Node,
                None,
                json!({"metadata": {"name": "n", "namespace": "x"}}),
            )
            .unwrap();
        assert_eq!(meta_str(&n, "namespace"), None);
    }

    #[test]
    fn timestamp_format() {
        let ts = now_rfc3339();
        assert_eq!(ts.len(), 20, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'), "{ts}");
    }
}
