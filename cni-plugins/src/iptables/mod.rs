//! A thin wrapper over the `iptables`/`ip6tables` commands. The commands, not a
//! library, because they pick the host's backend (nf_tables or legacy) the same way
//! the rest of the node does. Runs in the namespace of the calling process.

mod masq;
mod nft;

use std::process::Command;

pub use masq::{setup_masquerade, teardown_masquerade};
pub use nft::Nft;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} {args} failed: {stderr}")]
    Failed {
        program: String,
        args: String,
        stderr: String,
    },
}

/// The result of one command.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a program; the seam for unit tests.
pub trait Runner {
    fn run(&self, program: &str, args: &[String]) -> Result<Output, std::io::Error>;
}

/// Runs real processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[String]) -> Result<Output, std::io::Error> {
        let out = Command::new(program).args(args).output()?;
        Ok(Output {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// The `iptables` (or `ip6tables`) of one address family.
#[derive(Debug, Clone)]
pub struct Iptables<R: Runner> {
    runner: R,
    program: String,
}

/// Turns `&["-s", x]`-style pieces into owned strings.
pub fn rule<S: AsRef<str>>(parts: &[S]) -> Vec<String> {
    parts.iter().map(|s| s.as_ref().to_string()).collect()
}

impl<R: Runner> Iptables<R> {
    pub fn new(runner: R, ipv6: bool) -> Self {
        Self::with_program(runner, if ipv6 { "ip6tables" } else { "iptables" })
    }

    pub fn with_program(runner: R, program: &str) -> Self {
        Self {
            runner,
            program: program.to_string(),
        }
    }

    fn exec(&self, args: Vec<String>) -> Result<Output, IptablesError> {
        let mut full = vec!["-w".to_string()];
        full.extend(args);
        self.runner
            .run(&self.program, &full)
            .map_err(|source| IptablesError::Spawn {
                program: self.program.clone(),
                source,
            })
    }

    fn must(&self, args: Vec<String>) -> Result<Output, IptablesError> {
        let out = self.exec(args.clone())?;
        if out.success {
            Ok(out)
        } else {
            Err(IptablesError::Failed {
                program: self.program.clone(),
                args: args.join(" "),
                stderr: out.stderr.trim().to_string(),
            })
        }
    }

    /// The rules of `chain` as `-S` prints them (without the `-N` line); `None` when
    /// the chain does not exist.
    pub fn list(&self, table: &str, chain: &str) -> Result<Option<Vec<String>>, IptablesError> {
        let out = self.exec(rule(&["-t", table, "-S", chain]))?;
        if !out.success {
            return Ok(None);
        }
        Ok(Some(
            out.stdout
                .lines()
                .filter(|l| l.starts_with("-A "))
                .map(str::to_string)
                .collect(),
        ))
    }

    pub fn chain_exists(&self, table: &str, chain: &str) -> Result<bool, IptablesError> {
        Ok(self.list(table, chain)?.is_some())
    }

    /// Creates `chain` unless it exists.
    pub fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError> {
        if self.chain_exists(table, chain)? {
            return Ok(());
        }
        let out = self.exec(rule(&["-t", table, "-N", chain]))?;
        // A concurrent invocation may have created it between the two commands.
        if out.success || self.chain_exists(table, chain)? {
            Ok(())
        } else {
            Err(IptablesError::Failed {
                program: self.program.clone(),
                args: format!("-t {table} -N {chain}"),
                stderr: out.stderr.trim().to_string(),
            })
        }
    }

    pub fn exists(&self, table: &str, chain: &str, spec: &[String]) -> Result<bool, IptablesError> {
        let mut args = rule(&["-t", table, "-C", chain]);
        args.extend_from_slice(spec);
        Ok(self.exec(args)?.success)
    }

    /// Appends `spec` to `chain` unless an identical rule is there.
    pub fn append_unique(
        &self,
        table: &str,
        chain: &str,
        spec: &[String],
    ) -> Result<(), IptablesError> {
        if self.exists(table, chain, spec)? {
            return Ok(());
        }
        let mut args = rule(&["-t", table, "-A", chain]);
        args.extend_from_slice(spec);
        self.must(args).map(drop)
    }

    /// Inserts `spec` at the top of `chain` unless an identical rule is there.
    pub fn insert_unique(
        &self,
        table: &str,
        chain: &str,
        spec: &[String],
    ) -> Result<(), IptablesError> {
        if self.exists(table, chain, spec)? {
            return Ok(());
        }
        let mut args = rule(&["-t", table, "-I", chain, "1"]);
        args.extend_from_slice(spec);
        self.must(args).map(drop)
    }

    /// Appends without checking for duplicates (fresh per-container chains).
    pub fn append(&self, table: &str, chain: &str, spec: &[String]) -> Result<(), IptablesError> {
        let mut args = rule(&["-t", table, "-A", chain]);
        args.extend_from_slice(spec);
        self.must(args).map(drop)
    }

    /// Deletes one rule; a rule that is not there is not an error.
    pub fn delete(&self, table: &str, chain: &str, spec: &[String]) -> Result<(), IptablesError> {
        if !self.exists(table, chain, spec)? {
            return Ok(());
        }
        let mut args = rule(&["-t", table, "-D", chain]);
        args.extend_from_slice(spec);
        self.must(args).map(drop)
    }

    /// Deletes a rule given as a `-S` line (`-A CHAIN ...`).
    pub fn delete_listed(&self, table: &str, line: &str) -> Result<(), IptablesError> {
        let words = split_rule_line(line);
        let Some((first, rest)) = words.split_first() else {
            return Ok(());
        };
        if first != "-A" || rest.is_empty() {
            return Ok(());
        }
        let mut args = rule(&["-t", table, "-D"]);
        args.extend_from_slice(rest);
        self.must(args).map(drop)
    }

    /// Flushes and removes `chain`; a missing chain is not an error.
    pub fn delete_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError> {
        if !self.chain_exists(table, chain)? {
            return Ok(());
        }
        self.must(rule(&["-t", table, "-F", chain]))?;
        self.must(rule(&["-t", table, "-X", chain])).map(drop)
    }
}

/// Splits an `iptables -S` line into words, honouring the double quotes it puts
/// around comments.
pub fn split_rule_line(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The container ids named in rule comments of the form `<prefix><id>"`, e.g.
/// `name: "net" id: "abc"` with prefix `name: "net" id: "`.
pub fn commented_ids(rules: &[String], prefix: &str) -> std::collections::HashSet<String> {
    rules
        .iter()
        .filter_map(|line| {
            let words = split_rule_line(line);
            let i = words.iter().position(|w| w == "--comment")?;
            let id = words.get(i + 1)?.strip_prefix(prefix)?.strip_suffix('"')?;
            Some(id.to_string())
        })
        .collect()
}

/// The 28-character chain names the reference plugins use: `prefix` plus the start
/// of the SHA-512 of `name` and `id`, so chains of one container are found again.
pub fn chain_name(prefix: &str, name: &str, id: &str) -> String {
    use sha2::{Digest, Sha512};
    let digest = hex::encode(Sha512::digest(format!("{name}{id}").as_bytes()));
    let keep = 28usize.saturating_sub(prefix.len());
    format!("{prefix}{}", &digest[..keep])
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Records every command; answers `-S`/`-C` from a script.
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<String>>,
        existing_chains: Vec<&'static str>,
    }

    impl Runner for &Fake {
        fn run(&self, program: &str, args: &[String]) -> Result<Output, std::io::Error> {
            let line = format!("{program} {}", args.join(" "));
            self.calls.borrow_mut().push(line);
            let ok = match args.get(3).map(String::as_str) {
                Some("-S") => self.existing_chains.contains(&args[4].as_str()),
                Some("-C") => false,
                _ => true,
            };
            Ok(Output {
                success: ok,
                ..Output::default()
            })
        }
    }

    #[test]
    fn ensure_chain_creates_only_missing_chains() {
        let fake = Fake {
            existing_chains: vec!["HAVE"],
            ..Fake::default()
        };
        let ipt = Iptables::new(&fake, false);
        ipt.ensure_chain("nat", "HAVE").unwrap();
        ipt.ensure_chain("nat", "NEW").unwrap();
        let calls = fake.calls.borrow();
        assert_eq!(
            *calls,
            [
                "iptables -w -t nat -S HAVE",
                "iptables -w -t nat -S NEW",
                "iptables -w -t nat -N NEW",
            ]
        );
    }

    #[test]
    fn append_unique_checks_first() {
        let fake = Fake::default();
        let ipt = Iptables::new(&fake, true);
        ipt.append_unique("nat", "POSTROUTING", &rule(&["-s", "fd00::2", "-j", "X"]))
            .unwrap();
        assert_eq!(
            *fake.calls.borrow(),
            [
                "ip6tables -w -t nat -C POSTROUTING -s fd00::2 -j X",
                "ip6tables -w -t nat -A POSTROUTING -s fd00::2 -j X",
            ]
        );
    }

    #[test]
    fn quoted_comments_split_as_one_word() {
        let w = split_rule_line(
            r#"-A CNI-HOSTPORT-DNAT -p tcp -m comment --comment "dnat name: \"net\" id: \"c1\"" -j CNI-DN-1"#,
        );
        assert_eq!(w[7], r#"dnat name: "net" id: "c1""#);
        assert_eq!(w.last().unwrap(), "CNI-DN-1");
    }

    #[test]
    fn chain_names_are_28_chars_and_stable() {
        let a = chain_name("CNI-DN-", "net", "c1");
        assert_eq!(a.len(), 28);
        assert!(a.starts_with("CNI-DN-"));
        assert_eq!(a, chain_name("CNI-DN-", "net", "c1"));
        assert_ne!(a, chain_name("CNI-DN-", "net", "c2"));
    }

    /// The real runner against a fake `iptables` script that logs its arguments.
    #[test]
    fn system_runner_runs_the_program_with_arguments() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let bin = d.path().join("iptables");
        std::fs::write(
            &bin,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\ncase \"$*\" in *-S*) echo '-N X'; echo '-A X -j ACCEPT';; *-C*) exit 1;; esac\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ipt = Iptables::with_program(SystemRunner, bin.to_str().unwrap());
        assert_eq!(ipt.list("nat", "X").unwrap().unwrap(), ["-A X -j ACCEPT"]);
        ipt.delete("nat", "X", &rule(&["-j", "ACCEPT"])).unwrap();
        let logged = std::fs::read_to_string(&log).unwrap();
        assert_eq!(logged, "-w -t nat -S X\n-w -t nat -C X -j ACCEPT\n");
        let missing = Iptables::with_program(SystemRunner, "/nonexistent/iptables");
        assert!(matches!(
            missing.list("nat", "X"),
            Err(IptablesError::Spawn { .. })
        ));
    }
}
