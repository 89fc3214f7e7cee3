//! `macspoofchk`: an nftables rule per container that drops frames entering the bridge
//! from the container's veth with any source MAC other than the container's.

use super::{IptablesError, Output, Runner, rule};

const FAMILY: &str = "bridge";
const TABLE: &str = "ferrolet_cni";
const CHAIN: &str = "macspoofchk";

/// The `nft` command.
pub struct Nft<R: Runner> {
    runner: R,
}

impl<R: Runner> Nft<R> {
    pub fn new(runner: R) -> Self {
        Self { runner }
    }

    fn run(&self, args: &[String]) -> Result<Output, IptablesError> {
        let out = self
            .runner
            .run("nft", args)
            .map_err(|source| IptablesError::Spawn {
                program: "nft".into(),
                source,
            })?;
        if out.success {
            Ok(out)
        } else {
            Err(IptablesError::Failed {
                program: "nft".into(),
                args: args.join(" "),
                stderr: out.stderr.trim().to_string(),
            })
        }
    }

    /// Drops frames from `host_veth` whose source MAC is not `mac`; `tag` identifies the
    /// rule for removal.
    pub fn add_macspoof(&self, host_veth: &str, mac: &str, tag: &str) -> Result<(), IptablesError> {
        self.run(&rule(&["add", "table", FAMILY, TABLE]))?;
        self.run(&rule(&[
            "add",
            "chain",
            FAMILY,
            TABLE,
            CHAIN,
            "{ type filter hook prerouting priority -300; policy accept; }",
        ]))?;
        self.run(&rule(&[
            "add",
            "rule",
            FAMILY,
            TABLE,
            CHAIN,
            "iifname",
            host_veth,
            "ether",
            "saddr",
            "!=",
            mac,
            "drop",
            "comment",
            &format!("\"{tag}\""),
        ]))
        .map(drop)
    }

    /// Removes the rules tagged `tag`; missing table or rules are not errors.
    pub fn remove_macspoof(&self, tag: &str) -> Result<(), IptablesError> {
        let listed = self
            .runner
            .run("nft", &rule(&["-a", "list", "chain", FAMILY, TABLE, CHAIN]))
            .map_err(|source| IptablesError::Spawn {
                program: "nft".into(),
                source,
            })?;
        if !listed.success {
            return Ok(());
        }
        let needle = format!("comment \"{tag}\"");
        for line in listed.stdout.lines().filter(|l| l.contains(&needle)) {
            if let Some(handle) = line.rsplit("# handle ").next().map(str::trim) {
                self.run(&rule(&[
                    "delete", "rule", FAMILY, TABLE, CHAIN, "handle", handle,
                ]))?;
            }
        }
        Ok(())
    }

    /// Whether a rule tagged `tag` exists (CHECK).
    pub fn has_macspoof(&self, tag: &str) -> Result<bool, IptablesError> {
        let listed = self
            .runner
            .run("nft", &rule(&["list", "chain", FAMILY, TABLE, CHAIN]))
            .map_err(|source| IptablesError::Spawn {
                program: "nft".into(),
                source,
            })?;
        Ok(listed.success && listed.stdout.contains(&format!("comment \"{tag}\"")))
    }
}
