//! vlmem-tier
