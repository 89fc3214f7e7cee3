//! Runs the real `ferrolet-control-plane` binary on a loopback port with a temp data dir and
//! drives it with the real `kubectl` and `curl`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The server process; killed (and its data dir removed) on drop, even when a test fails.
pub struct ControlPlane {
    child: Child,
    dir: tempfile::TempDir,
    pub url: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_ferrolet-control-plane"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--service-cluster-ip-range",
            "10.96.0.0/24",
            // These tests check the API server's own behaviour (finalizers left in place,
            // namespaces staying Terminating): no controllers or scheduler acting meanwhile.
            "--controllers=none",
            "--scheduler=false",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrolet-control-plane")
}

impl ControlPlane {
    /// Stops the server and starts it again on the same data dir (a new port).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.kubeconfig());
        self.child = spawn(self.dir.path());
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let kubeconfig = self.kubeconfig();
        self.url = wait_for("admin.kubeconfig", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&kubeconfig).ok()?;
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with("server: "))?;
            Some(line.trim_start().trim_start_matches("server: ").to_owned())
        });
        wait_for("the API to answer", Duration::from_secs(30), || {
            self.curl(&["/readyz"]).status.success().then_some(())
        });
    }

    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferrolet-api-test-")
            .tempdir()
            .expect("temp dir");
        let child = spawn(dir.path());
        let mut cp = ControlPlane {
            child,
            dir,
            url: String::new(),
        };
        cp.wait_ready();
        cp
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir().join("admin.kubeconfig")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs kubectl with the admin kubeconfig; returns the output whatever the exit code.
    pub fn kubectl_output(
        &self,
        args: &[&str],
        stdin: Option<&str>,
        env: &[(&str, &str)],
    ) -> Output {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(self.kubeconfig()).args(args);
        cmd.env("HOME", self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl and asserts it exits 0; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_with(args, None, &[])
    }

    pub fn kubectl_with(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> String {
        let out = self.kubectl_output(args, stdin, env);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kubectl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: not JSON: {e}: {out}"))
    }

    fn pki(&self, file: &str) -> PathBuf {
        self.data_dir().join("pki").join(file)
    }

    /// curl with the admin client certificate; `args` after the base options, the path first.
    pub fn curl(&self, args: &[&str]) -> Output {
        let (path, rest) = args.split_first().expect("a path");
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--cacert"])
            .arg(self.pki("ca.crt"))
            .arg("--cert")
            .arg(self.pki("admin.crt"))
            .arg("--key")
            .arg(self.pki("admin.key"))
            .args(rest)
            .arg(format!("{}{path}", self.url))
            .output()
            .expect("run curl")
    }

    /// Sends `body` with `method` and returns (HTTP status, parsed JSON body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, serde_json::Value) {
        let body_file = self.dir.path().join(format!("body-{}", std::process::id()));
        std::fs::write(&body_file, body).expect("write body");
        let data = format!("@{}", body_file.display());
        let ct = format!("Content-Type: {content_type}");
        let out = self.curl(&[
            path,
            "-X",
            method,
            "-H",
            &ct,
            "--data-binary",
            &data,
            "-w",
            "\n%{http_code}",
        ]);
        parse_status(&out)
    }

    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let out = self.curl(&[path, "-w", "\n%{http_code}"]);
        parse_status(&out)
    }
}

fn parse_status(out: &Output) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    let code: u16 = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no status code in {text:?}"));
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (code, json)
}
