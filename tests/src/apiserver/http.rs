//! HTTP layer: routing of Kubernetes REST paths, verbs, watch streams, discovery and
//! the `/testing/` control endpoints.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use axum::{
    body::{to_bytes, Body, Bytes},
    extract::{Query, Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::{sync::watch, time::Instant};

use super::{
    openapi,
    resource::{ApiError, ResourceKind},
    selector::{FieldSelector, LabelSelector},
    store::{meta_str, Filter, PatchType},
    table::{self, IncludeObject},
    Shared, WatcherGuard, BYPASS_PAUSE_HEADER,
};

/// Request bodies larger than this are refused (the real default is 3 MiB).
const MAX_BODY: usize = 16 << 20;
/// Watch duration when the client sets no `timeoutSeconds` (the real server picks a
/// random value between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
/// The Kubernetes version `/version` reports (k8s-openapi feature `v1_34`).
const KUBE_MINOR: &str = "34";

/// Responds with `status` and a JSON body.
fn json_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &self.status())
    }
}

/// Query parameters the server looks at; the others are accepted and ignored.
#[derive(Debug, Default)]
struct Params {
    watch: bool,
    resource_version: Option<String>,
    resource_version_match: Option<String>,
    label_selector: String,
    field_selector: String,
    allow_watch_bookmarks: bool,
    send_initial_events: Option<bool>,
    timeout_seconds: Option<u64>,
    field_manager: Option<String>,
    dry_run: bool,
    /// LIST pagination: at most this many items per page (0: all).
    limit: usize,
    /// LIST pagination: the token of the page before (`<resourceVersion>/<namespace>/<name>`
    /// of its last item).
    continue_token: Option<String>,
    include_object: Option<IncludeObject>,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" | "True" => Ok(true),
        "false" | "0" | "False" | "" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "invalid boolean {v:?} for query parameter {name}"
        ))),
    }
}

impl Params {
    fn parse(uri: &Uri) -> Result<Self, ApiError> {
        let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        let mut p = Self::default();
        for (k, v) in pairs {
            match k.as_str() {
                "watch" => p.watch = parse_bool(&k, &v)?,
                "resourceVersion" => p.resource_version = Some(v).filter(|v| !v.is_empty()),
                "resourceVersionMatch" => {
                    p.resource_version_match = Some(v).filter(|v| !v.is_empty())
                }
                "labelSelector" => p.label_selector = v,
                "fieldSelector" => p.field_selector = v,
                "allowWatchBookmarks" => p.allow_watch_bookmarks = parse_bool(&k, &v)?,
                "sendInitialEvents" => p.send_initial_events = Some(parse_bool(&k, &v)?),
                "timeoutSeconds" => {
                    p.timeout_seconds = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid timeoutSeconds {v:?}"))
                    })?);
                }
                "fieldManager" => p.field_manager = Some(v),
                "dryRun" => p.dry_run = !v.is_empty(),
                "limit" => {
                    p.limit = v
                        .parse()
                        .map_err(|_| ApiError::bad_request(format!("invalid limit {v:?}")))?;
                }
                "continue" => p.continue_token = Some(v).filter(|v| !v.is_empty()),
                "includeObject" => {
                    p.include_object = Some(IncludeObject::parse(&v).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "invalid includeObject {v:?}: want None, Metadata or Object"
                        ))
                    })?);
                }
                // pretty, force, propagationPolicy, gracePeriodSeconds, fieldValidation, ...
                _ => {}
            }
        }
        Ok(p)
    }

    fn filter(&self, kind: ResourceKind, namespace: Option<&str>) -> Result<Filter, ApiError> {
        Ok(Filter {
            kind,
            namespace: namespace.map(str::to_owned),
            labels: LabelSelector::parse(&self.label_selector).map_err(|e| {
                ApiError::bad_request(format!("unable to parse labelSelector: {}", e.0))
            })?,
            fields: FieldSelector::parse(&self.field_selector).map_err(|e| {
                ApiError::bad_request(format!("unable to parse fieldSelector: {}", e.0))
            })?,
        })
    }
}

/// The one handler: every request comes here.
pub(super) async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = route(&shared, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    response
}

