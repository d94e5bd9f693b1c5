//! glibc malloc settings for a process that lives for months and holds one entry per directory.
//!
//! glibc serves a block of 128 KiB or more with its own `mmap`, returned to the kernel when freed,
//! until the first such block is freed: then it raises that threshold to the freed block's size, so
//! later blocks of that size come from the heap arenas and their free space stays resident. The
//! operator's large blocks are transient (a page of an initial list, a cache's table while it grows),
//! and after a restart, with 10,000 directories re-listed and re-reconciled at once, the raised
//! threshold cost ~5 MiB of peak RSS (BENCHMARKS.md). Setting the threshold explicitly keeps it where
//! it starts. A threshold the user chose (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`) is left alone.

/// glibc's own starting value.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Whether the environment already sets the threshold (glibc applied it at start).
pub fn user_chose(env: impl Fn(&str) -> Option<String>) -> bool {
    user_set(&env, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold=")
}

/// Pins the mmap threshold, unless the user chose one. Call before any other thread starts.
pub fn tune() {
    if !user_chose(|k| std::env::var(k).ok()) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD");
    }
}

/// How much free memory at the top of a heap glibc keeps before returning it to the kernel, in the
/// verifier. Pinning the mmap threshold (above) also pins this at glibc's 128 KiB, and then the freed
/// buffers of a burst of requests are handed back (`madvise`/`sbrk`) and faulted in again by the next:
/// on an idle 2-core machine that put the verifier's gRPC p99 at half its peak at 6.0 × its floor's
/// (21.4 vs 3.6 ms), and with 64 MiB at 0.98 × (3.9 vs 3.9 ms; BENCHMARKS.md). The cost is memory the
/// verifier already used staying resident: 21.2 instead of 17.0 MiB after 50 rotations.
pub const VERIFIER_TRIM_THRESHOLD: usize = 64 << 20;

/// Whether the environment already sets the trim threshold (glibc applied it at start).
pub fn user_chose_trim(env: impl Fn(&str) -> Option<String>) -> bool {
    user_set(&env, "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold=")
}

/// Keeps up to [`VERIFIER_TRIM_THRESHOLD`] of freed heap resident, unless the user chose a threshold:
/// the verifier answers on the request path of every SCIM call, where a page fault is latency.
pub fn keep_freed_heap() {
    if !user_chose_trim(|k| std::env::var(k).ok()) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        set(libc::M_TRIM_THRESHOLD, VERIFIER_TRIM_THRESHOLD, "M_TRIM_THRESHOLD");
    }
}

/// A malloc parameter is the user's when its environment variable or its `GLIBC_TUNABLES` entry is set.
fn user_set(env: &impl Fn(&str) -> Option<String>, variable: &str, tunable: &str) -> bool {
    env(variable).is_some() || env("GLIBC_TUNABLES").is_some_and(|t| t.split(':').any(|t| t.starts_with(tunable)))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt: see the SAFETY note
fn set(param: libc::c_int, value: usize, name: &str) {
    let value = libc::c_int::try_from(value).expect("fits");
    // SAFETY: mallopt only sets an allocator parameter; 1 means it was accepted.
    let accepted = unsafe { libc::mallopt(param, value) };
    debug_assert_eq!(accepted, 1, "glibc refused {name}");
}

#[cfg(test)]
mod tests {
    use super::{user_chose, user_chose_trim};

    #[test]
    fn a_trim_threshold_the_user_set_is_theirs() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("MALLOC_MMAP_THRESHOLD_", "65536")], false),
            (&[("MALLOC_TRIM_THRESHOLD_", "131072")], true),
            (&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1")], true),
            (&[("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")], false),
        ];
        for (env, chose) in cases {
            let get = |k: &str| env.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string());
            assert_eq!(user_chose_trim(get), *chose, "{env:?}");
        }
    }

    #[test]
    fn a_threshold_the_user_set_is_theirs() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("MALLOC_ARENA_MAX", "2")], false),
            (&[("MALLOC_MMAP_THRESHOLD_", "65536")], true),
            (&[("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")], true),
            (&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=1")], true),
            (&[("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")], false),
            (&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")], false),
        ];
        for (env, chose) in cases {
            let get = |k: &str| env.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string());
            assert_eq!(user_chose(get), *chose, "{env:?}");
        }
    }
}
