//! model.safetensors.index.json text as arbitrary bytes: a non-empty weight map or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlmem_qwen3vl::checkpoint::parse_index;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = parse_index(text) {
        assert!(!map.is_empty());
    }
});
