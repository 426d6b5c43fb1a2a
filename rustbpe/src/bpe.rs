//! Byte-level BPE: exact greedy training on counted chunks, and encoding with the learned merges.
//!
//! Training repeatedly merges the most frequent adjacent pair of tokens, ties going to the smallest
//! pair (as upstream rustbpe). Pair counts are updated incrementally from each merged occurrence's
//! neighbours, and a lazy max-heap holds candidate pairs: an entry whose count went stale is
//! refreshed when it surfaces. Each merge therefore costs time in proportion to the words holding
//! the pair, found through a per-pair list of word positions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::thread;

use crate::chunks::ChunkCounts;
use crate::hash::FastMap;
use crate::pretok::{self, Pattern};
use crate::prefetch;

/// A pair of token ids packed as `left << 32 | right`, so that integer order is pair order.
type Pair = u64;

/// How many words ahead of the one being merged to prefetch.
const PREFETCH_DISTANCE: usize = 8;

#[inline]
fn pair(left: u32, right: u32) -> Pair {
    (left as u64) << 32 | right as u64
}

/// Where a word's ids are, and how many times the word occurs.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    len: u32,
    count: i64,
}

/// The distinct chunks as token ids, end to end; merging shrinks a word in place.
struct Words {
    ids: Vec<u32>,
    spans: Vec<Span>,
}

