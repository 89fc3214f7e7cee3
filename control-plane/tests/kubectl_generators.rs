//! kubectl's generator commands send protobuf bodies; the objects they make read back whole.

mod api_support;

use api_support::ControlPlane;

#[test]
fn kubectl_create_run_and_expose_make_the_objects_asked_for() {
    let cp = ControlPlane::start();
    cp.kubectl(&["create", "namespace", "gen"]);
    cp.kubectl(&[
        "-n",
        "gen",
        "create",
        "configmap",
        "c1",
        "--from-literal=a=b",
    ]);
    cp.kubectl(&[
        "-n",
        "gen",
        "create",
        "secret",
        "generic",
        "s1",
        "--from-literal=pw=hunter2",
    ]);
    cp.kubectl(&[
        "-n",
        "gen",
        "create",
        "deployment",
        "d1",
        "--image=busybox:1.36",
        "--replicas=3",
        "--port=8080",
    ]);
    cp.kubectl(&[
        "-n",
        "gen",
        "run",
        "p1",
        "--image=busybox",
        "--labels=app=p1",
        "--env=X=1",
        "--port=80",
    ]);
    cp.kubectl(&[
        "-n",
        "gen",
        "expose",
        "deployment",
        "d1",
        "--port=80",
        "--target-port=8080",
        "--type=NodePort",
    ]);
    cp.kubectl(&["-n", "gen", "create", "job", "j1", "--image=busybox"]);

    let ns = cp.kubectl_json(&["get", "namespace", "gen"]);
    assert_eq!(ns["status"]["phase"], "Active");
    let cm = cp.kubectl_json(&["-n", "gen", "get", "configmap", "c1"]);
    assert_eq!(cm["data"]["a"], "b");
    let secret = cp.kubectl_json(&["-n", "gen", "get", "secret", "s1"]);
    assert_eq!(secret["data"]["pw"], "aHVudGVyMg==");
    assert_eq!(secret["type"], "Opaque");
    let d = cp.kubectl_json(&["-n", "gen", "get", "deployment", "d1"]);
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "d1");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "busybox:1.36");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    let p = cp.kubectl_json(&["-n", "gen", "get", "pod", "p1"]);
    assert_eq!(p["metadata"]["labels"]["app"], "p1");
    assert_eq!(p["spec"]["containers"][0]["env"][0]["value"], "1");
    assert_eq!(p["spec"]["containers"][0]["ports"][0]["containerPort"], 80);
    let svc = cp.kubectl_json(&["-n", "gen", "get", "service", "d1"]);
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(svc["spec"]["selector"]["app"], "d1");
    assert!(
        svc["spec"]["ports"][0]["nodePort"]
            .as_u64()
            .is_some_and(|p| (30000..=32767).contains(&p))
    );
    let job = cp.kubectl_json(&["-n", "gen", "get", "job", "j1"]);
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["image"],
        "busybox"
    );
    assert!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"].is_string()
    );

    // Server-side apply creates, then merges the applied configuration.
    let applied = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: gen\ndata:\n  k: one\n";
    let out = cp.kubectl_with(&["apply", "--server-side", "-f", "-"], Some(applied), &[]);
    assert!(out.contains("serverside-applied"), "{out}");
    let changed = applied.replace("k: one", "k: two");
    cp.kubectl_with(&["apply", "--server-side", "-f", "-"], Some(&changed), &[]);
    let ssa = cp.kubectl_json(&["-n", "gen", "get", "configmap", "ssa"]);
    assert_eq!(ssa["data"]["k"], "two");
}
