//! One set of behaviours every `Store` must have, run against each implementation: the
//! in-memory reference model, SQLite on a temp file, and a real etcd started for each test.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrolet_control_plane::storage::{
    KeyValue, ListOptions, Revision, Store, StoreError, WatchEvent, WatchStream,
};
use futures::StreamExt;

/// How long a watch may take to deliver an event that is already committed.
const EVENT_DEADLINE: Duration = Duration::from_secs(20);

fn val(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next_event(stream: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(EVENT_DEADLINE, stream.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("watch failed: {e}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {EVENT_DEADLINE:?}"),
    }
}

/// The next event, which must be about `key`: earlier events that should not be there (for
/// another prefix, or already seen) would show up here instead.
async fn expect_next_key(stream: &mut WatchStream, key: &str) -> WatchEvent {
    let event = next_event(stream).await;
    assert_eq!(event.key(), key, "unexpected event {event:?}");
    event
}

fn keys(items: &[KeyValue]) -> Vec<&str> {
    items.iter().map(|kv| kv.key.as_str()).collect()
}

async fn list_all(store: &dyn Store, prefix: &str, revision: Option<Revision>) -> Vec<KeyValue> {
    store
        .list(
            prefix,
            ListOptions {
                revision,
                ..ListOptions::default()
            },
        )
        .await
        .expect("list")
        .items
}

pub async fn revisions_are_monotonic_and_shared_across_keys(store: &dyn Store) {
    let start = store.current_revision().await.unwrap();
    assert!(
        start >= 1,
        "a store's revision is never below 1, got {start}"
    );
    let a = store.create("/a", val("a1")).await.unwrap();
    let b = store.create("/b", val("b1")).await.unwrap();
    let a2 = store.update("/a", val("a2"), None).await.unwrap();
    assert!(start < a.mod_revision);
    assert!(a.mod_revision < b.mod_revision, "one counter for all keys");
    assert!(b.mod_revision < a2.mod_revision);
    assert_eq!(a.create_revision, a.mod_revision);
    assert_eq!(
        a2.create_revision, a.create_revision,
        "update keeps create_revision"
    );
    assert_eq!(store.current_revision().await.unwrap(), a2.mod_revision);
    let got = store.get("/a").await.unwrap().expect("/a exists");
    assert_eq!(got, a2);
    assert_eq!(&got.value[..], b"a2");
    assert_eq!(store.get("/nope").await.unwrap(), None);
}

pub async fn create_of_existing_key_conflicts(store: &dyn Store) {
    let first = store.create("/k", val("one")).await.unwrap();
    let err = store.create("/k", val("two")).await.unwrap_err();
    assert!(
        matches!(err, StoreError::AlreadyExists { ref key } if key == "/k"),
        "{err:?}"
    );
    assert_eq!(
        store.get("/k").await.unwrap(),
        Some(first.clone()),
        "value untouched"
    );
    store.delete("/k", None).await.unwrap();
    let again = store.create("/k", val("three")).await.unwrap();
    assert!(
        again.create_revision > first.create_revision,
        "a new life of the key"
    );
}

pub async fn update_and_delete_compare_and_swap(store: &dyn Store) {
    let v1 = store.create("/cas", val("1")).await.unwrap();
    let v2 = store
        .update("/cas", val("2"), Some(v1.mod_revision))
        .await
        .unwrap();
    let err = store
        .update("/cas", val("stale"), Some(v1.mod_revision))
        .await
        .unwrap_err();
    match err {
        StoreError::Conflict {
            key,
            expected,
            current,
        } => {
            assert_eq!(key, "/cas");
            assert_eq!(expected, v1.mod_revision);
            assert_eq!(current, v2.mod_revision);
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    let err = store
        .delete("/cas", Some(v1.mod_revision))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!(store.get("/cas").await.unwrap(), Some(v2.clone()));

    let err = store.update("/missing", val("x"), None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref key } if key == "/missing"),
        "{err:?}"
    );
    let err = store
        .update("/missing", val("x"), Some(5))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let err = store.delete("/missing", None).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert!(
        store.get("/missing").await.unwrap().is_none(),
        "failed update created nothing"
    );

    let prev = store.delete("/cas", Some(v2.mod_revision)).await.unwrap();
    assert_eq!(prev, v2);
    assert_eq!(store.get("/cas").await.unwrap(), None);
    assert!(store.current_revision().await.unwrap() > v2.mod_revision);
}

pub async fn bad_input_is_rejected(store: &dyn Store) {
    let before = store.current_revision().await.unwrap();
    let err = store.create("", val("x")).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    let err = store.update("", val("x"), None).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    let err = store.delete("", None).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    let err = store.create("/a\0b", val("x")).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    let err = store.create("pods/a", val("x")).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err:?}");
    let err = store
        .list("pods/", ListOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    let err = store.watch("pods/", 1).await.err().expect("bad prefix");
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    let opts = ListOptions {
        revision: Some(0),
        ..ListOptions::default()
    };
    let err = store.list("/", opts).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    let err = store.watch("/", -1).await.err().expect("negative watch");
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    assert_eq!(
        store.current_revision().await.unwrap(),
        before,
        "nothing was written"
    );
    assert!(list_all(store, "", None).await.is_empty());
}

pub async fn list_at_a_past_revision(store: &dyn Store) {
    store.create("/l/a", val("a1")).await.unwrap();
    store.create("/l/b", val("b1")).await.unwrap();
    store.create("/l/c", val("c1")).await.unwrap();
    let then = store.current_revision().await.unwrap();
    store.update("/l/a", val("a2"), None).await.unwrap();
    store.delete("/l/b", None).await.unwrap();
    store.create("/l/d", val("d1")).await.unwrap();

    let past = store
        .list(
            "/l/",
            ListOptions {
                revision: Some(then),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(past.revision, then);
    assert_eq!(keys(&past.items), ["/l/a", "/l/b", "/l/c"]);
    assert_eq!(&past.items[0].value[..], b"a1");
    assert_eq!(past.remaining, 0);

    let now = store.list("/l/", ListOptions::default()).await.unwrap();
    assert_eq!(now.revision, store.current_revision().await.unwrap());
    assert_eq!(keys(&now.items), ["/l/a", "/l/c", "/l/d"]);
    assert_eq!(&now.items[0].value[..], b"a2");

    let future = now.revision + 10;
    let err = store
        .list(
            "/l/",
            ListOptions {
                revision: Some(future),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::FutureRevision { requested, .. } if requested == future),
        "{err:?}"
    );
}

pub async fn list_pages_with_start_after_and_limit(store: &dyn Store) {
    for i in 0..25 {
        store
            .create(&format!("/p/{i:02}"), val(&i.to_string()))
            .await
            .unwrap();
    }
    // Neighbours that share a string prefix but are not under "/p/".
    store.create("/p", val("x")).await.unwrap();
    store.create("/pa", val("x")).await.unwrap();
    store.create("/o/1", val("x")).await.unwrap();

    let first = store
        .list(
            "/p/",
            ListOptions {
                limit: Some(10),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.items[0].key, "/p/00");
    assert_eq!(first.remaining, 15);
    assert!(first.more());

    // Writes between pages do not show up: later pages are read at the first page's revision.
    store.create("/p/10a", val("late")).await.unwrap();
    store.delete("/p/24", None).await.unwrap();

    let mut seen = keys(&first.items)
        .iter()
        .map(|k| (*k).to_owned())
        .collect::<Vec<_>>();
    let mut last = first;
    while last.more() {
        let page = store
            .list(
                "/p/",
                ListOptions {
                    revision: Some(last.revision),
                    start_after: last.items.last().map(|kv| kv.key.clone()),
                    limit: Some(10),
                },
            )
            .await
            .unwrap();
        assert!(!page.items.is_empty());
        seen.extend(page.items.iter().map(|kv| kv.key.clone()));
        last = page;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("/p/{i:02}")).collect();
    assert_eq!(seen, expected);

    let now = list_all(store, "/p/", None).await;
    assert_eq!(now.len(), 25, "24 old keys + /p/10a");
    assert!(now.iter().any(|kv| kv.key == "/p/10a"));
}

pub async fn watch_replays_history_then_streams_live(store: &dyn Store) {
    let a = store.create("/w/a", val("1")).await.unwrap();
    let from = a.mod_revision;
    let b = store.create("/w/b", val("1")).await.unwrap();
    let a2 = store.update("/w/a", val("2"), None).await.unwrap();

    let mut watch = store.watch("/w/", from).await.unwrap();
    let e1 = next_event(&mut watch).await;
    assert_eq!(
        e1,
        WatchEvent::Put {
            kv: b.clone(),
            prev: None
        }
    );
    let e2 = next_event(&mut watch).await;
    assert_eq!(
        e2,
        WatchEvent::Put {
            kv: a2.clone(),
            prev: Some(a.clone())
        }
    );

    let c = store.create("/w/c", val("1")).await.unwrap();
    let e3 = next_event(&mut watch).await;
    assert_eq!(e3, WatchEvent::Put { kv: c, prev: None });
    assert!(e1.revision() < e2.revision() && e2.revision() < e3.revision());

    // Watching from the current revision sees only what comes next.
    let now = store.current_revision().await.unwrap();
    let mut fresh = store.watch("/w/", now).await.unwrap();
    let d = store.create("/w/d", val("1")).await.unwrap();
    assert_eq!(
        expect_next_key(&mut fresh, "/w/d").await.revision(),
        d.mod_revision
    );

    let err = store.watch("/w/", now + 100).await.err().expect("future");
    assert!(matches!(err, StoreError::FutureRevision { .. }), "{err:?}");
}

pub async fn watch_sees_only_its_prefix(store: &dyn Store) {
    let from = store.current_revision().await.unwrap();
    let mut watch = store.watch("/a/", from).await.unwrap();
    store.create("/ab", val("x")).await.unwrap();
    store.create("/b/1", val("x")).await.unwrap();
    store.create("/a", val("x")).await.unwrap();
    store.create("/a/1", val("x")).await.unwrap();
    expect_next_key(&mut watch, "/a/1").await;
    // And the same for events that come from history.
    let mut replay = store.watch("/a/", from).await.unwrap();
    expect_next_key(&mut replay, "/a/1").await;
}

pub async fn delete_events_carry_the_previous_value(store: &dyn Store) {
    let v1 = store.create("/d/x", val("one")).await.unwrap();
    let from = v1.mod_revision;
    let mut watch = store.watch("/d/", from).await.unwrap();
    let v2 = store.update("/d/x", val("two"), None).await.unwrap();
    let prev = store.delete("/d/x", None).await.unwrap();
    assert_eq!(prev, v2);
    let update = next_event(&mut watch).await;
    assert_eq!(
        update,
        WatchEvent::Put {
            kv: v2.clone(),
            prev: Some(v1)
        }
    );
    let delete = next_event(&mut watch).await;
    let deleted_at = store.current_revision().await.unwrap();
    assert_eq!(
        delete,
        WatchEvent::Delete {
            prev: v2.clone(),
            revision: deleted_at
        }
    );
    // Replayed from history, the same.
    let mut replay = store.watch("/d/", from).await.unwrap();
    next_event(&mut replay).await;
    assert_eq!(next_event(&mut replay).await, delete);
}

pub async fn compaction_answers_old_revisions_with_compacted(store: &dyn Store) {
    store.create("/c/a", val("1")).await.unwrap();
    let old = store.current_revision().await.unwrap();
    store.update("/c/a", val("2"), None).await.unwrap();
    store.create("/c/b", val("1")).await.unwrap();
    store.create("/c/gone", val("1")).await.unwrap();
    store.delete("/c/gone", None).await.unwrap();
    store.update("/c/b", val("2"), None).await.unwrap();
    let keep = store.current_revision().await.unwrap();
    store.update("/c/a", val("3"), None).await.unwrap();
    let after = store.current_revision().await.unwrap();

    let err = store.compact(after + 10).await.unwrap_err();
    assert!(matches!(err, StoreError::FutureRevision { .. }), "{err:?}");

    store.compact(keep).await.unwrap();

    let err = store
        .list(
            "/c/",
            ListOptions {
                revision: Some(old),
                ..ListOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == old && compacted == keep),
        "{err:?}"
    );
    let err = store
        .watch("/c/", old)
        .await
        .err()
        .expect("compacted watch");
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == old && compacted == keep),
        "{err:?}"
    );

    // The state at the compaction revision is still there, and so is everything after it.
    let at_keep = list_all(store, "/c/", Some(keep)).await;
    assert_eq!(keys(&at_keep), ["/c/a", "/c/b"]);
    assert_eq!(&at_keep[0].value[..], b"2");
    assert_eq!(&at_keep[1].value[..], b"2");
    let mut watch = store.watch("/c/", keep).await.unwrap();
    let event = expect_next_key(&mut watch, "/c/a").await;
    match event {
        WatchEvent::Put { kv, prev } => {
            assert_eq!(&kv.value[..], b"3");
            assert_eq!(prev.map(|p| p.value), Some(val("2")));
        }
        other => panic!("expected a put, got {other:?}"),
    }
    // Compacting again at or below is a no-op; writes go on.
    store.compact(keep).await.unwrap();
    store.compact(old).await.unwrap();
    store.create("/c/new", val("1")).await.unwrap();
    assert_eq!(
        keys(&list_all(store, "/c/", None).await),
        ["/c/a", "/c/b", "/c/new"]
    );
}

pub async fn slow_watcher_gets_every_event(store: &dyn Store) {
    // More separate commits than a store buffers for a watcher that does not read.
    const WRITES: usize = 1500;
    let from = store.current_revision().await.unwrap();
    let mut watch = store.watch("/slow/", from).await.unwrap();
    for i in 0..WRITES {
        store
            .create(&format!("/slow/{i:05}"), val("x"))
            .await
            .unwrap();
    }
    let mut last = from;
    for i in 0..WRITES {
        let event = next_event(&mut watch).await;
        assert_eq!(event.key(), format!("/slow/{i:05}"));
        assert!(event.revision() > last, "events in revision order");
        last = event.revision();
    }
}

pub async fn lagging_watcher_behind_compaction_gets_no_gap(store: &dyn Store) {
    // A watcher that does not read while its history is compacted away either still gets
    // every event (the backend had them buffered) or stops with Compacted; it never skips.
    const WRITES: usize = 1500;
    let from = store.current_revision().await.unwrap();
    let mut watch = store.watch("/lag/", from).await.unwrap();
    for i in 0..WRITES {
        store
            .create(&format!("/lag/{i:05}"), val("x"))
            .await
            .unwrap();
    }
    let now = store.current_revision().await.unwrap();
    store.compact(now).await.unwrap();
    let mut seen = 0;
    loop {
        match tokio::time::timeout(EVENT_DEADLINE, watch.next()).await {
            Ok(Some(Ok(event))) => {
                assert_eq!(event.key(), format!("/lag/{seen:05}"), "no gap, no reorder");
                seen += 1;
                if seen == WRITES {
                    break;
                }
            }
            Ok(Some(Err(StoreError::Compacted { compacted, .. }))) => {
                assert_eq!(compacted, now);
                assert!(
                    tokio::time::timeout(EVENT_DEADLINE, watch.next())
                        .await
                        .expect("a failed watch ends at once")
                        .is_none(),
                    "nothing after the error"
                );
                break;
            }
            Ok(Some(Err(e))) => panic!("watch failed with {e}, expected Compacted"),
            Ok(None) => panic!("watch ended after {seen} events without an error"),
            Err(_) => panic!("watch stalled after {seen} events"),
        }
    }
}

pub async fn concurrent_writers_lose_no_update(store: Arc<dyn Store>) {
    const WRITERS: usize = 8;
    const INCREMENTS: usize = 25;
    store.create("/counter", val("0")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0usize;
            for _ in 0..INCREMENTS {
                loop {
                    let current = store.get("/counter").await.unwrap().expect("counter");
                    let n: usize = std::str::from_utf8(&current.value)
                        .unwrap()
                        .parse()
                        .unwrap();
                    match store
                        .update(
                            "/counter",
                            val(&(n + 1).to_string()),
                            Some(current.mod_revision),
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("update failed: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let last = store.get("/counter").await.unwrap().expect("counter");
    assert_eq!(
        std::str::from_utf8(&last.value).unwrap(),
        (WRITERS * INCREMENTS).to_string()
    );
}

/// Generates one `#[tokio::test]` per behaviour for a backend. `$open` is an async block
/// giving `(Arc<dyn Store>, guard)`; the guard keeps the backend alive for the test.
macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        let (store, _guard) = $open.await;
                        super::$name(&*store).await;
                    }
                };
            }

            case!(revisions_are_monotonic_and_shared_across_keys);
            case!(create_of_existing_key_conflicts);
            case!(update_and_delete_compare_and_swap);
            case!(bad_input_is_rejected);
            case!(list_at_a_past_revision);
            case!(list_pages_with_start_after_and_limit);
            case!(watch_replays_history_then_streams_live);
            case!(watch_sees_only_its_prefix);
            case!(delete_events_carry_the_previous_value);
            case!(compaction_answers_old_revisions_with_compacted);
            case!(slow_watcher_gets_every_event);
            case!(lagging_watcher_behind_compaction_gets_no_gap);

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writers_lose_no_update() {
                let (store, _guard) = $open.await;
                super::concurrent_writers_lose_no_update(store).await;
            }
        }
    };
}

conformance!(memory, async {
    let store: Arc<dyn Store> =
        Arc::new(ferrolet_control_plane::storage::memory::MemoryStore::new());
    (store, ())
});

conformance!(sqlite, async {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        ferrolet_control_plane::storage::sqlite::SqliteStore::open(&dir.path().join("store.db"))
            .expect("open sqlite store");
    let store: Arc<dyn Store> = Arc::new(store);
    (store, dir)
});

conformance!(etcd, async {
    let server = ferrolet_control_plane::storage::testing::EtcdServer::start()
        .await
        .expect("start etcd");
    let store = ferrolet_control_plane::storage::etcd::EtcdStore::connect(
        &[server.endpoint()],
        ferrolet_control_plane::storage::etcd::DEFAULT_ROOT,
    )
    .await
    .expect("connect to etcd");
    let store: Arc<dyn Store> = Arc::new(store);
    (store, server)
});
