//! Small, typed wrappers over rtnetlink for what the plugins do to links, addresses
//! and routes. Every function works in the namespace the handle's socket was opened in.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec,
    LinkVeth, RouteMessageBuilder,
};

const ENODEV: i32 = libc::ENODEV;
const RT_TABLE_MAIN: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{op}: {source}")]
    Request {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

impl NetlinkError {
    /// The errno the kernel answered with, if this was a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The parts of a link the plugins look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub mtu: u32,
    pub kind: Option<String>,
    pub master: Option<u32>,
    pub up: bool,
    pub promisc: bool,
    pub hairpin: Option<bool>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            kind: None,
            master: None,
            up: m.header.flags.contains(LinkFlags::Up),
            promisc: m.header.flags.contains(LinkFlags::Promisc),
            hairpin: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(b) if b.len() == 6 => link.mac = Some(format_mac(b)),
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::Controller(c) if *c != 0 => link.master = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                            LinkInfo::PortData(
                                netlink_packet_route::link::InfoPortData::BridgePort(ps),
                            ) => {
                                for p in ps {
                                    if let netlink_packet_route::link::InfoBridgePort::HairpinMode(
                                        h,
                                    ) = p
                                    {
                                        link.hairpin = Some(*h);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

pub fn format_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The link called `name`, or `None`.
pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, NetlinkError> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(m) => Ok(m.as_ref().map(Link::from_message)),
        Err(e) if errno_of(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(req(format!("looking up link {name}"))(e)),
    }
}

/// Returns bridge `name`, creating it (up, with `mtu`) when missing. Fails when a link
/// of that name exists but is not a bridge.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    mtu: Option<u32>,
    promisc: bool,
) -> Result<Link, NetlinkError> {
    let existing = link_by_name(h, name).await?;
    let link = match existing {
        Some(l) => {
            if l.kind.as_deref() != Some("bridge") {
                return Err(NetlinkError::Invalid(format!(
                    "{name} already exists but is not a bridge (kind {:?})",
                    l.kind
                )));
            }
            l
        }
        None => {
            // An explicit MAC keeps the bridge's address from following its ports.
            let mut b = LinkBridge::new(name).address(random_mac().to_vec()).up();
            if let Some(mtu) = mtu {
                b = b.mtu(mtu);
            }
            if promisc {
                b = b.promiscuous(true);
            }
            match h.link().add(b.build()).execute().await {
                Ok(()) => {}
                // Another plugin invocation created it at the same moment.
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(req(format!("creating bridge {name}"))(e)),
            }
            link_by_name(h, name)
                .await?
                .ok_or_else(|| NetlinkError::Invalid(format!("bridge {name} vanished")))?
        }
    };
    if !link.up || (promisc && !link.promisc) {
        let mut m = LinkUnspec::new_with_index(link.index).up();
        if promisc {
            m = m.promiscuous(true);
        }
        h.link()
            .set(m.build())
            .execute()
            .await
            .map_err(req(format!("bringing up {name}")))?;
    }
    Ok(link)
}

/// `N` random bytes straight from the kernel.
///
/// One `getrandom(2)` call instead of a userspace generator: seeding `rand`'s ChaCha
/// probes CPU features with `cpuid`, and in a VM every `cpuid` traps to the hypervisor
/// (tens of microseconds each here), which is more than the rest of a DEL costs.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the kernel writes at most `N - filled` bytes into the rest of `buf`.
        let n = unsafe {
            libc::getrandom(
                buf[filled..].as_mut_ptr().cast::<libc::c_void>(),
                N - filled,
                0,
            )
        };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            // Only a kernel without getrandom(2) (before 3.17) gets here.
            Err(_) => {
                use std::io::Read;
                let _ = std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut buf[filled..]));
                break;
            }
        }
    }
    buf
}

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = random_bytes();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// A veth pair to create in one request: one end here (optionally attached to a
/// bridge), the other end directly inside another namespace under its final name.
#[derive(Debug, Clone)]
pub struct VethPair<'a> {
    pub name: &'a str,
    pub mac: [u8; 6],
    pub master: Option<u32>,
    pub peer: &'a str,
    pub peer_mac: [u8; 6],
    pub peer_ns_fd: i32,
    pub mtu: Option<u32>,
}

/// Creates the pair with the local end up; the peer cannot be brought up in the same
/// request (the kernel configures it before the two ends are joined). Fails with EEXIST if either name is taken in its
/// namespace.
pub async fn add_veth(h: &Handle, v: &VethPair<'_>) -> Result<(), NetlinkError> {
    let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::default()
        .name(v.peer)
        .address(v.peer_mac.to_vec())
        .setns_by_fd(v.peer_ns_fd);
    if let Some(mtu) = v.mtu {
        peer_msg = peer_msg.mtu(mtu);
    }
    let mut veth = LinkVeth::new(v.name, v.peer)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
        .address(v.mac.to_vec())
        .up();
    if let Some(mtu) = v.mtu {
        veth = veth.mtu(mtu);
    }
    if let Some(master) = v.master {
        veth = veth.controller(master);
    }
    h.link()
        .add(veth.build())
        .execute()
        .await
        .map_err(req(format!("creating veth pair {}/{}", v.name, v.peer)))
}

