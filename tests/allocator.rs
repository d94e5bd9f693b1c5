//! The mmap threshold stays pinned after a large block is freed (src/allocator.rs). Its own test
//! binary: the allocator's counters are process-wide, and this is the only test in the process.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
#[allow(unsafe_code)] // mallinfo2: see the SAFETY note
fn a_freed_large_block_does_not_move_later_ones_into_the_heap() {
    use std::hint::black_box;
    scim_token_operator::allocator::tune();

    // Unpinned, glibc would raise its threshold to 4 MiB on this free...
    drop(black_box(vec![1u8; 4 << 20]));
    // ...and serve this block from the heap, where its pages stay resident after it is freed.
    // SAFETY (both calls): mallinfo2 only reads the allocator's counters.
    let before = unsafe { libc::mallinfo2() }.hblks;
    let block = black_box(vec![1u8; 512 << 10]);
    let after = unsafe { libc::mallinfo2() }.hblks;
    drop(block);
    assert_eq!(after, before + 1, "a 512 KiB block should be its own mmap");
}
