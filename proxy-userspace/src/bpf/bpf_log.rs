//! The eBPF programs' aya-log records (`--bpf-log-level`), forwarded into the agent's own
//! tracing output as they arrive, under the target `switchyard::bpf`.
use std::{io, os::fd::AsFd};

use aya::Ebpf;
use aya_log::EbpfLogger;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::error::LoadError;

/// Hands each record to tracing at its level.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "switchyard::bpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "switchyard::bpf", "{message}"),
            log::Level::Info => tracing::info!(target: "switchyard::bpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "switchyard::bpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "switchyard::bpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The reader of the programs' log ring buffer.
pub struct BpfLogger(EbpfLogger<ToTracing>);

impl BpfLogger {
    /// Takes the log ring buffer out of the loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        EbpfLogger::init_with_logger(ebpf, ToTracing)
            .map(Self)
            .map_err(LoadError::Log)
    }

    /// Forwards records whenever the ring buffer has some, until an error (blocks: run it on
    /// a thread of its own).
    pub fn forward(mut self) -> io::Result<()> {
        loop {
            let mut ready = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut ready, PollTimeout::from(1000u16)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(error) => return Err(error.into()),
            }
            self.0.flush();
        }
    }
}
