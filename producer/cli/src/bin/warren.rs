//! `warren`: call and enqueue Warren tasks from the shell, and run the demo.

use std::io::Write;

use clap::Parser;
use warren_cli::Cli;

fn main() {
    let cli = Cli::parse();
    warren_shared::telemetry::init("warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // `run` closes its client before it returns, whatever happened.
    // The `send` spans of this command are exported before it ends (when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set).
    // The command's status (warren_cli::result::exit); 2 for an unusable OpenTelemetry
    // setting, as a bad flag is.
    let code = match runtime.block_on(warren_shared::otel::exporting_while(
        "warren",
        warren_cli::run(cli),
    )) {
        Ok(code) => i32::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            i32::from(warren_cli::result::exit::USAGE)
        }
    };
    // Then the process ends without tearing the runtime down: after a connection loss, lapin
    // may still be recovering the connection on tasks of that runtime, and dropping them
    // during a runtime shutdown makes tokio panic ("Tokio context is being shutdown") on
    // stderr after Warren's own clear error. Nothing is left to finish: the result is
    // printed and the client closed.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}
