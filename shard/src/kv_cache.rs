//! The paged KV cache: one preallocated pool of fixed-size blocks per layer,
//! addressed through per-sequence block tables (as in vLLM's paged attention).
//! Which blocks a sequence owns is decided outside the engine (by the router, or
//! by [`BlockAllocator`] for local use); the engine only reads and writes slots.

use tch::{Device, Kind, Tensor};

use crate::error::{EngineError, Result};

pub struct KvCache {
    /// Per layer, `[num_blocks * block_size, kv_heads, head_dim]`.
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(EngineError::KvCache(format!(
                "block size ({block_size}) and block count ({num_blocks}) must be positive"
            )));
        }
        let shape = [
            (num_blocks * block_size) as i64,
            kv_heads as i64,
            head_dim as i64,
        ];
        let mut keys = Vec::with_capacity(num_layers);
        let mut values = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            // Uninitialised: memory is only touched as slots are written. Readers never
            // look at a slot that was not written (see `attention`).
            keys.push(Tensor::f_empty(shape, (kind, device))?);
            values.push(Tensor::f_empty(shape, (kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            block_size,
            num_blocks,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes one block takes across all layers (keys and values).
    pub fn bytes_per_block(&self) -> usize {
        self.keys
            .first()
            .map(|k| {
                let per_slot = k.size().iter().skip(1).product::<i64>() as usize;
                2 * self.keys.len() * self.block_size * per_slot * k.kind().elt_size_in_bytes()
            })
            .unwrap_or(0)
    }

    /// The pool slot of position `pos` of a sequence with `block_table`.
    pub fn slot(&self, block_table: &[u32], pos: usize) -> Option<i64> {
        let block = *block_table.get(pos / self.block_size)? as usize;
        if block >= self.num_blocks {
            return None;
        }
        Some((block * self.block_size + pos % self.block_size) as i64)
    }

    /// Number of blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// A free list of KV blocks, for callers that run the engine without a router
/// (the command line, benchmarks, tests).
pub struct BlockAllocator {
    free: Vec<u32>,
    block_size: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            block_size,
        }
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks for `tokens` positions, or an error naming the shortfall.
    pub fn allocate(&mut self, tokens: usize) -> Result<Vec<u32>> {
        let n = tokens.div_ceil(self.block_size);
        if n > self.free.len() {
            return Err(EngineError::KvCache(format!(
                "{tokens} tokens need {n} blocks but only {} are free",
                self.free.len()
            )));
        }
        Ok(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_and_takes_back() {
        let mut a = BlockAllocator::new(4, 16);
        let b = a.allocate(17).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(a.free_blocks(), 2);
        assert!(a.allocate(33).is_err());
        a.release(b);
        assert_eq!(a.free_blocks(), 4);
    }

    #[test]
    fn slots_follow_block_tables() {
        let c = KvCache::new(1, 4, 16, 1, 2, Kind::Float, Device::Cpu).unwrap();
        assert_eq!(c.slot(&[3, 1], 0), Some(48));
        assert_eq!(c.slot(&[3, 1], 17), Some(17));
        assert_eq!(c.slot(&[3, 1], 32), None);
        assert_eq!(c.slot(&[9], 0), None);
    }
}
