//! Test harness: real servers started by the tests and clients to drive
//! skiff with.
#![allow(dead_code)]

pub mod admin_console;
pub mod postgres;
pub mod process;
pub mod raw;
pub mod skiff;
pub mod tls;
