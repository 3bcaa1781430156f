//! Maglev consistent hashing: the hashes every node must compute identically. The agent builds
//! each Maglev Service's lookup table from [`backend_offset_skip`] (the population algorithm of
//! Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer", NSDI 2016,
//! §3.4) and the TC path picks `table[flow_hash(tuple) % table_size]` for a new flow. Both
//! sides use this one implementation (MurmurHash3's 32-bit rounds, cheap enough for the
//! verifier: a handful of multiplies and rotates per word, no loops over packet data).

/// The default lookup-table size (Cilium's default too): a prime, so that every skip value
/// walks the whole table.
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
/// The smallest table size the agent accepts: with fewer slots than this the shares of a
/// hundred backends stop being even.
pub const MIN_TABLE_SIZE: u32 = 251;
/// The largest table size the agent accepts (the largest prime below 2^17, as Cilium's).
pub const MAX_TABLE_SIZE: u32 = 131_071;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

/// One MurmurHash3 (x86, 32-bit) block round.
#[inline]
const fn round(hash: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (hash ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: every input bit reaches every output bit.
#[inline]
const fn finish(hash: u32, len_bytes: u32) -> u32 {
    let mut h = hash ^ len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3 (x86, 32-bit) of `bytes` with `seed`, as the reference implementation computes
/// it (little-endian blocks).
pub const fn murmur3(bytes: &[u8], seed: u32) -> u32 {
    let mut hash = seed;
    let blocks = bytes.len() / 4;
    let mut i = 0;
    while i < blocks {
        let at = i * 4;
        let word = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        hash = round(hash, word);
        i += 1;
    }
    let tail = blocks * 4;
    let mut k: u32 = 0;
    let rest = bytes.len() - tail;
    if rest >= 3 {
        k ^= (bytes[tail + 2] as u32) << 16;
    }
    if rest >= 2 {
        k ^= (bytes[tail + 1] as u32) << 8;
    }
    if rest >= 1 {
        k ^= bytes[tail] as u32;
        hash ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "MurmurHash3 mixes in the length modulo 2^32 by definition"
    )]
    let len = bytes.len() as u32;
    finish(hash, len)
}

/// The seed `--maglev-hash-seed` stands for: the MurmurHash3 of its text. Every node given the
/// same text derives the same seed.
pub const fn seed_of(text: &str) -> u32 {
    murmur3(text.as_bytes(), 0)
}

/// A backend's place in a table's population: where its preference list starts and how it
/// steps (`offset` in `0..size`, `skip` in `1..size`). `identity` is the backend's address
/// octets followed by its port in network byte order: the same on every node, unlike the
/// agent's backend ids.
pub fn backend_offset_skip(identity: &[u8], seed: u32, table_size: u32) -> (u32, u32) {
    let offset = murmur3(identity, seed) % table_size;
    // A second, independent hash: another seed derived from the first.
    let skip = murmur3(identity, seed ^ 0x9e37_79b9) % (table_size - 1) + 1;
    (offset, skip)
}

/// The hash of an IPv4 flow (addresses and ports as the packet carries them: network byte
/// order read into native integers), from which a Maglev Service's table index is taken.
#[inline]
pub const fn flow_hash4(
    seed: u32,
    saddr: u32,
    daddr: u32,
    sport_be: u16,
    dport_be: u16,
    protocol: u8,
) -> u32 {
    let mut hash = round(seed, saddr);
    hash = round(hash, daddr);
    hash = round(hash, ports_word(sport_be, dport_be));
    hash = round(hash, protocol as u32);
    finish(hash, 16)
}

/// The hash of an IPv6 flow (see [`flow_hash4`]).
#[inline]
pub const fn flow_hash6(
    seed: u32,
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport_be: u16,
    dport_be: u16,
    protocol: u8,
) -> u32 {
    let mut hash = seed;
    hash = round(hash, saddr[0]);
    hash = round(hash, saddr[1]);
    hash = round(hash, saddr[2]);
    hash = round(hash, saddr[3]);
    hash = round(hash, daddr[0]);
    hash = round(hash, daddr[1]);
    hash = round(hash, daddr[2]);
    hash = round(hash, daddr[3]);
    hash = round(hash, ports_word(sport_be, dport_be));
    hash = round(hash, protocol as u32);
    finish(hash, 40)
}

#[inline]
const fn ports_word(sport_be: u16, dport_be: u16) -> u32 {
    ((sport_be as u32) << 16) | dport_be as u32
}

/// The settings the TC path needs to index a Maglev table (index 0 of the Maglev config
/// array). `table_size` 0: the agent has not written them, and no Maglev table exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MaglevConfig {
    /// `--maglev-table-size` (a prime).
    pub table_size: u32,
    /// The seed derived from `--maglev-hash-seed` ([`seed_of`]).
    pub seed: u32,
}
assert_layout!(MaglevConfig, size = 8, align = 4);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        // Vectors of the reference implementation (SMHasher's MurmurHash3_x86_32).
        assert_eq!(murmur3(b"", 0), 0);
        assert_eq!(murmur3(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3(b"abc", 0), 0xb3dd_93fa);
        assert_eq!(murmur3(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
    }

    #[test]
    fn offsets_and_skips_stay_in_range() {
        for port in 0..2_000u16 {
            let mut identity = [10, 0, 0, 1, 0, 0];
            identity[4..].copy_from_slice(&port.to_be_bytes());
            let (offset, skip) = backend_offset_skip(&identity, 7, 251);
            assert!(offset < 251);
            assert!((1..251).contains(&skip));
        }
    }

    #[test]
    fn flow_hashes_depend_on_every_field_and_the_seed() {
        let base = flow_hash4(1, 0x0a00_0001, 0x0a00_0002, 1000, 80, 6);
        assert_ne!(base, flow_hash4(2, 0x0a00_0001, 0x0a00_0002, 1000, 80, 6));
        assert_ne!(base, flow_hash4(1, 0x0a00_0003, 0x0a00_0002, 1000, 80, 6));
        assert_ne!(base, flow_hash4(1, 0x0a00_0001, 0x0a00_0003, 1000, 80, 6));
        assert_ne!(base, flow_hash4(1, 0x0a00_0001, 0x0a00_0002, 1001, 80, 6));
        assert_ne!(base, flow_hash4(1, 0x0a00_0001, 0x0a00_0002, 1000, 81, 6));
        assert_ne!(base, flow_hash4(1, 0x0a00_0001, 0x0a00_0002, 1000, 80, 17));
        let six = flow_hash6(1, &[1, 2, 3, 4], &[5, 6, 7, 8], 1000, 80, 6);
        assert_ne!(
            six,
            flow_hash6(1, &[1, 2, 3, 4], &[5, 6, 7, 9], 1000, 80, 6)
        );
        assert_ne!(six, flow_hash6(1, &[1, 2, 3, 4], &[5, 6, 7, 8], 999, 80, 6));
    }

    #[test]
    fn seeds_come_from_the_text() {
        assert_eq!(seed_of("a"), seed_of("a"));
        assert_ne!(seed_of("a"), seed_of("b"));
    }
}