async fn route(shared: &Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let segments: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();

    if segments.first() == Some(&"testing") {
        return control(shared, &parts.method, &segments[1..], &parts.uri);
    }
    if shared.paused.load(Ordering::SeqCst) && !parts.headers.contains_key(BYPASS_PAUSE_HEADER) {
        let code = shared.pause_code.load(Ordering::SeqCst);
        shared.refused.fetch_add(1, Ordering::SeqCst);
        let mut resp =
            ApiError::unavailable(code, "the test API server is paused (POST /testing/resume)")
                .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    if segments == ["openapi", "v2"] {
        if parts.method != Method::GET {
            return Err(ApiError::method_not_allowed(
                "the OpenAPI document is read-only",
            ));
        }
        return Ok(openapi_v2(&parts.headers));
    }
    if let Some(doc) = discovery(&segments) {
        if parts.method != Method::GET {
            return Err(ApiError::method_not_allowed("discovery is read-only"));
        }
        return Ok(match doc {
            Discovery::Json(v) => json_response(StatusCode::OK, &v),
            Discovery::Text(t) => (StatusCode::OK, t).into_response(),
        });
    }

    // /api/v1/... or /apis/{group}/{version}/...
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ((*version).to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return Err(ApiError::no_route()),
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return Err(ApiError::no_route()),
    };
    let kind = ResourceKind::from_path(&api_version, plural).ok_or_else(ApiError::no_route)?;
    // Cluster-scoped resources have no namespaced paths; a namespaced resource's
    // single objects are only reachable under their namespace.
    if (namespace.is_some() && !kind.namespaced())
        || (name.is_some() && namespace.is_none() && kind.namespaced())
    {
        return Err(ApiError::no_route());
    }
    let params = Params::parse(&parts.uri)?;
    let view = View::negotiate(&parts.headers, &params);
    if params.dry_run && parts.method != Method::GET {
        return Err(ApiError::bad_request(
            "dryRun is not supported by the test API server",
        ));
    }
    let body = to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::too_large(format!("reading the request body: {e}")))?;

    match (name, &parts.method) {
        (None, &Method::GET) => {
            if params.watch {
                watch(shared, kind, namespace, &params, view)
            } else {
                list(shared, kind, namespace, &params, view)
            }
        }
        (None, &Method::POST) => {
            let obj = parse_json(&body)?;
            let created = shared.mutate(|s| s.create(kind, namespace, obj))?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Some(name), &Method::GET) => {
            if params.watch {
                // The deprecated single-object watch: the same as a name field selector.
                let mut params = params;
                let sel = format!("metadata.name={name}");
                params.field_selector = if params.field_selector.is_empty() {
                    sel
                } else {
                    format!("{},{sel}", params.field_selector)
                };
                return watch(shared, kind, namespace, &params, view);
            }
            let obj = shared.read(|s| s.get(kind, namespace.unwrap_or_default(), name))?;
            Ok(json_response(StatusCode::OK, &view.single(kind, &obj)))
        }
        (Some(name), &Method::PUT) => {
            let obj = parse_json(&body)?;
            let updated = shared.mutate(|s| s.replace(kind, namespace, name, obj))?;
            Ok(json_response(StatusCode::OK, &updated))
        }
        (Some(name), &Method::PATCH) => {
            let patch_type = patch_type(&parts.headers)?;
            let patch = if patch_type == PatchType::Apply {
                if params
                    .field_manager
                    .as_deref()
                    .unwrap_or_default()
                    .is_empty()
                {
                    return Err(ApiError::bad_request(
                        "fieldManager is required for apply requests",
                    ));
                }
                serde_yaml::from_slice::<Value>(&body)
                    .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?
            } else {
                parse_json(&body)?
            };
            let (obj, created) =
                shared.mutate(|s| s.patch(kind, namespace, name, patch_type, patch))?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(json_response(status, &obj))
        }
        (Some(name), &Method::DELETE) => {
            let opts = if body.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                parse_json(&body)?
            };
            let gone =
                shared.mutate(|s| s.delete(kind, namespace, name, opts.get("preconditions")))?;
            Ok(json_response(StatusCode::OK, &gone))
        }
        (None, &Method::DELETE) => Err(ApiError::method_not_allowed(
            "deletecollection is not supported by the test API server",
        )),
        _ => Err(ApiError::method_not_allowed(format!(
            "{} is not supported on this path",
            parts.method
        ))),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn patch_type(headers: &HeaderMap) -> Result<PatchType, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = ct.split(';').next().unwrap_or_default().trim();
    match media {
        "application/merge-patch+json" => Ok(PatchType::Merge),
        "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
        "application/json-patch+json" => Ok(PatchType::Json),
        "application/apply-patch+yaml" => Ok(PatchType::Apply),
        _ => Err(ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, \
             application/strategic-merge-patch+json, application/apply-patch+yaml (got {ct:?})"
        ))),
    }
}

