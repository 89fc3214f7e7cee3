//! `ipMasq`: a per-container chain in `nat` that masquerades traffic leaving the
//! container's network, jumped to from POSTROUTING; rules as the reference plugins
//! write them so either plugin's DEL cleans up the other's ADD.

use ipnet::IpNet;

use super::{Iptables, IptablesError, Runner, rule};

const TABLE: &str = "nat";

/// Installs masquerading for `ip` (the container address with its prefix).
pub fn setup_masquerade<R: Runner>(
    ipt: &Iptables<R>,
    chain: &str,
    comment: &str,
    ip: IpNet,
) -> Result<(), IptablesError> {
    ipt.ensure_chain(TABLE, chain)?;
    let multicast = if ip.addr().is_ipv4() {
        "224.0.0.0/4"
    } else {
        "ff00::/8"
    };
    ipt.append_unique(
        TABLE,
        chain,
        &rule(&[
            "-d",
            &ip.trunc().to_string(),
            "-j",
            "ACCEPT",
            "-m",
            "comment",
            "--comment",
            comment,
        ]),
    )?;
    ipt.append_unique(
        TABLE,
        chain,
        &rule(&[
            "!",
            "-d",
            multicast,
            "-j",
            "MASQUERADE",
            "-m",
            "comment",
            "--comment",
            comment,
        ]),
    )?;
    let host = IpNet::from(ip.addr());
    ipt.append_unique(
        TABLE,
        "POSTROUTING",
        &rule(&[
            "-s",
            &host.to_string(),
            "-j",
            chain,
            "-m",
            "comment",
            "--comment",
            comment,
        ]),
    )
}

/// Removes every POSTROUTING jump to `chain` and the chain itself. Works without the
/// container's addresses, which a DEL after the namespace is gone no longer knows.
pub fn teardown_masquerade<R: Runner>(ipt: &Iptables<R>, chain: &str) -> Result<(), IptablesError> {
    if let Some(rules) = ipt.list(TABLE, "POSTROUTING")? {
        let target = format!("-j {chain}");
        for line in rules.iter().filter(|l| l.contains(&target)) {
            ipt.delete_listed(TABLE, line)?;
        }
    }
    ipt.delete_chain(TABLE, chain)
}
