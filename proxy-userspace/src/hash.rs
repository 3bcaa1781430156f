//! The hash maps and sets of the control plane's hot paths (Services, slices, frontend
//! addresses by the hundred thousand): foldhash, several times faster than std's SipHash on
//! short keys, and seeded per process so nobody can craft colliding Service names from
//! outside.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
