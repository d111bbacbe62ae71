//! vlmem-alloc
