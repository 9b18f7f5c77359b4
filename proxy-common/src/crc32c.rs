//! Incremental update of SCTP's checksum, CRC32c (RFC 9260 section 6.8 and appendix A,
//! the Castagnoli polynomial of RFC 3309), for the kernel programs; no BPF helper
//! computes it, and re-reading a whole packet to recompute it does not fit the
//! verifier's budget.
//!
//! A CRC is linear over GF(2): for two messages of the same length,
//! `crc(a) ^ crc(b) = crc0(a ^ b)`, where `crc0` is the CRC without its initial value
//! and final xor (they cancel). A change of the bytes at `[0, 4)` of an SCTP packet of
//! `len` bytes (its two ports) is a message that is the 4-byte xor `delta` followed by
//! `len - 4` zero bytes, and its `crc0` is `delta(x) * x^32 * x^(8 * (len - 4)) mod P`
//! = `delta(x) * x^(8 * len) mod P`. That is two carry-less multiplications modulo `P`
//! (32 steps each) with `x^(8 * len)` taken from two 256-entry tables (low and high
//! byte of `len`): a fixed, small cost whatever the packet's length, and the packet's
//! payload is never read.
//!
//! Representation: the reflected one every CRC32c implementation uses (bit 31 of a
//! `u32` is the coefficient of `x^0`), and the checksum field holds the CRC as a
//! little-endian `u32` (Linux: `cpu_to_le32(~crc32c(~0, ...))`), so the field's bytes,
//! read little-endian, xor with the result directly.

/// The reflected Castagnoli polynomial (0x1EDC6F41).
const POLY: u32 = 0x82f6_3b78;

/// `x^0`, the polynomial 1, in the reflected representation.
const ONE: u32 = 1 << 31;

/// `a * b mod P`. Branch-free (masks instead of `if`), so the verifier walks it as
/// straight-line code.
#[must_use]
#[inline(always)]
pub const fn mul(a: u32, b: u32) -> u32 {
    let mut product = 0;
    let mut b = b;
    let mut bit = 0;
    while bit < 32 {
        // The coefficient of x^bit in `a` decides whether `b * x^bit` is added.
        let take = 0u32.wrapping_sub((a >> (31 - bit)) & 1);
        product ^= b & take;
        // b * x mod P: a shift towards higher degree, reduced when x^31's term spills.
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        bit += 1;
    }
    product
}

/// `x^(8 * step * i) mod P` for `i` in `0..256`.
const fn powers(step: u32) -> [u32; 256] {
    // x^(8 * step), by repeated multiplication with x^8.
    let mut x8 = ONE;
    let mut i = 0;
    while i < 8 {
        x8 = mul(x8, ONE >> 1);
        i += 1;
    }
    let mut base = ONE;
    let mut i = 0;
    while i < step {
        base = mul(base, x8);
        i += 1;
    }
    let mut table = [0u32; 256];
    let mut power = ONE;
    let mut i = 0;
    while i < 256 {
        table[i] = power;
        power = mul(power, base);
        i += 1;
    }
    table
}

/// `x^(8 * i)`: a shift by `i` bytes.
static SHIFT_LOW: [u32; 256] = powers(1);
/// `x^(8 * 256 * i)`: a shift by `256 * i` bytes.
static SHIFT_HIGH: [u32; 256] = powers(256);

/// What to xor into an SCTP checksum field (its 4 bytes, as they sit in the packet)
/// when the first 4 bytes of the SCTP packet (the source and destination ports)
/// change from `old` to `new`; `sctp_len` is the SCTP packet's length in bytes,
/// common header included (an IP packet's payload). Lengths beyond 65535 are taken
/// modulo 65536: IP payloads are never longer.
#[must_use]
#[inline(always)]
pub fn port_change(old: [u8; 4], new: [u8; 4], sctp_len: u32) -> [u8; 4] {
    let delta = u32::from_le_bytes(old) ^ u32::from_le_bytes(new);
    let low = SHIFT_LOW[(sctp_len & 0xff) as usize];
    let high = SHIFT_HIGH[((sctp_len >> 8) & 0xff) as usize];
    mul(delta, mul(low, high)).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC32c bit by bit (init !0, reflected, final !0), as RFC 9260 appendix A
    /// describes it: the reference the incremental update is checked against.
    fn crc32c(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// An SCTP-like packet of `len` bytes with its checksum (bytes 8..12) filled in.
    fn packet(len: usize, seed: u8) -> [u8; 1500] {
        let mut bytes = [0u8; 1500];
        for (index, byte) in bytes.iter_mut().enumerate().take(len) {
            *byte = (index as u8).wrapping_mul(31).wrapping_add(seed);
        }
        bytes[8..12].fill(0);
        let crc = crc32c(&bytes[..len]);
        bytes[8..12].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn the_check_value_of_the_reference_is_the_standard_one() {
        // CRC-32C ("iSCSI") check value: the CRC of "123456789".
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_port_change_keeps_the_checksum_valid_for_every_length() {
        for len in [
            12usize, 13, 16, 20, 33, 64, 255, 256, 257, 511, 1024, 1499, 1500,
        ] {
            let mut bytes = packet(len, len as u8);
            let old: [u8; 4] = bytes[0..4].try_into().unwrap();
            let new = [0x1f, 0x90, old[2] ^ 0x5a, 0x01];
            bytes[0..4].copy_from_slice(&new);
            let patch = port_change(old, new, len as u32);
            for (field, patch) in bytes[8..12].iter_mut().zip(patch) {
                *field ^= patch;
            }
            let field: [u8; 4] = bytes[8..12].try_into().unwrap();
            bytes[8..12].fill(0);
            assert_eq!(
                u32::from_le_bytes(field),
                crc32c(&bytes[..len]),
                "length {len}"
            );
        }
    }

    #[test]
    fn unchanged_ports_change_nothing() {
        assert_eq!(port_change([1, 2, 3, 4], [1, 2, 3, 4], 1000), [0; 4]);
    }

    #[test]
    fn the_shift_tables_are_powers_of_x() {
        // x^(8 * 256) built both ways, and x^8 the image of one byte's shift.
        assert_eq!(mul(SHIFT_LOW[255], SHIFT_LOW[1]), SHIFT_HIGH[1]);
        assert_eq!(SHIFT_LOW[0], ONE);
        assert_eq!(SHIFT_HIGH[0], ONE);
        assert_eq!(SHIFT_LOW[1], ONE >> 8);
    }
}
