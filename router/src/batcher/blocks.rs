//! The router's view of the shards' KV pool: which blocks are free, and which hold
//! a prompt prefix that later requests may reuse.
//!
//! A request gets every block it can need (prompt + max_new_tokens) when it is
//! admitted, so a running request can never run out.
//!
//! Prefix caching: once a prompt has been prefilled, each of its full blocks is
//! registered under the prompt's tokens up to the end of that block (a chain of hashes,
//! each block's tokens checked too, so a hash collision can never share the wrong
//! keys). A later prompt that starts with the same tokens gets those blocks, shared and
//! reference-counted, and the shard computes only the rest (`cached_tokens`). A
//! registered block nobody holds any more keeps its contents and counts as free: it is
//! handed out again (and forgotten) only when no empty block is left, least recently
//! released first. Shared blocks are never written: they end before the block of the
//! prompt's last token, which the new request computes itself.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// What a registered block holds: the prompt prefix up to its end, as the hash of the
/// prefix before it and its own tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    parent: u64,
    tokens: Vec<u32>,
}

impl Content {
    fn key(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.parent.hash(&mut h);
        self.tokens.hash(&mut h);
        h.finish()
    }
}

/// One block's state.
#[derive(Debug, Clone, Default)]
struct Block {
    /// Requests holding it.
    refs: u32,
    /// The prefix it holds, when registered.
    content: Option<(u64, Content)>,
    /// Its place in the eviction order while registered and unheld.
    released_at: Option<u64>,
}

/// Blocks for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Allocation {
    pub blocks: Vec<u32>,
    /// Prompt tokens whose keys and values the first blocks already hold.
    pub cached_tokens: u32,
}

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: u32,
    total: u32,
    /// Blocks that hold nothing worth keeping.
    empty: Vec<u32>,
    blocks: Vec<Block>,
    /// Registered blocks by the key of their content.
    by_key: HashMap<u64, u32>,
    /// Registered blocks nobody holds, by release time (oldest first).
    evictable: BTreeMap<u64, u32>,
    clock: u64,
    prefix_caching: bool,
}

impl BlockAllocator {
    /// `budget_tokens` (0: no limit) caps how many of the pool's blocks may be handed out.
    pub fn new(num_blocks: u32, block_size: u32, budget_tokens: u64) -> Self {
        let block_size = block_size.max(1);
        let usable = if budget_tokens == 0 {
            num_blocks
        } else {
            num_blocks.min((budget_tokens / block_size as u64) as u32)
        };
        Self {
            block_size,
            total: usable,
            // Popped from the end: hand out low block numbers first.
            empty: (0..usable).rev().collect(),
            blocks: vec![Block::default(); usable as usize],
            by_key: HashMap::new(),
            evictable: BTreeMap::new(),
            clock: 0,
            prefix_caching: false,
        }
    }

    /// Turns prefix caching on or off (off: nothing is registered or shared).
    pub fn with_prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    /// Blocks that can be handed out: empty ones and cached ones nobody holds.
    pub fn free(&self) -> u32 {
        (self.empty.len() + self.evictable.len()) as u32
    }

    pub fn used(&self) -> u32 {
        self.total - self.free()
    }

    /// Registered blocks nobody holds (counted in [`free`](Self::free)).
    pub fn cached(&self) -> u32 {
        self.evictable.len() as u32
    }

