//! Reason counters: every non-trivial outcome of a hook is counted in the per-CPU metrics map
//! (and the rare ones logged, see `diag`).
use crate::{diag, maps::METRICS_V1};

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(counter) = METRICS_V1.get_ptr_mut(reason) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is valid
        // and only this CPU writes it (no preemption inside a BPF program).
        unsafe { *counter += 1 };
    }
    diag::rare(reason);
}
