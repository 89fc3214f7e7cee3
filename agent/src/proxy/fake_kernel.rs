//! A fake kernel for unit tests: an `Exec` that interprets `iptables-restore --noflush`
//! payloads the way the real tool does (declare = create or flush, `-A`, `-I`, `-X`,
//! reject jumps to missing chains), prints `iptables-save` from what it holds, and records
//! every call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::iptables::{Exec, ExecOutput};

pub(crate) type Tables = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[derive(Default)]
pub(crate) struct FakeKernel {
    pub(crate) tables: Mutex<Tables>,
    pub(crate) calls: Mutex<Vec<(String, Vec<String>, String)>>,
    pub(crate) fail_restores: Mutex<usize>,
    pub(crate) legacy: bool,
}

pub(crate) const BUILTINS: &[(&str, &[&str])] = &[
    ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]),
    ("filter", &["INPUT", "FORWARD", "OUTPUT"]),
];

impl FakeKernel {
    pub(crate) fn new() -> Arc<Self> {
        Self::with_backend(false)
    }

    pub(crate) fn with_backend(legacy: bool) -> Arc<Self> {
        let k = Self {
            legacy,
            ..Self::default()
        };
        {
            let mut t = k.tables.lock().unwrap();
            for (table, chains) in BUILTINS {
                let e = t.entry((*table).to_owned()).or_default();
                for c in *chains {
                    e.insert((*c).to_owned(), Vec::new());
                }
            }
        }
        Arc::new(k)
    }

    pub(crate) fn add_rule(&self, table: &str, chain: &str, rule: &str) {
        self.tables
            .lock()
            .unwrap()
            .entry(table.into())
            .or_default()
            .entry(chain.into())
            .or_default()
            .push(rule.into());
    }

    pub(crate) fn chain(&self, table: &str, chain: &str) -> Option<Vec<String>> {
        self.tables.lock().unwrap().get(table)?.get(chain).cloned()
    }

    pub(crate) fn flush_table(&self, table: &str) {
        let mut t = self.tables.lock().unwrap();
        let e = t.get_mut(table).unwrap();
        e.retain(|name, _| {
            BUILTINS
                .iter()
                .any(|(tb, cs)| *tb == table && cs.contains(&name.as_str()))
        });
        for rules in e.values_mut() {
            rules.clear();
        }
    }

    /// Our chains and every hook, for comparing two kernels.
    pub(crate) fn ours(&self) -> Tables {
        let t = self.tables.lock().unwrap();
        t.iter()
            .map(|(name, chains)| {
                let c = chains
                    .iter()
                    .filter(|(n, rules)| n.starts_with("FERRO-") || !rules.is_empty())
                    .map(|(n, r)| (n.clone(), r.clone()))
                    .collect();
                (name.clone(), c)
            })
            .collect()
    }

    pub(crate) fn restores(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p.ends_with("-restore"))
            .map(|(_, _, s)| s.clone())
            .collect()
    }

    pub(crate) fn conntrack_calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == "conntrack")
            .map(|(_, a, _)| a.join(" "))
            .collect()
    }

    pub(crate) fn restore(&self, payload: &str) -> Result<(), String> {
        let mut all = self.tables.lock().unwrap();
        let mut work = all.clone();
        let mut table: Option<String> = None;
        for line in payload.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = Some(t.to_owned());
                continue;
            }
            let t = work
                .get_mut(table.as_deref().ok_or("rule outside a table")?)
                .ok_or("unknown table")?;
            if line == "COMMIT" {
                for (name, rules) in t.iter() {
                    for r in rules {
                        if let Some(target) =
                            r.split(" -j ").nth(1).and_then(|s| s.split(' ').next())
                            && target.starts_with("FERRO-")
                            && !t.contains_key(target)
                        {
                            return Err(format!("{name}: jump to missing chain {target}"));
                        }
                    }
                }
                table = None;
            } else if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap_or("");
                t.insert(name.to_owned(), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').ok_or("bad -A")?;
                t.get_mut(chain)
                    .ok_or(format!("-A to missing chain {chain}"))?
                    .push(rule.to_owned());
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let mut it = rest.splitn(3, ' ');
                let chain = it.next().unwrap_or("");
                let _pos = it.next();
                let rule = it.next().ok_or("bad -I")?;
                t.get_mut(chain)
                    .ok_or("-I to missing chain")?
                    .insert(0, rule.to_owned());
            } else if let Some(chain) = line.strip_prefix("-X ") {
                let referenced = t.values().flatten().any(|r| {
                    r.ends_with(&format!("-j {chain}")) || r.contains(&format!("-j {chain} "))
                });
                if referenced {
                    return Err(format!("cannot delete referenced chain {chain}"));
                }
                t.remove(chain)
                    .ok_or(format!("-X of missing chain {chain}"))?;
            } else {
                return Err(format!("unparsed line {line:?}"));
            }
        }
        *all = work;
        Ok(())
    }
}

pub(crate) struct FakeExec(pub(crate) Arc<FakeKernel>);

impl Exec for FakeExec {
    fn run(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> std::io::Result<ExecOutput> {
        let k = &self.0;
        let stdin = String::from_utf8_lossy(stdin.unwrap_or_default()).into_owned();
        k.calls.lock().unwrap().push((
            program.to_owned(),
            args.iter().map(|s| (*s).to_owned()).collect(),
            stdin.clone(),
        ));
        let ok = |s: String| {
            Ok(ExecOutput {
                code: Some(0),
                stdout: s.into_bytes(),
                stderr: vec![],
            })
        };
        let fail = |s: String| {
            Ok(ExecOutput {
                code: Some(1),
                stdout: vec![],
                stderr: s.into_bytes(),
            })
        };
        match program {
            "iptables" if args == ["-V"] && k.legacy => ok("iptables v1.8.9 (legacy)\n".into()),
            "iptables" if args == ["-V"] => ok("iptables v1.8.9 (nf_tables)\n".into()),
            "iptables" => {
                // -w 5 -t TABLE -S CHAIN
                match k.chain(args[3], args[5]) {
                    Some(rules) => ok(rules
                        .iter()
                        .map(|r| format!("-A {} {r}\n", args[5]))
                        .collect()),
                    None => fail("No chain/target/match by that name.".into()),
                }
            }
            "iptables-save" => {
                let t = k.tables.lock().unwrap();
                let mut s = format!("*{}\n", args[1]);
                for (name, rules) in &t[args[1]] {
                    s.push_str(&format!(":{name} - [0:0]\n"));
                    let _ = rules;
                }
                for (name, rules) in &t[args[1]] {
                    for r in rules {
                        s.push_str(&format!("-A {name} {r}\n"));
                    }
                }
                s.push_str("COMMIT\n");
                ok(s)
            }
            "iptables-restore" => {
                {
                    let mut f = k.fail_restores.lock().unwrap();
                    if *f > 0 {
                        *f -= 1;
                        return fail("iptables-restore: line 2 failed".into());
                    }
                }
                match k.restore(&stdin) {
                    Ok(()) => ok(String::new()),
                    Err(e) => fail(e),
                }
            }
            "conntrack" | "sysctl" => ok(String::new()),
            other => fail(format!("unexpected program {other}")),
        }
    }
}
