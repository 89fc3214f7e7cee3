//! Where the proxy's inputs come from: Services, EndpointSlices and this node's Node, each
//! listed once and then watched. `ProxySource` is the narrow interface (a fake feeds it in
//! unit tests); `ApiSource` implements it with the agent's API client. `reflect` turns one
//! kind's list and watch into `Change`s, relisting (and deleting what vanished) when a
//! watch expires.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::{mpsc, watch};

use super::state::{Change, ServiceKey};
use crate::api::{Api, ApiError, ApiResource, ListParams, WatchEvent};

/// The kinds the proxy follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Services,
    EndpointSlices,
    /// Only the node the proxy runs on.
    Node,
}

/// One object of a [`Kind`].
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(s) => &s.metadata,
            Object::Slice(s) => &s.metadata,
            Object::Node(n) => &n.metadata,
        }
    }

    /// Namespace and name.
    fn key(&self) -> (String, String) {
        let m = self.meta();
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    }

    fn upserted(self) -> Change {
        match self {
            Object::Service(s) => Change::ServiceUpserted(s),
            Object::Slice(s) => Change::SliceUpserted(s),
            Object::Node(n) => Change::NodeUpserted(n),
        }
    }
}

/// The deletion of `(namespace, name)` of `kind`; a Node is never forgotten (its last
/// known addresses stay in use).
fn deleted(kind: Kind, (namespace, name): (String, String)) -> Option<Change> {
    match kind {
        Kind::Services => Some(Change::ServiceDeleted(ServiceKey::new(namespace, name))),
        Kind::EndpointSlices => Some(Change::SliceDeleted { namespace, name }),
        Kind::Node => None,
    }
}

/// Every object of a kind, and the revision to watch from.
#[derive(Clone, Debug, Default)]
pub struct Listed {
    pub objects: Vec<Object>,
    pub revision: String,
}

/// One watch event.
#[derive(Clone, Debug)]
pub enum Watched {
    Upserted(Object),
    Deleted(Object),
    /// Only the revision moved.
    Bookmark(String),
}

pub type WatchStream = BoxStream<'static, Result<Watched, ApiError>>;

/// Lists and watches of the three kinds. A revision too old to watch from is
/// [`ApiError::Gone`] (at once or as an item of the stream): the proxy lists again.
pub trait ProxySource: Send + Sync + 'static {
    fn list(&self, kind: Kind) -> impl Future<Output = Result<Listed, ApiError>> + Send;

    fn watch(
        &self,
        kind: Kind,
        revision: &str,
    ) -> impl Future<Output = Result<WatchStream, ApiError>> + Send;
}

/// The agent's API client as a proxy source: cluster-wide Services and EndpointSlices, and
/// the Node named `node_name`.
pub struct ApiSource<A> {
    api: Arc<A>,
    node_name: String,
}

impl<A: Api> ApiSource<A> {
    pub fn new(api: Arc<A>, node_name: impl Into<String>) -> Self {
        Self {
            api,
            node_name: node_name.into(),
        }
    }

    fn node_params(&self) -> ListParams {
        ListParams::fields(format!("metadata.name={}", self.node_name))
    }

    async fn list_as<K: ApiResource>(
        &self,
        params: &ListParams,
        wrap: fn(K) -> Object,
    ) -> Result<Listed, ApiError> {
        let list = self.api.list::<K>(None, params).await?;
        Ok(Listed {
            objects: list.items.into_iter().map(wrap).collect(),
            revision: list.resource_version,
        })
    }

    async fn watch_as<K: ApiResource>(
        &self,
        params: &ListParams,
        revision: &str,
        wrap: fn(K) -> Object,
    ) -> Result<WatchStream, ApiError> {
        let stream = self.api.watch::<K>(None, params, revision).await?;
        Ok(stream
            .map(move |ev| {
                ev.map(|ev| match ev {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => Watched::Upserted(wrap(o)),
                    WatchEvent::Deleted(o) => Watched::Deleted(wrap(o)),
                    WatchEvent::Bookmark(rv) => Watched::Bookmark(rv),
                })
            })
            .boxed())
    }
}

fn wrap_service(s: Service) -> Object {
    Object::Service(Box::new(s))
}

