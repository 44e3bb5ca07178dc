//! Process memory housekeeping.

/// Hands the heap memory freed so far back to the operating system. Model loading
/// frees hundreds of megabytes of temporaries (f32 dequantization bands, q/k/v and
/// gate/up parts before concatenation, int4 codes), which glibc otherwise keeps
/// resident for the life of the process.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused pages of the allocator's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}
