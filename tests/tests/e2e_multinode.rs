//! Three nodes end to end (see `ferrolet_tests::multinode`): each a network namespace acting
//! as a host with its own `ferrolet-shim`, CNI state and `ferrolet` agent (with its service
//! proxy), joined by a bridge; host 0 also runs the control plane. Driven with kubectl, and
//! with curl and pods as clients.
//!
//! One cluster runs all scenarios in order, because each builds on the state the previous
//! one left (the Deployment, the nodes' health) and starting three hosts costs more than
//! most scenarios; every step waits for a user-visible condition with a deadline and says
//! which step failed.
//!
//! Needs root, kubectl, busybox-static, and the workspace binaries built first:
//! `cargo build -p ferrolet -p ferrolet-shim -p ferrolet-control-plane -p ferrolet-cni --bins`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ferrolet_tests::cluster::{condition, in_netns};
use ferrolet_tests::images::{BUSYBOX_IMAGE, BUSYBOX_V2_IMAGE};
use ferrolet_tests::multinode::{MultiCluster, MultiOptions};
use ferrolet_tests::process::output_within;
use ferrolet_tests::wait::poll_until;
use serde_json::{Value, json};

const NS: &str = "default";
const APP: &str = "app=web";
const NODE_PORT: u16 = 30080;

/// A busybox pod on `node` that runs `script` once (`restartPolicy: Never`): its phase and
/// log say how it went.
fn client_pod(name: &str, node: &str, script: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "client",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", script],
            }],
        },
    })
}
fn deployment(replicas: u32) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 6,
                    "containers": [{
                        "name": "web",
                        "image": BUSYBOX_IMAGE,
                        "imagePullPolicy": "Never",
                        // On SIGTERM the server keeps answering for 3s, long enough for every
                        // node's proxy to drop the terminating endpoint, as a real app's
                        // graceful shutdown (or a preStop sleep) does.
                        "command": ["sh", "-c",
                            "mkdir -p /www; echo ${GREETING:-hello} from $(hostname) > /www/index.html; \
                             httpd -f -p 8080 -h /www & pid=$!; \
                             trap 'sleep 3; kill $pid; exit 0' TERM; wait $pid"],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    }],
                },
            },
        },
    })
}

fn live(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
}

fn ready(pod: &Value) -> bool {
    live(pod) && pod["status"]["phase"] == "Running" && condition(pod, "Ready") == Some("True")
}

fn name_of(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Ready web pods per host, and how many web pods exist at all (terminating included).
fn placement(c: &MultiCluster) -> anyhow::Result<(Vec<usize>, usize)> {
    let pods = c.pods(NS, APP)?;
    let mut per_host = vec![0; c.hosts.len()];
    for pod in pods.iter().filter(|p| ready(p)) {
        let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        if let Some(i) = c.host_of(node) {
            per_host[i] += 1;
        }
    }
    Ok((per_host, pods.len()))
}

/// Every pod interface on every host belongs to a pod the API has on that host.
fn bridges_match_the_api(c: &MultiCluster) -> anyhow::Result<bool> {
    let pods = c.kubectl_ok(&["get", "pods", "-A", "-o", "json"])?;
    let pods: Value = serde_json::from_str(&pods)?;
    for host in &c.hosts {
        let on_host = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["spec"]["nodeName"] == host.node_name.as_str())
            .count();
        if host.bridge_ports()?.len() != on_host {
            return Ok(false);
        }
    }
    Ok(true)
}