/// How objects are answered: as themselves, or as Table rows (`kubectl get`).
#[derive(Clone, Copy, Debug)]
enum View {
    Object,
    Table {
        version: &'static str,
        include: IncludeObject,
    },
}

impl View {
    fn negotiate(headers: &HeaderMap, params: &Params) -> Self {
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        match table::negotiate(accept) {
            Some(version) => Self::Table {
                version,
                include: params.include_object.unwrap_or(IncludeObject::Metadata),
            },
            None => Self::Object,
        }
    }

    /// One object (GET, or a watch event's object).
    fn single(self, kind: ResourceKind, obj: &Value) -> Value {
        match self {
            Self::Object => obj.clone(),
            Self::Table { version, include } => table::table(kind, &[obj], None, include, version),
        }
    }
}

/// `/openapi/v2`: protobuf when the client asks for it (kubectl does), else JSON.
fn openapi_v2(headers: &HeaderMap) -> Response {
    let doc = openapi::document(KUBE_MINOR);
    let wants_protobuf = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("protobuf"));
    if wants_protobuf {
        (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(openapi::PROTOBUF_MEDIA_TYPE),
            )],
            openapi::to_protobuf(&doc),
        )
            .into_response()
    } else {
        json_response(StatusCode::OK, &doc)
    }
}

fn list(
    shared: &Shared,
    kind: ResourceKind,
    namespace: Option<&str>,
    params: &Params,
    view: View,
) -> Result<Response, ApiError> {
    let filter = params.filter(kind, namespace)?;
    // A Table (what `kubectl get` asks for) holds every item in one page.
    if let View::Table { version, include } = view {
        let (current_rv, items) = shared.read(|s| s.list(&filter));
        let objects: Vec<&Value> = items.iter().map(|o| &**o).collect();
        return Ok(json_response(
            StatusCode::OK,
            &table::table(kind, &objects, Some(current_rv), include, version),
        ));
    }
    // Pages as the real server cuts them (`limit`, `continue`), in (namespace, name)
    // order. A continued page carries the first page's resourceVersion, so a watch
    // started from it replays every change since: the real server serves a continued
    // page from that version's snapshot; this one serves the objects as they are now,
    // and the replayed events bring the client to the same state.
    let mut after = None;
    let mut token_rv = None;
    if let Some(token) = &params.continue_token {
        let mut parts = token.splitn(3, '/');
        let (Some(rv), Some(namespace), Some(name)) = (
            parts.next().and_then(|rv| rv.parse::<u64>().ok()),
            parts.next(),
            parts.next(),
        ) else {
            return Err(ApiError::bad_request(format!(
                "invalid continue token {token:?}"
            )));
        };
        token_rv = Some(rv);
        after = Some((namespace.to_owned(), name.to_owned()));
    }
    let page = shared.read(|s| s.list_page(&filter, after.as_ref(), params.limit));
    let rv = token_rv.unwrap_or(page.rv);
    let items = page.items;
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if page.more {
        if let Some(last) = items.last() {
            let namespace = meta_str(last, "namespace").unwrap_or_default();
            let name = meta_str(last, "name").unwrap_or_default();
            metadata["continue"] = json!(format!("{rv}/{namespace}/{name}"));
            if let Some(remaining) = page.remaining {
                metadata["remainingItemCount"] = json!(remaining);
            }
        }
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct List<'a> {
        kind: &'static str,
        api_version: &'static str,
        metadata: Value,
        items: Vec<&'a Value>,
    }
    let body = List {
        kind: kind.list_kind(),
        api_version: kind.api_version(),
        metadata,
        items: items.iter().map(|o| &**o).collect(),
    };
    let bytes = serde_json::to_vec(&body).map_err(|e| ApiError::unavailable(500, e.to_string()))?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response())
}

