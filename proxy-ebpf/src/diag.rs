//! Rare datapath events logged through aya-log, for the agent to forward into its own log:
//! map writes that failed and states that should not happen. Nothing per packet: a decision
//! the datapath takes as designed is counted (and shown by `switchyard monitor`), not logged.
//!
//! Off unless the agent runs with `--bpf-log-level`: the level is a global the loader sets
//! (`AYA_LOG_LEVEL`, 0 = off), read-only once loaded, so the verifier prunes the logging code
//! of levels that are off.
use aya_log_ebpf::{debug, error, warn};
use proxy_common::reason;

/// Logs `why` if it is a rare event (one of the reason codes below).
#[inline(always)]
pub fn rare(why: u32) {
    // aya-log's macros take a context they no longer use; there is none here.
    match why {
        reason::BACKEND_LOOKUP_FAILED => {
            warn!(
                &(),
                "switchyard: a backend slot the service entry promised is missing (the agent is rewriting it?); passed untranslated"
            );
        }
        reason::SOCK_REV_NAT_STORE_FAILED => {
            error!(
                &(),
                "switchyard: cannot store a socket reverse-NAT entry: getpeername/recvmsg will show the backend"
            );
        }
        reason::AFFINITY_STORE_FAILED => {
            error!(&(), "switchyard: cannot store a session-affinity entry");
        }
        reason::TC_CT_STORE_FAILED => {
            error!(
                &(),
                "switchyard: cannot store a conntrack entry; packet dropped"
            );
        }
        reason::TC_SNAT_EXHAUSTED => {
            warn!(
                &(),
                "switchyard: no free masquerade port in the SNAT range; packet dropped"
            );
        }
        reason::TC_REWRITE_FAILED => {
            warn!(
                &(),
                "switchyard: cannot rewrite a packet (malformed, or a helper failed); dropped"
            );
        }
        reason::TC_FIB_FAILED => {
            debug!(
                &(),
                "switchyard: no route to a translated destination; packet dropped"
            );
        }
        _ => {}
    }
}