/// GET `url` with curl from host `i`'s network namespace; the body of a 2xx answer.
fn curl_from(c: &MultiCluster, i: usize, url: &str) -> anyhow::Result<String> {
    let out = c.hosts[i].exec(
        "curl",
        &["-sSf", "--max-time", "3", url],
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "curl {url} from host {i}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The Service's ClusterIP URL and every node's NodePort URL.
fn service_urls(c: &MultiCluster) -> anyhow::Result<Vec<String>> {
    let ip = c.kubectl_ok(&[
        "get",
        "service",
        "-n",
        NS,
        "web",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ensure!(!ip.trim().is_empty(), "the Service has no ClusterIP");
    let mut urls = vec![format!("http://{}:80/", ip.trim())];
    urls.extend(
        c.hosts
            .iter()
            .map(|h| format!("http://{}:{NODE_PORT}/", h.ip)),
    );
    Ok(urls)
}

fn scale(c: &MultiCluster, replicas: u32) -> anyhow::Result<()> {
    c.kubectl_ok(&[
        "scale",
        "-n",
        NS,
        "deployment/web",
        &format!("--replicas={replicas}"),
    ])?;
    Ok(())
}

/// (a) every node registered, Ready, with its own pod range, and routing the others'.
fn nodes_register_and_route(c: &mut MultiCluster) -> anyhow::Result<()> {
    let mut ranges = BTreeSet::new();
    for i in 0..c.hosts.len() {
        ensure!(
            c.node_ready(i)?.as_deref() == Some("True"),
            "node {i} Ready"
        );
        let node = c.node(&c.hosts[i].node_name)?;
        let addresses = &node["status"]["addresses"];
        ensure!(
            addresses
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["type"] == "InternalIP" && a["address"] == c.hosts[i].ip.to_string()),
            "node {i} reports its host IP {}: {addresses:#}",
            c.hosts[i].ip
        );
        let cidr = c.hosts[i].pod_cidr.clone().context("pod range")?;
        ensure!(ranges.insert(cidr.clone()), "two nodes got {cidr}");
    }
    c.wait_for(
        Duration::from_secs(30),
        "routing every other node's pod range to its host IP on every host",
        |c| {
            for host in &c.hosts {
                let routes = host.routes()?;
                for other in c.hosts.iter().filter(|o| o.index != host.index) {
                    let want = format!(
                        "{} via {} dev eth0 proto 70",
                        other.pod_cidr.as_deref().unwrap_or_default(),
                        other.ip
                    );
                    if !routes.iter().any(|r| r == &want) {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        },
    )
}

/// (b) three replicas land one per node; a pod on node 0 fetches a page from the pod on
/// node 2 by pod IP, and so does host 0 itself.
fn pods_spread_and_reach_each_other(c: &mut MultiCluster) -> anyhow::Result<()> {
    c.create(&deployment(3))?;
    c.wait_for(
        Duration::from_secs(120),
        "3 Ready web pods, one per node",
        |c| Ok(placement(c)?.0 == vec![1, 1, 1]),
    )?;
    let last = c.hosts.len() - 1;
    let target = c
        .pods(NS, APP)?
        .into_iter()
        .find(|p| ready(p) && p["spec"]["nodeName"] == c.hosts[last].node_name.as_str())
        .context("the web pod on the last node")?;
    let ip = target["status"]["podIP"]
        .as_str()
        .context("pod IP")?
        .to_owned();
    let greeting = format!("hello from {}", name_of(&target));

    // From a pod on node 0: wget retried for at most 20s inside the pod (`timeout`, since
    // busybox-static's `wget -T` crashes), then the pod's
    // phase and log tell the outcome.
    c.create(&client_pod(
        "client",
        &c.hosts[0].node_name,
        &format!(
            "for i in $(seq 20); do timeout 3 wget -q -O - http://{ip}:8080/ && exit 0; \
             sleep 1; done; exit 1"
        ),
    ))?;
    let phase = || -> anyhow::Result<Value> {
        let pod = c.kubectl_ok(&["get", "pod", "-n", NS, "client", "-o", "json"])?;
        Ok(serde_json::from_str::<Value>(&pod)?["status"]["phase"].clone())
    };
    let mut last_phase = Value::Null;
    let finished = poll_until(Duration::from_secs(90), Duration::from_millis(250), || {
        last_phase = phase().unwrap_or_default();
        last_phase == "Succeeded" || last_phase == "Failed"
    });
    let logs = c.kubectl(&["logs", "-n", NS, "client"])?;
    let logs =
        String::from_utf8_lossy(&logs.stdout).into_owned() + &String::from_utf8_lossy(&logs.stderr);
    ensure!(
        finished && last_phase == "Succeeded" && logs.trim() == greeting,
        "the client pod on node 0 fetching http://{ip}:8080/ on node {last}: phase {last_phase}, \
         output {logs:?}, want {greeting:?}; host 0 routes: {:?}\n{}",
        c.hosts[0].routes(),
        c.logs()
    );
    c.kubectl_ok(&["delete", "pod", "-n", NS, "client", "--wait=false"])?;

    // From host 0's own network namespace.
    let out = c.hosts[0].exec(
        "curl",
        &["-sS", "--max-time", "5", &format!("http://{ip}:8080/")],
        Duration::from_secs(20),
    )?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == greeting,
        "curl from host 0 to {ip}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// (f) a NodePort Service over the Deployment answers on its ClusterIP and on every node's
/// NodePort, from every host and from a pod on every node.
fn service_answers_everywhere(c: &mut MultiCluster) -> anyhow::Result<()> {
    c.create(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "type": "NodePort",
            "selector": {"app": "web"},
            "ports": [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}],
        },
    }))?;
    let urls = service_urls(c)?;
    let mut last = String::new();
    let from_hosts = poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
        for i in 0..c.hosts.len() {
            for url in &urls {
                match curl_from(c, i, url) {
                    Ok(body) if body.starts_with("hello from web-") => {}
                    Ok(body) => {
                        last = format!("host {i}, {url}: answered {body:?}");
                        return false;
                    }
                    Err(e) => {
                        last = format!("{e:#}");
                        return false;
                    }
                }
            }
        }
        true
    });
    ensure!(
        from_hosts,
        "the Service did not answer on {urls:?} from every host within 60s; last: {last}\n{}",
        c.logs()
    );

    // A pod on every node tries every URL (retrying for at most 20s each) and prints one line
    // per answer.
    let script = urls
        .iter()
        .map(|u| {
            format!(
                "ok=; for i in $(seq 20); do if timeout 3 wget -q -O - {u}; then ok=1; break; fi; \
                 sleep 1; done; [ -n \"$ok\" ] || {{ echo FAILED {u}; exit 1; }}; "
            )
        })
        .collect::<String>();
    for i in 0..c.hosts.len() {
        c.create(&client_pod(
            &format!("svc-client-{i}"),
            &c.hosts[i].node_name,
            &script,
        ))?;
    }
    for i in 0..c.hosts.len() {
        let name = format!("svc-client-{i}");
        let mut phase = Value::Null;
        let finished = poll_until(Duration::from_secs(120), Duration::from_millis(250), || {
            phase = c
                .kubectl_ok(&[
                    "get",
                    "pod",
                    "-n",
                    NS,
                    &name,
                    "-o",
                    "jsonpath={.status.phase}",
                ])
                .map(|p| Value::from(p.trim()))
                .unwrap_or_default();
            phase == "Succeeded" || phase == "Failed"
        });
        let logs = c.kubectl(&["logs", "-n", NS, &name])?;
        let logs = String::from_utf8_lossy(&logs.stdout).into_owned()
            + &String::from_utf8_lossy(&logs.stderr);
        let answers = logs
            .lines()
            .filter(|l| l.starts_with("hello from web-"))
            .count();
        ensure!(
            finished && phase == "Succeeded" && answers == urls.len(),
            "a pod on node {i} reaching the Service at {urls:?}: phase {phase}, output {logs:?}\n{}",
            c.logs()
        );
        c.kubectl_ok(&["delete", "pod", "-n", NS, &name, "--wait=false"])?;
    }
    Ok(())
}

/// A client in host 0's namespace sending GETs to one URL back to back until stopped.
struct LoadClient {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl LoadClient {
    fn start(c: &MultiCluster, url: &str) -> LoadClient {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let (netns, url) = (c.hosts[0].netns.clone(), url.to_owned());
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let out = output_within(
                        in_netns(Some(&netns), "curl").args(["-sSf", "--max-time", "5", &url]),
                        Duration::from_secs(10),
                    );
                    match out {
                        Ok(o) if o.status.success() => {
                            answers.push(String::from_utf8_lossy(&o.stdout).trim().to_owned());
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(o) => {
                            failures.push(String::from_utf8_lossy(&o.stderr).trim().to_owned());
                        }
                        Err(e) => failures.push(format!("{e:#}")),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (answers, failures)
            })
        };
        LoadClient {
            stop,
            answered,
            thread,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops; the bodies answered and the errors of the requests that failed.
    fn stop(self) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))
    }
}

