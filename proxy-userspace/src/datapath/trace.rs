//! `kpr trace`: the real TC program run on a packet with BPF_PROG_TEST_RUN against the
//! node's pinned maps, in a second instance of the object whose global `TRACE` is set
//! ([`proxy_common::trace`]): it writes no map of the node's (no conntrack, affinity,
//! SNAT claim, fragment or counter) and records each stage's decision in a map of its
//! own. The same code as the datapath's, so trace and traffic cannot disagree.
use std::{net::SocketAddr, path::Path};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
    EbpfLoader,
};
use proxy_common::{
    names,
    trace::{TraceRecordV1, GLOBAL, NAME},
};

use super::{is_bpffs, sock_destroy, Error, Hook, Result, ALL_MAPS, EBPF_OBJECT};

/// The trace instance.
pub struct Tracer {
    ebpf: aya::Ebpf,
    record: PerCpuArray<MapData, TraceRecordV1>,
}

/// One run's outcome.
#[derive(Clone, Debug)]
pub struct TraceRun {
    /// The TC verdict (0 pass, 2 drop, 7 redirect).
    pub verdict: i32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    pub record: TraceRecordV1,
}

/// The capacity of the map pinned at `path` (the trace instance must declare the same).
fn pinned_max_entries(path: &Path) -> Result<u32> {
    let name = "pinned map";
    let map = MapData::from_pin(path).map_err(|source| Error::Map { name, source })?;
    map.info()
        .map(|info| info.max_entries())
        .map_err(|source| Error::Map { name, source })
}

impl Tracer {
    /// Loads the trace instance on the maps pinned in `pin_dir` (a running agent's).
    ///
    /// # Errors
    /// When `pin_dir` holds no agent's maps or the kernel refuses the object.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        if super::is_stub_object() {
            return Err(Error::StubObject);
        }
        if !is_bpffs(pin_dir) {
            return Err(Error::NotBpffs {
                path: pin_dir.to_path_buf(),
            });
        }
        let mut loader = EbpfLoader::new();
        for name in ALL_MAPS {
            let path = pin_dir.join(name);
            // Reusing every pin, creating none: a missing one means no agent runs here.
            if !path.exists() {
                return Err(Error::Io {
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such map pin: is an agent running with this --bpffs?",
                    ),
                });
            }
            loader.map_pin_path(name, path);
        }
        for name in [
            names::CONNTRACK_V4,
            names::CONNTRACK_NEW_V4,
            names::CONNTRACK_V6,
            names::CONNTRACK_NEW_V6,
        ] {
            loader.map_max_entries(name, pinned_max_entries(&pin_dir.join(name))?);
        }
        loader.override_global(GLOBAL, &1u8, true);
        let btf = aya::Btf::from_sys_fs().ok();
        loader.btf(btf.as_ref());
        let object = sock_destroy::patch_kfunc_calls(EBPF_OBJECT, btf.as_ref());
        let mut ebpf = loader.load(&object)?;
        let record = ebpf.take_map(NAME).ok_or(Error::MissingMap(NAME))?;
        let record =
            PerCpuArray::try_from(record).map_err(|source| Error::Map { name: NAME, source })?;
        let mut tracer = Self { ebpf, record };
        for hook in [Hook::PodIngress, Hook::NodeIngress] {
            let name = hook.program_name();
            tracer
                .program(hook)?
                .load()
                .map_err(|source| Error::Program { name, source })?;
        }
        Ok(tracer)
    }

    fn program(&mut self, hook: Hook) -> Result<&mut SchedClassifier> {
        let name = hook.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(Error::MissingProgram(name))?
            .try_into()
            .map_err(|source| Error::Program { name, source })
    }

    /// How many instructions the verifier walked for each program of the trace
    /// instance (pod ingress, node ingress), as the kernel reports them; `None` where
    /// it does not.
    ///
    /// # Errors
    /// When a program's information cannot be read.
    pub fn verified_instructions(&mut self) -> Result<Vec<(&'static str, Option<u32>)>> {
        let mut counts = Vec::new();
        for hook in [Hook::PodIngress, Hook::NodeIngress] {
            let name = hook.program_name();
            let info = self
                .program(hook)?
                .info()
                .map_err(|source| Error::Program { name, source })?;
            counts.push((hook.label(), info.verified_instruction_count()));
        }
        Ok(counts)
    }

    /// Runs the program of `hook` once on `frame`.
    ///
    /// # Errors
    /// When the record cannot be reset or read, or the kernel refuses the run.
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> Result<TraceRun> {
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| Error::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        let zeros =
            PerCpuValues::try_from(vec![TraceRecordV1::default(); cpus]).map_err(|source| {
                Error::Io {
                    path: "/sys/devices/system/cpu/possible".into(),
                    source,
                }
            })?;
        self.record
            .set(0, zeros, 0)
            .map_err(|source| Error::Map { name: NAME, source })?;
        let mut out = vec![0u8; 2048];
        let name = hook.program_name();
        let result = self
            .program(hook)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .map_err(|source| Error::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        // The run happened on one CPU: the only record with a stage set.
        let values = self
            .record
            .get(&0, 0)
            .map_err(|source| Error::Map { name: NAME, source })?;
        let record = values
            .iter()
            .find(|record| record.stages != 0)
            .copied()
            .unwrap_or_default();
        Ok(TraceRun {
            #[expect(clippy::cast_possible_wrap, reason = "TC verdicts are small")]
            verdict: result.return_value as i32,
            packet: out,
            record,
        })
    }
}

