//! A write the store acknowledged survives `kill -9` of whatever holds the data: the process
//! running a SQLite store, or the etcd server. A child process writes under load from several
//! tasks and prints each acknowledged key; the test kills the holder mid-load, reopens the
//! data and checks that every acknowledged write is there with its value.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrolet_control_plane::storage::etcd::{DEFAULT_ROOT, EtcdStore};
use ferrolet_control_plane::storage::sqlite::SqliteStore;
use ferrolet_control_plane::storage::testing::EtcdServer;
use ferrolet_control_plane::storage::{ListOptions, Store};

/// Environment variable that turns the ignored `writer_child` test into the writer.
const CHILD_ENV: &str = "FERROLET_STORE_DURABILITY_CHILD";
/// Concurrent writer tasks in the child.
const WRITERS: usize = 8;
/// Each child task stops after this many writes, so a child nobody kills ends by itself.
const MAX_WRITES_PER_TASK: usize = 20_000;
/// Acknowledged writes to see before killing.
const KILL_AFTER: usize = 400;
/// How long the child may take to acknowledge that many writes.
const ACK_DEADLINE: Duration = Duration::from_secs(120);

fn value_for(key: &str) -> String {
    format!("{{\"key\":\"{key}\",\"padding\":\"{}\"}}", "x".repeat(200))
}

/// The child side: `sqlite:<path>` or `etcd:<endpoint>` in `CHILD_ENV`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the writer child of the durability tests, started by them"]
async fn writer_child() {
    let target = std::env::var(CHILD_ENV).expect("run by the durability tests only");
    let store: Arc<dyn Store> = match target.split_once(':') {
        Some(("sqlite", path)) => Arc::new(SqliteStore::open(path.as_ref()).expect("open sqlite")),
        Some(("etcd", endpoint)) => Arc::new(
            EtcdStore::connect(&[endpoint.to_owned()], DEFAULT_ROOT)
                .await
                .expect("connect etcd"),
        ),
        _ => panic!("bad {CHILD_ENV}={target}"),
    };
    let mut tasks = Vec::new();
    for task in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..MAX_WRITES_PER_TASK {
                let key = format!("/durable/{task}/{i:06}");
                if let Ok(kv) = store.create(&key, Bytes::from(value_for(&key))).await {
                    // One line per acknowledged write, written whole (stdout is line
                    // buffered).
                    println!("ack {key} {}", kv.mod_revision);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Starts the writer child against `target`.
fn spawn_writer(target: &str) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args([
            "writer_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, target)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start writer child")
}

/// Kills the child on drop, whatever happened.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's acknowledgements on a thread: key -> revision, sent as they come.
fn read_acks(child: &mut Child) -> mpsc::Receiver<(String, i64)> {
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split(' ');
            if let (Some("ack"), Some(key), Some(rev)) = (parts.next(), parts.next(), parts.next())
                && let Ok(rev) = rev.parse()
                && tx.send((key.to_owned(), rev)).is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Collects acknowledgements until `count` arrived (panics after the deadline).
fn wait_for_acks(acks: &mpsc::Receiver<(String, i64)>, count: usize) -> BTreeMap<String, i64> {
    let deadline = Instant::now() + ACK_DEADLINE;
    let mut seen = BTreeMap::new();
    while seen.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match acks.recv_timeout(left) {
            Ok((key, rev)) => {
                seen.insert(key, rev);
            }
            Err(e) => panic!(
                "only {} of {count} writes acknowledged within {ACK_DEADLINE:?}: {e}",
                seen.len()
            ),
        }
    }
    seen
}

/// Every acknowledged key is in the store, with its value, at its acknowledged revision or
/// a later one never (keys are only created once).
async fn verify(store: &dyn Store, acked: &BTreeMap<String, i64>) {
    let listed = store
        .list("/durable/", ListOptions::default())
        .await
        .expect("list after restart");
    let present: BTreeMap<&str, _> = listed
        .items
        .iter()
        .map(|kv| (kv.key.as_str(), kv))
        .collect();
    let mut missing = Vec::new();
    for (key, rev) in acked {
        match present.get(key.as_str()) {
            Some(kv) => {
                assert_eq!(kv.mod_revision, *rev, "revision of {key}");
                assert_eq!(&kv.value[..], value_for(key).as_bytes(), "value of {key}");
            }
            None => missing.push(key.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    let max_acked = acked.values().max().copied().unwrap_or(0);
    assert!(store.current_revision().await.unwrap() >= max_acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store.db");
    let mut child = ChildGuard(spawn_writer(&format!("sqlite:{}", path.display())));
    let acks = read_acks(&mut child.0);
    let mut acked = wait_for_acks(&acks, KILL_AFTER);
    // SIGKILL while the child is still writing.
    child.0.kill().expect("kill -9 the writer");
    child.0.wait().expect("reap the writer");
    // Everything it printed before it died, including writes after the first KILL_AFTER.
    acked.extend(acks.iter());
    assert!(acked.len() >= KILL_AFTER);

    let store = SqliteStore::open(&path).expect("reopen after kill -9");
    verify(&store, &acked).await;
    // The reopened store goes on from where the dead one stopped.
    let next = store
        .create("/after-restart", Bytes::from_static(b"x"))
        .await
        .expect("write after restart");
    assert!(next.mod_revision > acked.values().max().copied().unwrap_or(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_acknowledged_writes_survive_kill_9_of_etcd() {
    let mut etcd = EtcdServer::start().await.expect("start etcd");
    let mut child = ChildGuard(spawn_writer(&format!("etcd:{}", etcd.endpoint())));
    let acks = read_acks(&mut child.0);
    let mut acked = wait_for_acks(&acks, KILL_AFTER);
    // SIGKILL the server under load; the client's writes in flight fail unacknowledged.
    etcd.kill();
    child.0.kill().expect("stop the writer");
    child.0.wait().expect("reap the writer");
    acked.extend(acks.iter());
    assert!(acked.len() >= KILL_AFTER);

    etcd.restart().await.expect("restart etcd on its data");
    let store = EtcdStore::connect(&[etcd.endpoint()], DEFAULT_ROOT)
        .await
        .expect("connect after restart");
    verify(&store, &acked).await;
}
