//! Turns the state into kernel rules: a full sync writes everything we own (and deletes our
//! chains nobody wants any more); a partial sync writes only the chains of the Services that
//! changed. Both go through `iptables-restore --noflush`, so chains that are not ours are
//! never touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::config::{NodePortAddresses, ProxyConfig};
use super::events::EventRecorder;
use super::iptables::{
    Backend, Conntrack, Exec, Iptables, IptablesError, missing_hooks, set_sysctl,
};
use super::model::{
    Claim, PortModel, Protocol, ServiceClaims, ServiceModel, build_service, local_cidr,
    node_addresses, resolve_claims, service_claims,
};
use super::rules::{
    self, CANARY, EXTERNAL_SERVICES, NODEPORTS, NodePortMatch, RuleContext, SERVICES, ServiceRules,
    Table, service_rules,
};
use super::state::{Change, ProxyState, ServiceKey};

/// How many chains one nf_tables restore payload of a full sync carries at most (whole
/// Services are never split).
const NFT_BATCH_CHAINS: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("iptables: {0}")]
    Iptables(#[from] IptablesError),
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub full: bool,
    /// Bytes handed to `iptables-restore` (0 when nothing needed writing).
    pub bytes: usize,
    pub services_rebuilt: usize,
    pub conntrack_deletions: usize,
}

/// A health check node port and what it reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceKey,
    pub local_endpoints: usize,
}

#[derive(Clone, Debug)]
struct Written {
    model: ServiceModel,
    rules: ServiceRules,
}

/// The proxy's brain: state in, rules out.
pub struct Proxier {
    cfg: ProxyConfig,
    state: ProxyState,
    ipt: Iptables,
    exec: Arc<dyn Exec>,
    conntrack: Conntrack,
    events: Arc<dyn EventRecorder>,
    ctx: RuleContext,
    nodeport_match: NodePortMatch,
    written: BTreeMap<ServiceKey, Written>,
    claims: HashMap<ServiceKey, ServiceClaims>,
    denied: HashMap<ServiceKey, BTreeSet<Claim>>,
    /// The last filter chains written, to skip the filter table when they did not change.
    filter_text: Option<String>,
    need_full: bool,
    /// conntrack -D argument lists still to run (kept across a failed sync).
    conntrack_todo: Vec<Vec<String>>,
}

impl Proxier {
    pub fn new(
        cfg: ProxyConfig,
        ipt: Iptables,
        exec: Arc<dyn Exec>,
        events: Arc<dyn EventRecorder>,
    ) -> Self {
        let ctx = RuleContext {
            mark: cfg.masquerade_mark(),
            local_cidr: cfg.cluster_cidr,
        };
        let nodeport_match = nodeport_match(&cfg, &[]);
        Self {
            conntrack: Conntrack::new(exec.clone()),
            cfg,
            state: ProxyState::new(),
            ipt,
            exec,
            events,
            ctx,
            nodeport_match,
            written: BTreeMap::new(),
            claims: HashMap::new(),
            denied: HashMap::new(),
            filter_text: None,
            need_full: true,
            conntrack_todo: Vec::new(),
        }
    }

    pub fn apply(&mut self, change: Change) {
        self.state.apply(change);
    }

    pub fn state(&self) -> &ProxyState {
        &self.state
    }

    pub fn iptables(&self) -> &Iptables {
        &self.ipt
    }

    /// The next sync writes everything.
    pub fn request_full_sync(&mut self) {
        self.need_full = true;
    }

    pub fn needs_sync(&self) -> bool {
        self.need_full || self.state.has_changes()
    }

