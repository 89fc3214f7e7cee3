//! Round-robin allocation over range sets, like the reference: start after the last
//! reserved address, wrap across the ranges of a set, skip the gateway, and give up
//! only after coming back to the starting point.

use std::net::IpAddr;

use ipnet::IpNet;

use super::config::{Range, RangeSet, from_u128, to_u128};
use super::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("no IP addresses available in range set {0}")]
    Exhausted(String),
    #[error("requested IP {0} is not in any configured range")]
    NotInRange(IpAddr),
    #[error("requested IP {0} is the subnet's gateway")]
    IsGateway(IpAddr),
    #[error("requested IP {ip} is already allocated in range set {set}")]
    Taken { ip: IpAddr, set: String },
    #[error("{ip} is already allocated to {id}/{ifname}; duplicate allocation is not allowed")]
    Duplicate {
        ip: IpAddr,
        id: String,
        ifname: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One address handed out, with the mask and gateway of its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub address: IpNet,
    pub gateway: IpAddr,
}

/// Allocates from one range set; `id` names the set in `last_reserved_ip.<id>`.
pub struct Allocator<'a> {
    pub set: &'a RangeSet,
    pub id: usize,
}

fn describe(set: &RangeSet) -> String {
    set.iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

impl Allocator<'_> {
    fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.set.iter().find(|r| r.contains(ip))
    }

    fn allocated(r: &Range, ip: IpAddr) -> Allocated {
        Allocated {
            address: IpNet::new(ip, r.subnet.prefix_len()).unwrap_or_else(|_| IpNet::from(ip)),
            gateway: r.gateway,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.range_for(ip).is_some()
    }

    /// Claims `requested`, or the next free address after the last one reserved.
    pub fn allocate(
        &self,
        store: &mut dyn Store,
        id: &str,
        ifname: &str,
        requested: Option<IpAddr>,
    ) -> Result<Allocated, AllocError> {
        if let Some(ip) = requested {
            let r = self.range_for(ip).ok_or(AllocError::NotInRange(ip))?;
            if ip == r.gateway {
                return Err(AllocError::IsGateway(ip));
            }
            if !store.reserve(id, ifname, ip, self.id)? {
                return Err(AllocError::Taken {
                    ip,
                    set: describe(self.set),
                });
            }
            return Ok(Self::allocated(r, ip));
        }
        if let Some(ip) = store
            .get_by_id(id, ifname)?
            .into_iter()
            .find(|ip| self.contains(*ip))
        {
            return Err(AllocError::Duplicate {
                ip,
                id: id.into(),
                ifname: ifname.into(),
            });
        }
        let mut cursor = match store.last_reserved(self.id)? {
            Some(last) => match self.set.iter().position(|r| r.contains(last)) {
                Some(i) => self.step(i, last),
                None => (0, self.set[0].start),
            },
            None => (0, self.set[0].start),
        };
        let first = cursor;
        loop {
            let (i, ip) = cursor;
            let r = &self.set[i];
            if ip != r.gateway && store.reserve(id, ifname, ip, self.id)? {
                return Ok(Self::allocated(r, ip));
            }
            cursor = self.step(i, ip);
            if cursor == first {
                return Err(AllocError::Exhausted(describe(self.set)));
            }
        }
    }

    fn step(&self, i: usize, ip: IpAddr) -> (usize, IpAddr) {
        let r = &self.set[i];
        if ip == r.end {
            let next = (i + 1) % self.set.len();
            (next, self.set[next].start)
        } else {
            (i, from_u128(ip, to_u128(ip) + 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::ipam::IpamConfig;
    use crate::ipam::store::Allocation;
    use proptest::prelude::*;

    /// An in-memory store recording what it holds.
    #[derive(Default)]
    struct MemStore {
        ips: BTreeMap<IpAddr, (String, String)>,
        last: HashMap<usize, IpAddr>,
    }

    impl Store for MemStore {
        fn reserve(
            &mut self,
            id: &str,
            ifname: &str,
            ip: IpAddr,
            range_id: usize,
        ) -> Result<bool, StoreError> {
            if self.ips.contains_key(&ip) {
                return Ok(false);
            }
            self.ips.insert(ip, (id.into(), ifname.into()));
            self.last.insert(range_id, ip);
            Ok(true)
        }
        fn last_reserved(&self, range_id: usize) -> Result<Option<IpAddr>, StoreError> {
            Ok(self.last.get(&range_id).copied())
        }
        fn release(&mut self, ip: IpAddr) -> Result<(), StoreError> {
            self.ips.remove(&ip);
            Ok(())
        }
        fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
            Ok(self
                .ips
                .iter()
                .map(|(ip, (c, i))| Allocation {
                    ip: *ip,
                    container_id: c.clone(),
                    ifname: i.clone(),
                })
                .collect())
        }
    }

    fn sets(ipam: serde_json::Value) -> Vec<RangeSet> {
        IpamConfig::from_netconf(&serde_json::json!({ "ipam": ipam }))
            .unwrap()
            .range_sets
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_skips_gateway_and_wraps() {
        let s = sets(serde_json::json!({"subnet":"10.0.0.0/29"}));
        let a = Allocator { set: &s[0], id: 0 };
        let mut st = MemStore::default();
        let got: Vec<IpAddr> = (0..5)
            .map(|n| {
                a.allocate(&mut st, &format!("c{n}"), "eth0", None)
                    .unwrap()
                    .address
                    .addr()
            })
            .collect();
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip)
        );
        assert!(matches!(
            a.allocate(&mut st, "c9", "eth0", None),
            Err(AllocError::Exhausted(_))
        ));
        st.release_by_id("c1", "eth0").unwrap();
        st.release_by_id("c3", "eth0").unwrap();
        // The next search starts after the last reservation (.6) and wraps to .3.
        assert_eq!(
            a.allocate(&mut st, "c9", "eth0", None)
                .unwrap()
                .address
                .addr(),
            ip("10.0.0.3")
        );
        assert_eq!(
            a.allocate(&mut st, "c10", "eth0", None)
                .unwrap()
                .address
                .addr(),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn several_ranges_in_a_set_are_walked_in_order() {
        let s = sets(serde_json::json!({"ranges":[[
            {"subnet":"10.0.0.0/24","rangeStart":"10.0.0.10","rangeEnd":"10.0.0.11"},
            {"subnet":"10.0.1.0/24","rangeStart":"10.0.1.10","rangeEnd":"10.0.1.10","gateway":"10.0.1.254"}
        ]]}));
        let a = Allocator { set: &s[0], id: 0 };
        let mut st = MemStore::default();
        let got: Vec<Allocated> = (0..3)
            .map(|n| a.allocate(&mut st, &format!("c{n}"), "eth0", None).unwrap())
            .collect();
        assert_eq!(got[2].address, "10.0.1.10/24".parse::<IpNet>().unwrap());
        assert_eq!(got[2].gateway, ip("10.0.1.254"));
        assert_eq!(got[0].gateway, ip("10.0.0.1"));
    }

    #[test]
    fn requested_ips_are_checked() {
        let s = sets(serde_json::json!({"subnet":"10.0.0.0/24"}));
        let a = Allocator { set: &s[0], id: 0 };
        let mut st = MemStore::default();
        assert_eq!(
            a.allocate(&mut st, "c", "eth0", Some(ip("10.0.0.77")))
                .unwrap()
                .address
                .addr(),
            ip("10.0.0.77")
        );
        assert!(matches!(
            a.allocate(&mut st, "d", "eth0", Some(ip("10.0.0.77"))),
            Err(AllocError::Taken { .. })
        ));
        assert!(matches!(
            a.allocate(&mut st, "d", "eth0", Some(ip("10.0.0.1"))),
            Err(AllocError::IsGateway(_))
        ));
        assert!(matches!(
            a.allocate(&mut st, "d", "eth0", Some(ip("10.9.0.1"))),
            Err(AllocError::NotInRange(_))
        ));
        assert!(matches!(
            a.allocate(&mut st, "c", "eth0", None),
            Err(AllocError::Duplicate { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_hands_out_an_address_twice_or_outside_the_range(
            prefix in 26u8..30, ops in proptest::collection::vec(any::<bool>(), 1..80)
        ) {
            let s = sets(serde_json::json!({"subnet": format!("10.9.0.0/{prefix}")}));
            let a = Allocator { set: &s[0], id: 0 };
            let mut st = MemStore::default();
            let mut live: Vec<String> = Vec::new();
            for (n, add) in ops.into_iter().enumerate() {
                if add || live.is_empty() {
                    let id = format!("c{n}");
                    match a.allocate(&mut st, &id, "eth0", None) {
                        Ok(got) => {
                            let r = &s[0][0];
                            prop_assert!(r.contains(got.address.addr()));
                            prop_assert_ne!(got.address.addr(), r.gateway);
                            live.push(id);
                        }
                        Err(AllocError::Exhausted(_)) => {
                            let usable = (1u32 << (32 - prefix)) - 3;
                            prop_assert_eq!(st.ips.len() as u32, usable);
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                } else {
                    let id = live.remove(0);
                    prop_assert_eq!(st.release_by_id(&id, "eth0").unwrap().len(), 1);
                }
                prop_assert_eq!(st.ips.len(), live.len());
            }
        }
    }
}