    /// Blocks that hold `tokens` positions.
    pub fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.block_size as u64)
    }

    /// `count` blocks, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, count: u64) -> Option<Vec<u32>> {
        let count = usize::try_from(count).ok()?;
        if count > self.free() as usize {
            return None;
        }
        Some((0..count).filter_map(|_| self.take_one()).collect())
    }

    /// `count` blocks for a request with `prompt`, the first ones shared with earlier
    /// prompts that began the same way unless `reuse` is false; `None` (and nothing
    /// taken) when too few are free. Whenever `count <= free()`, this succeeds.
    pub fn allocate_for_prompt(
        &mut self,
        prompt: &[u32],
        count: u64,
        reuse: bool,
    ) -> Option<Allocation> {
        let count = usize::try_from(count).ok()?;
        let hits = if reuse {
            self.cached_prefix(prompt)
        } else {
            Vec::new()
        };
        let hits = &hits[..hits.len().min(count)];
        // Shared blocks held by others cost nothing; unheld ones leave the free pool.
        let reclaimed = hits
            .iter()
            .filter(|&&b| self.blocks[b as usize].refs == 0)
            .count();
        let needed = count - hits.len();
        if needed + reclaimed > self.free() as usize {
            return None;
        }
        for &b in hits {
            self.hold(b);
        }
        let mut blocks = hits.to_vec();
        blocks.extend((0..needed).filter_map(|_| self.take_one()));
        Some(Allocation {
            cached_tokens: hits.len() as u32 * self.block_size,
            blocks,
        })
    }

    /// The registered blocks holding the longest cached prefix of `prompt`, at most up
    /// to the block before the one of its last token (which must be computed for its
    /// logits).
    fn cached_prefix(&self, prompt: &[u32]) -> Vec<u32> {
        let mut hits = Vec::new();
        if !self.prefix_caching {
            return hits;
        }
        let bs = self.block_size as usize;
        let usable = prompt.len().saturating_sub(1) / bs;
        let mut parent = 0u64;
        for chunk in prompt.chunks_exact(bs).take(usable) {
            let content = Content {
                parent,
                tokens: chunk.to_vec(),
            };
            let key = content.key();
            let Some(&b) = self.by_key.get(&key) else {
                break;
            };
            if self.blocks[b as usize].content.as_ref().map(|c| &c.1) != Some(&content) {
                break;
            }
            hits.push(b);
            parent = key;
        }
        hits
    }

    /// Registers the full blocks of `prompt` (held in `blocks`, in order) once its
    /// prefill has written them, for later prompts to share.
    pub fn register(&mut self, prompt: &[u32], blocks: &[u32]) {
        if !self.prefix_caching {
            return;
        }
        let mut parent = 0u64;
        for (chunk, &b) in prompt.chunks_exact(self.block_size as usize).zip(blocks) {
            let content = Content {
                parent,
                tokens: chunk.to_vec(),
            };
            let key = content.key();
            parent = key;
            let Some(block) = self.blocks.get_mut(b as usize) else {
                return;
            };
            if block.content.is_some() {
                // Already registered (a shared block of this prompt).
                continue;
            }
            if self.by_key.contains_key(&key) {
                // Another block holds the same prefix; keep that one.
                continue;
            }
            block.content = Some((key, content));
            self.by_key.insert(key, b);
        }
    }

    pub fn release(&mut self, blocks: Vec<u32>) {
        for b in blocks {
            let Some(block) = self.blocks.get_mut(b as usize) else {
                continue;
            };
            block.refs = block.refs.saturating_sub(1);
            if block.refs > 0 {
                continue;
            }
            if block.content.is_some() {
                self.clock += 1;
                block.released_at = Some(self.clock);
                self.evictable.insert(self.clock, b);
            } else {
                self.empty.push(b);
            }
        }
    }

    /// Forgets every cached prefix (the shards' KV contents can no longer be trusted,
    /// e.g. after a failed step); blocks held by requests stay theirs.
    pub fn forget_prefixes(&mut self) {
        self.by_key.clear();
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.blocks[b as usize].released_at = None;
            self.empty.push(b);
        }
        for block in &mut self.blocks {
            block.content = None;
        }
    }

    /// One free block: an empty one, else the least recently released cached one
    /// (forgetting what it held).
    fn take_one(&mut self) -> Option<u32> {
        let b = match self.empty.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                let block = &mut self.blocks[b as usize];
                block.released_at = None;
                if let Some((key, _)) = block.content.take() {
                    self.by_key.remove(&key);
                }
                b
            }
        };
        self.blocks[b as usize].refs = 1;
        Some(b)
    }

    /// One more holder of registered block `b`.
    fn hold(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if let Some(at) = block.released_at.take() {
            self.evictable.remove(&at);
        }
        block.refs += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_takes_back() {
        let mut a = BlockAllocator::new(4, 16, 0);
        assert_eq!(a.blocks_for(17), 2);
        assert_eq!(a.blocks_for(16), 1);
        let x = a.allocate(3).unwrap();
        assert_eq!(x.len(), 3);
        assert_eq!(a.free(), 1);
        assert!(a.allocate(2).is_none());
        assert_eq!(a.free(), 1, "a failed allocation takes nothing");
        a.release(x);
        assert_eq!(a.free(), 4);
        assert_eq!(a.used(), 0);
        let mut all = a.allocate(4).unwrap();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3], "each block handed out once");
    }

    #[test]
    fn budget_caps_the_pool() {
        let a = BlockAllocator::new(100, 16, 320);
        assert_eq!(a.total(), 20);
        assert_eq!(a.free(), 20);
        let b = BlockAllocator::new(10, 16, 100_000);
        assert_eq!(b.total(), 10);
    }

    fn prompt(len: u32, salt: u32) -> Vec<u32> {
        (0..len).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn prompts_share_their_common_full_blocks() {
        let mut a = BlockAllocator::new(16, 4, 0).with_prefix_caching(true);
        let first = prompt(10, 0);
        let x = a.allocate_for_prompt(&first, 4, true).unwrap();
        assert_eq!(x.cached_tokens, 0, "nothing cached yet");
        // Not shared before its prefill registered it.
        assert_eq!(
            a.allocate_for_prompt(&first, 4, true)
                .unwrap()
                .cached_tokens,
            0
        );
        a.register(&first, &x.blocks);
        // Same first 9 tokens, then different: blocks 0 and 1 (tokens 0..8) shared.
        let mut second = first[..9].to_vec();
        second.extend([999, 998, 997]);
        let y = a.allocate_for_prompt(&second, 4, true).unwrap();
        assert_eq!(y.cached_tokens, 8);
        assert_eq!(y.blocks[..2], x.blocks[..2]);
        assert!(!x.blocks.contains(&y.blocks[2]) && !x.blocks.contains(&y.blocks[3]));
        // A prompt of exactly two blocks shares only the first: its last token's
        // block is computed.
        let z = a.allocate_for_prompt(&first[..8], 3, true).unwrap();
        assert_eq!(z.cached_tokens, 4);
        // A different first block shares nothing, even with later blocks equal.
        let mut other = first.clone();
        other[0] = 12345;
        assert_eq!(
            a.allocate_for_prompt(&other, 3, true)
                .unwrap()
                .cached_tokens,
            0
        );
        // Without reuse (a prompt whose log-probabilities are wanted) nothing is shared.
        let w = a.allocate_for_prompt(&first, 1, false).unwrap();
        assert_eq!(w.cached_tokens, 0);
        assert!(w.blocks.iter().all(|b| !x.blocks.contains(b)));
    }

    #[test]
    fn cached_blocks_count_as_free_and_are_evicted_oldest_first() {
        let mut a = BlockAllocator::new(6, 4, 0).with_prefix_caching(true);
        let (p, q) = (prompt(9, 0), prompt(9, 1));
        let x = a.allocate_for_prompt(&p, 3, true).unwrap();
        a.register(&p, &x.blocks);
        let y = a.allocate_for_prompt(&q, 3, true).unwrap();
        a.register(&q, &y.blocks);
        assert_eq!(a.free(), 0);
        a.release(x.blocks.clone());
        a.release(y.blocks.clone());
        assert_eq!((a.free(), a.used()), (6, 0));
        assert_eq!(a.cached(), 4, "two full blocks of each prompt");
        // Reused while cached: p's prefix comes back from the evictable blocks.
        let again = a.allocate_for_prompt(&p, 3, true).unwrap();
        assert_eq!(again.cached_tokens, 8);
        assert_eq!(again.blocks[..2], x.blocks[..2]);
        assert_eq!(a.free(), 3);
        // Needing more than the empty blocks evicts q's (released before p's reuse).
        let big = a.allocate(3).unwrap();
        assert_eq!(a.free(), 0);
        assert!(big.contains(&y.blocks[0]) || big.contains(&y.blocks[1]));
        assert_eq!(a.allocate_for_prompt(&q, 1, true), None, "nothing free");
        a.release(big);
        assert_eq!(
            a.allocate_for_prompt(&q, 3, true).unwrap().cached_tokens,
            0,
            "q's prefix was evicted"
        );
    }

    #[test]
    fn shared_blocks_stay_until_the_last_holder_leaves() {
        let mut a = BlockAllocator::new(8, 4, 0).with_prefix_caching(true);
        let p = prompt(9, 3);
        let x = a.allocate_for_prompt(&p, 3, true).unwrap();
        a.register(&p, &x.blocks);
        let y = a.allocate_for_prompt(&p, 3, true).unwrap();
        assert_eq!(y.cached_tokens, 8);
        assert_eq!(a.used(), 4, "two shared blocks and one each");
        a.release(x.blocks);
        assert_eq!(a.used(), 3, "the shared blocks are still held");
        let z = a.allocate(5).unwrap();
        assert!(
            !z.contains(&y.blocks[0]),
            "a held block is never handed out"
        );
        a.release(y.blocks);
        a.release(z);
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn allocation_fits_whenever_the_count_is_free() {
        let mut a = BlockAllocator::new(5, 2, 0).with_prefix_caching(true);
        let p = prompt(7, 0);
        let x = a.allocate_for_prompt(&p, 4, true).unwrap();
        a.register(&p, &x.blocks);
        a.release(x.blocks);
        // All 5 free (3 of them cached); a request for all 5 that shares 3 succeeds.
        let y = a.allocate_for_prompt(&p, 5, true).unwrap();
        assert_eq!(y.cached_tokens, 6);
        assert_eq!(y.blocks.len(), 5);
        assert_eq!(a.free(), 0);
        let mut sorted = y.blocks.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 5, "no block twice");
    }

    #[test]
    fn forgetting_prefixes_empties_the_cache_but_not_held_blocks() {
        let mut a = BlockAllocator::new(8, 4, 0).with_prefix_caching(true);
        let p = prompt(9, 0);
        let x = a.allocate_for_prompt(&p, 3, true).unwrap();
        a.register(&p, &x.blocks);
        let y = a.allocate_for_prompt(&p, 3, true).unwrap();
        a.release(y.blocks);
        a.forget_prefixes();
        assert_eq!(a.allocate_for_prompt(&p, 3, true).unwrap().cached_tokens, 0);
        assert_eq!(a.used(), 6, "x keeps its blocks");
    }

    #[test]
    fn without_prefix_caching_nothing_is_shared() {
        let mut a = BlockAllocator::new(8, 4, 0);
        let p = prompt(9, 0);
        let x = a.allocate_for_prompt(&p, 3, true).unwrap();
        a.register(&p, &x.blocks);
        assert_eq!(a.allocate_for_prompt(&p, 3, true).unwrap().cached_tokens, 0);
        a.release(x.blocks);
        assert_eq!(a.cached(), 0);
    }
}
