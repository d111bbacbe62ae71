//! Tensor kinds and memory tiers.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a tensor is for. Each kind has its own pool, budget and policy, so one kind cannot
/// flush another (weights are planned, KV blocks are paged, images are cached by popularity,
/// activations and scratch live for one step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// Model parameters: long-lived, read-only after load.
    Weight,
    /// Key/value cache blocks: fixed size, churn at every decode step.
    KvCache,
    /// Activations of one forward step.
    Activation,
    /// Vision-tower outputs (merged image embeddings and DeepStack features), cached by image.
    VisionEmbedding,
    /// Temporary buffers (staging, dequantisation, attention chunks).
    Scratch,
}

impl TensorKind {
    /// Every kind, in a fixed order (the index used by per-kind arrays).
    pub const ALL: [TensorKind; 5] = [
        TensorKind::Weight,
        TensorKind::KvCache,
        TensorKind::Activation,
        TensorKind::VisionEmbedding,
        TensorKind::Scratch,
    ];

    /// Position of this kind in [`TensorKind::ALL`].
    pub const fn index(self) -> usize {
        match self {
            TensorKind::Weight => 0,
            TensorKind::KvCache => 1,
            TensorKind::Activation => 2,
            TensorKind::VisionEmbedding => 3,
            TensorKind::Scratch => 4,
        }
    }

    /// The snake_case name used in JSON, metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            TensorKind::Weight => "weight",
            TensorKind::KvCache => "kv_cache",
            TensorKind::Activation => "activation",
            TensorKind::VisionEmbedding => "vision_embedding",
            TensorKind::Scratch => "scratch",
        }
    }
}

impl fmt::Display for TensorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A level of the memory hierarchy, fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// L1: GPU memory (or the simulated device where there is no GPU).
    Device,
    /// L2: host RAM (pinned when a GPU is present).
    Host,
    /// L3: swap files and read-only checkpoint extents on disk.
    Disk,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Disk];

    /// Position of this tier in [`Tier::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Tier::Device => 0,
            Tier::Host => 1,
            Tier::Disk => 2,
        }
    }

    /// The name used in JSON, metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }

    /// The next slower tier, where this tier demotes to under pressure.
    pub const fn below(self) -> Option<Tier> {
        match self {
            Tier::Device => Some(Tier::Host),
            Tier::Host => Some(Tier::Disk),
            Tier::Disk => None,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_all_order() {
        for (i, k) in TensorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        for (i, t) in Tier::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
        }
        assert_eq!(Tier::Device.below(), Some(Tier::Host));
        assert_eq!(Tier::Disk.below(), None);
        assert_eq!(
            serde_json::to_string(&TensorKind::KvCache).unwrap(),
            "\"kv_cache\""
        );
    }
}
