//! Hashes shared by the datapath and the host.
//!
//! The flow hash picks a ring slot for a new flow. It must be identical on
//! every LB node (same config, same table, same answer) and cheap in BPF:
//! word-at-a-time multiply/rotate mixing with a final avalanche, no tables and
//! no loops the verifier has to reason about.

use crate::FlowKey;

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

/// Hash of the whole 5-tuple: each connection is scheduled on its own.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(
        h,
        (u32::from(key.src_port_be) << 16) | u32::from(key.dst_port_be),
    );
    h = mix(h, (u32::from(key.proto) << 8) | u32::from(key.family));
    finish(h, 10)
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
        // spread them. 60000 ports into 16 buckets: each within 5% of even.
        let mut buckets = [0u32; 16];
        for port in 1000..61000u16 {
            buckets[(flow_hash(&key(port)) % 16) as usize] += 1;
        }
        for (i, b) in buckets.iter().enumerate() {
            assert!((3562..=3938).contains(b), "bucket {i} has {b} of 60000");
        }
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
        assert_eq!(flow_hash(&key(40000)), 3_726_545_323);
        assert_eq!(bytes_hash64(b"10.200.0.11", 1), 9_687_822_144_928_667_373);
    }
}
