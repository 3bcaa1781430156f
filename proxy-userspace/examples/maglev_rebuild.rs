//! Times the agent's Maglev table builder (`proxy_userspace::maglev::table`, what a sync runs
//! for every changed backend set) for `BACKENDS` backends at table size `SIZE`, `ROUNDS`
//! times, and prints one JSON array of the build times in nanoseconds. `cargo xtask bench`
//! runs it (release build) for its Maglev rebuild figure.
//!
//! Usage: `maglev_rebuild BACKENDS SIZE ROUNDS`
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use proxy_userspace::maglev::{self, Settings};
use proxy_userspace::model::{BackendAddr, Protocol};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [backends, size, rounds] = args.as_slice() else {
        bail!("usage: maglev_rebuild BACKENDS SIZE ROUNDS");
    };
    let backends: u32 = backends.parse().context("BACKENDS")?;
    let rounds: usize = rounds.parse().context("ROUNDS")?;
    let table_size = maglev::parse_table_size(size).map_err(anyhow::Error::msg)?;
    ensure!(
        (1..=60_000).contains(&backends) && (1..=100_000).contains(&rounds),
        "BACKENDS 1..=60000, ROUNDS 1..=100000"
    );
    let settings = Settings {
        table_size,
        ..Settings::default()
    };
    // Pod addresses as a cluster's: 10.240.0.0/16 upwards, one port.
    let set: Vec<BackendAddr> = (0..backends)
        .map(|i| BackendAddr {
            ip: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 240, 0, 10)) + i)),
            port: 8080,
            protocol: Protocol::Tcp,
        })
        .collect();
    // One build outside the timing: page faults of the first allocation are not the figure.
    let table = maglev::table(&set, settings).context("no table for a non-empty set")?;
    ensure!(table.len() == table_size as usize, "the table is not full");
    let mut nanos = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let table = maglev::table(black_box(&set), black_box(settings));
        let elapsed = started.elapsed();
        black_box(table);
        nanos.push(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }
    println!("{}", serde_json::to_string(&nanos)?);
    Ok(())
}
