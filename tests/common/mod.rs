pub mod worker;
pub mod harness;
