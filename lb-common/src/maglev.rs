//! Weighted Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! Each backend walks its own permutation of the ring slots and claims the
//! next free one on its turn. Weights decide how often a backend gets a turn:
//! every round each backend adds its weight to a credit, and takes a turn
//! each time the credit reaches the largest weight. Over a full table that
//! gives slot shares proportional to weight, within a slot or two.
//!
//! The table depends only on the set of (identity, weight, id) and the size:
//! backends are sorted by identity first, so two LB nodes given the same
//! configuration in any order build byte-identical tables.

use crate::{hash::bytes_hash64, EMPTY_SLOT};

/// A backend as Maglev sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Stable identity (e.g. the address as text): decides the permutation,
    /// so a backend keeps its slots across rebuilds.
    pub identity: Vec<u8>,
    pub weight: u32,
    /// The value stored in the table for this backend.
    pub id: u32,
}

/// Why a table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("ring size {0} is not a prime >= 3")]
    SizeNotPrime(u32),
    #[error("backend identity {0} appears twice")]
    DuplicateIdentity(String),
    #[error("backend id u32::MAX is reserved")]
    ReservedId,
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while u64::from(d) * u64::from(d) <= u64::from(n) {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds the lookup table: `size` slots, each a member id, or `EMPTY_SLOT`
/// everywhere when no member has a non-zero weight.
pub fn build(members: &[Member], size: u32) -> Result<Vec<u32>, TableError> {
    if size < 3 || !is_prime(size) {
        return Err(TableError::SizeNotPrime(size));
    }
    let mut live: Vec<&Member> = members.iter().filter(|m| m.weight > 0).collect();
    live.sort_by(|a, b| a.identity.cmp(&b.identity));
    if let Some(w) = live.windows(2).find(|w| w[0].identity == w[1].identity) {
        return Err(TableError::DuplicateIdentity(
            String::from_utf8_lossy(&w[0].identity).into_owned(),
        ));
    }
    if live.iter().any(|m| m.id == EMPTY_SLOT) {
        return Err(TableError::ReservedId);
    }
    let mut table = vec![EMPTY_SLOT; size as usize];
    if live.is_empty() {
        return Ok(table);
    }

    let m = u64::from(size);
    let offset: Vec<u64> = live
        .iter()
        .map(|b| bytes_hash64(&b.identity, 0) % m)
        .collect();
    let skip: Vec<u64> = live
        .iter()
        .map(|b| bytes_hash64(&b.identity, 0x5bd1_e995) % (m - 1) + 1)
        .collect();
    let max_weight = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut credit = vec![0u64; live.len()];
    let mut next = vec![0u64; live.len()];
    let mut filled = 0u64;

    loop {
        for (i, b) in live.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            // `skip` < size and size is prime, so the walk visits every slot
            // before repeating: a free one is always found.
            loop {
                let slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
                next[i] += 1;
                if table[slot] == EMPTY_SLOT {
                    table[slot] = b.id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                return Ok(table);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                identity: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256).into_bytes(),
                weight: weight(i),
                id: i,
            })
            .collect()
    }

    fn shares(table: &[u32], n: u32) -> Vec<f64> {
        let mut counts = vec![0u64; n as usize];
        for &s in table {
            counts[s as usize] += 1;
        }
        counts
            .iter()
            .map(|&c| c as f64 / table.len() as f64)
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(65_537));
        assert!(is_prime(13));
        assert!(!is_prime(65_536));
        assert!(!is_prime(1));
        assert!(build(&members(3, |_| 1), 65_536).is_err());
    }

    #[test]
    fn share_matches_weight_within_one_percent() {
        for n in [3u32, 7, 10, 100, 250, 1000] {
            for weighting in 0..3 {
                let w = |i: u32| match weighting {
                    0 => 1,
                    1 => 1 + i % 5,
                    _ => [1, 10, 100][(i % 3) as usize],
                };
                let ms = members(n, w);
                let table = build(&ms, 65_537).unwrap();
                let total: u64 = ms.iter().map(|m| u64::from(m.weight)).sum();
                for (i, share) in shares(&table, n).iter().enumerate() {
                    let want = f64::from(ms[i].weight) / total as f64;
                    assert!(
                        (share - want).abs() <= 0.01,
                        "n={n} weighting={weighting} backend {i}: share {share:.5}, weight share {want:.5}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_weight_gets_nothing_and_all_zero_is_empty() {
        let table = build(&members(4, |i| u32::from(i != 2)), 65_537).unwrap();
        assert!(!table.contains(&2));
        assert!(!table.contains(&EMPTY_SLOT));
        let empty = build(&members(4, |_| 0), 65_537).unwrap();
        assert!(empty.iter().all(|&s| s == EMPTY_SLOT));
    }

    #[test]
    fn removing_one_of_n_moves_at_most_one_nth_plus_one_percent() {
        for n in [3u32, 5, 10, 50, 100, 1000] {
            let all = members(n, |_| 1);
            let before = build(&all, 65_537).unwrap();
            // Remove a backend from the start, middle and end of the order.
            for gone in [0, n / 2, n - 1] {
                let rest: Vec<Member> = all.iter().filter(|m| m.id != gone).cloned().collect();
                let after = build(&rest, 65_537).unwrap();
                let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
                let fraction = changed as f64 / before.len() as f64;
                assert!(
                    fraction <= 1.0 / f64::from(n) + 0.01,
                    "n={n} removing {gone}: {fraction:.4} of slots changed"
                );
                // Slots that did not belong to the removed backend mostly stay.
                assert!(!after.contains(&gone));
            }
        }
    }

    #[test]
    fn identical_input_gives_identical_table_in_any_order() {
        let ms = members(100, |i| 1 + i % 3);
        let a = build(&ms, 65_537).unwrap();
        let mut reversed = ms.clone();
        reversed.reverse();
        let b = build(&reversed, 65_537).unwrap();
        assert_eq!(a, b, "order of members changed the table");
        // And it is stable across builds of the program: pin a digest.
        let digest = a.iter().fold(0u64, |h, &s| {
            (h ^ u64::from(s)).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!(
            digest, 17_865_254_037_883_486_233,
            "table digest changed: LB nodes on different builds would disagree"
        );
    }

    #[test]
    fn duplicate_identity_is_rejected() {
        let mut ms = members(3, |_| 1);
        ms[2].identity = ms[0].identity.clone();
        assert!(matches!(
            build(&ms, 13),
            Err(TableError::DuplicateIdentity(_))
        ));
    }
}
