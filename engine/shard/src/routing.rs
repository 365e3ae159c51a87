//! Pure functions that decide ownership: which shard owns a call, which RTP ports a shard owns.
//! They must give the same answer on every shard, in every process and after every restart.

use std::ops::RangeInclusive;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The shard that owns the call with this SIP `Call-ID` (or Twilio `CallSid`).
///
/// FNV-1a 64 of the bytes, modulo `shards`. The Call-ID is hashed exactly as received: RFC 3261
/// §20.8 compares Call-IDs byte for byte (case-sensitive). The function is fixed forever: a
/// change would move live calls to other shards across a rolling restart. `shards` of 0 or 1
/// gives 0.
pub fn shard_for_call_id(call_id: &[u8], shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let hash =
        call_id.iter().fold(FNV_OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME));
    // `shards` fits in u64 on every target Rust supports, and the result is below `shards`.
    (hash % shards as u64) as usize
}

/// Number of whole RTP/RTCP pairs (even port, the odd port above it) inside `range`.
pub(crate) fn rtp_pair_count(range: &RangeInclusive<u16>) -> usize {
    let (start, end) = (u32::from(*range.start()), u32::from(*range.end()));
    let first_even = start.next_multiple_of(2);
    if first_even + 1 > end {
        return 0;
    }
    let ports = end - first_even + 1;
    (ports / 2) as usize
}

