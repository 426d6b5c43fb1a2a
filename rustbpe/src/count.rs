//! Parallel chunk counting: worker threads split documents into chunks and count each distinct one.
//!
//! `feed` hands a batch to the workers and returns as soon as they have room for it, so the caller
//! prepares the next batch while they count; memory is bounded by the distinct chunks plus two
//! batches in flight.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::hash::FastMap;
use crate::pretok::{self, Pattern};

/// How many times each distinct chunk (as UTF-8 bytes) occurs.
pub type ChunkCounts = FastMap<Box<[u8]>, u64>;

/// Documents as UTF-8 bytes end to end, with the end offset of each.
pub struct Batch {
    pub text: Vec<u8>,
    pub ends: Vec<u64>,
}

impl Batch {
    fn check(&self) -> Result<(), String> {
        let ordered = self.ends.windows(2).all(|w| w[0] <= w[1]);
        if !ordered || self.ends.last().map_or(0, |&e| e as usize) != self.text.len() {
            return Err("document offsets do not partition the batch".into());
        }
        Ok(())
    }

    fn doc_start(&self, doc: usize) -> usize {
        if doc == 0 { 0 } else { self.ends[doc - 1] as usize }
    }
}

struct Job {
    batch: Arc<Batch>,
    docs: Range<usize>,
}

pub struct Counter {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<Result<ChunkCounts, String>>>,
}

impl Counter {
    pub fn new(pattern: Pattern, n_threads: usize) -> Counter {
        let n_threads = n_threads.max(1);
        let (jobs, receiver) = sync_channel::<Job>(n_threads);
        let receiver = Arc::new(Mutex::new(receiver));
        let workers = (0..n_threads)
            .map(|_| {
                let receiver = Arc::clone(&receiver);
                thread::spawn(move || count_jobs(&receiver, pattern))
            })
            .collect();
        Counter { jobs: Some(jobs), workers }
    }

    /// Queues `batch`, one job per worker with about the same number of bytes each.
    pub fn feed(&mut self, batch: Batch) -> Result<(), String> {
        batch.check()?;
        let batch = Arc::new(batch);
        let n_jobs = self.workers.len();
        let mut first = 0;
        for j in 1..=n_jobs {
            let target = batch.text.len() as u64 * j as u64 / n_jobs as u64;
            let last = if j == n_jobs { batch.ends.len() } else { batch.ends.partition_point(|&e| e <= target) };
            if last > first {
                let job = Job { batch: Arc::clone(&batch), docs: first..last };
                if self.jobs.as_ref().expect("fed after finish").send(job).is_err() {
                    // Only an error stops every worker: report it.
                    self.finish()?;
                    return Err("counting stopped".into());
                }
                first = last;
            }
        }
        Ok(())
    }

    /// Waits for the workers and merges their counts.
    pub fn finish(&mut self) -> Result<ChunkCounts, String> {
        drop(self.jobs.take());
        let mut total = ChunkCounts::default();
        for worker in self.workers.drain(..) {
            let counts = worker.join().map_err(|_| "a counting thread panicked".to_string())??;
            total = merge(total, counts);
        }
        Ok(total)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn count_jobs(jobs: &Mutex<Receiver<Job>>, pattern: Pattern) -> Result<ChunkCounts, String> {
    let mut counts = ChunkCounts::default();
    loop {
        let received = jobs.lock().map_err(|_| "job queue poisoned".to_string())?.recv();
        let Ok(Job { batch, docs }) = received else {
            return Ok(counts);
        };
        let mut start = batch.doc_start(docs.start);
        for &end in &batch.ends[docs] {
            let doc = std::str::from_utf8(&batch.text[start..end as usize])
                .map_err(|e| format!("a document is not valid UTF-8: {e}"))?;
            for chunk in pretok::split(doc, pattern) {
                match counts.get_mut(chunk.as_bytes()) {
                    Some(n) => *n += 1,
                    None => {
                        counts.insert(chunk.as_bytes().into(), 1);
                    }
                }
            }
            start = end as usize;
        }
    }
}

/// The sum of two counts, inserting the smaller map into the larger.
fn merge(a: ChunkCounts, b: ChunkCounts) -> ChunkCounts {
    let (mut large, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (chunk, n) in small {
        *large.entry(chunk).or_insert(0) += n;
    }
    large
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(docs: &[&str]) -> Batch {
        let mut ends = Vec::new();
        let mut text = Vec::new();
        for d in docs {
            text.extend_from_slice(d.as_bytes());
            ends.push(text.len() as u64);
        }
        Batch { text, ends }
    }

    #[test]
    fn counts_chunks_across_batches_and_threads() {
        let mut counter = Counter::new(Pattern::Gpt4, 3);
        counter.feed(batch(&["a cat", " cat", "", "dog a"])).unwrap();
        counter.feed(batch(&["cat cat"])).unwrap();
        let counts = counter.finish().unwrap();
        let get = |c: &str| counts.get(c.as_bytes()).copied();
        assert_eq!((get("a"), get(" cat"), get("cat"), get("dog"), get(" a")), (Some(1), Some(3), Some(1), Some(1), Some(1)));
        assert_eq!(counts.len(), 5);
    }

    #[test]
    fn rejects_bad_offsets_and_utf8() {
        let mut counter = Counter::new(Pattern::Gpt4, 2);
        assert!(counter.feed(Batch { text: b"abc".to_vec(), ends: vec![2] }).is_err());
        counter.feed(Batch { text: vec![b'a', 0xff], ends: vec![2] }).unwrap();
        assert!(counter.finish().unwrap_err().contains("UTF-8"));
    }
}
