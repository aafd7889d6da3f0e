pub mod compile;
pub mod eval;