impl Words {
    /// One word per chunk of two bytes or more (a single byte holds no pair).
    fn new(chunks: ChunkCounts) -> Words {
        let mut words = Words { ids: Vec::new(), spans: Vec::new() };
        chunks.for_each(|chunk, n| {
            if chunk.len() >= 2 {
                words.spans.push(Span { start: words.ids.len(), len: chunk.len() as u32, count: n as i64 });
                words.ids.extend(chunk.iter().map(|&b| b as u32));
            }
        });
        words
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn word(&self, w: usize) -> &[u32] {
        let span = self.spans[w];
        &self.ids[span.start..span.start + span.len as usize]
    }

    /// Starts loading word `w`'s span (`ids = false`) or its ids (`ids = true`, which reads the
    /// span: prefetch that first). Visiting the words of a merge is otherwise dominated by cache
    /// misses, as they are scattered over the whole corpus.
    #[inline]
    fn prefetch(&self, w: usize, ids: bool) {
        if ids {
            prefetch(&self.ids[self.spans[w].start]);
        } else {
            prefetch(&self.spans[w]);
        }
    }
}

/// Pair counts (weighted by word counts) and, per pair, the words holding it, in word order.
struct PairStats {
    counts: FastMap<Pair, i64>,
    positions: FastMap<Pair, Vec<u32>>,
}

/// The initial statistics, where every token is a byte: dense tables, one per thread.
fn count_byte_pairs(words: &Words, n_threads: usize) -> PairStats {
    let per_thread = words.len().div_ceil(n_threads.max(1)).max(1);
    let parts: Vec<(Vec<i64>, Vec<Vec<u32>>)> = thread::scope(|s| {
        let handles: Vec<_> = (0..words.len())
            .step_by(per_thread)
            .map(|first| {
                s.spawn(move || {
                    let mut counts = vec![0i64; 1 << 16];
                    let mut positions = vec![Vec::new(); 1 << 16];
                    for w in first..(first + per_thread).min(words.len()) {
                        for ab in words.word(w).windows(2) {
                            let i = (ab[0] << 8 | ab[1]) as usize;
                            counts[i] += words.spans[w].count;
                            let list: &mut Vec<u32> = &mut positions[i];
                            if list.last() != Some(&(w as u32)) {
                                list.push(w as u32);
                            }
                        }
                    }
                    (counts, positions)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("pair counting thread panicked")).collect()
    });
    let mut stats = PairStats { counts: FastMap::default(), positions: FastMap::default() };
    for i in 0..1usize << 16 {
        let total: i64 = parts.iter().map(|(counts, _)| counts[i]).sum();
        if total > 0 {
            let p = pair((i >> 8) as u32, (i & 255) as u32);
            stats.counts.insert(p, total);
            stats.positions.insert(p, parts.iter().flat_map(|(_, pos)| pos[i].iter().copied()).collect());
        }
    }
    stats
}

/// Learns up to `n_merges` merges from the chunk counts; merge i creates token 256 + i. Fewer come
/// back when no pair is left to merge.
pub fn train(chunks: ChunkCounts, n_merges: usize, n_threads: usize) -> Vec<(u32, u32)> {
    let mut words = Words::new(chunks);
    let mut stats = count_byte_pairs(&words, n_threads);
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        stats.counts.iter().map(|(&p, &n)| (n, Reverse(p))).collect();
    let mut merges = Vec::with_capacity(n_merges);
    // Scratch space of one merge, kept across merges: the net change of each pair's count (most
    // changes of a merge hit a few pairs, so they are summed here before touching the big map),
    // and the words where each new pair appears.
    let mut deltas: FastMap<Pair, i64> = FastMap::default();
    let mut gained: FastMap<Pair, Vec<u32>> = FastMap::default();
    while merges.len() < n_merges {
        let Some((n, Reverse(p))) = heap.pop() else { break };
        let current = stats.counts.get(&p).copied().unwrap_or(0);
        if n != current {
            if current > 0 {
                heap.push((current, Reverse(p)));
            }
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(((p >> 32) as u32, p as u32));
        let positions = stats.positions.remove(&p).unwrap_or_default();
        for (k, &w) in positions.iter().enumerate() {
            if let Some(&ahead) = positions.get(k + 2 * PREFETCH_DISTANCE) {
                words.prefetch(ahead as usize, false);
            }
            if let Some(&ahead) = positions.get(k + PREFETCH_DISTANCE) {
                words.prefetch(ahead as usize, true);
            }
            merge_word(&mut words, w as usize, p, new_id, &mut deltas, &mut gained);
        }
        stats.counts.remove(&p);
        for (q, delta) in deltas.drain() {
            let count = stats.counts.entry(q).or_insert(0);
            *count += delta;
            if *count == 0 {
                stats.counts.remove(&q);
                stats.positions.remove(&q);
            }
        }
        for (q, positions) in gained.drain() {
            if let Some(&n) = stats.counts.get(&q) {
                heap.push((n, Reverse(q)));
                stats.positions.insert(q, positions);
            }
        }
    }
    merges
}

/// Replaces each occurrence of `p` in word `w` by `new_id`, moving the counts of the neighbouring
/// pairs to the pairs they become (in `deltas`), and noting `w` in `gained` for each pair that
/// appears.
fn merge_word(words: &mut Words, w: usize, p: Pair, new_id: u32, deltas: &mut FastMap<Pair, i64>, gained: &mut FastMap<Pair, Vec<u32>>) {
    let (a, b) = ((p >> 32) as u32, p as u32);
    let Span { start, len, count: n } = words.spans[w];
    let mut add = |q: Pair, delta: i64| {
        *deltas.entry(q).or_insert(0) += delta;
        if delta > 0 {
            let list = gained.entry(q).or_default();
            if list.last() != Some(&(w as u32)) {
                list.push(w as u32);
            }
        }
    };
    let new_len = merge_in_place(&mut words.ids[start..start + len as usize], p, new_id, |left, right| {
        if let Some(left) = left {
            add(pair(left, a), -n);
            add(pair(left, new_id), n);
        }
        if let Some(right) = right {
            add(pair(b, right), -n);
            add(pair(new_id, right), n);
        }
    });
    words.spans[w].len = new_len as u32;
}

/// Replaces each occurrence of pair `p` in `ids`, left to right, by `new_id`, calling
/// `on_merge(left, right)` with the tokens beside each occurrence (the left one possibly a
/// `new_id` just written). Returns the new length; the ids past it are stale.
#[inline]
fn merge_in_place(ids: &mut [u32], p: Pair, new_id: u32, mut on_merge: impl FnMut(Option<u32>, Option<u32>)) -> usize {
    let (a, b) = ((p >> 32) as u32, p as u32);
    let (mut read, mut write) = (0usize, 0usize);
    while read < ids.len() {
        if read + 1 < ids.len() && ids[read] == a && ids[read + 1] == b {
            on_merge(write.checked_sub(1).map(|i| ids[i]), ids.get(read + 2).copied());
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    write
}

/// Encodes text with learned merges: within each chunk, repeatedly merge the adjacent pair with the
/// lowest merge rank (every occurrence of it, left to right).
pub struct Encoder {
    pattern: Pattern,
    ranks: FastMap<Pair, u32>,
}

impl Encoder {
    pub fn new(pattern: Pattern, merges: &[(u32, u32)]) -> Result<Encoder, String> {
        let mut ranks = FastMap::default();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let id = 256 + i as u32;
            if a >= id || b >= id {
                return Err(format!("merge {i} ({a}, {b}) uses a token that does not exist yet"));
            }
            ranks.insert(pair(a, b), id);
        }
        Ok(Encoder { pattern, ranks })
    }

    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut ids = Vec::new();
        for chunk in pretok::split(text, self.pattern) {
            ids.clear();
            ids.extend(chunk.bytes().map(u32::from));
            while let Some((p, new_id)) = self.lowest_rank_pair(&ids) {
                let len = merge_in_place(&mut ids, p, new_id, |_, _| {});
                ids.truncate(len);
            }
            out.extend_from_slice(&ids);
        }
    }

    fn lowest_rank_pair(&self, ids: &[u32]) -> Option<(Pair, u32)> {
        ids.windows(2)
            .filter_map(|ab| {
                let p = pair(ab[0], ab[1]);
                self.ranks.get(&p).map(|&id| (p, id))
            })
            .min_by_key(|&(_, id)| id)
    }

    /// Encodes each text, `n_threads` at a time.
    pub fn encode_batch(&self, texts: &[&str], n_threads: usize) -> Vec<Vec<u32>> {
        let per_thread = texts.len().div_ceil(n_threads.max(1)).max(1);
        thread::scope(|s| {
            let handles: Vec<_> = texts
                .chunks(per_thread)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|t| {
                                let mut ids = Vec::new();
                                self.encode(t, &mut ids);
                                ids
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("encoding thread panicked")).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(items: &[(&str, u64)]) -> ChunkCounts {
        let mut counts = ChunkCounts::default();
        for &(c, n) in items {
            counts.add(c.as_bytes(), n);
        }
        counts
    }

    #[test]
    fn merges_most_frequent_pair_first_and_breaks_ties_by_smallest_pair() {
        // "ab" appears 5 times, "cd" 5 times (tie: (a, b) < (c, d)), "ce" twice.
        let merges = train(chunks(&[("ab", 5), ("cd", 3), ("cdce", 2)]), 3, 2);
        let (a, b, c, d, e) = (97, 98, 99, 100, 101);
        assert_eq!(merges, vec![(a, b), (c, d), (c, e)]);
    }

    #[test]
    fn overlapping_runs_count_and_merge_left_to_right() {
        // "aaaa" holds (a, a) three times; merging gives [X, X], then (X, X).
        let merges = train(chunks(&[("aaaa", 1)]), 5, 1);
        assert_eq!(merges, vec![(97, 97), (256, 256)]);
    }

    #[test]
    fn encoder_applies_merges_by_rank() {
        let merges = train(chunks(&[("hello", 10), (" hello", 3)]), 10, 2);
        let encoder = Encoder::new(Pattern::Gpt4, &merges).unwrap();
        let mut ids = Vec::new();
        encoder.encode("hello hello", &mut ids);
        assert_eq!(ids.len(), 2);
        assert!(Encoder::new(Pattern::Gpt4, &[(300, 1)]).is_err());
    }
}
