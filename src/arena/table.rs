//! A heap's group heaps by key: an open-addressing table mapped directly (never through the
//! global allocator), only touched by the heap's owner under its lock or by a thread that
//! stopped it.

use core::cell::Cell;
use core::ptr::null_mut;

use crate::core::stock::Key;
use crate::platform;
use crate::sync::{AtomicUsize, Ordering};

/// Bytes mapped for the heaps' key tables.
pub(super) static TABLE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Records (a heap's group heaps) by key: open addressing, mapped directly (never through the
/// global allocator). Only touched under its heap's lock, through a `super::types::Locked`,
/// so changes go through shared references (cells; the entries are in mapped memory of their
/// own, written through the raw pointer).
pub(super) struct KeyTable<T> {
    entries: Cell<*mut Entry<T>>,
    cap: Cell<usize>,
    len: Cell<usize>,
    tombs: Cell<usize>,
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
            entries: Cell::new(null_mut()),
            cap: Cell::new(0),
            len: Cell::new(0),
            tombs: Cell::new(0),
        }
    }

    fn slot(&self, key: Key) -> usize {
        (key.wrapping_mul(0x9e37_79b1) as usize) & (self.cap.get() - 1)
    }

    /// Entry `i`, copied out.
    ///
    /// # Safety
    /// `i < cap`.
    unsafe fn at(&self, i: usize) -> (Key, *mut T) {
        // SAFETY: per the caller, `i` is inside the mapped entries; no reference to an entry
        // outlives a call.
        unsafe {
            let e = self.entries.get().add(i);
            ((*e).key, (*e).value)
        }
    }

    /// # Safety
    /// `i < cap`.
    unsafe fn set(&self, i: usize, key: Key, value: *mut T) {
        // SAFETY: as in `at`.
        unsafe {
            let e = self.entries.get().add(i);
            (*e).key = key;
            (*e).value = value;
        }
    }

    pub(super) fn find(&self, key: Key) -> *mut T {
        if self.cap.get() == 0 {
            return null_mut();
        }
        let mut i = self.slot(key);
        loop {
            // SAFETY: `i < cap`, and the table always has an empty entry (load below 1/2).
            let (k, v) = unsafe { self.at(i) };
            if k == key {
                return v;
            }
            if k == 0 {
                return null_mut();
            }
            i = (i + 1) & (self.cap.get() - 1);
        }
    }

    /// The live entries, in table order, each read when the walk reaches it: removals meanwhile
    /// are seen (they leave tombstones in place), insertions must not happen (they may grow
    /// the table and move every entry).
    pub(super) fn entries(&self) -> impl Iterator<Item = (Key, *mut T)> + '_ {
        let cap = self.cap.get();
        (0..cap).filter_map(move |i| {
            // A growth meanwhile would be a bug; stop the walk rather than read past the end.
            if self.cap.get() != cap {
                return None;
            }
            // SAFETY: `i < cap`, the current capacity.
            let (k, v) = unsafe { self.at(i) };
            (k != 0 && k != TOMB).then_some((k, v))
        })
    }

    /// The first key satisfying `pred`.
    pub(super) fn first(&self, pred: impl Fn(Key) -> bool) -> Option<Key> {
        self.entries().map(|(k, _)| k).find(|&k| pred(k))
    }

    pub(super) fn insert(&self, key: Key, value: *mut T) -> bool {
        if (self.len.get() + self.tombs.get() + 1) * 2 > self.cap.get() && !self.grow() {
            return false;
        }
        let mut i = self.slot(key);
        loop {
            // SAFETY: `i < cap`.
            let (k, _) = unsafe { self.at(i) };
            if k == 0 || k == TOMB {
                if k == TOMB {
                    self.tombs.set(self.tombs.get() - 1);
                }
                // SAFETY: `i < cap`.
                unsafe { self.set(i, key, value) };
                self.len.set(self.len.get() + 1);
                return true;
            }
            i = (i + 1) & (self.cap.get() - 1);
        }
    }

    pub(super) fn remove(&self, key: Key) {
        if self.cap.get() == 0 {
            return;
        }
        let mut i = self.slot(key);
        loop {
            // SAFETY: `i < cap`.
            let (k, _) = unsafe { self.at(i) };
            if k == key {
                // SAFETY: `i < cap`.
                unsafe { self.set(i, TOMB, null_mut()) };
                self.len.set(self.len.get() - 1);
                self.tombs.set(self.tombs.get() + 1);
                return;
            }
            if k == 0 {
                return;
            }
            i = (i + 1) & (self.cap.get() - 1);
        }
    }

    /// Rehashes into a table twice as large (or as large, if tombstones filled it).
    fn grow(&self) -> bool {
        let old_cap = self.cap.get();
        let cap = if old_cap == 0 {
            256
        } else if self.len.get() * 4 >= old_cap {
            old_cap * 2
        } else {
            old_cap
        };
        let Some(bytes) = cap.checked_mul(core::mem::size_of::<Entry<T>>()) else {
            return false;
        };
        let entries = platform::map(bytes) as *mut Entry<T>;
        if entries.is_null() {
            return false;
        }
        TABLE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        let old = self.entries.replace(entries);
        self.cap.set(cap);
        self.len.set(0);
        self.tombs.set(0);
        for i in 0..old_cap {
            // SAFETY: `i < old_cap`: the old entries, still mapped.
            let (k, v) = unsafe { ((*old.add(i)).key, (*old.add(i)).value) };
            if k != 0 && k != TOMB {
                self.insert(k, v);
            }
        }
        if old_cap != 0 {
            let bytes = old_cap * core::mem::size_of::<Entry<T>>();
            platform::unmap(old.cast(), bytes);
            TABLE_BYTES.fetch_sub(bytes, Ordering::Relaxed);
        }
        true
    }
}