/// (g) a rolling update of the Deployment's template while host 0 sends requests to the
/// ClusterIP without pause: every request answered, by the old and then by the new pods.
/// The new image ([`BUSYBOX_V2_IMAGE`]) carries `GREETING=v2`, so its pods answer "v2 from".
fn rolling_update_without_failed_requests(c: &mut MultiCluster) -> anyhow::Result<()> {
    let url = service_urls(c)?.remove(0);
    let client = LoadClient::start(c, &url);
    let rolled = (|| -> anyhow::Result<()> {
        // Some answers from the old pods first.
        c.wait_for(
            Duration::from_secs(10),
            "the client's first answers",
            |_| Ok(client.answered() >= 5),
        )?;
        c.kubectl_ok(&[
            "patch",
            "-n",
            NS,
            "deployment/web",
            "--type",
            "json",
            "-p",
            &format!(
                r#"[{{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "{BUSYBOX_V2_IMAGE}"}}]"#
            ),
        ])?;
        c.wait_for(
            Duration::from_secs(120),
            "the rolling update finished (3 new pods Ready, the old ones gone)",
            |c| {
                let pods = c.pods(NS, APP)?;
                let new_ready = pods
                    .iter()
                    .filter(|p| ready(p))
                    .filter(|p| p["spec"]["containers"][0]["image"] == BUSYBOX_V2_IMAGE)
                    .count();
                Ok(new_ready == 3 && pods.len() == 3)
            },
        )?;
        // The new pods answer through the proxy.
        c.wait_for(Duration::from_secs(10), "an answer from a new pod", |c| {
            Ok(curl_from(c, 0, &url)?.starts_with("v2 from "))
        })
    })();
    let (answers, failures) = client.stop()?;
    rolled?;
    ensure!(
        failures.is_empty(),
        "{} of {} requests to {url} failed during the rolling update: {failures:?}",
        failures.len(),
        answers.len() + failures.len()
    );
    let old = answers
        .iter()
        .filter(|a| a.starts_with("hello from "))
        .count();
    let new = answers.iter().filter(|a| a.starts_with("v2 from ")).count();
    ensure!(
        old > 0 && new > 0,
        "answers went from old to new pods: {old} old, {new} new of {}",
        answers.len()
    );
    eprintln!(
        "rolling update: {} requests through {url}, 0 failed ({old} old, {new} new)",
        answers.len()
    );
    Ok(())
}

