//! Workloads over the vlmem manager ([`vlmem::MemoryManager`]): [`replay`] runs workloads
//! generated from the real Qwen3-VL shapes through the manager beside simulated policies
//! (`vlmem replay`, `vlmem bench replay`), and [`stress`] runs many threads over every kind
//! and tier and ends with a ledger check (`vlmem stress`).

pub mod replay;
pub mod stress;
