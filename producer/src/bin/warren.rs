//! `warren`: call and enqueue Warren tasks from the shell, and run the demo.

use std::process::ExitCode;

use clap::Parser;
use warren_producer::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    warren_shared::telemetry::init("warn");
    cli::run(cli).await
}
