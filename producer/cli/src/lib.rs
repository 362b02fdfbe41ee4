//! # warren-cli
//!
//! The `warren` command line: `call`, `enqueue`, `dlq`, `status` ([`status`]: is it working?),
//! `functions` ([`functions`]: which queue serves each function; releasing a claim), `result`
//! ([`result`]: what became of a task, after its caller has gone), `events` ([`events`]: what
//! the fleet did lately) and `demo` ([`demo`]: the motivating scenario, mail to 1000 users
//! without blocking); [`progress`]: `call`'s progress bar.
//!
//! Results go to stdout (JSON, one line); errors go to stderr as `error: <kind>: <message>`,
//! with a non-zero exit status ([`result::exit`]), so scripts can tell the two apart.

pub mod demo;
pub mod events;
pub mod functions;
pub mod progress;
pub mod result;
pub mod status;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use warren_shared::broker::{BrokerSettings, DEFAULT_AMQP_URL};
use warren_shared::cli::BrokerArgs;
use warren_shared::topology::{self, DEFAULT_QUEUE};

use crate::demo::DemoOptions;
use crate::progress::ProgressMode;
use crate::result::exit;
use warren_client::Error;
use warren_client::Replay;
use warren_client::{CallOptions, Client, ClientSettings};

/// Warren: call and enqueue tasks on RabbitMQ-backed workers.
#[derive(Debug, Parser)]
#[command(name = "warren", version)]
pub struct Cli {
    /// Broker URL (the vhost `/` is `%2f`), or several separated by commas (cluster nodes,
    /// tried in a shuffled order on connect and every reconnect).
    #[arg(long, global = true, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// URL file and TLS certificates.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Do not declare the exchange and queues (they must exist): lets `warren` run as a broker
    /// user without `configure` permission.
    #[arg(long, global = true, env = "WARREN_NO_DECLARE")]
    pub no_declare: bool,
    /// Queue and functions exchange, before or after the subcommand.
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a task and print its JSON result.
    Call {
        /// Function name, e.g. `echo`.
        function: String,
        /// JSON arguments, e.g. '{"x":1}' (default: null).
        args: Option<String>,
        /// How long to wait for the result (e.g. `500ms`, `30s`).
        #[arg(long, default_value = shown(ClientSettings::default().call_timeout),
              value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The progress the task reports, on stderr: `auto` draws a bar when stderr is a
        /// terminal, `lines` writes one JSON line per update, `off` shows nothing.
        #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
        progress: ProgressMode,
    },
    /// Queue a task without waiting; print its id once the broker holds it.
    Enqueue {
        /// Function name, e.g. `send_mail`.
        function: String,
        /// JSON arguments (default: null).
        args: Option<String>,
        /// Run it this long from now (e.g. `90s`, `2h`, `3days`), not before; whole seconds,
        /// up to 2^28 - 1 s (8.5 years). It waits in the broker, not in a worker.
        #[arg(long = "in", value_name = "DELAY", value_parser = humantime::parse_duration,
              conflicts_with = "at")]
        delay: Option<Duration>,
        /// Run it at this time, not before (RFC 3339, e.g. `2026-12-08T09:00:00Z`).
        #[arg(long, value_name = "TIME", value_parser = humantime::parse_rfc3339_weak)]
        at: Option<std::time::SystemTime>,
    },
    /// Inspect and replay the tasks parked in the dead-letter queue.
    Dlq {
        /// What to do with the dead letters.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Which queue serves each function, with its consumers and depth (management API);
    /// `release NAME` frees a function for another queue.
    Functions {
        /// RabbitMQ's management API, as for `status`.
        #[arg(long, env = "WARREN_MANAGEMENT_URL", hide_env_values = true)]
        management_url: Option<String>,
        /// Print JSON (one array) instead of text.
        #[arg(long)]
        json: bool,
        /// Without one: list the functions.
        #[command(subcommand)]
        action: Option<FunctionsAction>,
    },
    /// Is it working? Depth, consumers, rates and workers of a queue (`--queue`), or of every
    /// queue that serves a function and `warren.tasks`, from the management API.
    Status {
        /// RabbitMQ's management API, e.g. `http://host:15672` (default: the broker's host,
        /// port 15672, with the broker URL's credentials unless this URL has its own).
        #[arg(long, env = "WARREN_MANAGEMENT_URL", hide_env_values = true)]
        management_url: Option<String>,
        /// Refresh in place until interrupted.
        #[arg(long)]
        watch: bool,
        /// How often `--watch` refreshes.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Print JSON (one object per refresh) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What became of a task, whoever enqueued it: its result, its failure, or how far it got,
    /// from the task event stream (within its retention). Exit status: 0 succeeded, 1 failed
    /// (or an error), 3 not found, 4 not settled (yet, or within --timeout).
    Result {
        /// The task's id (`warren enqueue` prints it).
        task_id: String,
        /// Wait for a task that has not settled yet (or has no event yet), at most --timeout.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = shown(DEFAULT_RESULT_WAIT),
              value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Duration,
        /// Print the whole outcome as one JSON object (`state`: settled, pending or
        /// not_found; `event`: the final or last event).
        #[arg(long)]
        json: bool,
        /// The event stream.
        #[command(flatten)]
        stream: events::StreamArgs,
    },
    /// What the fleet did lately: task events from the stream, one line each (time, kind,
    /// task, function, queue, attempt, worker, what happened), until caught up with the
    /// stream. `--queue` shows one queue's.
    Events {
        /// Keep showing events as they come, until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Only this task's events (from its creation, for a task id made by Warren, unless
        /// --since says otherwise).
        #[arg(long, value_name = "TASK_ID")]
        task: Option<String>,
        /// Only this function's events.
        #[arg(long)]
        function: Option<String>,
        /// Only events of these kinds (repeat it or separate them with commas): started,
        /// progress, succeeded, failed, dead_lettered, expired, cancelled.
        #[arg(long, value_delimiter = ',', value_parser = events::parse_kind)]
        kind: Vec<warren_shared::events::EventKind>,
        /// Start this long ago (e.g. `30s`, `2h`) [default: 10m].
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Print each event's JSON body as it was appended, one per line.
        #[arg(long)]
        json: bool,
        /// The event stream.
        #[command(flatten)]
        stream: events::StreamArgs,
    },
    /// Mail 1000 users through workers, without blocking, and report how it went.
    Demo {
        /// How many send_mail tasks to send.
        #[arg(long, default_value_t = demo::DEFAULT_TASKS)]
        tasks: usize,
        /// Worker processes to start when none consume the queue.
        #[arg(long, default_value_t = demo::DEFAULT_WORKERS)]
        workers: usize,
        /// Where the workers started by the demo write the mail.
        #[arg(long, default_value = demo::DEFAULT_OUTBOX)]
        outbox: PathBuf,
        /// How long each call may wait for its result.
        #[arg(long, default_value = shown(demo::DEFAULT_TIMEOUT),
              value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// How long to look for a worker consuming the queue before starting local ones
        /// (workers that are reconnecting have no consumer for a moment).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        worker_wait: Duration,
    },
}

/// `warren dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// One line per parked task: id, function, reason, kind, attempts, when, error.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = DEFAULT_DLQ_LIMIT)]
        limit: usize,
    },
    /// Everything about one parked task, as JSON.
    Show {
        /// The task id.
        id: String,
    },
    /// Send parked tasks back to the work queue with a fresh attempt budget.
    Replay {
        /// The task id (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every parked task.
        #[arg(long)]
        all: bool,
    },
    /// Delete every parked task.
    Purge,
}

