//! `warren call`'s progress display: a bar on a terminal, JSON lines for scripts, or nothing.
//!
//! The updates a running task reports ([`warren_client::ProgressCall`]) are shown on stderr, so
//! that stdout keeps the one line of the result: on a terminal a bar (the fraction) with the
//! task's message beside it, drawn from the first update on and cleared before the result is
//! printed; with `--progress lines`, one JSON object per update,
//! `{"progress": {"attempt": 1, "fraction": 0.4, "message": "..."}}`.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use warren_client::{CallOptions, CallerProgress, Client, Error};

/// How `warren call` shows the progress of the task it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ProgressMode {
    /// A bar on stderr when stderr is a terminal; nothing otherwise.
    #[default]
    Auto,
    /// One JSON line per update on stderr, terminal or not.
    Lines,
    /// Nothing (the task's progress updates are not asked for).
    Off,
}

/// The bar's length: a fraction in thousandths.
const BAR_STEPS: u64 = 1000;

/// Where updates are shown.
enum Display {
    Bar(Option<ProgressBar>),
    Lines,
}

impl Display {
    fn show(&mut self, update: &CallerProgress) {
        match self {
            Self::Bar(bar) => {
                let bar = bar.get_or_insert_with(new_bar);
                if let Some(fraction) = update.progress.fraction {
                    bar.set_position((fraction * BAR_STEPS as f64).round() as u64);
                }
                if let Some(message) = &update.progress.message {
                    bar.set_message(message.clone());
                }
            }
            Self::Lines => {
                let line = serde_json::json!({ "progress": update });
                let mut stderr = std::io::stderr().lock();
                let _ = writeln!(stderr, "{line}");
            }
        }
    }

    fn finish(self) {
        if let Self::Bar(Some(bar)) = self {
            bar.finish_and_clear();
        }
    }
}

fn new_bar() -> ProgressBar {
    let bar = ProgressBar::new(BAR_STEPS).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {percent:>3}%  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Calls `function` with `args`, showing its progress as `mode` says, and returns its result.
///
/// # Errors
/// As [`Client::call_json_with`].
pub async fn call(
    client: &Client,
    function: &str,
    args: Value,
    options: &CallOptions,
    mode: ProgressMode,
) -> Result<Value, Error> {
    let mut display = match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => Display::Bar(None),
        ProgressMode::Lines => Display::Lines,
        ProgressMode::Auto | ProgressMode::Off => {
            return client.call_json_with(function, args, options).await;
        }
    };
    let mut call = client.call_json_with_progress(function, args, options);
    while let Some(update) = call.progress().await {
        display.show(&update);
    }
    display.finish();
    call.await
}
