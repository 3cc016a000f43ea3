//! A heap's group heaps by key: an open-addressing table mapped directly (never through the
//! global allocator), only touched by the heap's owner under its lock or by a thread that
//! stopped it.

use core::ptr::null_mut;

use crate::core::stock::Key;
use crate::platform;
use crate::sync::{AtomicUsize, Ordering};

/// Bytes mapped for the heaps' key tables.
pub(super) static TABLE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Records (a heap's group heaps) by key: open addressing, mapped directly (never through the
/// global allocator). Only touched by the owner under its lock, or by a thread that stopped it.
pub(super) struct KeyTable<T> {
    pub(super) entries: *mut Entry<T>,
    pub(super) cap: usize,
    pub(super) len: usize,
    pub(super) tombs: usize,
}

#[repr(C)]
pub(super) struct Entry<T> {
    pub(super) key: Key,
    pub(super) value: *mut T,
}

/// A removed entry (no key is `u32::MAX`: ids stop at 2^20).
pub(super) const TOMB: Key = u32::MAX;

impl<T> KeyTable<T> {
    pub(super) const fn new() -> KeyTable<T> {
        KeyTable {
            entries: null_mut(),
            cap: 0,
            len: 0,
            tombs: 0,
        }
    }

    pub(super) fn slot(&self, key: Key) -> usize {
        (key.wrapping_mul(0x9e37_79b1) as usize) & (self.cap - 1)
    }

    pub(super) fn find(&self, key: Key) -> *mut T {
        if self.cap == 0 {
            return null_mut();
        }
        let mut i = self.slot(key);
        loop {
            // SAFETY: `i < cap`, and the table always has an empty entry (load below 1/2).
            let e = unsafe { &*self.entries.add(i) };
            if e.key == key {
                return e.value;
            }
            if e.key == 0 {
                return null_mut();
            }
            i = (i + 1) & (self.cap - 1);
        }
    }

    /// The group heap of the first key satisfying `pred`, or null.
    pub(super) fn first(&self, pred: impl Fn(Key) -> bool) -> *mut T {
        (0..self.cap)
            .find_map(|i| {
                // SAFETY: `i < cap`.
                let e = unsafe { &*self.entries.add(i) };
                (e.key != 0 && e.key != TOMB && pred(e.key)).then_some(e.value)
            })
            .unwrap_or(null_mut())
    }

    pub(super) fn insert(&mut self, key: Key, value: *mut T) -> bool {
        if (self.len + self.tombs + 1) * 2 > self.cap && !self.grow() {
            return false;
        }
        let mut i = self.slot(key);
        loop {
            // SAFETY: `i < cap`.
            let e = unsafe { &mut *self.entries.add(i) };
            if e.key == 0 || e.key == TOMB {
                if e.key == TOMB {
                    self.tombs -= 1;
                }
                e.key = key;
                e.value = value;
                self.len += 1;
                return true;
            }
            i = (i + 1) & (self.cap - 1);
        }
    }

    pub(super) fn remove(&mut self, key: Key) {
        if self.cap == 0 {
            return;
        }
        let mut i = self.slot(key);
        loop {
            // SAFETY: `i < cap`.
            let e = unsafe { &mut *self.entries.add(i) };
            if e.key == key {
                e.key = TOMB;
                e.value = null_mut();
                self.len -= 1;
                self.tombs += 1;
                return;
            }
            if e.key == 0 {
                return;
            }
            i = (i + 1) & (self.cap - 1);
        }
    }

    /// Rehashes into a table twice as large (or as large, if tombstones filled it).
    pub(super) fn grow(&mut self) -> bool {
        let cap = if self.cap == 0 {
            256
        } else if self.len * 4 >= self.cap {
            self.cap * 2
        } else {
            self.cap
        };
        let Some(bytes) = cap.checked_mul(core::mem::size_of::<Entry<T>>()) else {
            return false;
        };
        let entries = platform::map(bytes) as *mut Entry<T>;
        if entries.is_null() {
            return false;
        }
        TABLE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        let old = core::mem::replace(
            self,
            KeyTable {
                entries,
                cap,
                len: 0,
                tombs: 0,
            },
        );
        for i in 0..old.cap {
            // SAFETY: `i < old.cap`.
            let e = unsafe { &*old.entries.add(i) };
            if e.key != 0 && e.key != TOMB {
                self.insert(e.key, e.value);
            }
        }
        if old.cap != 0 {
            let bytes = old.cap * core::mem::size_of::<Entry<T>>();
            platform::unmap(old.entries.cast(), bytes);
            TABLE_BYTES.fetch_sub(bytes, Ordering::Relaxed);
        }
        true
    }
}