    /// True when our canary chains are intact; false (and a full sync scheduled) when
    /// someone flushed or deleted them.
    pub fn check_canary(&mut self) -> Result<bool, SyncError> {
        for table in [Table::Nat, Table::Filter] {
            if !self.ipt.chain_has_rules(table, CANARY)? {
                tracing::warn!(
                    table = table.as_str(),
                    "canary chain gone or flushed: full resync"
                );
                self.need_full = true;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The health check node ports to serve and their local endpoint counts.
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut out = BTreeMap::new();
        for w in self.written.values() {
            for p in &w.model.ports {
                if let Some(hc) = p.health_check_node_port {
                    out.entry(hc).or_insert_with(|| HealthCheck {
                        service: w.model.key.clone(),
                        local_endpoints: p.local_endpoints.len(),
                    });
                }
            }
        }
        out
    }

    /// Brings the kernel in line with the state: partial when possible, full when asked,
    /// at the start and after a failure.
    pub fn sync(&mut self) -> Result<SyncReport, SyncError> {
        let span = tracing::info_span!("proxy_sync");
        let _enter = span.enter();
        let (mut dirty, node_changed) = self.state.take_changes();
        let mut dispatch_changed = false;

        if node_changed {
            let node = self.state.node();
            let ctx = RuleContext {
                mark: self.cfg.masquerade_mark(),
                local_cidr: local_cidr(&self.cfg, node),
            };
            if ctx != self.ctx {
                self.ctx = ctx;
                dirty.extend(self.written.keys().cloned());
                dirty.extend(self.state.services().map(|(k, _)| k.clone()));
            }
            let m = nodeport_match(&self.cfg, &node_addresses(node));
            if m != self.nodeport_match {
                self.nodeport_match = m;
                dispatch_changed = true;
            }
        }

        // Who holds which port: only recomputed when a Service's claims changed.
        let mut claims_changed = false;
        for key in &dirty {
            let new = self
                .state
                .service(key)
                .map(|svc| service_claims(key, svc, &self.cfg));
            claims_changed |= match new {
                Some(n) => self.claims.insert(key.clone(), n.clone()).as_ref() != Some(&n),
                None => self.claims.remove(key).is_some(),
            };
        }
        if claims_changed {
            let denied = resolve_claims(self.claims.iter());
            for (k, v) in &denied {
                if self.denied.get(k) != Some(v) {
                    dirty.insert(k.clone());
                }
            }
            for k in self.denied.keys() {
                if !denied.contains_key(k) {
                    dirty.insert(k.clone());
                }
            }
            self.denied = denied;
        }

        // Rebuild the changed Services and note what differs from what was written.
        let mut chain_writes: BTreeSet<String> = BTreeSet::new();
        let mut chain_deletes: BTreeSet<String> = BTreeSet::new();
        let mut problems = Vec::new();
        let no_denials = BTreeSet::new();
        for key in &dirty {
            let new = self.state.service(key).map(|svc| {
                let slices = self.state.slices_for(key);
                let denied = self.denied.get(key).unwrap_or(&no_denials);
                let model = build_service(key, svc, &slices, &self.cfg, denied, &mut problems);
                let rules = service_rules(&model, &self.ctx);
                Written { model, rules }
            });
            let old = self.written.remove(key);
            let empty = ServiceRules::default();
            let old_rules = old.as_ref().map_or(&empty, |w| &w.rules);
            let new_rules = new.as_ref().map_or(&empty, |w| &w.rules);
            for (name, body) in &new_rules.chains {
                if old_rules.chains.get(name) != Some(body) {
                    chain_writes.insert(name.clone());
                }
            }
            for name in old_rules.chains.keys() {
                if !new_rules.chains.contains_key(name) {
                    chain_deletes.insert(name.clone());
                }
            }
            dispatch_changed |= old_rules.nat_dispatch != new_rules.nat_dispatch
                || old_rules.nat_nodeports != new_rules.nat_nodeports;
            self.conntrack_todo.extend(stale_udp_flows(
                old.as_ref().map(|w| &w.model),
                new.as_ref().map(|w| &w.model),
            ));
            if let Some(w) = new
                && !w.model.ports.is_empty()
            {
                self.written.insert(key.clone(), w);
            }
        }
        // A chain one Service dropped may be one another Service now writes (a shared name
        // cannot happen across Services, but be safe).
        chain_deletes.retain(|c| !chain_writes.contains(c));
        for mut ev in problems {
            ev.uid = self.state.uid(ev.kind, &ev.namespace, &ev.name);
            tracing::warn!(
                kind = ev.kind,
                namespace = %ev.namespace,
                name = %ev.name,
                reason = ev.reason,
                message = %ev.message,
                "cannot program part of a Service"
            );
            self.events.record(ev);
        }

        let filter_text = self.filter_rules();
        let full = self.need_full;
        let result = if full {
            self.full_sync(&filter_text)
        } else {
            let filter = (self.filter_text.as_deref() != Some(filter_text.as_str()))
                .then_some(filter_text.as_str());
            self.partial_sync(&chain_writes, &chain_deletes, dispatch_changed, filter)
        };
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, full, "sync failed; the next sync is a full one");
                self.need_full = true;
                self.filter_text = None;
                return Err(e);
            }
        };
        self.need_full = false;
        self.filter_text = Some(filter_text);