/// (d) node `victim`'s agent stops: the node goes NotReady and its pod is replaced on the
/// other nodes; the agent starts again: the node is Ready, the replaced pod leaves the API
/// and its sandbox leaves the host.
fn lost_node_heals(c: &mut MultiCluster, victim: usize) -> anyhow::Result<()> {
    let node = c.hosts[victim].node_name.clone();
    let stale: Vec<String> = c
        .pods(NS, APP)?
        .iter()
        .filter(|p| p["spec"]["nodeName"] == node.as_str())
        .map(uid_of)
        .collect();
    ensure!(!stale.is_empty(), "a web pod runs on node {victim}");
    c.stop_agent(victim)?;
    c.wait_for(
        Duration::from_secs(60),
        &format!("node {victim} NotReady after its agent stopped"),
        |c| Ok(c.node_ready(victim)?.as_deref() != Some("True")),
    )?;
    c.wait_for(
        Duration::from_secs(90),
        "3 Ready web pods on the remaining nodes",
        |c| {
            let (per_host, _) = placement(c)?;
            let elsewhere: usize = (0..per_host.len())
                .filter(|i| *i != victim)
                .map(|i| per_host[i])
                .sum();
            Ok(elsewhere == 3)
        },
    )?;
    let cluster_ip = service_urls(c)?.remove(0);
    c.wait_for(
        Duration::from_secs(30),
        "the Service answering from host 0 while a node is down",
        |c| Ok(curl_from(c, 0, &cluster_ip)?.starts_with("hello from web-")),
    )?;
    c.start_agent(victim)?;
    c.wait_node_ready(victim, Duration::from_secs(60))?;
    c.wait_for(
        Duration::from_secs(60),
        &format!("node {victim}'s replaced pods gone from the API and its pod bridge"),
        |c| {
            let uids: Vec<String> = c.pods(NS, APP)?.iter().map(uid_of).collect();
            Ok(!stale.iter().any(|u| uids.contains(u)) && bridges_match_the_api(c)?)
        },
    )?;
    let (per_host, total) = placement(c)?;
    ensure!(
        per_host.iter().sum::<usize>() == 3 && total == 3,
        "still 3 web pods after node {victim} came back: {per_host:?} of {total}"
    );
    Ok(())
}

