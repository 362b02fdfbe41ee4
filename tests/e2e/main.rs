//! Warren end to end, against a real RabbitMQ. One test binary; every test has its own queues.

// A failed unwrap is how a test says what went wrong.
#![allow(clippy::unwrap_used)]

mod access;
mod cli;
mod config;
mod core;
mod cron;
mod deploy;
mod election;
mod events;
mod gateway;
mod hygiene;
mod interactive;
mod isolation;
mod memory;
mod operations;
mod pools;
mod processes;
mod progress;
mod reliability;
mod results;
mod resume;
mod routing;
mod run_at;
mod safety;
mod tls;
