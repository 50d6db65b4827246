//! Virtual IPs that follow a target's primary — the job of Pacemaker's IPaddr2: the
//! serving node puts the address on the configured interface (netlink, through
//! iproute2's `ip`), announces it with gratuitous ARP so neighbours and switches update
//! at once, and listens on it as a portal. The node that stops serving the target
//! removes it; a node that died leaves it behind on its own interface only.
//!
//! Runs on the blocking reconcile thread: `ip` is a short process and the ARP socket
//! never waits.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Mutex;

use cluster::state::VirtualIp;
use cluster::status::EventKind;
use tracing::{info, warn};

/// The iSCSI port of a virtual IP's portal.
pub const VIP_PORT: u16 = 3260;

struct Held {
    vip: VirtualIp,
    listener: iscsi_target::PortalListener,
}

/// The virtual IPs this node holds.
#[derive(Default)]
pub struct Vips {
    held: Mutex<HashMap<IpAddr, Held>>,
}

impl Vips {
    /// None held yet.
    pub fn new() -> Vips {
        Vips::default()
    }

    /// Holds exactly `want`: adds the missing ones (address, ARP, portal) and removes
    /// the others. Failures are logged and retried at the next reconcile.
    pub fn reconcile(
        &self,
        want: &BTreeMap<IpAddr, VirtualIp>,
        server: &iscsi_target::Server,
        rt: &tokio::runtime::Handle,
        events: &cluster::status::EventLog,
    ) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<IpAddr> = held
            .iter()
            .filter(|(a, h)| want.get(a) != Some(&h.vip))
            .map(|(a, _)| *a)
            .collect();
        for a in stale {
            if let Some(h) = held.remove(&a) {
                drop(h.listener);
                remove_address(&h.vip);
                events.push(EventKind::Vip, format!("virtual IP {a} released"));
            }
        }
        for (a, vip) in want {
            if held.contains_key(a) {
                continue;
            }
            if let Err(e) = add_address(vip) {
                warn!(address = %a, interface = %vip.interface, "cannot add the virtual IP: {e}");
                continue;
            }
            if let IpAddr::V4(v4) = a {
                if let Err(e) = gratuitous_arp(&vip.interface, *v4) {
                    warn!(address = %a, "gratuitous ARP failed (neighbours learn the move when their cache expires): {e}");
                }
            }
            let listener = {
                let _rt = rt.enter();
                server.listen(SocketAddr::new(*a, VIP_PORT))
            };
            match listener {
                Ok(l) => {
                    info!(address = %a, interface = %vip.interface, "virtual IP up");
                    events.push(
                        EventKind::Vip,
                        format!("virtual IP {a}/{} up on {}", vip.prefix, vip.interface),
                    );
                    held.insert(
                        *a,
                        Held {
                            vip: vip.clone(),
                            listener: l,
                        },
                    );
                }
                Err(e) => {
                    warn!(address = %a, "cannot listen on the virtual IP: {e}");
                    remove_address(vip);
                }
            }
        }
    }

    /// Releases every virtual IP (the node stops).
    pub fn release_all(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (_, h) in held.drain() {
            drop(h.listener);
            remove_address(&h.vip);
        }
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run `ip` (Debian package iproute2): {e}"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn add_address(vip: &VirtualIp) -> io::Result<()> {
    // `replace` is idempotent: the address may still be there from a node that died.
    let cidr = format!("{}/{}", vip.address, vip.prefix);
    ip(&["addr", "replace", &cidr, "dev", &vip.interface])
}

fn remove_address(vip: &VirtualIp) {
    let cidr = format!("{}/{}", vip.address, vip.prefix);
    if let Err(e) = ip(&["addr", "del", &cidr, "dev", &vip.interface]) {
        warn!(address = %vip.address, "cannot remove the virtual IP: {e}");
    }
}

/// The ARP announcement of RFC 5227 §2.3 (sender and target address both `addr`),
/// broadcast on `interface`, twice as IPaddr2's send_arp does. The one unsafe code of
/// the binary: a packet socket has no safe wrapper in our dependencies (rustix 0.38 has
/// no link-layer addresses), and pulling a crate in for two syscalls is not worth it.
#[allow(unsafe_code)]
fn gratuitous_arp(interface: &str, addr: Ipv4Addr) -> io::Result<()> {
    let sys = |f: &str| std::fs::read_to_string(format!("/sys/class/net/{interface}/{f}"));
    let ifindex: i32 = sys("ifindex")?
        .trim()
        .parse()
        .map_err(|_| io::Error::other("bad ifindex"))?;
    let mut mac = [0u8; 6];
    let text = sys("address")?;
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(io::Error::other(format!(
            "{interface} has no Ethernet address"
        )));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| io::Error::other("bad MAC address"))?;
    }
    let mut pkt = [0u8; 28];
    pkt[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    pkt[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    pkt[4] = 6;
    pkt[5] = 4;
    pkt[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    pkt[8..14].copy_from_slice(&mac);
    pkt[14..18].copy_from_slice(&addr.octets());
    pkt[24..28].copy_from_slice(&addr.octets());
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: a plain socket(2) call; the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = proto;
    to.sll_ifindex = ifindex;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for _ in 0..2 {
        // SAFETY: `pkt` and `to` outlive the call; the lengths are theirs.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                std::ptr::addr_of!(to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
