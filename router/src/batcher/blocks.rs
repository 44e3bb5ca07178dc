//! The router's view of the shards' KV pool: which blocks are free. A request
//! gets every block it can need (prompt + max_new_tokens) when it is admitted,
//! so a running request can never run out.

#[derive(Debug)]
pub struct BlockAllocator {
    block_size: u32,
    total: u32,
    free: Vec<u32>,
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
            free: (0..usable).rev().collect(),
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn total(&self) -> u32 {
        self.total
    }

    pub fn free(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn used(&self) -> u32 {
        self.total - self.free()
    }

    /// Blocks that hold `tokens` positions.
    pub fn blocks_for(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.block_size as u64)
    }

    /// `count` blocks, or `None` (and nothing taken) when fewer are free.
    pub fn allocate(&mut self, count: u64) -> Option<Vec<u32>> {
        let count = usize::try_from(count).ok()?;
        if count > self.free.len() {
            return None;
        }
        let at = self.free.len() - count;
        Some(self.free.split_off(at))
    }

    pub fn release(&mut self, blocks: Vec<u32>) {
        self.free.extend(blocks);
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
}
