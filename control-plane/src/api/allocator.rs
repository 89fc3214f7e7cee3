//! Service ClusterIP and NodePort allocation. Each handed-out IP or port is a key in the
//! store (created atomically, so two API servers never hand out the same one), whose value is
//! the owning Service's key; it is deleted when the Service is.

use std::net::{IpAddr, Ipv4Addr};

use bytes::Bytes;
use ipnet::IpNet;
use rand::Rng;

use crate::storage::{Store, StoreError};

pub const NODE_PORT_MIN: u16 = 30000;
pub const NODE_PORT_MAX: u16 = 32767;
const IP_PREFIX: &str = "/registry/ferrolet/serviceips/";
const PORT_PREFIX: &str = "/registry/ferrolet/nodeports/";

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("the service cluster IP range {0} is full")]
    IpRangeFull(IpNet),
    #[error("the node port range {NODE_PORT_MIN}-{NODE_PORT_MAX} is full")]
    PortRangeFull,
    #[error("{0} is not in the service cluster IP range {1}")]
    OutOfRange(String, IpNet),
    #[error("{0} is already allocated")]
    Taken(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

pub struct Allocator {
    range: IpNet,
}

impl Allocator {
    pub fn new(range: IpNet) -> Self {
        Allocator { range }
    }

    pub fn range(&self) -> IpNet {
        self.range
    }

    /// The first usable address (the one the `kubernetes` Service gets upstream).
    fn host_count(&self) -> u64 {
        match self.range {
            IpNet::V4(n) => (1u64 << (32 - u32::from(n.prefix_len()))).saturating_sub(2),
            IpNet::V6(n) => 1u64 << (128 - u32::from(n.prefix_len())).min(32),
        }
    }

    fn nth(&self, n: u64) -> Option<IpAddr> {
        match self.range {
            IpNet::V4(net) => {
                let base = u32::from(net.network());
                let offset = u32::try_from(n + 1).ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(base.checked_add(offset)?)))
            }
            IpNet::V6(net) => {
                let base = u128::from(net.network());
                Some(IpAddr::V6(std::net::Ipv6Addr::from(
                    base + u128::from(n) + 1,
                )))
            }
        }
    }

    /// Claims `ip` (a user asked for it) for `owner`.
    pub async fn claim_ip(
        &self,
        store: &dyn Store,
        ip: &str,
        owner: &str,
    ) -> Result<(), AllocError> {
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| AllocError::OutOfRange(ip.to_owned(), self.range))?;
        if !self.range.contains(&parsed) || parsed == self.range.network() {
            return Err(AllocError::OutOfRange(ip.to_owned(), self.range));
        }
        match store
            .create(
                &format!("{IP_PREFIX}{parsed}"),
                Bytes::from(owner.to_owned()),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => Err(AllocError::Taken(ip.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// Picks a free IP for `owner`, starting at a random offset.
    pub async fn allocate_ip(&self, store: &dyn Store, owner: &str) -> Result<String, AllocError> {
        let count = self.host_count().max(1);
        let start = rand::rng().random_range(0..count);
        for i in 0..count {
            let Some(ip) = self.nth((start + i) % count) else {
                continue;
            };
            let key = format!("{IP_PREFIX}{ip}");
            match store.create(&key, Bytes::from(owner.to_owned())).await {
                Ok(_) => return Ok(ip.to_string()),
                Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(AllocError::IpRangeFull(self.range))
    }

    pub async fn claim_port(
        &self,
        store: &dyn Store,
        port: u16,
        owner: &str,
    ) -> Result<(), AllocError> {
        match store
            .create(
                &format!("{PORT_PREFIX}{port}"),
                Bytes::from(owner.to_owned()),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::AlreadyExists { .. }) => Err(AllocError::Taken(port.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn allocate_port(&self, store: &dyn Store, owner: &str) -> Result<u16, AllocError> {
        let count = NODE_PORT_MAX - NODE_PORT_MIN + 1;
        let start = rand::rng().random_range(0..count);
        for i in 0..count {
            let port = NODE_PORT_MIN + (start + i) % count;
            match self.claim_port(store, port, owner).await {
                Ok(()) => return Ok(port),
                Err(AllocError::Taken(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(AllocError::PortRangeFull)
    }

    /// Frees an IP; freeing one that is not held is not an error.
    pub async fn release_ip(&self, store: &dyn Store, ip: &str) -> Result<(), StoreError> {
        match store.delete(&format!("{IP_PREFIX}{ip}"), None).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn release_port(&self, store: &dyn Store, port: u16) -> Result<(), StoreError> {
        match store.delete(&format!("{PORT_PREFIX}{port}"), None).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Frees what a crash left claimed for Services that were never stored (or are gone).
    pub async fn repair(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let mut freed = 0;
        for prefix in [IP_PREFIX, PORT_PREFIX] {
            let list = store
                .list(prefix, crate::storage::ListOptions::default())
                .await?;
            for kv in list.items {
                let owner = String::from_utf8_lossy(&kv.value).into_owned();
                if store.get(&owner).await?.is_none() {
                    match store.delete(&kv.key, Some(kv.mod_revision)).await {
                        Ok(_) => freed += 1,
                        Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStore;

    #[tokio::test]
    async fn a_small_range_hands_out_each_ip_once_and_reuses_released_ones() {
        let store = MemoryStore::new();
        let alloc = Allocator::new("10.0.0.0/30".parse().expect("cidr"));
        let a = alloc.allocate_ip(&store, "/s/a").await.expect("first");
        let b = alloc.allocate_ip(&store, "/s/b").await.expect("second");
        assert_ne!(a, b);
        assert!(matches!(
            alloc.allocate_ip(&store, "/s/c").await,
            Err(AllocError::IpRangeFull(_))
        ));
        assert!(matches!(
            alloc.claim_ip(&store, &a, "/s/c").await,
            Err(AllocError::Taken(_))
        ));
        alloc.release_ip(&store, &a).await.expect("release");
        assert_eq!(alloc.allocate_ip(&store, "/s/c").await.expect("reused"), a);
        assert!(matches!(
            alloc.claim_ip(&store, "192.168.0.1", "/s/d").await,
            Err(AllocError::OutOfRange(..))
        ));
    }

    #[tokio::test]
    async fn node_ports_are_unique_and_repair_frees_orphans() {
        let store = MemoryStore::new();
        let alloc = Allocator::new("10.0.0.0/24".parse().expect("cidr"));
        let p = alloc.allocate_port(&store, "/s/a").await.expect("port");
        assert!((NODE_PORT_MIN..=NODE_PORT_MAX).contains(&p));
        assert!(matches!(
            alloc.claim_port(&store, p, "/s/b").await,
            Err(AllocError::Taken(_))
        ));
        // "/s/a" was never stored: repair gives the port back.
        assert_eq!(alloc.repair(&store).await.expect("repair"), 1);
        alloc
            .claim_port(&store, p, "/s/b")
            .await
            .expect("free again");
    }
}