/// One line of a watch stream.
fn event_line(ty: &str, object: &Value) -> Bytes {
    #[derive(Serialize)]
    struct Wire<'a> {
        #[serde(rename = "type")]
        ty: &'a str,
        object: &'a Value,
    }
    let mut line = serde_json::to_vec(&Wire { ty, object }).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark_line(kind: ResourceKind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

/// Where a watch starts, from `resourceVersion`.
enum Start {
    /// Unset: the current state as synthetic ADDED events, then changes.
    MostRecent,
    /// `"0"`: like `MostRecent` (the real server may serve a cached, older state).
    Any,
    /// `N`: every change after N.
    Exact(u64),
}

fn watch(
    shared: &Arc<Shared>,
    kind: ResourceKind,
    namespace: Option<&str>,
    params: &Params,
    view: View,
) -> Result<Response, ApiError> {
    let filter = params.filter(kind, namespace)?;
    let start = match params.resource_version.as_deref() {
        None => Start::MostRecent,
        Some("0") => Start::Any,
        Some(v) => Start::Exact(
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
        ),
    };
    if params.send_initial_events == Some(true) {
        if params.resource_version_match.as_deref() != Some("NotOlderThan") {
            return Err(ApiError::invalid(
                kind,
                "",
                "resourceVersionMatch: Forbidden: sendInitialEvents requires resourceVersionMatch=NotOlderThan",
            ));
        }
        if !params.allow_watch_bookmarks {
            return Err(ApiError::invalid(
                kind,
                "",
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires allowWatchBookmarks=true",
            ));
        }
    }
    let send_initial = params
        .send_initial_events
        .unwrap_or(matches!(start, Start::MostRecent | Start::Any));
    let streaming_list = params.send_initial_events == Some(true);

    // Under the store lock: check the start, snapshot the initial state and subscribe
    // to changes, so nothing falls between the snapshot and the subscription.
    let snapshot = shared.read(|store| {
        let position = match start {
            // With sendInitialEvents, N means "at least as new as N": serve now.
            Start::Exact(n) if !streaming_list => {
                store.check_watch_start(n)?;
                n
            }
            Start::Exact(n) if n > store.resource_version() => {
                return Err(ApiError::too_large_resource_version(
                    n,
                    store.resource_version(),
                ));
            }
            _ => store.resource_version(),
        };
        let initial = if send_initial {
            store.list(&filter).1
        } else {
            Vec::new()
        };
        Ok((
            position,
            initial,
            shared.rv_tx.subscribe(),
            shared.drop_tx.subscribe(),
        ))
    });
    let mut lines = VecDeque::new();
    let mut finished = false;
    let (position, rv_rx, drop_rx) = match snapshot {
        Ok((position, initial, rv_rx, drop_rx)) => {
            lines.extend(
                initial
                    .iter()
                    .map(|obj| event_line("ADDED", &view.single(kind, obj))),
            );
            (position, rv_rx, drop_rx)
        }
        Err(e) if e.code == 410 => {
            // As the real server: 200, one ERROR event, end of stream.
            lines.push_back(event_line("ERROR", &e.status()));
            finished = true;
            (0, shared.rv_tx.subscribe(), shared.drop_tx.subscribe())
        }
        Err(e) => return Err(e),
    };
    if streaming_list && !finished {
        lines.push_back(bookmark_line(kind, position, true));
    }

    let timeout = params
        .timeout_seconds
        .filter(|s| *s > 0)
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let interval = shared.config.bookmark_interval;
    let state = WatchStream {
        shared: shared.clone(),
        filter,
        view,
        position,
        lines,
        finished,
        rv_rx,
        drop_rx,
        deadline: Instant::now() + timeout,
        bookmarks: params.allow_watch_bookmarks && !interval.is_zero(),
        interval,
        next_bookmark: Instant::now() + interval,
        _guard: WatcherGuard::new(shared.clone()),
    };
    let stream = futures::stream::unfold(state, WatchStream::next);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// State of one open watch response.
struct WatchStream {
    shared: Arc<Shared>,
    filter: Filter,
    view: View,
    /// Every event up to here has been sent (or filtered out).
    position: u64,
    lines: VecDeque<Bytes>,
    /// End the stream cleanly once `lines` is drained.
    finished: bool,
    rv_rx: watch::Receiver<u64>,
    drop_rx: watch::Receiver<u64>,
    deadline: Instant,
    bookmarks: bool,
    interval: Duration,
    next_bookmark: Instant,
    _guard: WatcherGuard,
}

/// The stream's error: the body ends without its last chunk and the connection is
/// closed, as a broken connection would.
type Item = Result<Bytes, std::io::Error>;

impl WatchStream {
    async fn next(mut self) -> Option<(Item, Self)> {
        loop {
            if let Some(line) = self.lines.pop_front() {
                return Some((Ok(line), self));
            }
            if self.finished {
                return None;
            }
            tokio::select! {
                biased;
                _ = self.drop_rx.changed() => {
                    self.finished = true;
                    return Some((Err(std::io::Error::other("watch dropped by the test API server")), self));
                }
                () = tokio::time::sleep_until(self.deadline) => {
                    // timeoutSeconds elapsed: a clean end, the client resumes.
                    return None;
                }
                changed = self.rv_rx.changed() => {
                    if changed.is_err() {
                        // The server is gone.
                        self.finished = true;
                        return Some((Err(std::io::Error::other("test API server stopped")), self));
                    }
                    self.catch_up();
                }
                () = tokio::time::sleep_until(self.next_bookmark), if self.bookmarks => {
                    self.catch_up();
                    if !self.finished {
                        self.lines.push_back(bookmark_line(self.filter.kind, self.position, false));
                    }
                    self.next_bookmark = Instant::now() + self.interval;
                }
            }
        }
    }

    /// Queues the events after `position`, or a 410 ERROR if they were forgotten.
    fn catch_up(&mut self) {
        let since = self.shared.read(|s| {
            s.events_since(self.position)
                .map(|events| (events, s.resource_version()))
        });
        match since {
            Ok((events, now)) => {
                for ev in &events {
                    if let Some((ty, obj)) = self.filter.view(ev) {
                        let obj = self.view.single(self.filter.kind, &obj);
                        self.lines.push_back(event_line(ty.wire(), &obj));
                    }
                    self.position = ev.rv;
                }
                // Every change up to `now` has been seen; versions issued without an
                // event (compaction) count as seen too, so a later compaction does not
                // strand an up-to-date watch before its floor.
                self.position = self.position.max(now);
            }
            Err(e) => {
                self.lines.push_back(event_line("ERROR", &e.status()));
                self.finished = true;
            }
        }
    }
}

enum Discovery {
    Json(Value),
    Text(&'static str),
}

fn discovery(segments: &[&str]) -> Option<Discovery> {
    let resources = |group_version: &str| {
        let list: Vec<Value> = ResourceKind::ALL
            .into_iter()
            .filter(|k| k.api_version() == group_version)
            .map(ResourceKind::api_resource)
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
    };
    let discovery_group = json!({
        "name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"},
    });
    Some(Discovery::Json(match segments {
        ["version"] => json!({
            "major": "1",
            "minor": KUBE_MINOR,
            "gitVersion": format!("v1.{KUBE_MINOR}.0-kpr-test"),
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24",
            "compiler": "gc",
            "platform": "linux/amd64",
        }),
        ["healthz" | "livez" | "readyz"] => return Some(Discovery::Text("ok")),
        ["api"] => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }),
        ["api", "v1"] => resources("v1"),
        ["apis"] => {
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [discovery_group]})
        }
        ["apis", "discovery.k8s.io"] => {
            let mut g = discovery_group;
            g["kind"] = json!("APIGroup");
            g["apiVersion"] = json!("v1");
            g
        }
        ["apis", "discovery.k8s.io", "v1"] => resources("discovery.k8s.io/v1"),
        _ => return None,
    }))
}

