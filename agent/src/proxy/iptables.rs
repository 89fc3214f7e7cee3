//! The command-line tools the proxy drives: `iptables-restore`/`iptables-save`/`iptables`
//! (legacy or nf_tables backend), `conntrack` and `sysctl`. All of them run through `Exec`,
//! so unit tests record the calls and real tests point the tools at a network namespace.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::rules::{HOOKS, PREFIX, Table};

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {args} failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
    #[error("cannot tell the iptables backend from {0:?}")]
    UnknownBackend(String),
}

/// What a finished command left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs a program to completion.
pub trait Exec: Send + Sync {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> std::io::Result<ExecOutput>;
}

/// Runs programs on this host, optionally behind a prefix such as
/// `ip netns exec NAME` to run them in another network namespace.
#[derive(Clone, Debug, Default)]
pub struct HostExec {
    prefix: Vec<String>,
}

impl HostExec {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every command becomes `prefix... program args...`.
    pub fn with_prefix(prefix: Vec<String>) -> Self {
        Self { prefix }
    }

    /// Runs every command in the named network namespace (`ip netns exec`).
    pub fn in_netns(name: &str) -> Self {
        Self::with_prefix(vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            name.into(),
        ])
    }
}

impl Exec for HostExec {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> std::io::Result<ExecOutput> {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A program that exits early closes the pipe; its exit status tells why.
            let _ = pipe.write_all(data);
        }
        let out = child.wait_with_output()?;
        Ok(ExecOutput {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

fn run_checked(
    exec: &dyn Exec,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<ExecOutput, IptablesError> {
    let out = exec
        .run(program, args, stdin)
        .map_err(|source| IptablesError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if out.code != Some(0) {
        return Err(IptablesError::Failed {
            program: program.to_owned(),
            args: args.join(" "),
            status: out
                .code
                .map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit {c}")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

/// Which iptables to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Whatever `iptables` on the PATH is.
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// What `iptables-save` says about our part of one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableView {
    /// Our chains that exist.
    pub chains: BTreeSet<String>,
    /// (built-in chain, our target) for every jump into our chains.
    pub hooks: BTreeSet<(String, String)>,
}

/// Parses `iptables-save` output for one table, keeping what concerns us.
pub fn parse_save(text: &str) -> TableView {
    let mut view = TableView::default();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next()
                && name.starts_with(PREFIX)
            {
                view.chains.insert(name.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            if chain.starts_with(PREFIX) {
                continue;
            }
            if let Some(target) = rule
                .split(" -j ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                && target.starts_with(PREFIX)
            {
                view.hooks.insert((chain.to_owned(), target.to_owned()));
            }
        }
    }
    view
}

/// Our chain names in `table` from `nft list chains ip`.
pub fn parse_nft_chains(text: &str, table: &str) -> BTreeSet<String> {
    let mut current = "";
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("table ip ") {
            current = rest.trim_end_matches('{').trim();
        } else if let Some(rest) = line.strip_prefix("chain ")
            && current == table
        {
            let name = rest.trim_end_matches('{').trim();
            if name.starts_with(PREFIX) {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// The iptables tools of one backend.
#[derive(Clone)]
pub struct Iptables {
    exec: Arc<dyn Exec>,
    backend: Backend,
    iptables: String,
    restore: String,
    save: String,
}

impl std::fmt::Debug for Iptables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iptables")
            .field("backend", &self.backend)
            .field("restore", &self.restore)
            .finish_non_exhaustive()
    }
}

impl Iptables {
    /// Finds the backend: the explicit `iptables-legacy`/`iptables-nft` tools when asked for,
    /// else whatever `iptables -V` reports.
    pub fn detect(exec: Arc<dyn Exec>, choice: BackendChoice) -> Result<Self, IptablesError> {
        let suffix = match choice {
            BackendChoice::Auto => "",
            BackendChoice::Legacy => "-legacy",
            BackendChoice::Nft => "-nft",
        };
        let iptables = format!("iptables{suffix}");
        let out = run_checked(exec.as_ref(), &iptables, &["-V"], None)?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let backend = if version.contains("nf_tables") {
            Backend::Nft
        } else if version.contains("legacy") || version.starts_with("iptables v1.") {
            // Releases before 1.8 print no backend and are legacy.
            Backend::Legacy
        } else {
            return Err(IptablesError::UnknownBackend(version));
        };
        tracing::info!(%version, ?backend, "iptables backend");
        Ok(Self {
            exec,
            backend,
            restore: format!("iptables{suffix}-restore"),
            save: format!("iptables{suffix}-save"),
            iptables,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies a restore payload without flushing the tables it names.
    pub fn restore(&self, payload: &[u8]) -> Result<(), IptablesError> {
        run_checked(
            self.exec.as_ref(),
            &self.restore,
            &["-w", "5", "--noflush"],
            Some(payload),
        )
        .map(drop)
    }

    /// Our chains and hooks in `table`, as the kernel has them now.
    pub fn view(&self, table: Table) -> Result<TableView, IptablesError> {
        if self.backend == Backend::Nft {
            // `iptables-nft-save` decodes every rule back into iptables syntax (seconds at
            // 10,000 Services); chain names and the few rules of the built-in chains are
            // all we need. Without the `nft` tool, fall back to the save.
            match self.nft_view(table) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::debug!(error = %e, "nft chain listing unavailable; using iptables-save");
                }
            }
        }
        let out = run_checked(
            self.exec.as_ref(),
            &self.save,
            &["-t", table.as_str()],
            None,
        )?;
        Ok(parse_save(&String::from_utf8_lossy(&out.stdout)))
    }

    fn nft_view(&self, table: Table) -> Result<TableView, IptablesError> {
        let out = run_checked(self.exec.as_ref(), "nft", &["list", "chains", "ip"], None)?;
        let mut view = TableView {
            chains: parse_nft_chains(&String::from_utf8_lossy(&out.stdout), table.as_str()),
            hooks: BTreeSet::new(),
        };
        let builtins: BTreeSet<&str> = HOOKS
            .iter()
            .filter(|h| h.table == table)
            .map(|h| h.builtin)
            .collect();
        for builtin in builtins {
            let out = run_checked(
                self.exec.as_ref(),
                &self.iptables,
                &["-w", "5", "-t", table.as_str(), "-S", builtin],
                None,
            )?;
            view.hooks
                .extend(parse_save(&String::from_utf8_lossy(&out.stdout)).hooks);
        }
        Ok(view)
    }

    /// The whole table as `iptables-save` prints it.
    pub fn save_text(&self, table: Table) -> Result<String, IptablesError> {
        let out = run_checked(
            self.exec.as_ref(),
            &self.save,
            &["-t", table.as_str()],
            None,
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether `chain` exists and still holds rules: a flushed or deleted canary means
    /// someone wiped the table.
    pub fn chain_has_rules(&self, table: Table, chain: &str) -> Result<bool, IptablesError> {
        let out = self
            .exec
            .run(
                &self.iptables,
                &["-w", "5", "-t", table.as_str(), "-S", chain],
                None,
            )
            .map_err(|source| IptablesError::Spawn {
                program: self.iptables.clone(),
                source,
            })?;
        if out.code != Some(0) {
            return Ok(false);
        }
        let prefix = format!("-A {chain} ");
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&prefix)))
    }
}

/// Which of our hooks `view` lacks for `table`.
pub fn missing_hooks(table: Table, view: &TableView) -> Vec<&'static super::rules::Hook> {
    HOOKS
        .iter()
        .filter(|h| h.table == table)
        .filter(|h| {
            !view
                .hooks
                .contains(&(h.builtin.to_owned(), h.target.to_owned()))
        })
        .collect()
}

/// Deletes conntrack entries; `conntrack -D` exits 1 when nothing matched, which is fine.
#[derive(Clone)]
pub struct Conntrack {
    exec: Arc<dyn Exec>,
}

impl Conntrack {
    pub fn new(exec: Arc<dyn Exec>) -> Self {
        Self { exec }
    }

    pub fn delete(&self, args: &[&str]) -> Result<(), IptablesError> {
        let mut full = vec!["-D"];
        full.extend_from_slice(args);
        let out =
            self.exec
                .run("conntrack", &full, None)
                .map_err(|source| IptablesError::Spawn {
                    program: "conntrack".into(),
                    source,
                })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.code == Some(0) || (out.code == Some(1) && stderr.contains("0 flow entries")) {
            return Ok(());
        }
        Err(IptablesError::Failed {
            program: "conntrack".into(),
            args: full.join(" "),
            status: format!("{:?}", out.code),
            stderr: stderr.trim().to_owned(),
        })
    }
}

/// Sets a sysctl (in the namespace the exec runs in).
pub fn set_sysctl(exec: &dyn Exec, key: &str, value: &str) -> Result<(), IptablesError> {
    run_checked(
        exec,
        "sysctl",
        &["-q", "-w", &format!("{key}={value}")],
        None,
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake `iptables` binary on a private PATH proves the real exec and the parsing.
    fn fake_tool(dir: &std::path::Path, name: &str, script: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    struct PathExec(std::path::PathBuf);
    impl Exec for PathExec {
        fn run(
            &self,
            program: &str,
            args: &[&str],
            stdin: Option<&[u8]>,
        ) -> std::io::Result<ExecOutput> {
            HostExec::new().run(self.0.join(program).to_str().unwrap_or(""), args, stdin)
        }
    }

    #[test]
    fn detects_backend_from_version_and_feeds_restore_stdin() {
        let dir = tempfile::tempdir().unwrap();
        fake_tool(
            dir.path(),
            "iptables-nft",
            "echo 'iptables v1.8.9 (nf_tables)'",
        );
        fake_tool(
            dir.path(),
            "iptables-nft-restore",
            &format!(
                "echo \"$@\" > {0}/args; cat > {0}/stdin",
                dir.path().display()
            ),
        );
        fake_tool(
            dir.path(),
            "iptables-legacy",
            "echo 'iptables v1.8.9 (legacy)'",
        );
        fake_tool(dir.path(), "iptables", "echo 'something else'");
        let exec: Arc<dyn Exec> = Arc::new(PathExec(dir.path().to_owned()));

        let nft = Iptables::detect(exec.clone(), BackendChoice::Nft).unwrap();
        assert_eq!(nft.backend(), Backend::Nft);
        nft.restore(b"*nat\nCOMMIT\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("args")).unwrap(),
            "-w 5 --noflush\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("stdin")).unwrap(),
            "*nat\nCOMMIT\n"
        );

        let legacy = Iptables::detect(exec.clone(), BackendChoice::Legacy).unwrap();
        assert_eq!(legacy.backend(), Backend::Legacy);
        let err = Iptables::detect(exec, BackendChoice::Auto).unwrap_err();
        assert!(matches!(err, IptablesError::UnknownBackend(_)), "{err}");
    }

    #[test]
    fn failed_restore_reports_stderr() {
        let dir = tempfile::tempdir().unwrap();
        fake_tool(
            dir.path(),
            "iptables-legacy",
            "echo 'iptables v1.8.9 (legacy)'",
        );
        fake_tool(
            dir.path(),
            "iptables-legacy-restore",
            "cat >/dev/null; echo 'line 3 failed' >&2; exit 1",
        );
        let exec: Arc<dyn Exec> = Arc::new(PathExec(dir.path().to_owned()));
        let ipt = Iptables::detect(exec, BackendChoice::Legacy).unwrap();
        let err = ipt
            .restore(b"*nat\nbogus\nCOMMIT\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3 failed") && err.contains("exit 1"),
            "{err}"
        );
    }

    #[test]
    fn nft_chain_listing_is_read_per_table() {
        let text = "table ip nat {\n\tchain PREROUTING {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n\tchain FERRO-SVC-A {\n\t}\n}\ntable ip filter {\n\tchain FERRO-SERVICES {\n\t}\n\tchain OTHER {\n\t}\n}\n";
        assert_eq!(
            parse_nft_chains(text, "nat")
                .into_iter()
                .collect::<Vec<_>>(),
            ["FERRO-SVC-A"]
        );
        assert_eq!(
            parse_nft_chains(text, "filter")
                .into_iter()
                .collect::<Vec<_>>(),
            ["FERRO-SERVICES"]
        );
    }

    #[test]
    fn save_parser_finds_our_chains_and_hooks_only() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\n:FERRO-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n\
                    :FERRO-SVC-ABC - [0:0]\n-A PREROUTING -m comment --comment \"x\" -j FERRO-SERVICES\n\
                    -A PREROUTING -j KUBE-SERVICES\n-A FERRO-SERVICES -d 10.0.0.1/32 -j FERRO-SVC-ABC\nCOMMIT\n";
        let v = parse_save(text);
        assert_eq!(
            v.chains.into_iter().collect::<Vec<_>>(),
            ["FERRO-SERVICES", "FERRO-SVC-ABC"]
        );
        assert_eq!(
            v.hooks.into_iter().collect::<Vec<_>>(),
            [("PREROUTING".to_owned(), "FERRO-SERVICES".to_owned())]
        );
    }
}