/// `warren functions ...`.
#[derive(Debug, Subcommand)]
pub enum FunctionsAction {
    /// Free a function's claim (delete its exchange on the functions exchange), so that the
    /// next worker serving it claims it for its own queue. Refused while the queue that owns it
    /// has consumers or ready tasks. Needs `configure` on the function's exchange (a worker's or
    /// an operator's permissions).
    Release {
        /// The function, e.g. `echo`.
        function: String,
        /// Release it even though its queue has consumers or ready tasks (they keep the tasks
        /// already queued; new ones go to the next queue that claims the function).
        #[arg(long)]
        force: bool,
    },
}

/// How long `warren result --wait` waits unless told otherwise.
pub const DEFAULT_RESULT_WAIT: Duration = Duration::from_secs(30);

/// How many parked tasks `warren dlq list` shows unless told otherwise.
pub const DEFAULT_DLQ_LIMIT: usize = 100;

/// A duration default as `--help` shows it (`30s`), from the constant that defines it.
fn shown(default: Duration) -> String {
    humantime::format_duration(default).to_string()
}

/// The queue flags shared by every subcommand.
#[derive(Debug, Args)]
pub struct Target {
    /// Work queue. `call` and `enqueue` send to it whatever function it serves; without it they
    /// send by function name to the queue that serves the function. `dlq` and `demo` use it, or
    /// `warren.tasks`; `status` shows it, or without it every queue that serves a function;
    /// `events` shows only its events.
    #[arg(long, global = true, env = "WARREN_QUEUE")]
    pub queue: Option<String>,
    /// The exchange that routes tasks by function name (the workers' `functions_exchange`).
    #[arg(long, global = true, env = "WARREN_FUNCTIONS_EXCHANGE",
          default_value = topology::FUNCTIONS_EXCHANGE)]
    pub functions_exchange: String,
}

