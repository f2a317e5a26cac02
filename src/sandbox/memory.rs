//! How the allocator gives memory back. glibc serves large blocks with `mmap` only up to a
//! threshold that it raises (to 32 MiB) after the first such block is freed; from then on a
//! 19 MiB argon2 verification comes from a thread's heap arena and stays with the process
//! after it is freed. A fixed threshold keeps every large block an `mmap` that `free` returns.

/// Call once at start-up, before other threads exist.
pub fn return_large_allocations() {
    #[cfg(target_env = "gnu")]
    {
        /// Blocks from this size up are mapped on their own and unmapped when freed.
        const MMAP_THRESHOLD_BYTES: libc::c_int = 1024 * 1024;
        // SAFETY: mallopt only changes glibc's allocation tunables; it is called before any
        // other thread exists (first thing in `main`), so no allocation runs concurrently.
        let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
    }
}
