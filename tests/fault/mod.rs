//! The fault-injection harness used by `tests/fault_injection.rs`.
#![allow(dead_code)]

pub mod app;
pub mod logs;
pub mod procs;
pub mod report;
pub mod rng;
pub mod runner;
pub mod schedule;
pub mod workload;
