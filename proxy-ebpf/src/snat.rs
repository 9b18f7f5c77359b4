//! Masquerading (SNAT) to the node's address, with a source port chosen here.
//!
//! A masqueraded flow's replies are found by the reply key `(backend, node address,
//! port)`, so the port must be unique among live flows to the same backend. The port
//! is drawn at random from the configured range and claimed by inserting the reply
//! entry with BPF_NOEXIST: the insert is atomic, so two CPUs can never claim the same
//! port, and a port is only ever taken over from an expired flow. The range sits above
//! the kernel's ephemeral ports, so the node's own connections never collide with it.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{BackendV4, Be16, CtEntryV4, CtKeyV4};

use crate::{
    conntrack::{self, Created, Translation},
    maps,
    verdict::{DropReason, Result},
};

/// Random draws before giving up. With a range of ~4,500 ports, failing 8 draws needs
/// the range to be nearly full for that one backend.
const ATTEMPTS: u32 = 8;

/// Creates the conntrack entries of a new masqueraded flow to `backend` and returns
/// the original direction's entry (source: node address and the claimed port).
#[inline(always)]
pub fn create(
    original: &CtKeyV4,
    backend: &BackendV4,
    backend_id: u32,
    service_id: u32,
    now: u64,
) -> Result<CtEntryV4> {
    let config = maps::config();
    if config.snat_addr.0 == 0 {
        return Err(DropReason::NO_SNAT_ADDR);
    }
    let (low, high) = (config.snat_port_min, config.snat_port_max);
    let span = if high >= low {
        u32::from(high - low) + 1
    } else {
        1
    };
    for _ in 0..ATTEMPTS {
        // SAFETY: the helper has no preconditions.
        let random = unsafe { bpf_get_prandom_u32() };
        // `random % span < span <= 65536 - low`, so the sum fits in u16.
        let port = low.wrapping_add((random % span) as u16);
        let translation = Translation {
            new_src: (config.snat_addr, Be16::from_host(port)),
            new_dst: (backend.addr, backend.port),
            backend_id,
            service_id,
            via_stack: false,
        };
        match conntrack::create(original, &translation, now, true)? {
            Created::Flow(entry) => return Ok(entry),
            Created::ReplyKeyTaken => continue,
        }
    }
    Err(DropReason::SNAT_PORTS)
}