/// An SCTP packet with one INIT chunk (RFC 9260 section 3.3.2): common header
/// (verification tag 0), then type 1, flags, length 20, initiate tag, a_rwnd, 10
/// streams each way, initial TSN; its CRC32c (section 6.8) in the checksum field,
/// little-endian as Linux writes it.
fn sctp_init(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(32);
    packet.extend_from_slice(&src_port.to_be_bytes());
    packet.extend_from_slice(&dst_port.to_be_bytes());
    packet.extend_from_slice(&[0; 8]);
    packet.extend_from_slice(&[1, 0, 0, 20]);
    packet.extend_from_slice(&0x6b70_7274_u32.to_be_bytes());
    packet.extend_from_slice(&106_496_u32.to_be_bytes());
    packet.extend_from_slice(&[0, 10, 0, 10]);
    packet.extend_from_slice(&1_u32.to_be_bytes());
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(&packet);
    packet[8..12].copy_from_slice(&crc.to_le_bytes());
    packet
}

/// A first packet from `client` to `destination`: a TCP SYN, a UDP datagram or an SCTP
/// INIT, in an Ethernet frame (IPv4, or IPv6 with hop limit 64), checksums computed.
/// `None` when the two are of different families.
#[must_use]
pub fn first_packet(client: SocketAddr, destination: SocketAddr, l4_proto: u8) -> Option<Vec<u8>> {
    let ethernet =
        etherparse::PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0xfe]);
    let builder = match (client, destination) {
        (SocketAddr::V4(from), SocketAddr::V4(to)) => {
            ethernet.ipv4(from.ip().octets(), to.ip().octets(), 64)
        }
        (SocketAddr::V6(from), SocketAddr::V6(to)) => {
            ethernet.ipv6(from.ip().octets(), to.ip().octets(), 64)
        }
        _ => return None,
    };
    let payload = b"kpr trace";
    let mut out = Vec::new();
    let written = if l4_proto == proxy_common::proto::SCTP {
        builder.write(
            &mut out,
            etherparse::IpNumber::SCTP,
            &sctp_init(client.port(), destination.port()),
        )
    } else if l4_proto == proxy_common::proto::UDP {
        builder
            .udp(client.port(), destination.port())
            .write(&mut out, payload)
    } else {
        builder
            .tcp(client.port(), destination.port(), 1, 64_240)
            .syn()
            .write(&mut out, &[])
    };
    // Writing into a Vec fails only for sizes far beyond these.
    written.ok().map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sctp_first_packet_is_an_init_with_a_valid_crc32c() {
        let client = "10.244.1.2:40000".parse().expect("address");
        let to = "10.96.0.30:3868".parse().expect("address");
        let frame = first_packet(client, to, proxy_common::proto::SCTP).expect("one family");
        let ip = &frame[14..];
        assert_eq!(ip[9], proxy_common::proto::SCTP, "IP protocol");
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 20 + 32);
        let sctp = &ip[20..];
        assert_eq!(sctp.len(), 32);
        assert_eq!(
            &sctp[0..4],
            &[0x9c, 0x40, 0x0f, 0x1c],
            "ports 40000 -> 3868"
        );
        assert_eq!(sctp[12], 1, "an INIT chunk");
        // The CRC32c check value of RFC 9260 appendix A's algorithm, bit by bit.
        let mut zeroed = sctp.to_vec();
        zeroed[8..12].fill(0);
        let mut crc = !0u32;
        for byte in zeroed {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        assert_eq!(sctp[8..12], (!crc).to_le_bytes());
    }

    /// An IPv6 first packet: Ethernet type 0x86dd, next header TCP straight after the
    /// fixed header, a SYN whose checksum (over the IPv6 pseudo-header) verifies.
    #[test]
    fn an_ipv6_first_packet_is_a_syn_with_a_valid_checksum() {
        let client: SocketAddr = "[fd00:244::2]:40000".parse().expect("address");
        let to: SocketAddr = "[fd00:96::10]:80".parse().expect("address");
        let frame = first_packet(client, to, proxy_common::proto::TCP).expect("one family");
        assert_eq!(&frame[12..14], &[0x86, 0xdd], "ethertype IPv6");
        let packet = etherparse::SlicedPacket::from_ethernet(&frame).expect("parses");
        let Some(etherparse::NetSlice::Ipv6(ip)) = &packet.net else {
            panic!("not IPv6: {:?}", packet.net);
        };
        assert_eq!(ip.header().next_header(), etherparse::IpNumber::TCP);
        assert_eq!(ip.header().hop_limit(), 64);
        assert_eq!(
            std::net::IpAddr::from(ip.header().source_addr()),
            client.ip()
        );
        let Some(etherparse::TransportSlice::Tcp(tcp)) = &packet.transport else {
            panic!("not TCP");
        };
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (40_000, 80));
        let expected = tcp
            .to_header()
            .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
            .expect("checksum");
        assert_eq!(tcp.checksum(), expected);
        assert!(first_packet(client, "10.96.0.10:80".parse().expect("address"), 6).is_none());
    }

    #[test]
    fn ipv6_udp_and_sctp_first_packets() {
        let client: SocketAddr = "[fd00:244::2]:40000".parse().expect("address");
        let to: SocketAddr = "[fd00:96::10]:53".parse().expect("address");
        let udp = first_packet(client, to, proxy_common::proto::UDP).expect("one family");
        assert_eq!(udp[14 + 6], proxy_common::proto::UDP, "next header");
        let sctp = first_packet(client, to, proxy_common::proto::SCTP).expect("one family");
        assert_eq!(sctp[14 + 6], proxy_common::proto::SCTP, "next header");
        assert_eq!(sctp.len(), 14 + 40 + 32);
        assert_eq!(sctp[14 + 40 + 12], 1, "an INIT chunk");
    }
}
