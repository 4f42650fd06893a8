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

/// mimalloc 3's per-thread parts of a heap, and the heap `malloc` takes
/// from on this thread. mimalloc.h declares `mi_theap_set_default` for
/// the second, but this release (3.3, bundled by libmimalloc-sys 0.1.49)
/// does not define it; `_mi_theap_default_set` is the function the C
/// library itself sets it with. Linked statically: a release that renames
/// it fails the build rather than run without it.
mod theap {
    use std::ffi::c_void;

    extern "C" {
        pub fn mi_heap_theap(heap: *mut libmimalloc_sys::mi_heap_t) -> *mut c_void;
        pub fn mi_theap_get_default() -> *mut c_void;
        pub fn _mi_theap_default_set(theap: *mut c_void);
        #[cfg(test)]
        pub fn mi_heap_of(p: *const c_void) -> *mut libmimalloc_sys::mi_heap_t;
    }
}

/// A mimalloc heap, which any thread may allocate from (mimalloc 3).
struct Heap(*mut ffi::mi_heap_t);

// SAFETY: mimalloc 3's heaps are first-class: any thread allocates from
// one, and frees its blocks, through mimalloc's own synchronisation.
unsafe impl Send for Heap {}
// SAFETY: as above.
unsafe impl Sync for Heap {}

/// The heap of what stays in memory while a key does (see [`lasting`]):
/// made at first use, never deleted.
static LASTING: std::sync::OnceLock<Heap> = std::sync::OnceLock::new();

fn lasting_heap() -> *mut ffi::mi_heap_t {
    // SAFETY: makes a heap that lives until deleted (never).
    LASTING
        .get_or_init(|| Heap(unsafe { ffi::mi_heap_new() }))
        .0
}

/// Runs `f` with the calling thread's mimalloc allocations taken from a
/// heap of their own: for what a request leaves behind for a long time,
/// such as a key loaded into memory.
///
/// A heap keeps each size of block in pages of its own. A worker thread
/// that loads thousands of keys between requests would otherwise leave
/// their blocks strewn over the pages its requests' short-lived blocks
/// come from: mimalloc then walks and collects more pages to find a free
/// block, and every request reaches over more pages for the same few
/// blocks. After traffic over 10,000 keys the public route ran ~960 more
/// instructions a request (BENCHMARKS.md, "The keys' own heap"). Only
/// what lasts should be made inside: a block made and let go of inside
/// leaves a hole the heap seldom fills again (with 90,000 keys loaded:
/// 279 MB parsed inside, 213 MB copied in once parsed, 235 MB with one
/// heap for all). Blocks of either heap are freed by any thread as usual;
/// the allocator's own path is unchanged (nothing is checked per
/// allocation).
pub fn lasting<T>(f: impl FnOnce() -> T) -> T {
    /// Puts the thread's own heap back, also if `f` panics.
    struct Back(*mut c_void);
    impl Drop for Back {
        fn drop(&mut self) {
            // SAFETY: the theap this thread allocated from before.
            unsafe { theap::_mi_theap_default_set(self.0) };
        }
    }
    let heap = lasting_heap();
    if heap.is_null() {
        return f();
    }
    // SAFETY: the heap is live; `mi_heap_theap` gives (making it at first
    // use) its part for the calling thread, which only this thread makes
    // its default, and only until `Back` puts the previous one back.
    let (previous, own) = unsafe { (theap::mi_theap_get_default(), theap::mi_heap_theap(heap)) };
    if previous.is_null() || own.is_null() {
        return f();
    }
    let _back = Back(previous);
    // SAFETY: as above.
    unsafe { theap::_mi_theap_default_set(own) };
    f()
}

/// Whether the block `p` points into came from the keys' heap (see
/// [`lasting`]). `p` must point into a live block of the global allocator
/// (mimalloc in the unit tests, as in the binary).
#[cfg(test)]
pub(crate) fn in_lasting_heap<T>(p: *const T) -> bool {
    // SAFETY: `p` is inside a live mimalloc block (the caller's promise).
    unsafe { theap::mi_heap_of(p.cast()) == lasting_heap() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside `lasting`, `malloc` takes from the keys' heap, and from the
    /// thread's own again after it (also after a panic inside it); either
    /// heap's blocks are freed as any other.
    #[test]
    fn lasting_allocations_come_from_their_own_heap() {
        let lasting_heap = lasting_heap();
        // SAFETY: plain mimalloc blocks, each freed once.
        unsafe {
            let inside = lasting(|| ffi::mi_malloc(48));
            let outside = ffi::mi_malloc(48);
            assert_eq!(theap::mi_heap_of(inside), lasting_heap);
            assert_ne!(theap::mi_heap_of(outside), lasting_heap);
            let nested = lasting(|| lasting(|| ffi::mi_malloc(48)));
            assert_eq!(theap::mi_heap_of(nested), lasting_heap);
            let _ = std::panic::catch_unwind(|| lasting(|| panic!("inside")));
            let after_panic = ffi::mi_malloc(48);
            assert_ne!(theap::mi_heap_of(after_panic), lasting_heap);
            for p in [inside, outside, nested, after_panic] {
                ffi::mi_free(p);
            }
        }
    }

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
