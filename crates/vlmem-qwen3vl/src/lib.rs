//! vlmem-qwen3vl
