//! Addressing in the flow table (`XLB_FLOWS`), shared by the datapath and
//! the daemon: which bucket a 5-tuple lives in, and the key as the five
//! words a slot compares.
//!
//! The table is an array of `FlowBucket`s of `FLOW_WAYS` slots, not a
//! kernel hash map: a lookup is a few multiplies and two inlined array
//! reads (one per bucket: the program reaches a bucket's slots through one
//! map value pointer), with no helper call (see docs/benchmarks.md for
//! what that saves).
//!
//! Each flow has two candidate buckets and a new one goes to the emptier
//! ("two choices"), and the table has `FLOW_SLOTS_PER_FLOW` slots per flow
//! of `flow_table_size`: at that many flows it is half full, and a new
//! flow finds both its buckets full (and evicts) about once in 10^4.

use crate::{FlowKey, FLOW_WAYS};

/// Slots the table has per flow of `flow_table_size`.
pub const FLOW_SLOTS_PER_FLOW: u32 = 2;
/// Candidate slots of a flow: `FLOW_WAYS` in each of its two buckets.
pub const FLOW_CANDIDATES: u32 = 2 * FLOW_WAYS;

// `key_words` is the key's memory layout read as little-endian words.
#[cfg(not(target_endian = "little"))]
compile_error!("the flow table's key words assume a little-endian machine");

/// The key as the five 64-bit words of its memory layout, built from its
/// fields. The datapath builds the same words straight from the packet
/// (an address's bytes read as one little-endian word, `ports_word`) and
/// turns them back into fields only where it needs them (`key_of_words`).
#[inline(always)]
pub fn key_words(k: &FlowKey) -> [u64; 5] {
    #[inline(always)]
    fn pair(lo: u32, hi: u32) -> u64 {
        u64::from(lo) | (u64::from(hi) << 32)
    }
    [
        pair(k.src[0], k.src[1]),
        pair(k.src[2], k.src[3]),
        pair(k.dst[0], k.dst[1]),
        pair(k.dst[2], k.dst[3]),
        ports_word(k.src_port_be, k.dst_port_be, k.proto, k.family)
            | (u64::from(k._pad[0]) << 48)
            | (u64::from(k._pad[1]) << 56),
    ]
}

/// Key word 4 (`key_words`) of a key with these fields (and zero padding).
#[inline(always)]
pub fn ports_word(src_port_be: u16, dst_port_be: u16, proto: u8, family: u8) -> u64 {
    u64::from(src_port_be)
        | (u64::from(dst_port_be) << 16)
        | (u64::from(proto) << 32)
        | (u64::from(family) << 40)
}

/// The key whose `key_words` are `w`.
#[inline(always)]
pub fn key_of_words(w: &[u64; 5]) -> FlowKey {
    FlowKey {
        src: [
            w[0] as u32,
            (w[0] >> 32) as u32,
            w[1] as u32,
            (w[1] >> 32) as u32,
        ],
        dst: [
            w[2] as u32,
            (w[2] >> 32) as u32,
            w[3] as u32,
            (w[3] >> 32) as u32,
        ],
        src_port_be: w[4] as u16,
        dst_port_be: (w[4] >> 16) as u16,
        proto: (w[4] >> 32) as u8,
        family: (w[4] >> 40) as u8,
        _pad: [(w[4] >> 48) as u8, (w[4] >> 56) as u8],
    }
}

/// Whether two keys as five words (`key_words`, or the datapath's VIP key
/// words) are equal: one branch, no memcmp.
#[inline(always)]
pub fn same_key(a: &[u64; 5], b: &[u64; 5]) -> bool {
    ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4])) == 0
}

