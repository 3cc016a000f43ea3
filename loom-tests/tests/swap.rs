//! A group switch on a thread as a swap of its pocket's two words (`Pocket::swap_words`,
//! through `Stocks::charge_block_slow`): the owner of a pocket whose own word holds one group's
//! bytes and whose far word another's switches back to the far word's group, swapping the two
//! words, their extras and its cells in one owner access, while another thread takes both
//! words (a drain, or a group's removal).
//!
//! A module of the library (see `src/lib.rs`), with `pocket.rs`'s sizes: batch 128, so a
//! pocket holds at most 16 bytes and a refill puts 8 in it; blocks of 8 bytes, padded by 8.
//!
//! The swap is a read of both words and extras and a write of both: done outside the owner's
//! access (no `busy`, no `stop` check), a drain could take a word between the owner's read and
//! its write, and the write would bring back content the drain already drained (usage and
//! counts twice); a drain that skipped the far word would leave the swapped-out word's bytes
//! charged after a flush. Both break the checks below (see the notes of the branch that added
//! this file for the runs).
//!
//! Checked in every interleaving: after a final drain every counter is exact (`usage` equals
//! the live blocks' bytes, `allocs` and `frees` the blocks allocated and freed, `overhead` the
//! live blocks' pads); with a removal, the removed group is empty and reported emptied once,
//! and no pocket names it.

use crate::core::pocket::Pocket;
use crate::core::stock::{key, Key};
use crate::expect::{check, sum, Expect};
use crate::{model, under, World, ROOT};

const BATCH: usize = 128;
const BLOCK: usize = 8;
const PAD: usize = 8;

const R: u32 = 1;
const C: u32 = 2;
const D: u32 = 3;

/// R with children C and D; one pocket. Its owner allocates `x` of C (the stock, then a
/// refill: the pocket's own word holds 8 bytes of C), then `d` of D (the stock, then the
/// refill for D, which moves C's word to the far word and puts 8 of D's bytes in the own
/// word). Both padded.
fn setup() -> (World, &'static Pocket) {
    let w = World::new(&[ROOT, under(R), under(R)], BATCH);
    let p = w.pocket();
    let (c, d) = (key(C, false), key(D, false));
    assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(c));
    assert_eq!(w.pocket_alloc(0, p, D, false, BLOCK, PAD), Some(d));
    assert!(
        w.stocks.pocket_holds(p, d) && w.stocks.pocket_far_holds(p, c),
        "the switch to D kept C's word in the far word"
    );
    (w, p)
}

/// The owner switches back to C: it allocates `y` of C (padded), which the swap serves
/// (C's word back in the own word, D's in the far word), then frees `y` (into the own word)
/// and `d` (into the far word). Thread B drains every stock and pocket meanwhile, racing the
/// swap, the charge from the swapped-in word and both frees.
#[test]
fn swap_races_drain() {
    model(2, || {
        let (w, p) = setup();
        let (c, d) = (key(C, false), key(D, false));
        let a = loom::thread::spawn(move || {
            assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(c));
            w.pocket_free(0, p, c, BLOCK, PAD);
            w.pocket_free(0, p, d, BLOCK, PAD);
        });
        let b = loom::thread::spawn(move || w.stocks.drain(|_| true));
        a.join().unwrap();
        b.join().unwrap();
        w.flush();
        let ce = Expect {
            usage: BLOCK,
            allocs: 2,
            frees: 1,
            overhead: PAD as isize,
            refused: 0,
        };
        let de = Expect {
            allocs: 1,
            frees: 1,
            ..Expect::default()
        };
        check(&w, C, ce);
        check(&w, D, de);
        check(&w, R, sum(ce, de));
    });
}

/// `Group::remove`'s part in the core.
fn remove(w: World, id: u32) {
    assert!(w.counter(id).set_offline(), "removed twice");
    w.stocks.drain_group(id);
}

/// D's word sits in the far word (the owner freed `d` into its own word, then switched back to
/// C with `y`, a swap) when thread B removes D, while the owner switches to D again: it
/// allocates `z` (the swap, if the far word still holds D; else the stock path, which sends a
/// removed group's block to R) and frees it. The removal must take D's word wherever the swap
/// left it: no pocket names D afterwards, D is empty and reported emptied once.
#[test]
fn removal_of_far_word_group_races_swap() {
    model(2, || {
        let (w, p) = setup();
        let (c, d) = (key(C, false), key(D, false));
        w.pocket_free(0, p, d, BLOCK, PAD);
        assert_eq!(w.pocket_alloc(0, p, C, false, BLOCK, PAD), Some(c));
        assert!(w.stocks.pocket_far_holds(p, d), "the swap put D's word far");
        let a = loom::thread::spawn(move || {
            let z: Key = w.pocket_alloc(0, p, D, false, BLOCK, 0).expect("no limit");
            w.pocket_free(0, p, z, BLOCK, 0);
            z
        });
        let b = loom::thread::spawn(move || remove(w, D));
        let z = a.join().unwrap();
        b.join().unwrap();
        assert!(
            z == d || z == key(R, false),
            "z charged to D or, once D is removed, to R"
        );
        assert!(!w.pocket_names(D), "a pocket still names removed group D");
        assert_eq!(
            w.snap(D).usage,
            0,
            "D's freed bytes are still charged to it"
        );
        assert_eq!(w.emptied(D), 1, "D was not reported emptied once");
        w.flush();
        let ce = Expect {
            usage: 2 * BLOCK,
            allocs: 2,
            frees: 0,
            overhead: 2 * PAD as isize,
            refused: 0,
        };
        let in_d = (z == d) as u64;
        let de = Expect {
            allocs: 1 + in_d,
            frees: 1 + in_d,
            ..Expect::default()
        };
        check(&w, C, ce);
        check(&w, D, de);
        let re = sum(ce, de);
        check(
            &w,
            R,
            Expect {
                allocs: re.allocs + 1 - in_d,
                frees: re.frees + 1 - in_d,
                ..re
            },
        );
    });
}