/// `/testing/...`: test-only controls; always served, even while paused.
fn control(
    shared: &Shared,
    method: &Method,
    segments: &[&str],
    uri: &Uri,
) -> Result<Response, ApiError> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let param = |name: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match (method, segments) {
        (&Method::GET, ["watchers"]) => ok(json!({
            "watchers": shared.watchers(),
            "watchRequests": shared.watch_requests.load(Ordering::SeqCst),
        })),
        (&Method::GET, ["resource-version"]) => {
            ok(json!({"resourceVersion": shared.read(|s| s.resource_version()).to_string()}))
        }
        (&Method::POST, ["drop-watches"]) => ok(json!({"dropped": shared.drop_watches()})),
        (&Method::POST, ["compact"]) => {
            let drop = parse_bool("dropWatches", param("dropWatches").unwrap_or_default())?;
            let rv = shared.compact(drop);
            ok(json!({"resourceVersion": rv.to_string()}))
        }
        (&Method::POST, ["pause"]) => {
            let code = match param("code") {
                None => 503,
                Some(c) => c
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (400..=599).contains(c))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("invalid code {c:?}: want 400..=599"))
                    })?,
            };
            shared.pause(code);
            ok(json!({"paused": true, "code": code}))
        }
        (&Method::POST, ["resume"]) => {
            shared.resume();
            ok(json!({"paused": false}))
        }
        (
            _,
            ["watchers" | "resource-version" | "drop-watches" | "compact" | "pause" | "resume"],
        ) => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on this path"
        ))),
        _ => Err(ApiError::no_route()),
    }
}
