//! The global allocator: mimalloc, entered the way the C library's own
//! `malloc` is for the common case.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every allocation to
//! `mi_malloc_aligned`, whatever its alignment. For a block of more than
//! 1 KiB that is not a power of two, that function cannot tell the block
//! will be aligned anyway, so it allocates `size + align - 1` bytes and
//! marks the page as holding interior pointers (which slows every free on
//! it): 16 of a keyed request's 83 allocations took that path, at ~190
//! instructions each against ~40 for `mi_malloc` (callgrind, BENCHMARKS.md
//! "Fewer map operations and boxes a request"). Every mimalloc block is aligned to at least
//! a machine word, so a layout asking no more than that needs no aligned
//! entry at all: the rule Rust's own `System` allocator follows for
//! `malloc`. Larger alignments still go to the aligned functions.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every mimalloc block has, whatever its size (its smallest
/// size class is one word).
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, without the aligned entry for alignments it gives anyway.
pub struct Allocator;

// SAFETY: each method forwards to the mimalloc function for the same
// operation: plain ones only for layouts whose alignment (at most a word)
// every mimalloc block has, the aligned ones otherwise; mimalloc's `free`
// and `realloc` take pointers from either.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            ffi::mi_malloc(layout.size()).cast()
        } else {
            ffi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= WORD {
            ffi::mi_zalloc(layout.size()).cast()
        } else {
            ffi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        ffi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= WORD {
            ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size class from 1 byte to 2 MiB, every alignment up to 4 KiB:
    /// the block is aligned, holds what was written through growing and
    /// shrinking reallocations, and a zeroed one is zero.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let mut sizes: Vec<usize> = (1..=64).collect();
        let mut s = 64;
        while s <= 2 << 20 {
            sizes.extend([s - 8, s - 1, s, s + 1, s + s / 2 + 8]);
            s *= 2;
        }
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for &size in &sizes {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: size >= 1; each block is freed with its own layout.
                unsafe {
                    let zeroed = Allocator.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size} @ {align}");
                    assert!(std::slice::from_raw_parts(zeroed, size)
                        .iter()
                        .all(|&b| b == 0));
                    Allocator.dealloc(zeroed, layout);

                    let p = Allocator.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{size} @ {align}");
                    for i in 0..size {
                        *p.add(i) = (i % 251) as u8;
                    }
                    let grown = Allocator.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "grown {size} @ {align}");
                    let shrunk_size = size.div_ceil(2);
                    let grown_layout = Layout::from_size_align_unchecked(size * 3, align);
                    let shrunk = Allocator.realloc(grown, grown_layout, shrunk_size);
                    assert_eq!(shrunk as usize % align, 0, "shrunk {size} @ {align}");
                    for i in 0..shrunk_size {
                        assert_eq!(
                            *shrunk.add(i),
                            (i % 251) as u8,
                            "byte {i} of {size} @ {align}"
                        );
                    }
                    Allocator.dealloc(
                        shrunk,
                        Layout::from_size_align_unchecked(shrunk_size, align),
                    );
                }
            }
        }
    }
}
