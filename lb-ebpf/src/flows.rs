//! The flow table on the BPF side (shared by the datapath and the bench
//! floors): a lockless lookup, and the bucket lock every write holds.
//!
//! Layout and addressing: `lb_common::FlowBucket`, `lb_common::flow_table`.
//! A packet looks its two buckets up once (`buckets`); everything after
//! reaches their slots through those two map value pointers.
//! Protocol, the same in the daemon (lb-userspace/src/flows.rs):
//! - A write holds the locks of both buckets of its flow (`FLOW_BUCKET_LOCK`
//!   in a bucket's first slot's `seq`, taken with a compare-and-swap, the
//!   lower bucket first) and bumps the slot's `seq` to odd before it and to
//!   even after it. Here the holder releases a lock with a plain store: no
//!   one else writes a locked first `seq` (a compare-and-swap against it
//!   fails), and a locked instruction costs more than the rest of an
//!   unlock.
//! - A lockless read takes a slot only if `seq` was even and unchanged
//!   across the read. Anything else reads as a miss; a miss leads to the
//!   locked path, where the answer is exact.
//! - The one write without the lock: a packet refreshing `last_seen_ns`
//!   of its own entry (a single 8-byte store; at worst it lands on an entry
//!   that just replaced it, which then looks a little younger).
//!
//! The ordering argument (stores seen in program order, loads not passed
//! by later loads) is x86-64's: BPF has no fences, and this datapath is
//! built and tested for x86-64 only.

