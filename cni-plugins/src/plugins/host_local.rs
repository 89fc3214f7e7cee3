//! `host-local` IPAM: addresses from configured ranges, state on local disk.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::invoke::{Plugin, Request};
use crate::ipam::config::requested_ips;
use crate::ipam::{
    AllocError, Allocator, DiskStore, IpamConfig, IpamConfigError, Store, StoreError,
};
use crate::spec::{CniError, CniResult, ErrorCode, IpConfig, Route};

pub struct HostLocal;

impl From<IpamConfigError> for CniError {
    fn from(e: IpamConfigError) -> Self {
        let code = match e {
            IpamConfigError::ResolvConf { .. } => ErrorCode::IoFailure,
            _ => ErrorCode::InvalidConfig,
        };
        CniError::new(code, "invalid host-local configuration", e.to_string())
    }
}

impl From<StoreError> for CniError {
    fn from(e: StoreError) -> Self {
        CniError::new(
            ErrorCode::IoFailure,
            "host-local store failed",
            e.to_string(),
        )
    }
}

impl From<AllocError> for CniError {
    fn from(e: AllocError) -> Self {
        let code = match e {
            // Addresses come back as containers go, so the runtime should retry.
            AllocError::Exhausted(_) | AllocError::Taken { .. } => ErrorCode::TryAgainLater,
            AllocError::NotInRange(_) | AllocError::IsGateway(_) => ErrorCode::InvalidConfig,
            AllocError::Duplicate { .. } => ErrorCode::Internal,
            AllocError::Store(e) => return e.into(),
        };
        CniError::new(code, "host-local allocation failed", e.to_string())
    }
}

fn open(req: &Request) -> Result<(IpamConfig, DiskStore), CniError> {
    let conf = IpamConfig::from_netconf(&req.raw)?;
    let store = DiskStore::open(&conf.data_dir, &req.conf.name)?;
    Ok((conf, store))
}

/// Allocates one address per range set, honouring requested IPs, all or nothing.
fn allocate(
    conf: &IpamConfig,
    store: &mut dyn Store,
    req: &Request,
) -> Result<Vec<IpConfig>, CniError> {
    let mut requested = requested_ips(&req.raw, req.arg("IP"))?;
    let mut ips: Vec<IpConfig> = Vec::new();
    let mut taken: Vec<IpAddr> = Vec::new();
    let mut attempt = || -> Result<(), CniError> {
        for (i, set) in conf.range_sets.iter().enumerate() {
            let alloc = Allocator { set, id: i };
            let want = requested
                .iter()
                .position(|ip| alloc.contains(*ip))
                .map(|p| requested.remove(p));
            let got = alloc.allocate(store, &req.container_id, &req.ifname, want)?;
            taken.push(got.address.addr());
            ips.push(IpConfig {
                interface: None,
                address: got.address,
                gateway: Some(got.gateway),
            });
        }
        if let Some(ip) = requested.first() {
            return Err(AllocError::NotInRange(*ip).into());
        }
        Ok(())
    };
    match attempt() {
        Ok(()) => Ok(ips),
        Err(e) => {
            for ip in taken {
                if let Err(release) = store.release(ip) {
                    tracing::error!(%ip, error = %release, "rolling back an allocation failed");
                }
            }
            Err(e)
        }
    }
}

impl Plugin for HostLocal {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let (conf, mut store) = open(req)?;
        let ips = allocate(&conf, &mut store, req)?;
        Ok(CniResult {
            cni_version: req.version.to_string(),
            interfaces: Vec::new(),
            ips,
            routes: conf
                .routes
                .iter()
                .map(|r| Route {
                    dst: r.dst,
                    gw: r.gw,
                    mtu: None,
                    advmss: None,
                    priority: None,
                    table: None,
                    scope: None,
                })
                .collect(),
            dns: conf.dns,
        })
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let (_, mut store) = open(req)?;
        let freed = store.release_by_id(&req.container_id, &req.ifname)?;
        tracing::debug!(?freed, "released");
        Ok(())
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let (_, store) = open(req)?;
        let held = store.get_by_id(&req.container_id, &req.ifname)?;
        if held.is_empty() {
            return Err(CniError::new(
                ErrorCode::Internal,
                "host-local holds no address for this container",
                format!("{}/{}", req.container_id, req.ifname),
            ));
        }
        if let Some(prev) = &req.prev_result {
            for ip in &prev.ips {
                if !held.contains(&ip.address.addr()) {
                    return Err(CniError::new(
                        ErrorCode::Internal,
                        "address in prevResult is not reserved for this container",
                        ip.address.to_string(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        let (_, _store) = open(req).map_err(|e| CniError {
            code: ErrorCode::PluginNotAvailable,
            ..e
        })?;
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let valid = req.valid_attachments()?;
        let valid_ids: HashSet<&str> = valid.iter().map(|(id, _)| id.as_str()).collect();
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|(id, ifname)| (id.as_str(), ifname.as_str()))
            .collect();
        let (_, mut store) = open(req)?;
        let mut errors = Vec::new();
        for a in store.allocations()? {
            let keep = if a.ifname.is_empty() {
                valid_ids.contains(a.container_id.as_str())
            } else {
                valid.contains(&(a.container_id.as_str(), a.ifname.as_str()))
            };
            if !keep {
                tracing::info!(ip = %a.ip, container = %a.container_id, "gc releases");
                if let Err(e) = store.release(a.ip) {
                    errors.push(e.to_string());
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::IoFailure,
                "gc could not release every address",
                errors.join("; "),
            ))
        }
    }
}