impl Target {
    /// The queue named, or the default one.
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }
}

/// Runs the parsed command line and returns the process exit status ([`result::exit`]).
pub async fn run(cli: Cli) -> u8 {
    match execute(cli).await {
        Ok(status) => status,
        Err(message) => {
            eprintln!("error: {message}");
            exit::FAILED
        }
    }
}

async fn execute(cli: Cli) -> Result<u8, String> {
    let broker = cli
        .broker
        .apply(BrokerSettings::new(cli.amqp_url.clone()))
        .map_err(|e| e.to_string())?;
    let settings = |target: &Target, queue: Option<&str>| ClientSettings {
        broker: broker.clone(),
        queue: queue.map(str::to_owned),
        functions_exchange: target.functions_exchange.clone(),
        declare: !cli.no_declare,
        ..ClientSettings::default()
    };
    let target = &cli.target;
    match &cli.command {
        Command::Call {
            function,
            args,
            timeout,
            progress,
        } => {
            let args = parse_args(args.as_deref())?;
            let client = Client::connect(settings(target, target.queue.as_deref()))
                .await
                .map_err(describe)?;
            let options = CallOptions::default().timeout(*timeout);
            let result = progress::call(&client, function, args, &options, *progress).await;
            client.close().await;
            println!("{}", result.map_err(describe)?);
        }
        Command::Enqueue {
            function,
            args,
            delay,
            at,
        } => {
            let args = parse_args(args.as_deref())?;
            let options = CallOptions {
                run_at: match delay {
                    Some(d) => Some(run_at_in(*d)?),
                    None => *at,
                },
                ..CallOptions::default()
            };
            let client = Client::connect(settings(target, target.queue.as_deref()))
                .await
                .map_err(describe)?;
            let id = client.enqueue_json_with(function, args, &options).await;
            client.close().await;
            println!("{}", id.map_err(describe)?);
        }
        Command::Dlq { action } => {
            let client = Client::connect(settings(target, Some(target.queue())))
                .await
                .map_err(describe)?;
            let done = dlq(&client, target.queue(), action).await;
            client.close().await;
            done?;
        }
        Command::Status {
            management_url,
            watch,
            interval,
            json,
        } => {
            let source = status_source(&broker, management_url);
            loop {
                let report =
                    status::read(&source, target.queue.as_deref(), &target.functions_exchange)
                        .await?;
                if *json {
                    let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
                    println!("{line}");
                } else if *watch {
                    // Home, clear the screen below: the view refreshes in place.
                    print!("\x1b[H\x1b[J{}", status::render(&report));
                } else {
                    print!("{}", status::render(&report));
                }
                if !*watch {
                    break;
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    () = tokio::time::sleep(*interval) => {}
                }
            }
        }
        Command::Functions {
            management_url,
            json,
            action: None,
        } => {
            let source = status_source(&broker, management_url);
            let exchange = target.functions_exchange.clone();
            let (api, shown) = status::Management::of(&source)?;
            let rows = tokio::task::spawn_blocking(move || functions::list(&api, &exchange))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| {
                    format!(
                        "management API not reachable at {shown} ({e}); AMQP cannot list \
                         functions. Enable the rabbitmq_management plugin or pass \
                         --management-url."
                    )
                })?;
            if *json {
                println!(
                    "{}",
                    serde_json::to_string(&rows).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", functions::render(&target.functions_exchange, &rows));
            }
        }
        Command::Functions {
            management_url,
            action: Some(FunctionsAction::Release { function, force }),
            ..
        } => {
            // The owner's full name, when the management API answers: the broker's own answer
            // over AMQP cuts long names, and such a claim is released only when forced.
            let source = status_source(&broker, management_url);
            let (api, _) = status::Management::of(&source)?;
            let (exchange, name) = (target.functions_exchange.clone(), function.clone());
            let listed =
                tokio::task::spawn_blocking(move || functions::owner(&api, &exchange, &name))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok()
                    .flatten();
            let client = Client::connect(settings(target, None))
                .await
                .map_err(describe)?;
            let released = match &listed {
                Some(owner) => {
                    client
                        .release_function_owned_by(function, owner, *force)
                        .await
                }
                None => client.release_function(function, *force).await,
            };
            client.close().await;
            let released = released.map_err(|e| e.to_string())?;
            println!(
                "released {} from queue {} ({} consumer(s), {} ready task(s) left there)",
                released.function, released.queue, released.consumers, released.ready
            );
        }
        Command::Result {
            task_id,
            wait,
            timeout,
            json,
            stream,
        } => {
            let client = Client::connect(with_stream(settings(target, None), stream))
                .await
                .map_err(describe)?;
            let shown = result::show(&client, task_id, wait.then_some(*timeout), *json).await;
            client.close().await;
            return shown;
        }
        Command::Events {
            follow,
            task,
            function,
            kind,
            since,
            json,
            stream,
        } => {
            let filter = events::Filter {
                task: task.clone(),
                function: function.clone(),
                queue: target.queue.clone(),
                kinds: kind.clone(),
            };
            let start = events::start(*since, task.as_deref());
            let client = Client::connect(with_stream(settings(target, None), stream))
                .await
                .map_err(describe)?;
            let shown = events::show(&client, start, &filter, *follow, *json).await;
            client.close().await;
            shown?;
        }
        Command::Demo {
            tasks,
            workers,
            outbox,
            timeout,
            worker_wait,
        } => {
            let client = Client::connect(settings(target, Some(target.queue())))
                .await
                .map_err(describe)?;
            let options = DemoOptions {
                amqp_url: broker.url.clone(),
                queue: target.queue().to_owned(),
                tasks: *tasks,
                workers: *workers,
                outbox: outbox.clone(),
                timeout: *timeout,
                worker_wait: *worker_wait,
            };
            let outcome = demo::run(&client, &options).await;
            client.close().await;
            let summary = outcome.map_err(|e| format!("{e:#}"))?;
            if summary.failures > 0 {
                return Err(format!(
                    "{} of {} tasks failed",
                    summary.failures, summary.tasks
                ));
            }
        }
    }
    Ok(exit::OK)
}