        let mut deletions = 0;
        for args in std::mem::take(&mut self.conntrack_todo) {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            match self.conntrack.delete(&refs) {
                Ok(()) => deletions += 1,
                Err(e) => tracing::warn!(error = %e, "stale UDP conntrack entries not removed"),
            }
        }
        let report = SyncReport {
            full,
            bytes,
            services_rebuilt: dirty.len(),
            conntrack_deletions: deletions,
        };
        tracing::debug!(?report, "synced");
        Ok(report)
    }

    /// Our filter chains that depend on Services (the fixed ones are written by full syncs).
    fn filter_rules(&self) -> String {
        let mut services = String::new();
        let mut external = String::new();
        let mut nodeports = String::new();
        for w in self.written.values() {
            services.push_str(&w.rules.filter_services);
            external.push_str(&w.rules.filter_external);
            nodeports.push_str(&w.rules.filter_nodeports);
        }
        let mut out =
            String::with_capacity(services.len() + external.len() + nodeports.len() + 100);
        for c in [SERVICES, EXTERNAL_SERVICES, NODEPORTS] {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(&services);
        out.push_str(&external);
        out.push_str(&nodeports);
        out
    }

    fn nat_dispatch(&self, out: &mut String) {
        let _ = writeln!(out, ":{SERVICES} - [0:0]");
        let _ = writeln!(out, ":{NODEPORTS} - [0:0]");
        for w in self.written.values() {
            out.push_str(&w.rules.nat_dispatch);
        }
        out.push_str(&rules::nodeport_jumps(&self.nodeport_match));
        for w in self.written.values() {
            out.push_str(&w.rules.nat_nodeports);
        }
    }

    fn full_sync(&mut self, filter_text: &str) -> Result<usize, SyncError> {
        let nat_view = self.ipt.view(Table::Nat)?;
        let filter_view = self.ipt.view(Table::Filter)?;

        let mut wanted: BTreeSet<&str> = rules::static_chains(Table::Nat).iter().copied().collect();
        for w in self.written.values() {
            wanted.extend(w.rules.chains.keys().map(String::as_str));
        }
        // iptables-nft-restore --noflush slows down with the square of the chains in one
        // payload (1.8.9: 1,000 chains 0.07 s, 12,000 chains 3.5 s), so on nf_tables the
        // Services' chains go first in batches, whole Services at a time; nothing refers to
        // a new chain until the last payload rewrites the dispatch chains.
        let mut written_bytes = 0;
        let batched = self.ipt.backend() == Backend::Nft;
        if batched {
            // The first batch also brings the fixed chains the Services jump to.
            let mut decls = String::new();
            for c in rules::static_chains(Table::Nat) {
                if *c != SERVICES && *c != NODEPORTS {
                    let _ = writeln!(decls, ":{c} - [0:0]");
                }
            }
            let mut bodies = rules::nat_fixed(&self.ctx.mark);
            let mut chains = 0;
            let mut values = self.written.values().peekable();
            while let Some(w) = values.next() {
                for (name, body) in &w.rules.chains {
                    let _ = writeln!(decls, ":{name} - [0:0]");
                    bodies.push_str(body);
                }
                chains += w.rules.chains.len();
                if chains >= NFT_BATCH_CHAINS || values.peek().is_none() {
                    let payload = format!("*nat\n{decls}{bodies}COMMIT\n");
                    self.ipt.restore(payload.as_bytes())?;
                    written_bytes += payload.len();
                    decls.clear();
                    bodies.clear();
                    chains = 0;
                }
            }
        }
        let mut out = String::with_capacity(if batched {
            4096
        } else {
            self.written.len() * 600 + 4096
        });
        out.push_str("*nat\n");
        for c in rules::static_chains(Table::Nat) {
            if *c != SERVICES && *c != NODEPORTS {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
        }
        if !batched {
            for w in self.written.values() {
                for name in w.rules.chains.keys() {
                    let _ = writeln!(out, ":{name} - [0:0]");
                }
            }
        }
        let stale_nat: Vec<&String> = nat_view
            .chains
            .iter()
            .filter(|c| !wanted.contains(c.as_str()))
            .collect();
        for c in &stale_nat {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        self.nat_dispatch(&mut out);
        out.push_str(&rules::nat_fixed(&self.ctx.mark));
        if !batched {
            for w in self.written.values() {
                for body in w.rules.chains.values() {
                    out.push_str(body);
                }
            }
        }
        insert_hooks(&mut out, Table::Nat, &missing_hooks(Table::Nat, &nat_view));
        for c in &stale_nat {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");

        out.push_str("*filter\n");
        for c in rules::static_chains(Table::Filter) {
            if ![SERVICES, EXTERNAL_SERVICES, NODEPORTS].contains(c) {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
        }
        let filter_wanted: BTreeSet<&str> = rules::static_chains(Table::Filter)
            .iter()
            .copied()
            .collect();
        let stale_filter: Vec<&String> = filter_view
            .chains
            .iter()
            .filter(|c| !filter_wanted.contains(c.as_str()))
            .collect();
        for c in &stale_filter {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(filter_text);
        out.push_str(&rules::filter_fixed(
            &self.ctx.mark,
            self.cfg.localhost_node_ports,
        ));
        insert_hooks(
            &mut out,
            Table::Filter,
            &missing_hooks(Table::Filter, &filter_view),
        );
        for c in &stale_filter {
            let _ = writeln!(out, "-X {c}");
        }
        out.push_str("COMMIT\n");

        self.ipt.restore(out.as_bytes())?;
        written_bytes += out.len();
        if self.cfg.localhost_node_ports {
            // Without it the kernel drops packets to 127.0.0.1 that are DNATed elsewhere.
            if let Err(e) = set_sysctl(self.exec.as_ref(), "net.ipv4.conf.all.route_localnet", "1")
            {
                tracing::warn!(error = %e, "cannot enable route_localnet: NodePorts on 127.0.0.1 will not work");
            }
        }
        Ok(written_bytes)
    }

    fn partial_sync(
        &mut self,
        writes: &BTreeSet<String>,
        deletes: &BTreeSet<String>,
        dispatch_changed: bool,
        filter: Option<&str>,
    ) -> Result<usize, SyncError> {
        let mut out = String::new();
        if !writes.is_empty() || !deletes.is_empty() || dispatch_changed {
            out.push_str("*nat\n");
            for c in writes.iter().chain(deletes) {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            if dispatch_changed {
                self.nat_dispatch(&mut out);
            }
            let mut bodies: HashMap<&str, &str> = HashMap::new();
            for w in self.written.values() {
                for (name, body) in &w.rules.chains {
                    if writes.contains(name) {
                        bodies.insert(name.as_str(), body.as_str());
                    }
                }
            }
            for c in writes {
                out.push_str(bodies.get(c.as_str()).copied().unwrap_or(""));
            }
            for c in deletes {
                let _ = writeln!(out, "-X {c}");
            }
            out.push_str("COMMIT\n");
        }
        if let Some(f) = filter {
            out.push_str("*filter\n");
            out.push_str(f);
            out.push_str("COMMIT\n");
        }
        if out.is_empty() {
            return Ok(0);
        }
        self.ipt.restore(out.as_bytes())?;
        Ok(out.len())
    }
}

fn insert_hooks(out: &mut String, table: Table, hooks: &[&rules::Hook]) {
    // Inserting at the top in reverse keeps our hooks in their listed order.
    for h in hooks.iter().rev() {
        tracing::info!(
            table = table.as_str(),
            chain = h.builtin,
            target = h.target,
            "adding jump"
        );
        let _ = writeln!(out, "-I {} 1 {}", h.builtin, h.rule());
    }
}

fn nodeport_match(cfg: &ProxyConfig, node_addrs: &[Ipv4Addr]) -> NodePortMatch {
    match cfg.node_port_addresses {
        NodePortAddresses::AllLocal => NodePortMatch::AllLocal {
            localhost: cfg.localhost_node_ports,
        },
        NodePortAddresses::NodeAddresses => NodePortMatch::Addresses {
            addrs: node_addrs.to_vec(),
            localhost: cfg.localhost_node_ports,
        },
    }
}

/// `conntrack -D` argument lists for UDP flows that point at endpoints that went away, and
/// for flows to a UDP Service that had no endpoints (those were never DNATed and would keep
/// missing the new endpoints).
fn stale_udp_flows(old: Option<&ServiceModel>, new: Option<&ServiceModel>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let Some(old) = old else { return out };
    let find = |p: &PortModel| {
        new.and_then(|n| {
            n.ports
                .iter()
                .find(|q| q.id == p.id && q.protocol == p.protocol)
        })
    };
    for p in old.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
        let q = find(p);
        let kept: BTreeSet<(Ipv4Addr, u16)> = q
            .into_iter()
            .flat_map(|q| q.cluster_endpoints.iter().map(|e| (e.ip, e.port)))
            .collect();
        let mut gone: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for e in &p.cluster_endpoints {
            if !kept.contains(&(e.ip, e.port)) {
                gone.insert(e.ip);
            }
        }
        for ip in gone {
            let mut origins = vec![p.cluster_ip];
            origins.extend(&p.external_ips);
            for o in origins {
                out.push(strings(&[
                    "-p",
                    "udp",
                    "--orig-dst",
                    &o.to_string(),
                    "--dst-nat",
                    &ip.to_string(),
                ]));
            }
            if let Some(np) = p.node_port {
                out.push(strings(&[
                    "-p",
                    "udp",
                    "--orig-port-dst",
                    &np.to_string(),
                    "--dst-nat",
                    &ip.to_string(),
                ]));
            }
        }
        if p.cluster_endpoints.is_empty()
            && let Some(q) = q
            && !q.cluster_endpoints.is_empty()
        {
            out.push(strings(&[
                "-p",
                "udp",
                "--orig-dst",
                &q.cluster_ip.to_string(),
            ]));
            if let Some(np) = q.node_port {
                out.push(strings(&["-p", "udp", "--orig-port-dst", &np.to_string()]));
            }
        }
    }
    out
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// The local CIDR the rules are built with (for tests and diagnostics).
impl Proxier {
    pub fn local_cidr(&self) -> Option<Ipv4Net> {
        self.ctx.local_cidr
    }
}

#[cfg(test)]
#[path = "proxier_tests.rs"]
mod tests;
