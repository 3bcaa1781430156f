//! Full checksums for packets the TC path builds itself (RST, ICMP unreachable); translated
//! packets are fixed up incrementally with `l3/l4_csum_replace` instead.
use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_skb_load_bytes},
    programs::TcContext,
};

/// A stack buffer the checksum helper can read (4-byte aligned, length a multiple of 4).
#[repr(C, align(4))]
pub struct Words<const N: usize>(pub [u8; N]);

impl<const N: usize> Words<N> {
    #[inline(always)]
    pub const fn zeroed() -> Self {
        Self([0; N])
    }

    /// Adds the buffer's 16-bit words to `seed` (an unfolded one's-complement sum).
    #[inline(always)]
    pub fn sum(&mut self, seed: u32) -> Result<u32, i64> {
        const { assert!(N.is_multiple_of(4) && N <= 512) };
        // SAFETY: the helper reads `N` bytes of this initialised, aligned stack buffer; a
        // null `from` with size 0 is its documented "sum only" form.
        let sum = unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                self.0.as_mut_ptr().cast(),
                N as u32,
                seed,
            )
        };
        if sum < 0 { Err(sum) } else { Ok(sum as u32) }
    }

    /// Copies `LEN` packet bytes from `offset` into the buffer at `at` (a constant length,
    /// as the verifier wants for a stack destination).
    #[inline(always)]
    pub fn load<const AT: usize, const LEN: usize>(
        &mut self,
        ctx: &TcContext,
        offset: usize,
    ) -> Result<(), i64> {
        const { assert!(AT + LEN <= N) };
        // SAFETY: the destination is `LEN` bytes inside this buffer (checked above); the
        // helper bounds-checks the packet side itself.
        let result = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                offset as u32,
                self.0.as_mut_ptr().add(AT).cast(),
                LEN as u32,
            )
        };
        if result < 0 { Err(result) } else { Ok(()) }
    }

    #[inline(always)]
    pub fn put(&mut self, offset: usize, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            if let Some(slot) = self.0.get_mut(offset + i) {
                *slot = bytes[i];
            }
            i += 1;
        }
    }
}

/// Folds an unfolded sum into the 16-bit checksum field value, ready to be stored as is.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let mut folded = (sum & 0xffff) + (sum >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    !(folded as u16)
}
