//! The four plugins. Each implements [`crate::invoke::Plugin`]; the binaries only call
//! [`crate::invoke::run_main`] with one of them.

pub mod bridge;
mod delegate;
pub mod host_local;
pub mod loopback;
pub mod portmap;

use std::future::Future;

use crate::invoke::Request;
use crate::netlink::NetlinkError;
use crate::netns::{Netns, NetnsError};
use crate::spec::{CniError, ErrorCode};

impl From<NetnsError> for CniError {
    fn from(e: NetnsError) -> Self {
        let code = match e {
            NetnsError::NotFound(_) => ErrorCode::UnknownContainer,
            NetnsError::NotNetns(_) => ErrorCode::InvalidEnvironment,
            _ => ErrorCode::Internal,
        };
        CniError::new(code, "network namespace unusable", e.to_string())
    }
}

impl From<NetlinkError> for CniError {
    fn from(e: NetlinkError) -> Self {
        CniError::new(ErrorCode::Internal, "netlink request failed", e.to_string())
    }
}

impl From<crate::sysctl::SysctlError> for CniError {
    fn from(e: crate::sysctl::SysctlError) -> Self {
        CniError::new(ErrorCode::Internal, "sysctl failed", e.to_string())
    }
}

/// The container namespace of an ADD or CHECK, which must exist.
fn required_netns(req: &Request) -> Result<Netns, CniError> {
    let path = req
        .netns
        .as_deref()
        .ok_or_else(|| CniError::msg(ErrorCode::InvalidEnvironment, "CNI_NETNS is required"))?;
    Ok(Netns::open(path)?)
}

/// The container namespace of a DEL: `None` when it is gone, since DEL must still
/// release what lives outside it.
fn optional_netns(req: &Request) -> Result<Option<Netns>, CniError> {
    let Some(path) = req.netns.as_deref() else {
        return Ok(None);
    };
    match Netns::open(path) {
        Ok(ns) => Ok(Some(ns)),
        Err(NetnsError::NotFound(_) | NetnsError::NotNetns(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Runs netlink work in `ns`, mapping both layers of failure to CNI errors.
fn in_netns<F, Fut, T>(ns: &Netns, f: F) -> Result<T, CniError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
    T: Send,
{
    ns.run(f)?
}

/// Runs netlink work in the plugin's own (host) namespace.
fn on_host<F, Fut, T>(f: F) -> Result<T, CniError>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = Result<T, CniError>>,
{
    crate::netns::block_on_netlink(f).map_err(|e| {
        CniError::new(
            ErrorCode::Internal,
            "starting netlink in the host namespace",
            e.to_string(),
        )
    })?
}
