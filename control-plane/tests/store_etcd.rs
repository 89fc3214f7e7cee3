//! etcd-specific behaviour of the etcd store, checked against a real etcd: keys live under
//! the root prefix, where `etcdctl` finds them, and nothing outside the root is seen or
//! touched.

use bytes::Bytes;
use ferrolet_control_plane::storage::etcd::{DEFAULT_ROOT, EtcdStore};
use ferrolet_control_plane::storage::testing::EtcdServer;
use ferrolet_control_plane::storage::{ListOptions, Store, StoreError};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_under_the_root_and_nothing_outside_it_is_seen() {
    let server = EtcdServer::start().await.expect("start etcd");
    let mut raw = etcd_client::Client::connect([server.endpoint()], None)
        .await
        .expect("raw client");
    // Another user of the same etcd, including a key that shares the root's spelling.
    raw.put("/other/x", "o", None).await.unwrap();
    raw.put("/registryX/y", "o", None).await.unwrap();

    let store = EtcdStore::connect(&[server.endpoint()], DEFAULT_ROOT)
        .await
        .expect("connect");
    let from = store.current_revision().await.unwrap();
    let mut watch = store.watch("", from).await.unwrap();
    let kv = store
        .create("/pods/default/a", Bytes::from_static(b"{}"))
        .await
        .unwrap();

    let stored = raw.get("/registry/pods/default/a", None).await.unwrap();
    let stored = stored.kvs().first().expect("key under the root in etcd");
    assert_eq!(stored.value(), b"{}");
    assert_eq!(stored.mod_revision(), kv.mod_revision);

    raw.put("/other/z", "o", None).await.unwrap();
    store
        .create("/pods/default/b", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let listed = store.list("", ListOptions::default()).await.unwrap();
    let keys: Vec<&str> = listed.items.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/pods/default/a", "/pods/default/b"]);
    for expected in ["/pods/default/a", "/pods/default/b"] {
        let event = tokio::time::timeout(std::time::Duration::from_secs(20), watch.next())
            .await
            .expect("event in time")
            .expect("stream open")
            .expect("event");
        assert_eq!(
            event.key(),
            expected,
            "writes outside the root are not watched"
        );
    }
    assert!(raw.get("/other/x", None).await.unwrap().count() == 1);
}

#[tokio::test]
async fn bad_connection_settings_are_refused() {
    let err = EtcdStore::connect(&[], DEFAULT_ROOT)
        .await
        .err()
        .expect("no endpoints");
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
    for root in ["", "registry", "/registry/"] {
        let err = EtcdStore::connect(&["http://127.0.0.1:1".to_owned()], root)
            .await
            .err()
            .expect("bad root");
        assert!(
            matches!(err, StoreError::InvalidArgument(_)),
            "{root:?}: {err}"
        );
    }
    // Nothing listens on port 1 of loopback.
    let err = EtcdStore::connect(&["http://127.0.0.1:1".to_owned()], DEFAULT_ROOT)
        .await
        .err()
        .expect("nothing to connect to");
    assert!(matches!(err, StoreError::Etcd { .. }), "{err}");
}
