//! vlmem-bench