/// `settings` reading the event stream of `stream`.
fn with_stream(settings: ClientSettings, stream: &events::StreamArgs) -> ClientSettings {
    ClientSettings {
        events_stream: stream.events_stream.clone(),
        events_max_age: stream.events_max_age,
        ..settings
    }
}

/// Where `status` and `functions` read: the first broker address, and the management API.
fn status_source(broker: &BrokerSettings, management_url: &Option<String>) -> status::StatusSource {
    status::StatusSource {
        amqp_url: broker
            .url
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        broker: broker.clone(),
        management_url: management_url.clone(),
    }
}

async fn dlq(client: &Client, queue: &str, action: &DlqAction) -> Result<(), String> {
    match action {
        DlqAction::List { limit } => {
            let dead = client.dead_letters(queue, *limit).await.map_err(describe)?;
            if dead.is_empty() {
                eprintln!("no dead letters in {queue}.dead");
            }
            let mut out = std::io::stdout().lock();
            for d in dead {
                let when = d
                    .dead_at
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string());
                let written = writeln!(
                    out,
                    "{}  {}  {}  {}  attempts={}  {}  {}",
                    d.id,
                    d.function.as_deref().unwrap_or("-"),
                    d.reason,
                    d.kind.as_deref().unwrap_or("-"),
                    d.attempts.map_or_else(|| "-".to_owned(), |a| a.to_string()),
                    when.as_deref().unwrap_or("-"),
                    d.error.as_deref().unwrap_or("-"),
                );
                match written {
                    Ok(()) => {}
                    // The reader had enough (`warren dlq list | head`): stop, quietly.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(format!("cannot write to stdout: {e}")),
                }
            }
        }
        DlqAction::Show { id } => {
            let dead = client
                .dead_letters(queue, usize::MAX)
                .await
                .map_err(describe)?;
            let found = dead
                .into_iter()
                .find(|d| &d.id == id)
                .ok_or_else(|| format!("no dead letter with id {id} in {queue}.dead"))?;
            let json = serde_json::to_string_pretty(&found).map_err(|e| e.to_string())?;
            println!("{json}");
        }
        DlqAction::Replay { id, all } => {
            let which = match (id, all) {
                (Some(id), false) => Replay::One(id.clone()),
                _ => Replay::All,
            };
            let replayed = client
                .replay_dead_letters(queue, &which)
                .await
                .map_err(describe)?;
            if let Replay::One(id) = &which
                && replayed == 0
            {
                return Err(format!("no dead letter with id {id} in {queue}.dead"));
            }
            println!("replayed {replayed}");
        }
        DlqAction::Purge => {
            let purged = client.purge_dead_letters(queue).await.map_err(describe)?;
            println!("purged {purged}");
        }
    }
    Ok(())
}