/// Bucket hash: four 64-bit multiplies; each half picks one bucket, and
/// `hash::flow_hash_of` takes a new flow's ring slot from it. Fixed across
/// builds: a restarted daemon adopts the table its predecessor filled (a
/// changed hash would look every flow up in the wrong buckets), and nodes
/// of one VIP must place new flows alike.
#[inline(always)]
pub fn slot_hash(w: &[u64; 5]) -> u64 {
    let mut h = (w[0] ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ w[1] ^ w[2].rotate_left(17)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h = (h ^ w[3] ^ w[4].rotate_left(29)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    // The halves pick independent buckets only after a full final mix.
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

// `ways_in` and `lowest_way` read a bucket's ways as 4 bits.
const _: () = assert!(FLOW_WAYS == 4);

/// How many ways a bucket's way mask (bit w: way w, `FLOW_WAYS` bits)
/// has set: a popcount by a 16-entry table of 4-bit counts held in one
/// constant (BPF has no popcount instruction).
#[inline(always)]
pub fn ways_in(mask: u64) -> u64 {
    const COUNTS: u64 = 0x4332_3221_3221_2110;
    (COUNTS >> ((mask & 0xf) * 4)) & 0xf
}

/// The lowest way set in a non-zero way mask, without a branch: the
/// lowest set bit (1, 2, 4 or 8) to its index (0 to 3).
#[inline(always)]
pub fn lowest_way(mask: u64) -> u32 {
    let low = mask & mask.wrapping_neg();
    ((low >> 1) - (low >> 3)) as u32
}

/// The bucket of `hash` in a table of `buckets` buckets (any count: a
/// multiply and a shift, no division).
#[inline(always)]
fn bucket_of(hash: u32, buckets: u32) -> u32 {
    ((u64::from(hash) * u64::from(buckets)) >> 32) as u32
}

/// The flow's two buckets (the same bucket twice, rarely).
#[inline(always)]
pub fn bucket_pair(hash: u64, buckets: u32) -> [u32; 2] {
    [
        bucket_of(hash as u32, buckets),
        bucket_of((hash >> 32) as u32, buckets),
    ]
}

/// The two buckets of flow `key` in a table of `buckets` buckets, as the
/// datapath finds them (from the words it reads off the packet).
#[inline(always)]
pub fn key_buckets(key: &FlowKey, buckets: u32) -> [u32; 2] {
    bucket_pair(slot_hash(&key_words(key)), buckets)
}

/// Candidate `i` (`0..FLOW_CANDIDATES`) of a flow in `pair`: bucket
/// `pair[i / FLOW_WAYS]`, way `i % FLOW_WAYS`.
#[inline(always)]
pub fn candidate(pair: &[u32; 2], i: u32) -> (u32, u32) {
    if i < FLOW_WAYS {
        (pair[0], i)
    } else {
        (pair[1], i - FLOW_WAYS)
    }
}

/// Buckets (`XLB_FLOWS` entries) of the table for `flow_table_size`
/// flows: `FLOW_SLOTS_PER_FLOW` slots per flow.
pub const fn buckets_for(flow_table_size: u32) -> u32 {
    flow_table_size.saturating_mul(FLOW_SLOTS_PER_FLOW) / FLOW_WAYS
}

/// Slots of the table for `flow_table_size` flows.
pub const fn slots_for(flow_table_size: u32) -> u32 {
    buckets_for(flow_table_size) * FLOW_WAYS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6, PROTO_TCP};

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src.to_be(), 0, 0, 0],
            dst: [0x0ac8_6401u32.to_be(), 0, 0, 0],
            src_port_be: sport.to_be(),
            dst_port_be: 8080u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn key_words_are_the_key_bytes() {
        let mut k = key(0x0ac8_0001, 40000);
        k.family = FAMILY_V6;
        k.src = [1, 2, 3, 4];
        k.dst = [5, 6, 7, 8];
        // SAFETY: FlowKey is 40 bytes of integers without implicit padding.
        let bytes: [u64; 5] = unsafe { core::mem::transmute(k) };
        assert_eq!(key_words(&k), bytes);
        assert!(same_key(&key_words(&k), &bytes));
        assert!(!same_key(&key_words(&key(1, 2)), &key_words(&key(1, 3))));
    }

    #[test]
    fn way_masks_count_and_find_their_ways() {
        for mask in 0..16u64 {
            assert_eq!(ways_in(mask), u64::from(mask.count_ones()), "{mask:#06b}");
            if mask != 0 {
                assert_eq!(lowest_way(mask), mask.trailing_zeros(), "{mask:#06b}");
            }
        }
    }

    #[test]
    fn key_of_words_inverts_key_words() {
        let mut v6 = key(0x0ac8_0001, 40000);
        v6.family = FAMILY_V6;
        v6.src = [0x0000_00fd, 0x1200_0000, 0x3400_0000, 0x0100_0000];
        v6.dst = [0x0000_00fd, 0x1200_0000, 0x3400_0000, 0x0200_0000];
        for k in [key(0x0ac8_0001, 40000), key(u32::MAX, u16::MAX), v6] {
            assert_eq!(key_of_words(&key_words(&k)), k);
            let w = key_words(&k);
            assert_eq!(
                w[4],
                ports_word(k.src_port_be, k.dst_port_be, k.proto, k.family)
            );
        }
    }

    #[test]
    fn buckets_stay_in_range() {
        for buckets in [1, 3, 256, 250_000, 25_000_000] {
            for h in [0, 1, u32::MAX / 2, u32::MAX] {
                assert!(bucket_of(h, buckets) < buckets, "{h} of {buckets}");
            }
        }
    }

    /// Sequential ports of one client, and sequential clients on one port,
    /// spread over 1024 buckets at least as evenly as random placement
    /// would (64 a bucket, standard deviation 8; chi-square 1023 +- 45).
    #[test]
    fn sequential_flows_spread_evenly() {
        for flows in [
            (0..65536u32)
                .map(|p| key(0x0ac8_0001, p as u16))
                .collect::<Vec<_>>(),
            (0..65536u32).map(|a| key(0x0ac8_0000 + a, 40000)).collect(),
        ] {
            let mut n = [0u32; 1024];
            for k in &flows {
                let [a, _] = key_buckets(k, 1024);
                n[a as usize] += 1;
            }
            let (min, max) = (n.iter().min().unwrap(), n.iter().max().unwrap());
            let chi2: f64 = n
                .iter()
                .map(|&c| (f64::from(c) - 64.0).powi(2) / 64.0)
                .sum();
            assert!(
                *min >= 28 && *max <= 100 && chi2 < 1300.0,
                "buckets hold {min}..={max} flows, chi-square {chi2}"
            );
        }
    }

    #[test]
    fn the_two_buckets_are_independent() {
        // Flows sharing their first bucket spread over second buckets.
        let mut seconds = std::collections::HashSet::new();
        let mut sharing = 0;
        for p in 0..65536u32 {
            let [a, b] = key_buckets(&key(0x0ac8_0001, p as u16), 1024);
            if a == 0 {
                sharing += 1;
                seconds.insert(b);
            }
        }
        assert!(
            sharing > 30 && seconds.len() * 10 >= sharing * 9,
            "{sharing} {seconds:?}"
        );
    }

    #[test]
    fn slot_hash_is_fixed_across_builds() {
        // A change here makes a restarted daemon miss every adopted flow.
        assert_eq!(
            slot_hash(&key_words(&key(0x0ac8_0001, 40000))),
            8_159_497_897_332_927_427
        );
    }
}
