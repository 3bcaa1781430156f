//! Full checksums for packets the TC path builds itself (RST, ICMP unreachable); translated
//! packets are fixed up incrementally with `l3/l4_csum_replace` instead.
use aya_ebpf::helpers::bpf_csum_diff;

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
        const { assert!(N % 4 == 0 && N <= 512) };
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
