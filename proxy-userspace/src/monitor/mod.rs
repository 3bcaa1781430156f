//! `switchyard monitor`: streams the datapath's decisions live from the pinned ring buffer.
//!
//! The datapath writes events only while a monitor holds the lease in the pinned
//! `MONITOR_CFG_V1` (renewed every second, two seconds long, cleared on exit), so it costs
//! nothing when nobody watches, and a monitor killed without cleaning up stops the events
//! within two seconds. Several monitors may run at once; each sees every event.
pub mod event;

use std::{
    io::Write as _,
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, Map, MapData, RingBuf};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use proxy_common::{MonitorEvent, map_names};
use tracing::warn;

use crate::{
    agent::preflight,
    bpf::pins::PinLayout,
    cli::{MonitorArgs, OutputFormat},
    datapath::conntrack::monotonic_now_ns,
    maps::{KernelMaps, MapWriter},
    offline::existing_pins,
};
use event::{Clock, Filter, Record};

/// How long one renewal of the lease lasts, and how often it is renewed.
const LEASE: Duration = Duration::from_secs(2);
const RENEW_EVERY: Duration = Duration::from_secs(1);
/// How often an unknown frontend id may trigger a re-read of the Service names.
const NAMES_REFRESH: Duration = Duration::from_secs(5);

/// Reads a [`MonitorEvent`] from a ring-buffer record (the datapath's layout, native order);
/// `None` when the record has another size (another layout version).
pub fn parse(bytes: &[u8]) -> Option<MonitorEvent> {
    if bytes.len() != size_of::<MonitorEvent>() {
        return None;
    }
    let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u16_at = |at: usize| u16::from_ne_bytes(bytes[at..at + 2].try_into().expect("2 bytes"));
    let words = |at: usize| [u32_at(at), u32_at(at + 4), u32_at(at + 8), u32_at(at + 12)];
    let mut comm = [0u8; 16];
    comm.copy_from_slice(&bytes[120..136]);
    Some(MonitorEvent {
        timestamp_ns: u64_at(0),
        socket_cookie: u64_at(8),
        netns_cookie: u64_at(16),
        pid_tgid: u64_at(24),
        rev_nat_id: u32_at(32),
        backend_id: u32_at(36),
        kind: bytes[40],
        reason: bytes[41],
        family: bytes[42],
        protocol: bytes[43],
        hook: bytes[44],
        pad: [0; 3],
        src: words(48),
        dst: words(64),
        nat_src: words(80),
        backend: words(96),
        src_port_be: u16_at(112),
        dst_port_be: u16_at(114),
        nat_src_port_be: u16_at(116),
        backend_port_be: u16_at(118),
        comm,
    })
}

/// The Service names of the frontends (rev-NAT id → `namespace/name:port`), re-read when an
/// event names an id not seen yet.
struct Names {
    pins: PinLayout,
    by_id: std::collections::BTreeMap<u32, String>,
    read_at: Option<Instant>,
}

impl Names {
    fn refresh(&mut self) {
        if self.read_at.is_some_and(|at| at.elapsed() < NAMES_REFRESH) {
            return;
        }
        self.read_at = Some(Instant::now());
        match KernelMaps::open_pinned(&self.pins).and_then(|maps| maps.read_image()) {
            Ok(image) => {
                self.by_id = crate::maps::encode::programmed_from_image(&image).0.names;
            }
            Err(error) => warn!("cannot read the Service names: {error}"),
        }
    }

    fn get(&mut self, id: u32) -> Option<String> {
        if !self.by_id.contains_key(&id) {
            self.refresh();
        }
        self.by_id.get(&id).cloned()
    }
}

/// Holds the lease while the monitor runs; clears it when dropped.
struct Lease(Array<MapData, u64>);

impl Lease {
    fn renew(&mut self) -> Result<()> {
        let until = monotonic_now_ns() + u64::try_from(LEASE.as_nanos()).unwrap_or(u64::MAX);
        self.0.set(0, until, 0).with_context(|| {
            format!(
                "renewing the monitor lease in {}",
                map_names::MONITOR_CONFIG
            )
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Err(error) = self.0.set(0, 0, 0) {
            warn!("cannot clear the monitor lease: {error}");
        }
    }
}

fn open_map(pins: &PinLayout, name: &str) -> Result<MapData> {
    MapData::from_pin(pins.map(name)).with_context(|| {
        format!("opening {name}: the pinned maps predate `switchyard monitor`; restart the agent with this version")
    })
}

/// Stops the loop on SIGINT or SIGTERM.
fn stop_on_signal() -> Result<(Arc<AtomicBool>, tokio::runtime::Runtime)> {
    let stop = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let flag = stop.clone();
    runtime.spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        flag.store(true, Ordering::SeqCst);
    });
    Ok((stop, runtime))
}

