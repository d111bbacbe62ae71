//! I/O buffers: small ones on the heap, large ones on their own huge-page mapping; both
//! aligned for O_DIRECT, zeroed, and usable to their capacity.

use vlmem_tier::{AlignedBuf, HUGE_PAGE_BYTES, HostBuffer, IO_ALIGN_BYTES, advise_huge_pages};

fn check(len: usize, align: usize) {
    let mut b = AlignedBuf::new(len).unwrap();
    assert_eq!(b.len(), len);
    assert_eq!(
        b.capacity_bytes(),
        len.max(1).next_multiple_of(IO_ALIGN_BYTES)
    );
    assert_eq!(b.as_slice().as_ptr() as usize % align, 0, "len {len}");
    assert!(
        b.full_mut_slice().iter().all(|&x| x == 0),
        "zeroed, len {len}"
    );
    // Every byte up to the capacity is ours.
    let cap = b.capacity_bytes();
    assert!(b.set_len(cap));
    assert!(!b.set_len(cap + 1));
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    assert!(
        b.as_slice()
            .iter()
            .enumerate()
            .all(|(i, &x)| x == (i % 251) as u8)
    );
}

#[test]
fn small_buffers_are_page_aligned_and_large_ones_huge_page_aligned() {
    for len in [0, 1, 4095, 4096, 100_000, HUGE_PAGE_BYTES - 1] {
        check(len, IO_ALIGN_BYTES);
    }
    for len in [
        HUGE_PAGE_BYTES,
        HUGE_PAGE_BYTES + 1,
        3 * HUGE_PAGE_BYTES + 12_345,
    ] {
        check(len, HUGE_PAGE_BYTES);
    }
    // Many large ones at once, dropped in any order: each is its own mapping.
    let mut bufs: Vec<AlignedBuf> = (1..6).map(|k| AlignedBuf::new(k << 21).unwrap()).collect();
    bufs.swap(0, 3);
    for b in &mut bufs {
        b.as_mut_slice().fill(7);
    }
    assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 7)));
}

#[test]
fn host_buffers_on_huge_pages_start_on_a_huge_page() {
    for len in [1, HUGE_PAGE_BYTES, 5 << 20] {
        let mut h = HostBuffer::new(len, true).unwrap();
        assert_eq!(h.as_slice().as_ptr() as usize % HUGE_PAGE_BYTES, 0);
        assert_eq!(h.as_slice().len(), len);
        h.as_mut_slice().fill(3);
        assert!(h.as_slice().iter().all(|&x| x == 3));
    }
    let plain = HostBuffer::new(10_000, false).unwrap();
    assert_eq!(plain.as_slice().as_ptr() as usize % IO_ALIGN_BYTES, 0);
}

#[test]
fn the_huge_page_advice_changes_no_bytes() {
    // Too small to hold a whole huge page: nothing to advise.
    let mut small = vec![5u8; 100];
    advise_huge_pages(&mut small);
    assert!(small.iter().all(|&x| x == 5));
    // Touched memory keeps its bytes; untouched capacity is fine too.
    let mut big = vec![9u8; 5 << 20];
    advise_huge_pages(&mut big);
    assert!(big.iter().all(|&x| x == 9));
    let mut fresh: Vec<u8> = Vec::with_capacity(6 << 20);
    advise_huge_pages(fresh.spare_capacity_mut());
    fresh.resize(6 << 20, 1);
    assert!(fresh.iter().all(|&x| x == 1));
    advise_huge_pages::<u64>(&mut []);
}
