//! Hashes shared by the datapath and the host.
//!
//! The flow hash picks a ring slot for a new flow. It must be identical on
//! every LB node (same config, same table, same answer) and cheap in BPF:
//! the flow hash is the flow table's slot hash, which the datapath computes
//! anyway; the client hash is word-at-a-time multiply/rotate mixing with a
//! final avalanche. No tables and no loops the verifier has to reason about.

use crate::{
    flow_table::{key_words, slot_hash},
    FlowKey,
};

const SEED: u32 = 0x9e37_79b9;

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len_words: u32) -> u32 {
    h ^= len_words * 4;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The ring hash of a flow whose `flow_table::slot_hash` (over
/// `flow_table::key_words`) is `slot_hash`: each connection is scheduled
/// on its own. The datapath has that hash already (it found the flow's
/// table buckets with it), so a new flow pays no second hash over its
/// 40-byte key. `ring_slot` reads mostly the top bits of the value: here
/// the low 16 bits of the slot hash, which the bucket choice (the top
/// bits of each half) does not read in tables of up to 2^16 buckets, so
/// flows that share a bucket spread over the whole ring. In larger tables
/// the two share a few bits (3 at the default 500,000 buckets) and flows
/// that share a bucket land in a part of the ring; no backend's share of
/// all flows changes.
#[inline(always)]
pub fn flow_hash_of(slot_hash: u64) -> u32 {
    slot_hash.rotate_left(16) as u32
}

/// Hash of the whole 5-tuple (`flow_hash_of` its slot hash).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    flow_hash_of(slot_hash(&key_words(key)))
}

/// The slot of `hash` in a ring of `ring_size` slots: a multiply and a
/// shift (uniform like `hash % ring_size` within one part in 2^16 at the
/// default 65537 slots, without a division).
#[inline(always)]
pub fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    ((u64::from(hash) * u64::from(ring_size)) >> 32) as u32
}

/// Hash of the client address only (`affinity: client-ip`): every connection
/// of one client lands on the same ring slot.
#[inline(always)]
pub fn client_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, u32::from(key.family));
    finish(h, 5)
}

/// 64-bit FNV-1a over bytes followed by a 64-bit avalanche. Used on the host
/// for Maglev permutations, where the input is a backend's identity.
pub const fn bytes_hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src_port: u16) -> FlowKey {
        FlowKey {
            src: [0x0100_c80a, 0, 0, 0],
            dst: [0x0164_c80a, 0, 0, 0],
            src_port_be: src_port.to_be(),
            dst_port_be: 8080u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn flow_hash_spreads_sequential_ports_evenly() {
        // Clients allocate ephemeral ports sequentially; the hash must still
        // spread them over the ring. 60000 ports into 16 slots: each within
        // 5% of even.
        let mut slots = [0u32; 16];
        for port in 1000..61000u16 {
            slots[ring_slot(flow_hash(&key(port)), 16) as usize] += 1;
        }
        for (i, n) in slots.iter().enumerate() {
            assert!((3562..=3938).contains(n), "slot {i} has {n} of 60000");
        }
    }

    #[test]
    fn ring_slot_is_in_range_and_even() {
        for size in [1, 2, 16, 65_537, crate::MAX_RING_SIZE] {
            for h in [0, 1, u32::MAX / 2, u32::MAX] {
                assert!(ring_slot(h, size) < size, "{h} in {size}");
            }
        }
        // Slot s of n begins at hash ceil(s * 2^32 / n): every slot of
        // 65537 gets 65535 or 65536 of the 2^32 hashes, as with `%`.
        let n = 65_537u64;
        let first = |s: u64| ((s << 32).div_ceil(n)) as u32;
        for s in [1u64, 2, 1000, 32_768, 65_535, 65_536] {
            let (lo, hi) = (first(s), if s + 1 < n { first(s + 1) } else { 0 });
            assert_eq!(u64::from(ring_slot(lo, n as u32)), s);
            assert_eq!(u64::from(ring_slot(lo - 1, n as u32)), s - 1);
            if hi != 0 {
                assert!(
                    (65_535..=65_536).contains(&(hi - lo)),
                    "slot {s}: {}",
                    hi - lo
                );
            }
        }
    }

    #[test]
    fn flows_sharing_a_bucket_spread_over_the_ring() {
        // The ring slot and the bucket come from one hash: flows that share
        // their first bucket must not share their ring slots too.
        let mut slots = std::collections::HashSet::new();
        let mut sharing = 0;
        for port in 0..=u16::MAX {
            let h = slot_hash(&key_words(&key(port)));
            if crate::flow_table::bucket_pair(h, 1024)[0] == 0 {
                sharing += 1;
                slots.insert(ring_slot(flow_hash_of(h), 65_537));
            }
        }
        assert!(
            sharing > 30 && slots.len() * 10 >= sharing * 9,
            "{sharing} {slots:?}"
        );
    }

    #[test]
    fn client_hash_ignores_ports() {
        assert_eq!(client_hash(&key(1)), client_hash(&key(2)));
        assert_ne!(flow_hash(&key(1)), flow_hash(&key(2)));
    }

    #[test]
    fn hashes_are_fixed_across_builds() {
        // LB nodes running different builds must agree; a change here is a
        // change of every flow's backend and needs a release note.
        assert_eq!(flow_hash(&key(40000)), 1_807_970_620);
        assert_eq!(bytes_hash64(b"10.200.0.11", 1), 9_687_822_144_928_667_373);
    }
}