/// Runs `switchyard monitor` until interrupted, `--count` events or `--duration`.
pub fn run(args: &MonitorArgs) -> Result<()> {
    preflight()?;
    let Some(pins) = existing_pins(&args.pins) else {
        bail!(
            "no pinned Switchyard maps under {}",
            args.pins.bpffs.display()
        );
    };
    let mut ring = RingBuf::try_from(Map::RingBuf(open_map(&pins, map_names::MONITOR_EVENTS)?))
        .context("the monitor ring buffer")?;
    let lease =
        Array::<MapData, u64>::try_from(Map::Array(open_map(&pins, map_names::MONITOR_CONFIG)?))
            .context("the monitor lease")?;
    let mut lease = Lease(lease);
    let (stop, _runtime) = stop_on_signal()?;
    let filter = Filter {
        service: args.service.clone(),
        address: args.address,
        verdicts: args.verdict.clone(),
    };
    let mut names = Names {
        pins,
        by_id: std::collections::BTreeMap::new(),
        read_at: None,
    };
    names.refresh();
    let clock = Clock {
        wall: SystemTime::now(),
        monotonic_ns: monotonic_now_ns(),
    };
    let started = Instant::now();
    let mut out = std::io::stdout().lock();
    if args.output == OutputFormat::Table {
        writeln!(out, "{}", event::TABLE_HEADER)?;
    }
    let mut shown = 0u64;
    let mut renewed: Option<Instant> = None;
    loop {
        let done = stop.load(Ordering::SeqCst)
            || args
                .duration
                .is_some_and(|limit| started.elapsed() >= limit)
            || args.count.is_some_and(|limit| shown >= limit);
        if done {
            return Ok(());
        }
        if renewed.is_none_or(|at| at.elapsed() >= RENEW_EVERY) {
            lease.renew()?;
            renewed = Some(Instant::now());
        }
        let mut ready = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
        match poll(&mut ready, PollTimeout::from(200u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(error) => return Err(error).context("waiting for monitor events"),
        }
        let mut records: Vec<Record> = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(event) = parse(&item) {
                records.extend(event::decode(&event, &clock, |id| names.get(id)));
            }
        }
        for record in records.iter().filter(|record| filter.accepts(record)) {
            if args.count.is_some_and(|limit| shown >= limit) {
                break;
            }
            let line = match args.output {
                OutputFormat::Table => event::table_row(record),
                OutputFormat::Json => event::json_line(record),
            };
            // A closed pipe (`| head`) ends the monitor quietly.
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                return Ok(());
            }
            shown += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_the_datapath_layout_back() {
        let event = MonitorEvent {
            timestamp_ns: 1,
            socket_cookie: 2,
            netns_cookie: 3,
            pid_tgid: 4,
            rev_nat_id: 5,
            backend_id: 6,
            kind: 7,
            reason: 8,
            family: 4,
            protocol: 17,
            hook: 2,
            pad: [0; 3],
            src: [9, 10, 11, 12],
            dst: [13, 14, 15, 16],
            nat_src: [17, 18, 19, 20],
            backend: [21, 22, 23, 24],
            src_port_be: 25,
            dst_port_be: 26,
            nat_src_port_be: 27,
            backend_port_be: 28,
            comm: *b"sixteen-bytes!!\0",
        };
        // The bytes as the kernel lays the struct out (repr(C), no implicit padding).
        let mut bytes = Vec::new();
        for value in [
            event.timestamp_ns,
            event.socket_cookie,
            event.netns_cookie,
            event.pid_tgid,
        ] {
            bytes.extend_from_slice(&value.to_ne_bytes());
        }
        for value in [event.rev_nat_id, event.backend_id] {
            bytes.extend_from_slice(&value.to_ne_bytes());
        }
        bytes.extend_from_slice(&[7, 8, 4, 17, 2, 0, 0, 0]);
        for words in [event.src, event.dst, event.nat_src, event.backend] {
            for word in words {
                bytes.extend_from_slice(&word.to_ne_bytes());
            }
        }
        for port in [25u16, 26, 27, 28] {
            bytes.extend_from_slice(&port.to_ne_bytes());
        }
        bytes.extend_from_slice(&event.comm);
        assert_eq!(parse(&bytes), Some(event));
        assert_eq!(parse(&bytes[..100]), None, "another size is refused");
    }
}
