//! Maglev lookup tables (Eisenbud et al., NSDI 2016, §3.4): a pure function from a backend set
//! to the table the TC path indexes by a flow's hash. Every node builds the same table from the
//! same backends, because a backend is known here only by its identity (address and port, never
//! an agent's backend id) and the backends are taken in identity order, whatever order the
//! EndpointSlices listed them in. The hashes themselves live in `proxy_common::maglev`, shared
//! with the datapath.
use std::net::IpAddr;

use proxy_common::maglev::{
    DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE, MIN_TABLE_SIZE, backend_offset_skip, seed_of,
};

use crate::model::BackendAddr;

/// The default `--maglev-hash-seed`: any text works, as long as every node has the same one.
pub const DEFAULT_SEED: &str = "switchyard-maglev";

/// The table size and seed every node must share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// A prime in `MIN_TABLE_SIZE..=MAX_TABLE_SIZE`.
    pub table_size: u32,
    /// Derived from the `--maglev-hash-seed` text.
    pub seed: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            table_size: DEFAULT_TABLE_SIZE,
            seed: seed_of(DEFAULT_SEED),
        }
    }
}

/// Parses `--maglev-table-size`: a prime (so every skip walks the whole table) within bounds.
pub fn parse_table_size(text: &str) -> Result<u32, String> {
    let size: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
        return Err(format!(
            "{size} is outside {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE} (a smaller table spreads \
             backends unevenly; a larger one costs memory for nothing)"
        ));
    }
    if !is_prime(size) {
        return Err(format!(
            "{size} is not a prime (Maglev needs one; {DEFAULT_TABLE_SIZE} is the default)"
        ));
    }
    Ok(size)
}

/// Parses `--maglev-hash-seed`: any non-empty text, hashed to the seed.
pub fn parse_seed(text: &str) -> Result<u32, String> {
    if text.is_empty() {
        return Err("the Maglev hash seed must not be empty".to_owned());
    }
    Ok(seed_of(text))
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut divisor = 2u32;
    while divisor * divisor <= n {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 1;
    }
    true
}

/// The bytes a backend is known by: its address octets, then its port in network byte order.
fn identity(backend: &BackendAddr) -> Vec<u8> {
    let mut bytes = match backend.ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&backend.port.to_be_bytes());
    bytes
}

/// The weight a backend takes turns with. Kubernetes' EndpointSlices carry no weight, so the
/// agent gives every backend 1 (serving-but-terminating fallback endpoints too: they are used
/// only when no ready endpoint exists, and then all of them alike).
pub const DEFAULT_WEIGHT: u32 = 1;

/// Fills a table of `settings.table_size` slots with indexes into `backends` (the paper's
/// population: each backend in turn, `weight` turns per round, takes the next free slot of
/// its own permutation `offset, offset + skip, ...`). Backends with weight 0 get no slot;
/// `None` when no backend has a weight. Backends listed twice count once.
pub fn populate(backends: &[(BackendAddr, u32)], settings: Settings) -> Option<Vec<u32>> {
    let size = settings.table_size;
    // Identity order, not the caller's: the population depends on the order of turns.
    let mut order: Vec<(Vec<u8>, u32, u32)> = backends
        .iter()
        .enumerate()
        .filter(|(_, (_, weight))| *weight > 0)
        .map(|(index, (backend, weight))| {
            let index = u32::try_from(index).expect("fewer than 2^32 backends");
            (identity(backend), *weight, index)
        })
        .collect();
    order.sort();
    order.dedup_by(|a, b| a.0 == b.0);
    if order.is_empty() {
        return None;
    }
    let mut walkers: Vec<(u32, u32, u32, u32)> = order
        .iter()
        .map(|(identity, weight, index)| {
            let (offset, skip) = backend_offset_skip(identity, settings.seed, size);
            (offset, skip, *weight, *index)
        })
        .collect();
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    while filled < size {
        for (next, skip, weight, index) in &mut walkers {
            for _ in 0..*weight {
                // Walk the permutation to its next free slot (there is one: filled < size).
                while table[*next as usize] != u32::MAX {
                    *next = step(*next, *skip, size);
                }
                table[*next as usize] = *index;
                *next = step(*next, *skip, size);
                filled += 1;
                if filled == size {
                    return Some(table);
                }
            }
        }
    }
    Some(table)
}

fn step(position: u32, skip: u32, size: u32) -> u32 {
    let next = u64::from(position) + u64::from(skip);
    u32::try_from(next % u64::from(size)).expect("below the table size")
}

/// The table of an unweighted backend set: each slot's backend.
pub fn table(backends: &[BackendAddr], settings: Settings) -> Option<Vec<BackendAddr>> {
    let weighted: Vec<(BackendAddr, u32)> = backends
        .iter()
        .map(|backend| (*backend, DEFAULT_WEIGHT))
        .collect();
    let slots = populate(&weighted, settings)?;
    Some(
        slots
            .into_iter()
            .map(|index| backends[index as usize])
            .collect(),
    )
}