/// (c) 3 -> 12 spreads over every node; 12 -> 2 removes the rest from the API and the hosts.
fn scale_up_and_down(c: &mut MultiCluster) -> anyhow::Result<()> {
    scale(c, 12)?;
    c.wait_for(
        Duration::from_secs(150),
        "12 Ready web pods spread over every node",
        |c| {
            let (per_host, total) = placement(c)?;
            Ok(total == 12
                && per_host.iter().sum::<usize>() == 12
                && per_host.iter().all(|n| *n >= 3))
        },
    )?;
    scale(c, 2)?;
    c.wait_for(
        Duration::from_secs(90),
        "2 web pods left, the others gone from the API and the hosts",
        |c| {
            let (per_host, total) = placement(c)?;
            Ok(total == 2 && per_host.iter().sum::<usize>() == 2 && bridges_match_the_api(c)?)
        },
    )
}

/// (e) `kill -9` of the control plane and a restart while host 0 sends requests through the
/// Service: none fails, nodes stay Ready, the pods are the same ones, and the agents' watches
/// work again (a new replica runs).
fn control_plane_restart(c: &mut MultiCluster) -> anyhow::Result<()> {
    let url = service_urls(c)?.remove(0);
    let client = LoadClient::start(c, &url);
    let outcome = control_plane_restart_under(c, &client);
    let (answers, failures) = client.stop()?;
    outcome?;
    ensure!(
        failures.is_empty() && !answers.is_empty(),
        "{} of {} requests to {url} failed while the control plane restarted: {failures:?}",
        failures.len(),
        answers.len() + failures.len()
    );
    eprintln!(
        "control plane restart: {} requests through {url}, 0 failed",
        answers.len()
    );
    Ok(())
}

fn control_plane_restart_under(c: &mut MultiCluster, client: &LoadClient) -> anyhow::Result<()> {
    c.wait_for(
        Duration::from_secs(10),
        "the client's first answers",
        |_| Ok(client.answered() >= 5),
    )?;
    let before: BTreeSet<String> = c.pods(NS, APP)?.iter().map(uid_of).collect();
    c.kill_control_plane();
    c.start_control_plane()?;
    for i in 0..c.hosts.len() {
        c.wait_node_ready(i, Duration::from_secs(30))?;
    }
    let after: BTreeSet<String> = c.pods(NS, APP)?.iter().map(uid_of).collect();
    ensure!(
        before == after,
        "pods changed across the restart: {before:?} -> {after:?}"
    );
    scale(c, 3)?;
    c.wait_for(
        Duration::from_secs(90),
        "a third replica Ready after the control plane restart",
        |c| {
            let (per_host, total) = placement(c)?;
            Ok(total == 3 && per_host.iter().sum::<usize>() == 3)
        },
    )?;
    let now: BTreeSet<String> = c.pods(NS, APP)?.iter().map(uid_of).collect();
    ensure!(
        before.is_subset(&now),
        "the old pods survived: {before:?} in {now:?}"
    );
    Ok(())
}

type Scenario = fn(&mut MultiCluster) -> anyhow::Result<()>;

fn all_scenarios(options: MultiOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut c = MultiCluster::start(options).context("starting three nodes")?;
    eprintln!("three nodes Ready after {:?}", started.elapsed());
    let scenarios: [(&str, Scenario); 7] = [
        ("(a) nodes register and route", nodes_register_and_route),
        (
            "(b) spread and pod-to-pod",
            pods_spread_and_reach_each_other,
        ),
        (
            "(f) Service by ClusterIP and NodePort from every node and pod",
            service_answers_everywhere,
        ),
        ("(d) a node's agent stops and comes back", |c| {
            lost_node_heals(c, 2)
        }),
        ("(c) scale 3 -> 12 -> 2", scale_up_and_down),
        (
            "(e) control plane kill -9 and restart",
            control_plane_restart,
        ),
        (
            "(g) rolling update through the Service without a failed request",
            rolling_update_without_failed_requests,
        ),
    ];
    for (what, scenario) in scenarios {
        let t = Instant::now();
        scenario(&mut c).context(what)?;
        eprintln!("{what}: passed in {:?}", t.elapsed());
    }
    Ok(())
}

#[test]
fn three_nodes_spread_route_heal_scale_and_survive_a_control_plane_restart() {
    if let Err(e) = all_scenarios(MultiOptions::default()) {
        panic!("{e:#}");
    }
}

#[test]
fn three_nodes_with_the_store_on_etcd() {
    let options = MultiOptions {
        etcd: true,
        ..MultiOptions::default()
    };
    if let Err(e) = all_scenarios(options) {
        panic!("{e:#}");
    }
}
