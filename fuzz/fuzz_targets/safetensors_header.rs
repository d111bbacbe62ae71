//! A whole safetensors file (length prefix, JSON header, data section) as arbitrary bytes:
//! the header reader must return entries that lie inside the data section and do not
//! overlap, or an error; never panic, never read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlmem_qwen3vl::checkpoint::parse_file;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_file(data) {
        let header_len = u64::from_le_bytes(data[..8].try_into().unwrap());
        let data_len = data.len() as u64 - 8 - header_len;
        let mut end = 0;
        for e in &entries {
            assert!(e.begin <= e.end && e.end <= data_len);
            assert!(e.begin >= end, "overlap");
            end = e.end;
            let n: u64 = e.shape.iter().product();
            assert_eq!(n * e.dtype.size_bytes(), e.end - e.begin);
        }
    }
});
