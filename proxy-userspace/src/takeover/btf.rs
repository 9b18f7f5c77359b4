//! Reading one member offset from the kernel's BTF: where `status` sits in `struct
//! nf_conn`, which the takeover check reads (`proxy-ebpf/src/takeover.rs`). The layout
//! depends on the kernel's build options, our toolchain emits no CO-RE relocations,
//! and aya keeps its BTF type table private, so the few BTF records needed are read
//! here (format: the kernel's `Documentation/bpf/btf.rst`).

/// `BTF_KIND_*` numbers of the records this reader must step over or read.
mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

const BTF_MAGIC: u16 = 0xeb9f;

/// One type record: where its kind-specific data starts.
#[derive(Clone, Copy)]
struct Record {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// Offset of the data after the 12-byte common header.
    data: usize,
}

struct Btf<'a> {
    bytes: &'a [u8],
    strings: &'a [u8],
    /// Records by type id (id 0 is `void` and has none: index 0 is a placeholder).
    records: Vec<Record>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(word.try_into().ok()?))
}

impl<'a> Btf<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        let magic = u16::from_le_bytes(bytes.get(0..2)?.try_into().ok()?);
        if magic != BTF_MAGIC {
            return None;
        }
        let header_len = usize::try_from(u32_at(bytes, 4)?).ok()?;
        let type_off = usize::try_from(u32_at(bytes, 8)?).ok()?;
        let type_len = usize::try_from(u32_at(bytes, 12)?).ok()?;
        let str_off = usize::try_from(u32_at(bytes, 16)?).ok()?;
        let str_len = usize::try_from(u32_at(bytes, 20)?).ok()?;
        let types_start = header_len.checked_add(type_off)?;
        let types_end = types_start.checked_add(type_len)?;
        let strings_start = header_len.checked_add(str_off)?;
        let strings = bytes.get(strings_start..strings_start.checked_add(str_len)?)?;
        let mut records = vec![Record {
            name_off: 0,
            kind: 0,
            vlen: 0,
            kind_flag: false,
            size_or_type: 0,
            data: 0,
        }];
        let mut at = types_start;
        while at < types_end {
            let name_off = u32_at(bytes, at)?;
            let info = u32_at(bytes, at + 4)?;
            let size_or_type = u32_at(bytes, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = usize::try_from(info & 0xffff).ok()?;
            let data = at + 12;
            let extra = match kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
                kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                // have no data; an unknown kind means a format this reader cannot step
                // over.
                2 | 7 | 8..=12 | 16 | kind::TYPE_TAG => 0,
                _ => return None,
            };
            records.push(Record {
                name_off,
                kind,
                vlen,
                kind_flag: info >> 31 != 0,
                size_or_type,
                data,
            });
            at = data.checked_add(extra)?;
        }
        Some(Self {
            bytes,
            strings,
            records,
        })
    }

    fn name(&self, offset: u32) -> Option<&'a [u8]> {
        let rest = self.strings.get(usize::try_from(offset).ok()?..)?;
        let end = rest.iter().position(|byte| *byte == 0)?;
        rest.get(..end)
    }

    /// The size in bytes of type `id` after typedefs and qualifiers, for integers.
    fn int_size(&self, mut id: u32) -> Option<u32> {
        // A chain of typedefs and qualifiers is short; the bound guards a corrupt loop.
        for _ in 0..16 {
            let record = self.records.get(usize::try_from(id).ok()?)?;
            match record.kind {
                kind::INT => return Some(record.size_or_type),
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = record.size_or_type;
                }
                _ => return None,
            }
        }
        None
    }

    /// Byte offset of member `member` of struct `name`, when it is a whole integer of
    /// `size` bytes.
    fn member_offset(&self, name: &[u8], member: &[u8], size: u32) -> Option<u32> {
        let record = self.records.iter().find(|record| {
            record.kind == kind::STRUCT && self.name(record.name_off) == Some(name)
        })?;
        for index in 0..record.vlen {
            let at = record.data + 12 * index;
            if self.name(u32_at(self.bytes, at)?) != Some(member) {
                continue;
            }
            let member_type = u32_at(self.bytes, at + 4)?;
            let raw_offset = u32_at(self.bytes, at + 8)?;
            // With kind_flag, the top 8 bits give a bitfield's width (0: not one).
            let (bits, bitfield) = if record.kind_flag {
                (raw_offset & 0x00ff_ffff, raw_offset >> 24 != 0)
            } else {
                (raw_offset, false)
            };
            if bitfield || bits % 8 != 0 || self.int_size(member_type)? != size {
                return None;
            }
            return Some(bits / 8);
        }
        None
    }
}

/// Byte offset of `status` (an 8-byte `unsigned long`) in `struct nf_conn`, from the
/// kernel's BTF (`/sys/kernel/btf/vmlinux`); `None` when the BTF lacks it or says
/// something this reader does not expect.
#[must_use]
pub fn nf_conn_status_offset(btf: &[u8]) -> Option<u32> {
    Btf::parse(btf)?.member_offset(b"nf_conn", b"status", 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: header, the given type records, the given strings.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_bytes: Vec<u8> = types.iter().flat_map(|word| word.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [24, 0, type_bytes.len() as u32, type_bytes.len() as u32] {
            out.extend_from_slice(&u32::to_le_bytes(word));
        }
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&type_bytes);
        out.extend_from_slice(strings);
        out
    }

    // Strings: 0 "", 1 "long", 6 "nf_conn", 14 "status", 21 "lock".
    const STRINGS: &[u8] = b"\0long\0nf_conn\0status\0lock\0";

    fn info(kind: u32, vlen: u32, kind_flag: bool) -> u32 {
        (u32::from(kind_flag) << 31) | (kind << 24) | vlen
    }

    #[test]
    fn finds_a_member_through_a_typedef() {
        let types = [
            // 1: INT "long", 8 bytes, 64 bits
            1,
            info(kind::INT, 0, false),
            8,
            64,
            // 2: TYPEDEF "long" -> 1
            1,
            info(kind::TYPEDEF, 0, false),
            1,
            // 3: STRUCT nf_conn, 16 bytes: lock (int at 0), status (typedef at 64 bits)
            6,
            info(kind::STRUCT, 2, false),
            16,
            21,
            1,
            0,
            14,
            2,
            64,
        ];
        assert_eq!(nf_conn_status_offset(&blob(&types, STRINGS)), Some(8));
    }

    #[test]
    fn refuses_a_bitfield_or_another_size() {
        let bitfield = [
            1,
            info(kind::INT, 0, false),
            8,
            64,
            6,
            info(kind::STRUCT, 1, true),
            16,
            14,
            1,
            (3 << 24) | 64,
        ];
        assert_eq!(nf_conn_status_offset(&blob(&bitfield, STRINGS)), None);
        let four_bytes = [
            1,
            info(kind::INT, 0, false),
            4,
            32,
            6,
            info(kind::STRUCT, 1, false),
            16,
            14,
            1,
            64,
        ];
        assert_eq!(nf_conn_status_offset(&blob(&four_bytes, STRINGS)), None);
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(nf_conn_status_offset(b"not btf at all, no"), None);
        assert_eq!(nf_conn_status_offset(&[]), None);
    }

    #[test]
    fn reads_the_running_kernels_layout() {
        // Every kernel this project supports has BTF; the offset is whatever this build
        // put there, but it lies inside the struct and past its first fields.
        let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
        let offset = nf_conn_status_offset(&btf).expect("nf_conn.status");
        assert!((16..=proxy_common::takeover::STATUS_OFFSET_MASK).contains(&offset));
        assert_eq!(offset % 8, 0);
    }
}