fn wrap_slice(s: EndpointSlice) -> Object {
    Object::Slice(Box::new(s))
}

fn wrap_node(n: Node) -> Object {
    Object::Node(Box::new(n))
}

impl<A: Api> ProxySource for ApiSource<A> {
    async fn list(&self, kind: Kind) -> Result<Listed, ApiError> {
        match kind {
            Kind::Services => self.list_as(&ListParams::default(), wrap_service).await,
            Kind::EndpointSlices => self.list_as(&ListParams::default(), wrap_slice).await,
            Kind::Node => self.list_as(&self.node_params(), wrap_node).await,
        }
    }

    async fn watch(&self, kind: Kind, revision: &str) -> Result<WatchStream, ApiError> {
        match kind {
            Kind::Services => {
                self.watch_as(&ListParams::default(), revision, wrap_service)
                    .await
            }
            Kind::EndpointSlices => {
                self.watch_as(&ListParams::default(), revision, wrap_slice)
                    .await
            }
            Kind::Node => {
                self.watch_as(&self.node_params(), revision, wrap_node)
                    .await
            }
        }
    }
}

/// How long to wait before trying again after a failed list or watch.
const RETRY: Duration = Duration::from_secs(2);

/// Waits `d`; true when shutdown came first (or its sender is gone).
async fn pause(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = shutdown.wait_for(|s| *s) => true,
    }
}

/// Follows one kind until shutdown or until the receiver goes away: lists, sends every
/// object (and a deletion for every object the previous list had and this one lacks),
/// reports `listed` once after the first list, then watches from the list's revision.
pub async fn reflect<S: ProxySource>(
    source: Arc<S>,
    kind: Kind,
    node_name: String,
    tx: mpsc::Sender<Change>,
    listed: mpsc::UnboundedSender<Kind>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known: BTreeSet<(String, String)> = BTreeSet::new();
    let mut first = true;
    // A Node listing that the server does not filter by name is filtered here.
    let wanted = |o: &Object| !matches!(o, Object::Node(_)) || o.key().1 == node_name;
    'relist: loop {
        if *shutdown.borrow() {
            return;
        }
        let list = tokio::select! {
            r = source.list(kind) => r,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(?kind, error = %e, "proxy: list failed; retrying");
                if pause(RETRY, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        let mut now = BTreeSet::new();
        for o in list.objects.into_iter().filter(wanted) {
            now.insert(o.key());
            if tx.send(o.upserted()).await.is_err() {
                return;
            }
        }
        for gone in known.difference(&now) {
            if let Some(c) = deleted(kind, gone.clone())
                && tx.send(c).await.is_err()
            {
                return;
            }
        }
        known = now;
        if std::mem::take(&mut first) {
            let _ = listed.send(kind);
        }
        let mut revision = list.revision;
        loop {
            let stream = tokio::select! {
                r = source.watch(kind, &revision) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(ApiError::Gone { .. }) => continue 'relist,
                Err(e) => {
                    tracing::warn!(?kind, error = %e, "proxy: watch failed; retrying");
                    if pause(RETRY, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    n = stream.next() => n,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                let change = match next {
                    // The server ended the watch: resume where it stopped.
                    None => break,
                    Some(Err(ApiError::Gone { .. })) => continue 'relist,
                    Some(Err(e)) => {
                        tracing::warn!(?kind, error = %e, "proxy: watch broke; resuming");
                        if pause(RETRY, &mut shutdown).await {
                            return;
                        }
                        break;
                    }
                    Some(Ok(Watched::Bookmark(rv))) => {
                        revision = rv;
                        continue;
                    }
                    Some(Ok(Watched::Upserted(o))) => {
                        if !wanted(&o) {
                            continue;
                        }
                        advance(&mut revision, &o);
                        known.insert(o.key());
                        Some(o.upserted())
                    }
                    Some(Ok(Watched::Deleted(o))) => {
                        advance(&mut revision, &o);
                        let key = o.key();
                        known.remove(&key);
                        deleted(kind, key)
                    }
                };
                if let Some(c) = change
                    && tx.send(c).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

fn advance(revision: &mut String, o: &Object) {
    if let Some(rv) = &o.meta().resource_version {
        revision.clone_from(rv);
    }
}
