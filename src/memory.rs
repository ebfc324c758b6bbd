//! Hints to the operating system and the processor about memory.

/// Asks for transparent huge pages (2 MiB) for the whole 2 MiB pages inside `v`'s
/// allocation: a large buffer filled once then faults a page per 2 MiB instead of one
/// per 4 KiB. Where the kernel offers them only on request (`madvise` mode), this is the
/// request; elsewhere it does nothing. Only a hint: the contents are unaffected.
pub(crate) fn advise_huge<T>(v: &mut Vec<T>) {
    const HUGE: usize = 2 << 20;
    let start = v.as_mut_ptr() as usize;
    let end = start + v.capacity() * std::mem::size_of::<T>();
    let first = start.next_multiple_of(HUGE);
    let last = end / HUGE * HUGE;
    if last > first {
        // SAFETY: the pages are inside the vector's own allocation.
        unsafe { advise_huge_pages(first as *mut u8, last - first) };
    }
}

/// `n` copies of `value`, each written (in huge pages where [`advise_huge`] gets them).
///
/// For a table that is read before it is written, unlike `vec![0; n]`: that asks the
/// allocator for zeroed memory, which fresh pages from the kernel already are, so
/// nothing is written; the first read of each page then maps the shared zero page and
/// the first write copies it, which takes a TLB shootdown (an interrupt to every other
/// core running the process's threads) per page. On the 60 MB benchmark dump the
/// parser's chain index paid about 30 such samples of 3,400 (perf, 8 kHz) on the
/// filing thread, which the other threads wait for.
pub(crate) fn written<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise_huge(&mut v);
    v.resize(n, value);
    v
}

/// Asks for transparent huge pages for the `len` bytes from `start` (`madvise`
/// `MADV_HUGEPAGE`; nothing elsewhere than Linux). Only a hint: the result is ignored.
///
/// # Safety
/// `start` and `len` must describe pages of one mapping the caller owns.
pub(crate) unsafe fn advise_huge_pages(start: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    // SAFETY: advice about pages the caller owns (this function's contract).
    unsafe {
        libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// A hint to the processor to load the cache line of `p` (nothing on other
/// architectures).
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of every x86_64 processor; a prefetch never faults, whatever
    // the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
}

/// [`prefetch`] for the first three cache lines of a rule's text.
#[inline(always)]
pub(crate) fn prefetch_text(text: &str) {
    let p = text.as_ptr();
    prefetch(p);
    prefetch(p.wrapping_add(64));
    prefetch(p.wrapping_add(128));
}
