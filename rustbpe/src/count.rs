//! Parallel chunk counting: worker threads split documents into chunks and count each distinct one.
//!
//! `feed` hands a batch to the workers and returns as soon as they have room for it, so the caller
//! prepares the next batch while they count; memory is bounded by the distinct chunks plus two
//! batches in flight.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::chunks::ChunkCounts;
use crate::pretok::{self, Pattern};

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
            let mut counts = worker.join().map_err(|_| "a counting thread panicked".to_string())??;
            if counts.len() > total.len() {
                std::mem::swap(&mut counts, &mut total);
            }
            total.merge(counts);
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
        let mut chunks: Vec<&[u8]> = Vec::new();
        for &end in &batch.ends[docs] {
            let doc = std::str::from_utf8(&batch.text[start..end as usize])
                .map_err(|e| format!("a document is not valid UTF-8: {e}"))?;
            chunks.extend(pretok::split(doc, pattern).map(str::as_bytes));
            counts.add_each(&chunks);
            chunks.clear();
            start = end as usize;
        }
    }
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
        let mut counts = std::collections::HashMap::new();
        counter.finish().unwrap().for_each(|c, n| {
            counts.insert(String::from_utf8(c.to_vec()).unwrap(), n);
        });
        let expected = [("a", 1), (" cat", 3), ("cat", 1), ("dog", 1), (" a", 1)];
        assert_eq!(counts, expected.iter().map(|&(c, n)| (c.to_string(), n)).collect());
    }

    #[test]
    fn rejects_bad_offsets_and_utf8() {
        let mut counter = Counter::new(Pattern::Gpt4, 2);
        assert!(counter.feed(Batch { text: b"abc".to_vec(), ends: vec![2] }).is_err());
        counter.feed(Batch { text: vec![b'a', 0xff], ends: vec![2] }).unwrap();
        assert!(counter.finish().err().unwrap().contains("UTF-8"));
    }
}
