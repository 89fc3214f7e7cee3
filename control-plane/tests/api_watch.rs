//! List and watch over real HTTPS: resume from a resourceVersion, selectors on watch,
//! bookmarks, 410 Gone after the window is lost, pagination, and the Python client.

mod api_support;

use api_support::ControlPlane;
use serde_json::{Value, json};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn events(cp: &ControlPlane, query: &str) -> Vec<Value> {
    let out = cp.curl(&[&format!("{CMS}?watch=true&{query}")]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

fn create(cp: &ControlPlane, name: &str, labels: Value) -> Value {
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels}, "data": {"v": "1"}});
    let (code, obj) = cp.request("POST", CMS, "application/json", body.to_string().as_bytes());
    assert_eq!(code, 201, "{obj}");
    obj
}

fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn summary(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["type"] != "BOOKMARK")
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn watch_resumes_from_a_resource_version_and_honours_selectors() {
    let cp = ControlPlane::start();
    let first = create(&cp, "a", json!({"app": "x"}));
    create(&cp, "b", json!({"app": "y"}));
    let patch = json!({"metadata": {"labels": {"app": "y"}}});
    let (code, _) = cp.request(
        "PATCH",
        &format!("{CMS}/a"),
        "application/merge-patch+json",
        patch.to_string().as_bytes(),
    );
    assert_eq!(code, 200);
    let (code, _) = cp.request("DELETE", &format!("{CMS}/b"), "application/json", b"");
    assert_eq!(code, 200);

    let all = events(
        &cp,
        &format!("resourceVersion={}&timeoutSeconds=1", rv(&first)),
    );
    let want = [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(t, n)| ((*t).into(), (*n).into()))
        .collect();
    assert_eq!(summary(&all), want);
    // Resource versions only grow along the stream.
    let rvs: Vec<i64> = all
        .iter()
        .map(|e| rv(&e["object"]).parse().unwrap_or(0))
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");

    // Leaving a selector is a DELETED for that watcher.
    let selected = events(
        &cp,
        &format!(
            "resourceVersion={}&timeoutSeconds=1&labelSelector=app%3Dx",
            rv(&first)
        ),
    );
    let want: Vec<(String, String)> = vec![("DELETED".into(), "a".into())];
    assert_eq!(summary(&selected), want);

    // Without a resourceVersion the watch starts with the current objects.
    let initial = events(&cp, "timeoutSeconds=1");
    let want: Vec<(String, String)> = vec![("ADDED".into(), "a".into())];
    assert_eq!(summary(&initial), want);

    // Bookmarks carry a resourceVersion and nothing else.
    let with_bookmarks = events(
        &cp,
        &format!(
            "resourceVersion={}&timeoutSeconds=7&allowWatchBookmarks=true",
            rv(&first)
        ),
    );
    let bookmark = with_bookmarks
        .iter()
        .find(|e| e["type"] == "BOOKMARK")
        .expect("a bookmark within 7s");
    assert!(!rv(&bookmark["object"]).is_empty());
    assert_eq!(bookmark["object"]["kind"], "ConfigMap");
}

#[test]
fn watch_from_a_revision_the_server_no_longer_has_is_gone() {
    let mut cp = ControlPlane::start();
    let old = create(&cp, "old", json!({}));
    create(&cp, "newer", json!({}));
    // A new server process starts its watch window at the store's current revision.
    cp.restart();
    let (code, body) = cp.get(&format!("{CMS}?watch=true&resourceVersion={}", rv(&old)));
    assert_eq!(code, 410, "{body}");
    assert_eq!(body["reason"], "Expired");
    // The data itself survived the restart.
    let (code, body) = cp.get(&format!("{CMS}/newer"));
    assert_eq!(code, 200, "{body}");
}

#[test]
fn lists_page_with_limit_and_continue() {
    let cp = ControlPlane::start();
    for i in 0..7 {
        create(
            &cp,
            &format!("page-{i}"),
            json!({"parity": if i % 2 == 0 { "even" } else { "odd" }}),
        );
    }
    let mut names = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let (code, list) = cp.get(&format!("{CMS}?limit=3&continue={token}"));
        assert_eq!(code, 200, "{list}");
        pages += 1;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= 3);
        names.extend(items.iter().map(|i| {
            i["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }));
        match list["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => token = t.to_owned(),
            _ => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    let want: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    assert_eq!(names, want);

    let (_, odd) = cp.get(&format!("{CMS}?labelSelector=parity%3Dodd&limit=2"));
    let first_page: Vec<&str> = odd["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["metadata"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(first_page, ["page-1", "page-3"]);
    let (_, by_name) = cp.get(&format!("{CMS}?fieldSelector=metadata.name%3Dpage-4"));
    assert_eq!(by_name["items"].as_array().map_or(0, Vec::len), 1);
}

#[test]
fn the_python_kubernetes_client_lists_pods() {
    let cp = ControlPlane::start();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "py", "labels": {"app": "py"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    let (code, body) = cp.request(
        "POST",
        "/api/v1/namespaces/default/pods",
        "application/json",
        pod.to_string().as_bytes(),
    );
    assert_eq!(code, 201, "{body}");
    let script = "import sys\nfrom kubernetes import client, config\nconfig.load_kube_config(config_file=sys.argv[1])\nv1 = client.CoreV1Api()\nfor p in v1.list_namespaced_pod('default', label_selector='app=py').items:\n    print(p.metadata.name, p.status.phase, p.spec.containers[0].image)\n";
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(cp.kubeconfig())
        .output()
        .expect("run python3 (Debian's python3-kubernetes)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "py Pending busybox"
    );
}
