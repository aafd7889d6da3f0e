//! The client's keys on disk (`veil keygen`): the runtime's key directory, re-exported.

pub use veil_runtime::key_dir::{KeyPair, PARAM_SETS, key_id, param_set_by_name};