/// The time `delay` from now, or the error sending would give for a delay past the longest
/// (checked first: a delay past what the clock can represent cannot be added to now).
fn run_at_in(delay: Duration) -> Result<std::time::SystemTime, String> {
    warren_shared::delay::delay_seconds(delay)
        .map_err(|e| describe(Error::InvalidDelay(e.to_string())))?;
    Ok(std::time::SystemTime::now() + delay)
}

fn parse_args(args: Option<&str>) -> Result<Value, String> {
    match args {
        None => Ok(Value::Null),
        Some(text) => serde_json::from_str(text).map_err(|e| {
            format!("ARGS is not valid JSON ({e}); quote it for the shell, e.g. '{{\"x\":1}}'")
        }),
    }
}

/// One line for stderr: the task's kind and message, or what failed before it could run.
fn describe(error: Error) -> String {
    match error {
        Error::Failed(failure) => format!("{}: {}", failure.kind, failure.message),
        Error::Timeout(_) => format!("timeout: {error}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_past_the_clock_is_an_error_not_a_panic() {
        let far = humantime::parse_duration("300000000000years").unwrap();
        let error = run_at_in(far).unwrap_err();
        assert!(error.starts_with("cannot delay the task"), "{error}");
        assert!(run_at_in(Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn enqueue_takes_a_delay_or_a_time_but_not_both() {
        let at = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Enqueue { delay, at, .. }) => Ok((delay, at)),
            Ok(_) => Err("not enqueue".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            at(&["warren", "enqueue", "f", "--in", "90s"]),
            Ok((Some(Duration::from_secs(90)), None))
        );
        let (_, time) = at(&["warren", "enqueue", "f", "--at", "2026-12-08T09:00:00Z"]).unwrap();
        assert_eq!(
            time.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            Some("2026-12-08T09:00:00Z".to_owned())
        );
        assert!(at(&["warren", "enqueue", "f", "--at", "tomorrow"]).is_err());
        assert!(
            at(&[
                "warren",
                "enqueue",
                "f",
                "--in",
                "1s",
                "--at",
                "2026-12-08T09:00:00Z"
            ])
            .is_err()
        );
    }

    #[test]
    fn the_queue_flags_go_before_or_after_the_subcommand() {
        for argv in [
            &["warren", "--queue", "q", "dlq", "list"][..],
            &["warren", "dlq", "--queue", "q", "list"],
            &["warren", "dlq", "list", "--queue", "q"],
            &["warren", "--queue", "q", "call", "echo", "1"],
            &["warren", "call", "echo", "1", "--queue", "q"],
            &["warren", "--queue", "q", "status"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(cli.target.queue(), "q", "{argv:?}");
        }
        let cli = Cli::try_parse_from(["warren", "enqueue", "echo"]).unwrap();
        assert_eq!(cli.target.queue, None);
        assert_eq!(cli.target.queue(), DEFAULT_QUEUE);
    }

    #[test]
    fn functions_lists_by_default_and_release_takes_a_name_and_force() {
        let cli = Cli::try_parse_from(["warren", "functions", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Functions {
                json: true,
                action: None,
                ..
            }
        ));
        let cli =
            Cli::try_parse_from(["warren", "functions", "release", "echo", "--force"]).unwrap();
        let Command::Functions {
            action: Some(FunctionsAction::Release { function, force }),
            ..
        } = cli.command
        else {
            panic!("not a release: {:?}", cli.command);
        };
        assert_eq!((function.as_str(), force), ("echo", true));
        assert!(Cli::try_parse_from(["warren", "functions", "release"]).is_err());
        // `status` without --queue is the whole deployment.
        let cli = Cli::try_parse_from(["warren", "status"]).unwrap();
        assert_eq!(cli.target.queue, None);
    }
}
