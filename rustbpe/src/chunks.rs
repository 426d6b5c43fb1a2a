//! `ChunkCounts`: how many times each distinct chunk occurs, built for the counting hot loop.
//!
//! Nearly every chunk is a word of at most 16 bytes. Those live inline in an open-addressing table
//! (linear probing, at most 3/4 full): a lookup hashes two words and touches one slot, with no
//! allocation and no pointer to follow. Longer chunks go to an ordinary map.

use crate::hash::FastMap;
use crate::prefetch;

const INLINE: usize = 16;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The chunk's bytes, zero-padded; with `len` they identify it.
    key: [u64; 2],
    /// 0 marks an empty slot (no chunk is empty).
    len: u64,
    count: u64,
}

impl Slot {
    fn bytes(&self) -> [u8; INLINE] {
        let mut out = [0u8; INLINE];
        out[..8].copy_from_slice(&self.key[0].to_le_bytes());
        out[8..].copy_from_slice(&self.key[1].to_le_bytes());
        out
    }
}

#[derive(Default)]
pub struct ChunkCounts {
    slots: Vec<Slot>,
    n_inline: usize,
    long: FastMap<Box<[u8]>, u64>,
}

#[inline]
fn pack(chunk: &[u8]) -> [u64; 2] {
    let mut buf = [0u8; INLINE];
    buf[..chunk.len()].copy_from_slice(chunk);
    [u64::from_le_bytes(buf[..8].try_into().unwrap()), u64::from_le_bytes(buf[8..].try_into().unwrap())]
}

/// Folded 128-bit multiply of the two key words (salted by the length): every bit of the key
/// reaches the low bits that pick the slot.
#[inline]
fn slot_hash(key: [u64; 2], len: u64) -> u64 {
    let full = ((key[0] ^ 0x243F_6A88_85A3_08D3) as u128).wrapping_mul((key[1] ^ len.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as u128);
    (full as u64) ^ ((full >> 64) as u64)
}

impl ChunkCounts {
    /// Adds `n` occurrences of a non-empty `chunk`.
    pub fn add(&mut self, chunk: &[u8], n: u64) {
        if chunk.len() > INLINE {
            self.add_long(chunk, n);
        } else {
            self.reserve(1);
            let (key, len) = (pack(chunk), chunk.len() as u64);
            self.add_inline(key, len, self.slot_of(key, len), n);
        }
    }

    /// Adds one occurrence of each non-empty chunk. Slots are looked up a group at a time,
    /// prefetching them all before the first is read, so that cache misses overlap.
    pub fn add_each(&mut self, chunks: &[&[u8]]) {
        const GROUP: usize = 16;
        for group in chunks.chunks(GROUP) {
            self.reserve(group.len());
            let mut found = [([0u64; 2], 0u64, 0usize); GROUP];
            for (chunk, (key, len, slot)) in group.iter().zip(&mut found) {
                if chunk.len() <= INLINE {
                    (*key, *len) = (pack(chunk), chunk.len() as u64);
                    *slot = self.slot_of(*key, *len);
                    prefetch(&self.slots[*slot]);
                }
            }
            for (chunk, &(key, len, slot)) in group.iter().zip(&found) {
                if chunk.len() > INLINE {
                    self.add_long(chunk, 1);
                } else {
                    self.add_inline(key, len, slot, 1);
                }
            }
        }
    }

    fn add_long(&mut self, chunk: &[u8], n: u64) {
        match self.long.get_mut(chunk) {
            Some(count) => *count += n,
            None => {
                self.long.insert(chunk.into(), n);
            }
        }
    }

    /// The slot where probing for a key starts.
    #[inline]
    fn slot_of(&self, key: [u64; 2], len: u64) -> usize {
        slot_hash(key, len) as usize & (self.slots.len() - 1)
    }

    /// Probes from slot `i` for the chunk (`key`, `len`) and adds `n` to its count.
    #[inline]
    fn add_inline(&mut self, key: [u64; 2], len: u64, mut i: usize, n: u64) {
        let mask = self.slots.len() - 1;
        loop {
            let slot = &mut self.slots[i];
            if slot.len == len && slot.key == key {
                slot.count += n;
                return;
            }
            if slot.len == 0 {
                *slot = Slot { key, len, count: n };
                self.n_inline += 1;
                return;
            }
            i = (i + 1) & mask;
        }
    }

    /// Grows the table so that `extra` more chunks keep it at most 3/4 full.
    fn reserve(&mut self, extra: usize) {
        while (self.n_inline + extra) * 4 > self.slots.len() * 3 {
            self.grow();
        }
    }

    fn grow(&mut self) {
        let capacity = (self.slots.len() * 2).max(1024);
        let old = std::mem::replace(&mut self.slots, vec![Slot::default(); capacity]);
        let mask = self.slots.len() - 1;
        for slot in old.into_iter().filter(|s| s.len != 0) {
            let mut i = slot_hash(slot.key, slot.len) as usize & mask;
            while self.slots[i].len != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }

    /// Adds all of `other`'s counts.
    pub fn merge(&mut self, other: ChunkCounts) {
        other.for_each(|chunk, n| self.add(chunk, n));
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.n_inline + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f(chunk, count)` for every distinct chunk, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], u64)) {
        for slot in self.slots.iter().filter(|s| s.len != 0) {
            f(&slot.bytes()[..slot.len as usize], slot.count);
        }
        for (chunk, &n) in &self.long {
            f(chunk, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_short_and_long_chunks_through_growth() {
        let mut counts = ChunkCounts::default();
        let long = "a chunk longer than sixteen bytes";
        for i in 0..5000u64 {
            counts.add(format!("w{i}").as_bytes(), 1);
            counts.add(format!("w{}", i % 7).as_bytes(), 2);
            counts.add(long.as_bytes(), 1);
        }
        counts.add(b"a\0", 1); // zero padding must not confuse "a\0" with "a"
        counts.add(b"a", 1);
        let mut seen = std::collections::HashMap::new();
        counts.for_each(|c, n| assert!(seen.insert(c.to_vec(), n).is_none()));
        assert_eq!(counts.len(), 5000 + 1 + 2);
        assert_eq!(seen.len(), counts.len());
        assert_eq!(seen[&b"w3"[..]], 1 + 2 * 714); // i = 3, 10, ..., 4994
        assert_eq!(seen[&b"w4999"[..]], 1);
        assert_eq!(seen[long.as_bytes()], 5000);
        assert_eq!((seen[&b"a\0"[..]], seen[&b"a"[..]]), (1, 1));
    }
}
