//! config.json text as arbitrary bytes: parsing either fails with a message or yields a
//! config that passes `validate()`, whose memory math (tensor list, weight bytes, KV bytes
//! per token) then runs without overflow or panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vlmem_qwen3vl::Qwen3VlConfig;
use vlmem_qwen3vl::math::{WeightBytes, kv_bytes_per_token};
use vlmem_qwen3vl::tensors::Dtype;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = Qwen3VlConfig::from_json_str(text) {
        assert!(cfg.validate().is_ok());
        let w = WeightBytes::of_config(&cfg, Dtype::BF16);
        assert!(w.total_bytes >= w.text_bytes);
        let _ = kv_bytes_per_token(&cfg, 2);
    }
});
