//! How a run talks to its operator: timestamped progress lines, and Ctrl-C, which stops the
//! run at the next check so every guard can clean up on the way out.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Result, bail};

static STOP: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C request a stop. Children of the same process group get the signal too.
pub fn stop_on_ctrl_c() {
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
}

/// Fails once a stop was requested.
pub fn check_stop() -> Result<()> {
    if stopping() {
        bail!("interrupted");
    }
    Ok(())
}

pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Progress lines with the time since the start.
pub struct Progress(Instant);

impl Progress {
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn started(&self) -> Instant {
        self.0
    }

    pub fn say(&self, message: &str) {
        let secs = self.0.elapsed().as_secs();
        println!("[{:>2}:{:02}] {message}", secs / 60, secs % 60);
        let _ = std::io::stdout().flush();
    }
}
