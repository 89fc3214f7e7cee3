//! A bump allocator for the plugin executables.
//!
//! A plugin process lives for one command and exits, so freeing memory along the way
//! buys nothing. Profiles of ADD and DEL showed about a third of the plugins' own
//! instructions in malloc/free, and musl's allocator handing pages back with `munmap`
//! only to fault fresh ones in again. Here allocations are carved from one zeroed
//! static region in order; freeing the newest block (and growing it in place) rolls
//! the cursor back, everything else is left until exit. Requests that do not fit go
//! to the system allocator, so a large GC or a long iptables listing still works.
//!
//! Install it in a binary with
//! `#[global_allocator] static A: ferrolet_cni::arena::Arena = ferrolet_cni::arena::Arena;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Address space reserved in `.bss`; only the pages actually used cost memory.
const SIZE: usize = 8 << 20;

#[repr(C, align(4096))]
struct Space(UnsafeCell<[u8; SIZE]>);

// SAFETY: the bytes are only reached through pointers handed out by `Arena`, and the
// atomic cursor gives every caller a range no other live allocation overlaps.
unsafe impl Sync for Space {}

static SPACE: Space = Space(UnsafeCell::new([0; SIZE]));
/// Offset of the first free byte of `SPACE`.
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn base() -> usize {
    SPACE.0.get() as usize
}

/// The offset of `ptr` inside the arena, or `None` for a system allocation.
fn offset_of(ptr: *mut u8) -> Option<usize> {
    (ptr as usize).checked_sub(base()).filter(|off| *off < SIZE)
}

/// The bump allocator; see the module documentation.
pub struct Arena;

impl Arena {
    /// Carves `layout` out of the arena, or `None` when it does not fit.
    fn bump(layout: Layout) -> Option<*mut u8> {
        let base = base();
        let mut cur = NEXT.load(Ordering::Acquire);
        loop {
            let start = (base + cur).checked_next_multiple_of(layout.align())? - base;
            let end = start.checked_add(layout.size())?;
            if end > SIZE {
                return None;
            }
            match NEXT.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some((base + start) as *mut u8),
                Err(now) => cur = now,
            }
        }
    }
}

// SAFETY: every pointer returned is either a fresh, suitably aligned, non-overlapping
// range of the static arena (the cursor only moves back over a block being freed or
// resized by its owner) or comes from, and goes back to, the system allocator.
unsafe impl GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match Self::bump(layout) {
            Some(p) => p,
            // SAFETY: forwarded with the caller's guarantees about `layout`.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match offset_of(ptr) {
            Some(off) => {
                // Only the newest block can be given back; a failed exchange means a
                // later block exists and this one stays until exit.
                let _ = NEXT.compare_exchange(
                    off + layout.size(),
                    off,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            // SAFETY: `ptr` came from `System.alloc` with this `layout`.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Some(off) = offset_of(ptr) {
            // The newest block grows or shrinks where it is.
            if let Some(new_end) = off.checked_add(new_size).filter(|e| *e <= SIZE)
                && NEXT
                    .compare_exchange(
                        off + layout.size(),
                        new_end,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
            {
                return ptr;
            }
            if new_size <= layout.size() {
                return ptr;
            }
        }
        // SAFETY: the caller guarantees `new_size`, rounded up to `layout.align()`,
        // does not overflow isize, which makes this a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: `new_layout` has a non-zero size because `new_size` is non-zero.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and are
            // distinct allocations, so they do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The arena is process-wide, so the tests below only check properties that hold
    // whatever else the test binary allocates at the same time.

    #[test]
    fn blocks_are_aligned_distinct_and_writable() {
        let a = Layout::from_size_align(24, 8).unwrap();
        let b = Layout::from_size_align(100, 64).unwrap();
        // SAFETY: non-zero sizes; every block is freed with its own layout.
        unsafe {
            let p = Arena.alloc(a);
            let q = Arena.alloc(b);
            assert!(!p.is_null() && !q.is_null());
            assert_eq!(p as usize % 8, 0);
            assert_eq!(q as usize % 64, 0);
            assert!(p as usize + 24 <= q as usize || q as usize + 100 <= p as usize);
            p.write_bytes(0xaa, 24);
            q.write_bytes(0x55, 100);
            assert_eq!(*p.add(23), 0xaa);
            Arena.dealloc(q, b);
            Arena.dealloc(p, a);
        }
    }

    #[test]
    fn realloc_keeps_the_contents() {
        let l = Layout::from_size_align(16, 8).unwrap();
        // SAFETY: non-zero sizes; the final block is freed with its final layout.
        unsafe {
            let p = Arena.alloc(l);
            for i in 0..16u8 {
                *p.add(usize::from(i)) = i;
            }
            let q = Arena.realloc(p, l, 4096);
            assert!(!q.is_null());
            for i in 0..16u8 {
                assert_eq!(*q.add(usize::from(i)), i);
            }
            let r = Arena.realloc(q, Layout::from_size_align(4096, 8).unwrap(), 8);
            assert_eq!(*r.add(7), 7);
            Arena.dealloc(r, Layout::from_size_align(8, 8).unwrap());
        }
    }

    #[test]
    fn requests_larger_than_the_arena_go_to_the_system() {
        let l = Layout::from_size_align(SIZE + 1, 8).unwrap();
        // SAFETY: non-zero size; freed with the same layout.
        unsafe {
            let p = Arena.alloc(l);
            assert!(!p.is_null());
            assert!(offset_of(p).is_none());
            p.add(SIZE).write(1);
            Arena.dealloc(p, l);
        }
    }
}