/// The RTP ports shard `shard` of `shards` allocates from.
///
/// RTP uses even ports and RTCP the odd port above (RFC 3550 §11), so the range is cut into
/// whole pairs: an odd first port or an even last port of `range` is left unused. The pairs are
/// shared out in order, the first `pairs % shards` shards getting one more; each slice starts on
/// an even port and ends on an odd one, and the slices are disjoint and cover every pair.
///
/// Returns an empty range (`is_empty()`) when `shards` is 0, `shard >= shards`, or there are
/// fewer pairs than shards and this shard gets none. [`EngineConfig::validate`] rejects the last
/// case when SIP is enabled.
///
/// [`EngineConfig::validate`]: crate::EngineConfig::validate
pub fn rtp_port_slice(
    range: RangeInclusive<u16>,
    shard: usize,
    shards: usize,
) -> RangeInclusive<u16> {
    let empty = RangeInclusive::new(1, 0);
    if shard >= shards {
        return empty;
    }
    let pairs = rtp_pair_count(&range);
    let (base, extra) = (pairs / shards, pairs % shards);
    let count = base + usize::from(shard < extra);
    if count == 0 {
        return empty;
    }
    let first_pair = shard * base + shard.min(extra);
    let start = u32::from(*range.start());
    let first_even = start.next_multiple_of(2);
    // Both ends lie inside `range`, so they fit in u16.
    let lo = first_even + 2 * first_pair as u32;
    let hi = lo + 2 * count as u32 - 1;
    (lo as u16)..=(hi as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression vectors: these values must never change (see `shard_for_call_id`).
    #[test]
    fn call_id_routing_is_stable() {
        // Call-ID, then its shard over 2, 3, 4 and 8 shards.
        let vectors: &[(&[u8], [usize; 4])] = &[
            (b"", [1, 2, 1, 5]),
            (b"a84b4c76e66710@pc33.atlanta.com", [0, 1, 0, 4]),
            (b"3848276298220188511@atlanta.example.com", [0, 2, 0, 0]),
            (b"CA1234567890abcdef1234567890abcdef", [1, 0, 1, 1]),
            (b"f81d4fae-7dec-11d0-a765-00a0c91e6bf6", [1, 0, 1, 1]),
            (b"1-12345@127.0.0.1", [1, 1, 3, 3]),
            (b"2-12345@127.0.0.1", [0, 1, 2, 2]),
            (b"843817637684230@998sdasdh09", [1, 2, 3, 7]),
        ];
        for (id, want) in vectors {
            let got = [2, 3, 4, 8].map(|shards| shard_for_call_id(id, shards));
            assert_eq!(&got, want, "{}", String::from_utf8_lossy(id));
        }
        // FNV-1a 64 reference values (from the FNV test suite).
        let fnv = |s: &[u8]| {
            s.iter().fold(FNV_OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn single_shard_gets_everything() {
        assert_eq!(shard_for_call_id(b"anything", 1), 0);
        assert_eq!(shard_for_call_id(b"anything", 0), 0);
    }

    #[test]
    fn call_ids_spread_evenly() {
        for shards in [2usize, 4] {
            let mut counts = vec![0usize; shards];
            for i in 0..10_000u32 {
                // Shaped like real Call-IDs: a varying prefix, a fixed host.
                let id = format!("{:08x}-{}@10.0.0.7", i.wrapping_mul(2_654_435_761), i);
                counts[shard_for_call_id(id.as_bytes(), shards)] += 1;
            }
            let fair = 10_000 / shards;
            for (shard, &n) in counts.iter().enumerate() {
                assert!(
                    n.abs_diff(fair) * 10 <= fair,
                    "shard {shard} of {shards} got {n}, expected {fair} ± 10%: {counts:?}"
                );
            }
        }
    }

    fn check_slices(range: RangeInclusive<u16>, shards: usize) {
        let slices: Vec<_> =
            (0..shards).map(|s| rtp_port_slice(range.clone(), s, shards)).collect();
        let mut next = u32::from(*range.start()) + u32::from(*range.start() & 1);
        for slice in slices.iter().filter(|s| !s.is_empty()) {
            assert_eq!(slice.start() % 2, 0, "{slice:?} starts on an odd port");
            assert_eq!(slice.end() % 2, 1, "{slice:?} ends on an even port");
            assert!(range.contains(slice.start()) && range.contains(slice.end()));
            // Consecutive and in order: disjoint, with no pair skipped.
            assert_eq!(u32::from(*slice.start()), next, "gap or overlap at {slice:?}");
            next = u32::from(*slice.end()) + 1;
        }
        let covered: usize = slices.iter().map(|s| s.clone().count()).sum();
        assert_eq!(covered, 2 * rtp_pair_count(&range), "{range:?} over {shards}");
        let sizes: Vec<_> = slices.iter().map(|s| s.clone().count()).collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(max - min <= 2, "unbalanced slices {sizes:?}");
    }

    #[test]
    fn rtp_slices_are_even_aligned_disjoint_and_cover_the_range() {
        for range in [16384..=32767, 16385..=32768, 10000..=10003, 0..=65535, 65534..=65535, 7..=8]
        {
            for shards in [1, 2, 3, 4, 7, 64] {
                check_slices(range.clone(), shards);
            }
        }
    }

    #[test]
    fn rtp_slice_examples() {
        assert_eq!(rtp_port_slice(16384..=32767, 0, 2), 16384..=24575);
        assert_eq!(rtp_port_slice(16384..=32767, 1, 2), 24576..=32767);
        // Odd start and even end are trimmed: pairs 10002/3, 10004/5, 10006/7.
        assert_eq!(rtp_port_slice(10001..=10008, 0, 2), 10002..=10005);
        assert_eq!(rtp_port_slice(10001..=10008, 1, 2), 10006..=10007);
        assert_eq!(rtp_port_slice(0..=65535, 0, 1), 0..=65535);
    }

    #[test]
    fn rtp_slice_empty_cases() {
        assert!(rtp_port_slice(16384..=32767, 2, 2).is_empty());
        assert!(rtp_port_slice(16384..=32767, 0, 0).is_empty());
        assert!(rtp_port_slice(16384..=16385, 1, 2).is_empty());
        assert!(rtp_port_slice(7..=8, 0, 1).is_empty());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 200..=100;
        assert!(rtp_port_slice(reversed, 0, 1).is_empty());
    }
}
