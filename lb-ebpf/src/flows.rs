//! The flow table on the BPF side (shared by the datapath and the bench
//! floors): a lockless lookup, and the bucket lock every write holds.
//!
//! Layout and addressing: `lb_common::FlowSlot`, `lb_common::flow_table`.
//! Protocol, the same in the daemon (lb-userspace/src/flows.rs):
//! - A write holds the locks of both buckets of its flow (`FLOW_BUCKET_LOCK`
//!   in a bucket's first slot's `seq`, taken with a compare-and-swap, the
//!   lower bucket first) and bumps the slot's `seq` to odd before it and to
//!   even after it.
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
    intrinsics::{atomic_and, atomic_cxchg, AtomicOrdering},
    ptr::{read_volatile, write_volatile},
    sync::atomic::{compiler_fence, Ordering},
};

use aya_ebpf::maps::Array;
use lb_common::{
    flow_table::{candidate, same_key, FLOW_CANDIDATES},
    FlowSlot, FlowValue, FLOW_BUCKET_LOCK, FLOW_F_CLOSED, FLOW_WAYS,
};

/// Tries at the bucket lock before giving up. A holder writes one slot
/// (tens of ns); the bound only matters if a holder is preempted (the
/// daemon) or the bucket is hammered from every CPU.
const LOCK_TRIES: u32 = 64;

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

/// Looks `words` up in its buckets (`pair`) without the locks.
#[inline(always)]
pub fn find(table: &Array<FlowSlot>, pair: &[u32; 2], words: &[u64; 5]) -> Found {
    for i in 0..FLOW_CANDIDATES {
        let Some(slot) = table.get_ptr_mut(candidate(pair, i)) else {
            continue;
        };
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

/// Takes the lock of the bucket at `first`, in `LOCK_TRIES` tries.
#[inline(always)]
fn lock_one(table: &Array<FlowSlot>, first: u32) -> *mut FlowSlot {
    let Some(head) = table.get_ptr_mut(first) else {
        return core::ptr::null_mut();
    };
    let mut tries = 0;
    while tries < LOCK_TRIES {
        // SAFETY: a valid, 8-byte aligned map value field; every writer
        // changes it atomically or while holding the lock.
        unsafe {
            let seq = read_volatile(&(*head).seq);
            if seq & FLOW_BUCKET_LOCK == 0 {
                let (_, taken) =
                    atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                        &raw mut (*head).seq,
                        seq,
                        seq | FLOW_BUCKET_LOCK,
                    );
                if taken {
                    return head;
                }
            }
        }
        tries += 1;
    }
    core::ptr::null_mut()
}

#[inline(always)]
fn unlock_one(head: *mut FlowSlot) {
    // SAFETY: the caller holds the lock; see `lock_one`.
    unsafe {
        atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*head).seq, !FLOW_BUCKET_LOCK);
    }
}

/// The locks of a flow's buckets, from `lock`: `low` null if not taken;
/// `high` null if both buckets are one.
pub struct Held {
    pub low: *mut FlowSlot,
    high: *mut FlowSlot,
}

/// Takes the locks of both buckets of `pair`, the lower first (two CPUs
/// never wait on each other in a cycle); `Held::low` is null if either
/// stayed taken for `LOCK_TRIES`.
#[inline(always)]
pub fn lock(table: &Array<FlowSlot>, pair: &[u32; 2]) -> Held {
    let (low, high) = if pair[0] <= pair[1] {
        (pair[0], pair[1])
    } else {
        (pair[1], pair[0])
    };
    let none = Held {
        low: core::ptr::null_mut(),
        high: core::ptr::null_mut(),
    };
    let low_head = lock_one(table, low);
    if low_head.is_null() {
        return none;
    }
    if high == low {
        return Held {
            low: low_head,
            high: core::ptr::null_mut(),
        };
    }
    let high_head = lock_one(table, high);
    if high_head.is_null() {
        unlock_one(low_head);
        return none;
    }
    Held {
        low: low_head,
        high: high_head,
    }
}

/// Releases the locks `lock` took (`held.low` not null).
#[inline(always)]
pub fn unlock(held: &Held) {
    if !held.high.is_null() {
        unlock_one(held.high);
    }
    unlock_one(held.low);
}

/// The slot holding `words` in its locked buckets (`pair`).
#[inline(always)]
pub fn find_locked(
    table: &Array<FlowSlot>,
    pair: &[u32; 2],
    words: &[u64; 5],
) -> Option<*mut FlowSlot> {
    for i in 0..FLOW_CANDIDATES {
        let Some(slot) = table.get_ptr_mut(candidate(pair, i)) else {
            continue;
        };
        // SAFETY: a valid map value pointer; the bucket is locked, so no
        // key changes under us.
        if same_key(unsafe { &*key_of(slot) }, words) {
            return Some(slot);
        }
    }
    None
}

/// The slot a new flow takes in its locked buckets (`pair`): an empty one
/// in the emptier bucket, else the closed flow seen longest ago, else the
/// open one seen longest ago. Returns it with a copy of what it held.
#[inline(always)]
pub fn victim(table: &Array<FlowSlot>, pair: &[u32; 2]) -> Option<(*mut FlowSlot, FlowSlot)> {
    let mut used = [0u64; 2];
    for i in 0..FLOW_CANDIDATES {
        let Some(slot) = table.get_ptr_mut(candidate(pair, i)) else {
            continue;
        };
        // SAFETY: a valid map value pointer in a locked bucket.
        let family = u64::from(unsafe { (*slot).key.family });
        // Branch-free (1 if family is not 0): a branch here would give
        // the verifier 2^8 states to walk through the rest of the program.
        used[(i / FLOW_WAYS) as usize] += (family + 255) >> 8;
    }
    let mut best = pair[0];
    let mut best_rank = u64::MAX;
    for i in 0..FLOW_CANDIDATES {
        let index = candidate(pair, i);
        let Some(slot) = table.get_ptr_mut(index) else {
            continue;
        };
        // SAFETY: as above.
        let (family, value) = unsafe { ((*slot).key.family, (*slot).value) };
        // Empty (in the emptier bucket) first, then closed, then open, the
        // older first. (last_seen_ns is CLOCK_MONOTONIC ns: far below 2^62.)
        let rank = if family == 0 {
            used[(i / FLOW_WAYS) as usize]
        } else if value.flags & FLOW_F_CLOSED != 0 {
            (1 << 62) | (value.last_seen_ns >> 2)
        } else {
            (2 << 62) | (value.last_seen_ns >> 2)
        };
        if rank < best_rank {
            best_rank = rank;
            best = index;
        }
    }
    let slot = table.get_ptr_mut(best)?;
    // SAFETY: as above.
    Some((slot, unsafe { *slot }))
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
