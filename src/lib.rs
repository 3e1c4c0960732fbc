//! skiff: a data-tier sidecar that pools PostgreSQL connections, routes Redis
//! commands and ships log records to Alibaba Cloud Log Service.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod control;
pub mod logship;
pub mod pg;
pub mod plan;
pub mod redis;
pub mod server;
pub mod signal;
pub mod threads;
pub mod tls;