#[cfg(test)]
#[expect(
    clippy::cast_precision_loss,
    reason = "slot counts below 2^17 compared as shares"
)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::model::Protocol;

    fn backend(n: u32) -> BackendAddr {
        BackendAddr {
            ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(ns: impl IntoIterator<Item = u32>) -> Vec<BackendAddr> {
        ns.into_iter().map(backend).collect()
    }

    fn settings(table_size: u32) -> Settings {
        Settings {
            table_size,
            seed: seed_of("test"),
        }
    }

    fn moved(a: &[BackendAddr], b: &[BackendAddr]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    #[test]
    fn table_sizes_must_be_primes_within_bounds() {
        assert_eq!(parse_table_size("16381"), Ok(16_381));
        assert_eq!(parse_table_size("251"), Ok(251));
        assert_eq!(parse_table_size("131071"), Ok(131_071));
        let not_prime = parse_table_size("16383").unwrap_err();
        assert!(not_prime.contains("not a prime"), "{not_prime}");
        let small = parse_table_size("7").unwrap_err();
        assert!(small.contains("outside 251..=131071"), "{small}");
        assert!(
            parse_table_size("131101").is_err(),
            "a prime above the bound"
        );
        assert!(parse_table_size("-3").is_err());
        assert!(parse_table_size("many").is_err());
    }

    #[test]
    fn seeds_are_any_text_but_empty() {
        assert_eq!(parse_seed("abc"), Ok(seed_of("abc")));
        assert_ne!(parse_seed("abc"), parse_seed("abd"));
        assert!(parse_seed("").is_err());
    }

    #[test]
    fn no_backend_no_table() {
        assert_eq!(table(&[], settings(251)), None);
        assert_eq!(populate(&[(backend(1), 0)], settings(251)), None);
    }

    #[test]
    fn the_table_ignores_the_order_backends_are_listed_in() {
        let forward = backends(1..=20);
        let mut reversed = forward.clone();
        reversed.reverse();
        assert_eq!(
            table(&forward, settings(4_099)),
            table(&reversed, settings(4_099))
        );
    }

    #[test]
    fn another_seed_gives_another_table() {
        let set = backends(1..=10);
        let a = table(&set, settings(4_099)).unwrap();
        let b = table(
            &set,
            Settings {
                table_size: 4_099,
                seed: seed_of("other"),
            },
        )
        .unwrap();
        assert!(moved(&a, &b) > 1_000, "the seed must reshuffle the table");
    }

    #[test]
    fn weights_give_proportional_shares() {
        let weighted = [(backend(1), 1), (backend(2), 3), (backend(3), 0)];
        let slots = populate(&weighted, settings(DEFAULT_TABLE_SIZE)).unwrap();
        let count = |index: u32| slots.iter().filter(|slot| **slot == index).count();
        assert_eq!(count(2), 0, "weight 0 takes no slot");
        assert_eq!(count(0) + count(1), DEFAULT_TABLE_SIZE as usize);
        let share = count(1) as f64 / f64::from(DEFAULT_TABLE_SIZE);
        assert!((share - 0.75).abs() < 0.01, "share {share}");
    }

    #[test]
    fn a_backend_listed_twice_counts_once() {
        let once = table(&backends([1, 2]), settings(251)).unwrap();
        let twice = table(&backends([1, 2, 2]), settings(251)).unwrap();
        assert_eq!(once, twice);
    }

    /// The most slots beyond the minimum (1/N of the table for a removal, 1/(N+1) for an
    /// addition) that one backend change moves, as a fraction of the table, over a sweep of
    /// backend sets of `n` members (26 different sets, each losing a different member).
    fn worst_excess(size: u32, n: u32) -> f64 {
        let mut worst = 0f64;
        for first in (1u32..10_000).step_by(397) {
            let set = backends(first..first + n);
            let before = table(&set, settings(size)).unwrap();
            let mut fewer = set.clone();
            fewer.remove((first % n) as usize);
            let removal = moved(&before, &table(&fewer, settings(size)).unwrap());
            let mut more = set.clone();
            more.push(backend(first + n + 1_000));
            let addition = moved(&before, &table(&more, settings(size)).unwrap());
            let size = f64::from(size);
            worst = worst
                .max(removal as f64 / size - 1.0 / f64::from(n))
                .max(addition as f64 / size - 1.0 / f64::from(n + 1));
        }
        worst
    }

    const SET_SIZES: [u32; 12] = [2, 3, 5, 8, 10, 16, 20, 30, 50, 78, 100, 200];

    /// Removing one of N backends moves at most 1/N + 1 % of the slots, adding one at most
    /// 1/(N+1) + 1 %, with a table of 65537 slots (measured worst: 1 % at N = 200).
    #[test]
    fn one_change_moves_at_most_one_percent_extra_with_65537_slots() {
        for n in SET_SIZES {
            let excess = worst_excess(65_537, n);
            assert!(excess <= 0.01, "N = {n}: {:.2} % extra", excess * 100.0);
        }
    }

    /// At the default 16381 slots the population's shifted turn order moves more: measured
    /// worst 2.4 % extra (N = 3), about 1.5 % at N = 100, 2 % at N = 200. The README states it.
    #[test]
    fn one_change_moves_at_most_three_percent_extra_with_the_default_table() {
        for n in SET_SIZES {
            let excess = worst_excess(DEFAULT_TABLE_SIZE, n);
            assert!(excess <= 0.03, "N = {n}: {:.2} % extra", excess * 100.0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every slot is filled, the same input gives the same table, and each backend's
        /// share of the slots is M/N within a few percent of the table.
        #[test]
        fn tables_are_full_deterministic_and_even(n in 1u32..=200, first in 1u32..10_000) {
            let set = backends(first..first + n);
            let size = DEFAULT_TABLE_SIZE;
            let built = table(&set, settings(size)).unwrap();
            prop_assert_eq!(built.len(), size as usize);
            let again = table(&set, settings(size)).unwrap();
            prop_assert_eq!(&built, &again);
            let fair = f64::from(size) / f64::from(n);
            for member in &set {
                let share = built.iter().filter(|slot| *slot == member).count() as f64;
                // The population's turns differ by at most one per backend and round; the
                // deviation from M/N is well under a slot per backend at N <= 200.
                prop_assert!((share - fair).abs() <= fair * 0.02 + 1.0,
                    "{} has {} slots, fair is {}", member, share, fair);
            }
        }
    }
}