pub async fn set_up(h: &Handle, index: u32) -> Result<(), NetlinkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(req(format!("bringing up link #{index}")))
}

pub async fn set_hairpin(h: &Handle, index: u32, on: bool) -> Result<(), NetlinkError> {
    h.link()
        .set_port(LinkBridgePort::new(index).hairpin(on).build())
        .execute()
        .await
        .map_err(req(format!("setting hairpin mode on link #{index}")))
}

fn address_of(m: &AddressMessage) -> Option<IpNet> {
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => addr = Some(*ip),
            AddressAttribute::Address(ip) if addr.is_none() => addr = Some(*ip),
            _ => {}
        }
    }
    addr.and_then(|ip| IpNet::new(ip, m.header.prefix_len).ok())
}

/// Deletes the link called `name`; a missing link is not an error. One request, so a
/// DEL costs a single round trip on top of the kernel's teardown.
pub async fn delete_link_by_name(h: &Handle, name: &str) -> Result<bool, NetlinkError> {
    let msg = LinkUnspec::new_with_name(name).build();
    match h.link().del_with_message(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno_of(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(req(format!("deleting link {name}"))(e)),
    }
}

/// Netlink requests over a plain blocking socket (see
/// [`crate::netns::Netns::netlink_socket`]), for the container-side steps of ADD and
/// DEL: a few requests, each answered by one message, do not need an async runtime,
/// a connection task and a response stream set up for them. The messages are built
/// with the same builders as the async functions above, so they are byte for byte
/// what those send.
pub struct Blocking {
    sock: OwnedFd,
    seq: u32,
}

const NLMSG_HDRLEN: usize = 16;

impl Blocking {
    pub fn new(sock: OwnedFd) -> Self {
        Self { sock, seq: 0 }
    }

    /// Sends `msg` with `flags` and returns the first answer to it: the reply
    /// message, or the kernel's error code from an NLMSG_ERROR (0 for an ack).
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<Answer, NetlinkError> {
        let io = |source| NetlinkError::Io { op: op(), source };
        self.seq += 1;
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut out = vec![0u8; req.buffer_len()];
        req.serialize(&mut out);
        let fd = self.sock.as_raw_fd();
        // SAFETY: `out` is valid for reads of `out.len()` bytes.
        if unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), 0) } < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 32 << 10];
        loop {
            // SAFETY: `buf` is valid for writes of its full length.
            let got = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let got = usize::try_from(got).map_err(|_| io(std::io::Error::last_os_error()))?;
            if got == 0 {
                return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let mut at = 0;
            while at + NLMSG_HDRLEN <= got {
                let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
                let len = u32::from_ne_bytes(word(at)) as usize;
                if len < NLMSG_HDRLEN || at + len > got {
                    return Err(NetlinkError::Invalid(format!(
                        "{}: malformed netlink answer",
                        op()
                    )));
                }
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if u32::from_ne_bytes(word(at + 8)) == self.seq {
                    if kind == libc::NLMSG_ERROR as u16 && len >= NLMSG_HDRLEN + 4 {
                        return Ok(Answer::Code(-i32::from_ne_bytes(word(at + NLMSG_HDRLEN))));
                    }
                    return Ok(Answer::Message(buf[at..at + len].to_vec()));
                }
                at += len.next_multiple_of(4);
            }
        }
    }

    /// Sends a request that is answered with an acknowledgement.
    fn acked(
        &mut self,
        msg: RouteNetlinkMessage,
        extra_flags: u16,
        op: &dyn Fn() -> String,
    ) -> Result<(), NetlinkError> {
        match self.request(msg, NLM_F_REQUEST | NLM_F_ACK | extra_flags, op)? {
            Answer::Code(0) => Ok(()),
            Answer::Code(e) => Err(NetlinkError::Io {
                op: op(),
                source: std::io::Error::from_raw_os_error(e),
            }),
            Answer::Message(_) => Err(NetlinkError::Invalid(format!(
                "{}: expected an acknowledgement",
                op()
            ))),
        }
    }

    /// The index of the link called `name`, or `None`.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        let op = || format!("looking up link {name}");
        match self.request(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST, &op)? {
            Answer::Code(e) if e == ENODEV => Ok(None),
            Answer::Code(e) => Err(NetlinkError::Io {
                op: op(),
                source: std::io::Error::from_raw_os_error(e),
            }),
            // struct ifinfomsg follows the header: family, pad, type, then the index.
            Answer::Message(m) if m.len() >= NLMSG_HDRLEN + 8 => Ok(Some(u32::from_ne_bytes([
                m[NLMSG_HDRLEN + 4],
                m[NLMSG_HDRLEN + 5],
                m[NLMSG_HDRLEN + 6],
                m[NLMSG_HDRLEN + 7],
            ]))),
            Answer::Message(_) => Err(NetlinkError::Invalid(format!("{}: short answer", op()))),
        }
    }

    /// As [`set_up`].
    pub fn set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let m = LinkUnspec::new_with_index(index).up().build();
        self.acked(
            RouteNetlinkMessage::SetLink(m),
            NLM_F_EXCL | NLM_F_CREATE,
            &|| format!("bringing up link #{index}"),
        )
    }

    /// As [`add_address`].
    pub fn add_address(&mut self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let mut m = match addr.addr() {
            IpAddr::V4(a) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(index)
                .address(a, addr.prefix_len())
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(index)
                .address(a, addr.prefix_len())
                .build(),
        };
        if addr.addr().is_ipv6() {
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.acked(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_EXCL | NLM_F_CREATE,
            &|| format!("adding address {addr} to #{index}"),
        )
    }

    /// As [`add_route`].
    pub fn add_route(
        &mut self,
        index: u32,
        dst: IpNet,
        gw: Option<IpAddr>,
    ) -> Result<(), NetlinkError> {
        let what = format!("adding route {dst} via {gw:?} dev #{index}");
        let m = route_message(index, dst, gw)
            .map_err(|e| NetlinkError::Invalid(format!("{what}: {e}")))?;
        self.acked(
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_EXCL | NLM_F_CREATE,
            &|| what.clone(),
        )
    }

    /// As [`delete_link_by_name`].
    pub fn delete_link_by_name(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let m = LinkUnspec::new_with_name(name).build();
        match self.acked(RouteNetlinkMessage::DelLink(m), 0, &|| {
            format!("deleting link {name}")
        }) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

enum Answer {
    Code(i32),
    Message(Vec<u8>),
}

/// Adds `addr` unless present; `Ok(false)` when it was already there.
pub async fn add_address_if_missing(
    h: &Handle,
    index: u32,
    addr: IpNet,
) -> Result<bool, NetlinkError> {
    match add_address(h, index, addr).await {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Addresses on link `index`, link-local IPv6 ones included.
pub async fn addresses(h: &Handle, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
    let mut out = Vec::new();
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(req(format!("listing addresses of #{index}")))?
    {
        if m.header.index == index {
            out.extend(address_of(&m));
        }
    }
    Ok(out)
}

/// Adds `addr` to link `index`. IPv6 addresses skip duplicate address detection: the
/// allocator already guarantees uniqueness and DAD would delay the container's traffic.
pub async fn add_address(h: &Handle, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
    let mut r = h.address().add(index, addr.addr(), addr.prefix_len());
    if addr.addr().is_ipv6() {
        r.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    r.execute()
        .await
        .map_err(req(format!("adding address {addr} to #{index}")))
}

pub async fn del_address(h: &Handle, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(req(format!("listing addresses of #{index}")))?
    {
        if m.header.index == index && address_of(&m) == Some(addr) {
            return h
                .address()
                .del(m)
                .execute()
                .await
                .map_err(req(format!("deleting address {addr} from #{index}")));
        }
    }
    Ok(())
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

fn route_of(m: &RouteMessage) -> Option<RouteEntry> {
    let v6 = m.header.address_family == AddressFamily::Inet6;
    let mut table = u32::from(m.header.table);
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gw = route_addr(g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    let dst = dst.unwrap_or(if v6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    });
    Some(RouteEntry {
        dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
        gw,
        oif,
    })
}

/// Main-table routes of both families.
pub async fn routes(h: &Handle) -> Result<Vec<RouteEntry>, NetlinkError> {
    let mut out = Vec::new();
    for msg in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut s = h.route().get(msg).execute();
        while let Some(m) = s.try_next().await.map_err(req("listing routes"))? {
            out.extend(route_of(&m));
        }
    }
    Ok(out)
}

/// Adds a route to `dst` out of link `index`, via `gw` when given.
pub async fn add_route(
    h: &Handle,
    index: u32,
    dst: IpNet,
    gw: Option<IpAddr>,
) -> Result<(), NetlinkError> {
    let what = format!("adding route {dst} via {gw:?} dev #{index}");
    let m =
        route_message(index, dst, gw).map_err(|e| NetlinkError::Invalid(format!("{what}: {e}")))?;
    h.route().add(m).execute().await.map_err(req(what.clone()))
}

/// The route to `dst` out of link `index`, via `gw` when given.
fn route_message(index: u32, dst: IpNet, gw: Option<IpAddr>) -> Result<RouteMessage, String> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .map_err(|e| e.to_string())?
        .output_interface(index);
    if let Some(gw) = gw {
        b = b.gateway(gw).map_err(|e| e.to_string())?;
    }
    Ok(b.build())
}
