//! How a Service's north-south flows choose their backend: the `--lb-algorithm` default and
//! the per-Service annotation that overrides it.
use std::fmt;

/// The Service annotation that chooses the algorithm (`maglev` or `random`).
pub const LB_ALGORITHM_ANNOTATION: &str = "switchyard.dev/lb-algorithm";

/// How a Service's north-south flows (NodePorts, externalIPs, LoadBalancer IPs through the TC
/// path) choose their backend. Socket-level (east-west) choices are always random: a connect
/// has no flow tuple to hash yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbAlgorithm {
    /// A random backend per new flow (kube-proxy's behaviour).
    #[default]
    Random,
    /// The backend the Service's Maglev table gives the flow's hash: every node with the same
    /// table size and seed picks the same one.
    Maglev,
}

impl LbAlgorithm {
    /// The value as the flag and the annotation spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Maglev => "maglev",
        }
    }

    /// The algorithm a flag or annotation value names.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "random" => Some(Self::Random),
            "maglev" => Some(Self::Maglev),
            _ => None,
        }
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_parse_as_spelled_in_the_annotation() {
        assert_eq!(LbAlgorithm::parse("maglev"), Some(LbAlgorithm::Maglev));
        assert_eq!(LbAlgorithm::parse("random"), Some(LbAlgorithm::Random));
        assert_eq!(LbAlgorithm::parse("Maglev"), None);
        assert_eq!(LbAlgorithm::parse(""), None);
        assert_eq!(LbAlgorithm::default(), LbAlgorithm::Random);
        for algorithm in [LbAlgorithm::Random, LbAlgorithm::Maglev] {
            assert_eq!(LbAlgorithm::parse(&algorithm.to_string()), Some(algorithm));
        }
    }
}
