//! Printing what is programmed: the golden-test `dump` format and `inspect`'s tables and JSON.
pub mod dump;
pub mod inspect;