use core::{
    intrinsics::{atomic_cxchg, AtomicOrdering},
    ptr::{read_volatile, write_volatile},
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::maps::Array;
use lb_common::{
    flow_table::{lowest_way, same_key, ways_in, FLOW_CANDIDATES},
    FlowBucket, FlowSlot, FlowValue, FLOW_BUCKET_LOCK, FLOW_F_CLOSED, FLOW_WAYS,
};

/// Tries at the bucket lock before giving up. A holder writes one slot
/// (tens of ns); the bound only matters if a holder is preempted (the
/// daemon) or the bucket is hammered from every CPU.
const LOCK_TRIES: u32 = 64;

/// A flow's two buckets (`flow_table::bucket_pair`), as map value
/// pointers; `b[0] == b[1]` when the pair is one bucket twice.
#[derive(Clone, Copy)]
pub struct Buckets {
    b: [*mut FlowBucket; 2],
    /// `b[1]` is the lower bucket index (locked first).
    high_first: bool,
}

/// Looks the flow's buckets (`pair`, from `flow_table::bucket_pair`) up.
#[inline(always)]
pub fn buckets(table: &Array<FlowBucket>, pair: &[u32; 2]) -> Option<Buckets> {
    Some(Buckets {
        b: [table.get_ptr_mut(pair[0])?, table.get_ptr_mut(pair[1])?],
        high_first: pair[1] < pair[0],
    })
}

/// Candidate slot `i` (`0..FLOW_CANDIDATES`; `flow_table::candidate`).
/// With `i` a constant, a constant offset from one of the two pointers.
#[inline(always)]
fn slot(b: &Buckets, i: u32) -> *mut FlowSlot {
    let bucket = if i < FLOW_WAYS { b.b[0] } else { b.b[1] };
    // SAFETY: `i % FLOW_WAYS` is a slot of the bucket, so the pointer stays
    // inside the map value.
    unsafe {
        (&raw mut (*bucket).slots)
            .cast::<FlowSlot>()
            .add((i % FLOW_WAYS) as usize)
    }
}

/// A lockless lookup's answer: `value` as of `seq` (even, lock bit
/// cleared) in `slot`; a null `slot` if no slot holds the key or the one
/// that does was being written. (Not an enum: LLVM spills the payload of
/// the variant without one uninitialised, and the verifier rejects the
/// read.)
#[allow(dead_code, reason = "the bench floors (bench.rs) read `slot` only")]
pub struct Found {
    pub slot: *mut FlowSlot,
    pub seq: u64,
    pub value: FlowValue,
}

/// The key's words as stored in the slot.
///
/// # Safety
/// `slot` is a valid map value pointer. `FlowSlot` is 8-byte aligned and
/// its key, at offset 8, is 40 bytes of integers.
#[inline(always)]
unsafe fn key_of(slot: *mut FlowSlot) -> *mut [u64; 5] {
    // SAFETY: the caller's.
    unsafe { (&raw mut (*slot).key).cast::<[u64; 5]>() }
}

/// `seq` without the bucket lock bit.
///
/// # Safety
/// `slot` is a valid map value pointer.
#[inline(always)]
pub unsafe fn seq_of(slot: *mut FlowSlot) -> u64 {
    // SAFETY: the caller's.
    unsafe { read_volatile(&(*slot).seq) & !FLOW_BUCKET_LOCK }
}

/// Looks `words` up in its buckets without the locks.
#[inline(always)]
pub fn find(b: &Buckets, words: &[u64; 5]) -> Found {
    for i in 0..FLOW_CANDIDATES {
        let slot = slot(b, i);
        // SAFETY: a valid map value pointer; see the module comment for
        // why an even, unchanged seq means the copy is whole.
        unsafe {
            let before = seq_of(slot);
            compiler_fence(Ordering::SeqCst);
            if before & 1 != 0 || !same_key(&*key_of(slot), words) {
                continue;
            }
            let value = (*slot).value;
            compiler_fence(Ordering::SeqCst);
            if seq_of(slot) != before {
                continue;
            }
            return Found {
                slot,
                seq: before,
                value,
            };
        }
    }
    Found {
        slot: core::ptr::null_mut(),
        seq: 0,
        value: FlowValue::default(),
    }
}

/// A bucket's ways as bits of `victim`'s empty mask.
const WAYS_MASK: u64 = (1 << FLOW_WAYS) - 1;

/// Takes the lock of `bucket` (in its first slot's `seq`), in
/// `LOCK_TRIES` tries.
#[inline(always)]
fn lock_one(bucket: *mut FlowBucket) -> bool {
    // SAFETY: a valid map value pointer; its first slot's seq is 8-byte
    // aligned, and every writer changes it atomically or while holding the
    // lock.
    let head = unsafe { &raw mut (*bucket).slots[0].seq };
    let mut tries = 0;
    while tries < LOCK_TRIES {
        // SAFETY: as above.
        unsafe {
            let seq = read_volatile(head);
            if seq & FLOW_BUCKET_LOCK == 0 {
                let (_, taken) = atomic_cxchg::<
                    u64,
                    { AtomicOrdering::SeqCst },
                    { AtomicOrdering::SeqCst },
                >(head, seq, seq | FLOW_BUCKET_LOCK);
                if taken {
                    return true;
                }
            }
        }
        tries += 1;
    }
    false
}

#[inline(always)]
fn unlock_one(bucket: *mut FlowBucket) {
    // SAFETY: the caller holds the lock, so only this CPU writes the head
    // (see the module comment); the fence keeps the slot writes before the
    // releasing store, which x86-64 then makes visible after them.
    unsafe {
        let head = &raw mut (*bucket).slots[0].seq;
        let seq = read_volatile(head);
        compiler_fence(Ordering::SeqCst);
        write_volatile(head, seq & !FLOW_BUCKET_LOCK);
    }
}

/// Takes the locks of both buckets, the lower index first (two CPUs never
/// wait on each other in a cycle); false if either stayed taken for
/// `LOCK_TRIES` (then neither is held).
#[inline(always)]
pub fn lock(b: &Buckets) -> bool {
    let (first, second) = if b.high_first {
        (b.b[1], b.b[0])
    } else {
        (b.b[0], b.b[1])
    };
    if !lock_one(first) {
        return false;
    }
    if second == first {
        return true;
    }
    if !lock_one(second) {
        unlock_one(first);
        return false;
    }
    true
}

/// Releases the locks `lock` took (it returned true).
#[inline(always)]
pub fn unlock(b: &Buckets) {
    if b.b[1] != b.b[0] {
        unlock_one(b.b[1]);
    }
    unlock_one(b.b[0]);
}

/// The slot holding `words` in its locked buckets.
#[inline(always)]
pub fn find_locked(b: &Buckets, words: &[u64; 5]) -> Option<*mut FlowSlot> {
    for i in 0..FLOW_CANDIDATES {
        let slot = slot(b, i);
        // SAFETY: a valid map value pointer; the bucket is locked, so no
        // key changes under us.
        if same_key(unsafe { &*key_of(slot) }, words) {
            return Some(slot);
        }
    }
    None
}

/// The slot a new flow takes in its locked buckets: an empty one in the
/// emptier bucket (the first bucket on a tie), else the closed flow seen
/// longest ago, else the open one seen longest ago. Returns it with a copy
/// of what it held.
///
/// The empty slots are found without a branch (a branch per slot would
/// give the verifier 2^8 states to walk through the rest of the program),
/// and flows are ranked only when there is none: then a new flow pushes
/// one out, which a table sized for its load does about once in 10^4.
#[inline(always)]
pub fn victim(b: &Buckets) -> (*mut FlowSlot, FlowSlot) {
    // Bit i: candidate i is empty (family 0). One byte load per slot.
    let mut empty = 0u64;
    for i in 0..FLOW_CANDIDATES {
        // SAFETY: a valid map value pointer in a locked bucket.
        let family = u64::from(unsafe { read_volatile(&(*slot(b, i)).key.family) });
        // (family + 255) >> 8: 1 if the family is not 0.
        empty |= (((family + 255) >> 8) ^ 1) << i;
    }
    let best = if empty != 0 {
        let first = empty & WAYS_MASK;
        let second = empty >> FLOW_WAYS;
        let (ways, base) = if ways_in(second) > ways_in(first) {
            (second, FLOW_WAYS)
        } else {
            (first, 0)
        };
        // The chosen bucket has an empty way.
        base + lowest_way(ways)
    } else {
        // Closed before open, then the older first: bit 63 is set for an
        // open flow, the bits below it are last_seen_ns halved.
        let mut best = 0;
        let mut best_rank = u64::MAX;
        for i in 0..FLOW_CANDIDATES {
            // SAFETY: as above.
            let value = unsafe { (*slot(b, i)).value };
            let closed = (u64::from(value.flags) >> FLOW_F_CLOSED.trailing_zeros()) & 1;
            let rank = ((closed ^ 1) << 63) | (value.last_seen_ns >> 1);
            if rank < best_rank {
                best_rank = rank;
                best = i;
            }
        }
        best
    };
    // Masked: a bounded offset into one bucket, for the verifier.
    let slot = slot(b, best & (FLOW_CANDIDATES - 1));
    // SAFETY: as above.
    (slot, unsafe { *slot })
}

/// Writes `words` and `value` into a slot of a locked bucket.
///
/// # Safety
/// `slot` is a valid map value pointer in a bucket this CPU has locked.
#[inline(always)]
pub unsafe fn write(slot: *mut FlowSlot, words: &[u64; 5], value: &FlowValue) {
    // SAFETY: the caller's; only the lock holder writes seq, so a plain
    // read-then-store is exact.
    unsafe {
        let seq = read_volatile(&(*slot).seq);
        write_volatile(&raw mut (*slot).seq, seq + 1);
        compiler_fence(Ordering::SeqCst);
        *key_of(slot) = *words;
        (*slot).value = *value;
        compiler_fence(Ordering::SeqCst);
        write_volatile(&raw mut (*slot).seq, seq + 2);
    }
}
