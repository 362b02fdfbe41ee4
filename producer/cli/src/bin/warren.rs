//! `warren`: call and enqueue Warren tasks from the shell, and run the demo.

use std::process::ExitCode;

use clap::Parser;
use warren_cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    warren_shared::telemetry::init("warn");
    warren_cli::run(cli).await
}
