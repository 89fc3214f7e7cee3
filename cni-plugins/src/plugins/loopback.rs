//! `loopback`: brings `lo` up in the container.

use crate::invoke::{Plugin, Request};
use crate::netlink;
use crate::spec::{CniError, CniResult, ErrorCode, Interface, IpConfig};

use super::{in_netns, optional_netns, required_netns};

pub struct Loopback;

impl Plugin for Loopback {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let ns = required_netns(req)?;
        let addrs = in_netns(&ns, |h| async move {
            let lo = netlink::link_by_name(&h, "lo").await?.ok_or_else(|| {
                CniError::msg(ErrorCode::Internal, "the namespace has no lo interface")
            })?;
            netlink::set_up(&h, lo.index).await?;
            Ok(netlink::addresses(&h, lo.index).await?)
        })?;
        if let Some(prev) = &req.prev_result {
            return Ok(prev.clone());
        }
        Ok(CniResult {
            cni_version: req.version.to_string(),
            interfaces: vec![Interface {
                name: "lo".into(),
                mac: Some("00:00:00:00:00:00".into()),
                sandbox: Some(ns.path().display().to_string()),
                ..Interface::default()
            }],
            ips: addrs
                .into_iter()
                .map(|a| IpConfig {
                    interface: Some(0),
                    address: a,
                    gateway: None,
                })
                .collect(),
            ..CniResult::default()
        })
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let Some(ns) = optional_netns(req)? else {
            return Ok(());
        };
        in_netns(&ns, |h| async move {
            if let Some(lo) = netlink::link_by_name(&h, "lo").await? {
                h.link()
                    .set(
                        rtnetlink::LinkUnspec::new_with_index(lo.index)
                            .down()
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(|e| {
                        CniError::new(ErrorCode::Internal, "setting lo down", e.to_string())
                    })?;
            }
            Ok(())
        })
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let ns = required_netns(req)?;
        in_netns(&ns, |h| async move {
            match netlink::link_by_name(&h, "lo").await? {
                Some(lo) if lo.up => Ok(()),
                Some(_) => Err(CniError::msg(ErrorCode::Internal, "lo is down")),
                None => Err(CniError::msg(ErrorCode::Internal, "lo is missing")),
            }
        })
    }

    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }

    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }
}
