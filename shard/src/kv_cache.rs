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

    /// Writes the new keys and values of layer `layer` (`[T, kv_heads, head_dim]` each,
    /// possibly views into a wider projection) into pool slots `slots` (`slots_host` is
    /// the same list on the host). On the CPU the rows are copied directly; elsewhere,
    /// or for layouts the copy does not handle, with `index_copy_`.
    pub fn write(
        &mut self,
        layer: usize,
        slots: &Tensor,
        slots_host: &[i64],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (Some(keys), Some(values)) = (self.keys.get_mut(layer), self.values.get_mut(layer))
        else {
            return Err(EngineError::KvCache(format!(
                "no layer {layer} in the cache"
            )));
        };
        for (pool, new) in [(keys, k), (values, v)] {
            if !copy_rows(pool, slots_host, new)? {
                let _ = pool.f_index_copy_(0, slots, new)?;
            }
        }
        Ok(())
    }

    /// Number of blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// Copies row `t` of `new` (`[T, kv_heads, head_dim]`, each row contiguous) into slot
/// `slots[t]` of `pool` (`[slots, kv_heads, head_dim]`, contiguous, same kind), on the
/// CPU. Returns false, having written nothing, when the layouts do not allow it.
fn copy_rows(pool: &mut Tensor, slots: &[i64], new: &Tensor) -> Result<bool> {
    let (ps, ns) = (pool.size(), new.size());
    let (&[pool_slots, heads, dim], &[t, new_heads, new_dim]) = (&ps[..], &ns[..]) else {
        return Ok(false);
    };
    let stride = new.stride();
    let row_contiguous = stride.get(1) == Some(&dim) && stride.get(2) == Some(&1);
    if pool.device() != Device::Cpu
        || new.device() != Device::Cpu
        || pool.kind() != new.kind()
        || !pool.is_contiguous()
        || !row_contiguous
        || (heads, dim) != (new_heads, new_dim)
        || t as usize != slots.len()
    {
        return Ok(false);
    }
    if let Some(&bad) = slots.iter().find(|&&s| s < 0 || s >= pool_slots) {
        return Err(EngineError::KvCache(format!(
            "slot {bad} is outside the pool of {pool_slots} slots"
        )));
    }
    let elem = pool.kind().elt_size_in_bytes();
    let row_bytes = (heads * dim) as usize * elem;
    let src_stride = stride[0] as usize * elem;
    let (src, dst) = (new.data_ptr() as *const u8, pool.data_ptr() as *mut u8);
    if src.is_null() || dst.is_null() {
        return Ok(false);
    }
    for (row, &slot) in slots.iter().enumerate() {
        // SAFETY: `row < T` and each source row holds `heads * dim` contiguous elements
        // (checked strides); `slot` is within the contiguous pool (checked above); the
        // new rows are a fresh projection, never a view of the pool, so they do not
        // overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.add(row * src_stride),
                dst.add(slot as usize * row_bytes),
                row_bytes,
            );
        }
    }
    Ok(true)
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
    fn direct_writes_equal_index_copy() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let mut direct = KvCache::new(2, 4, 4, 2, 8, kind, Device::Cpu).unwrap();
            let mut reference = KvCache::new(2, 4, 4, 2, 8, kind, Device::Cpu).unwrap();
            for c in [&mut direct, &mut reference] {
                for t in c.keys.iter_mut().chain(c.values.iter_mut()) {
                    let _ = t.zero_();
                }
            }
            // k and v as views into a wider projection, as the model makes them.
            let qkv = Tensor::randn([3, 48], (Kind::Float, Device::Cpu)).to_kind(kind);
            let k = qkv.narrow(1, 16, 16).view([3, 2, 8]);
            let v = qkv.narrow(1, 32, 16).view([3, 2, 8]);
            let host = [5i64, 0, 14];
            let slots = Tensor::from_slice(&host);
            direct.write(1, &slots, &host, &k, &v).unwrap();
            let _ = reference.keys[1].index_copy_(0, &slots, &k);
            let _ = reference.values[1].index_copy_(0, &slots, &v);
            assert!(direct.keys[1].equal(&reference.keys[1]));
            assert!(direct.values[1].equal(&reference.values[1]));
            assert!(direct.keys[0].equal(&reference.keys[0]));
            // A slot outside the pool is an error, not a write.
            let bad = [16i64, 0, 1];
            let err = direct.write(0, &Tensor::from_slice(&bad), &bad, &k, &v);
            assert!(err.is_err());
            assert!(direct.write(7, &slots, &host, &k, &v).is_err());
        }
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
