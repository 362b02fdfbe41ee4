//! Configuration: the `--config` file of the binaries, its layering with the environment and
//! the flags, and the documented defaults (README tables, `deploy/*.toml` examples) tied to the
//! code.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Command as Cli;
use warren_gateway::GatewayConfig;
use warren_shared::config::{self, Layered};
use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually};
use warren_worker::WorkerConfig;

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_file(relative)).unwrap()
}

/// The rows (flag, environment, default) of the markdown table under `heading` in README.md.
fn readme_rows(heading: &str) -> Vec<[String; 3]> {
    let readme = read("README.md");
    let start = readme
        .lines()
        .position(|l| l == heading)
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    readme
        .lines()
        .skip(start + 1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|row| {
            let cells: Vec<String> = row.split('|').map(|c| c.trim().to_owned()).collect();
            [cells[1].clone(), cells[2].clone(), cells[3].clone()]
        })
        .collect()
}

/// Every flag of `C`'s command line is in the README tables under `headings`, with its
/// environment variable and the default the code has; and every row there is a flag.
fn assert_readme_matches<C: Layered>(headings: &[&str]) {
    let rows: Vec<[String; 3]> = headings.iter().flat_map(|h| readme_rows(h)).collect();
    let cmd = config::command::<C>(Cli::new("probe"));
    let flags: Vec<_> = cmd
        .get_arguments()
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    for arg in &flags {
        let long = arg.get_long().unwrap();
        let row = rows
            .iter()
            .find(|r| r[0] == format!("`--{long}`"))
            .unwrap_or_else(|| panic!("--{long} is missing from README's {headings:?}"));
        let env = arg.get_env().unwrap().to_string_lossy();
        assert_eq!(row[1], format!("`{env}`"), "environment of --{long}");
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if default.is_empty() {
            assert!(row[2].starts_with("unset"), "--{long}: README {:?}", row[2]);
        } else {
            assert_eq!(
                row[2],
                format!("`{}`", default.join(",")),
                "default of --{long}"
            );
        }
    }
    for row in &rows {
        assert!(
            flags
                .iter()
                .any(|a| row[0] == format!("`--{}`", a.get_long().unwrap())),
            "README documents {} but the program has no such flag",
            row[0]
        );
    }
}

#[test]
fn readme_configuration_tables_match_the_flags_and_their_defaults() {
    let broker = "### Broker settings (`[broker]`, both programs)";
    assert_readme_matches::<WorkerConfig>(&[broker, "### `warren-worker`"]);
    assert_readme_matches::<GatewayConfig>(&[broker, "### `warren-gateway`"]);
}

fn load<C: Layered>(file: Option<&Path>) -> C {
    let mut args = vec![PathBuf::from("probe")];
    if let Some(file) = file {
        args.extend([PathBuf::from("--config"), file.to_path_buf()]);
    }
    config::load_from(Cli::new("probe"), args).unwrap_or_else(|e| panic!("{e}"))
}

/// The example loads as it is; with every `# key = value` line uncommented it still equals the
/// defaults (so the values it shows are the code's); and it shows every setting that has one.
fn assert_example_documents_the_defaults<C: Layered + PartialEq + std::fmt::Debug>(relative: &str) {
    let path = repo_file(relative);
    assert_eq!(
        load::<C>(Some(&path)),
        load::<C>(None),
        "{relative} as shipped"
    );

    let text = read(relative);
    let is_default_line = |line: &str| {
        line.strip_prefix("# ").is_some_and(|rest| {
            rest.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        })
    };
    let uncommented: String = text
        .lines()
        .map(|l| if is_default_line(l) { &l[2..] } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &uncommented).unwrap();
    assert_eq!(
        load::<C>(Some(file.path())),
        load::<C>(None),
        "{relative} with its defaults uncommented"
    );

    let cmd = config::command::<C>(Cli::new("probe"));
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id != "config" && !arg.get_default_values().is_empty() {
            assert!(
                text.lines()
                    .any(|l| is_default_line(l) && l[2..].starts_with(&format!("{id} = "))),
                "{relative} does not show `{id}` at its default"
            );
        }
    }
}

#[test]
fn deploy_examples_load_and_show_the_defaults_of_the_code() {
    assert_example_documents_the_defaults::<WorkerConfig>("deploy/warren-worker.toml");
    assert_example_documents_the_defaults::<GatewayConfig>("deploy/warren-gateway.toml");
}

/// `warren-worker` with a clean environment (so that the test's own AMQP_URL or WARREN_*
/// variables do not leak in), `envs` and `args`.
fn worker_command(envs: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(binary("warren-worker"));
    command
        .env_clear()
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        // Claims nothing, so it never meets another worker's claim of the built-ins.
        .env("WARREN_FUNCTIONS_EXCHANGE", "")
        .envs(envs.iter().copied())
        .args(args)
        .stdout(Stdio::null());
    command
}

/// `(queue, prefetch)` of every consumer on the broker, from `rabbitmqctl list_consumers`.
fn prefetches(queue: &str) -> Vec<u32> {
    let out = Command::new("rabbitmqctl")
        .args(["list_consumers", "-q", "queue_name", "prefetch_count"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "rabbitmqctl list_consumers: {out:?}");
    let mut found: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(q, _)| *q == queue)
        .filter_map(|(_, n)| n.trim().parse().ok())
        .collect();
    found.sort_unstable();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_takes_its_settings_from_the_file_then_the_environment_then_the_flags() {
    let q = TestQueue::new("config-file");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "queue = \"{}\"\nconcurrency = 3\n\n[broker]\namqp_url = \"{}\"\n",
            q.name,
            amqp_url()
        ),
    )
    .unwrap();
    let path = file.path().to_str().unwrap();

    // Queue and broker only in the file; the concurrency (= the consumer's prefetch) from the
    // file, then from WARREN_CONCURRENCY over the file, then from the flag over both.
    let _from_file = ChildGuard::spawn(worker_command(&[], &["--config", path]));
    let _from_env = ChildGuard::spawn(worker_command(
        &[("WARREN_CONFIG", path), ("WARREN_CONCURRENCY", "4")],
        &[],
    ));
    let _from_flag = ChildGuard::spawn(worker_command(
        &[("WARREN_CONCURRENCY", "4")],
        &["--config", path, "--concurrency", "5"],
    ));

    let client = q.client().await;
    eventually(
        "three workers consuming",
        Duration::from_secs(30),
        || async {
            client
                .queue_stats(&q.name)
                .await
                .is_ok_and(|s| s.consumers == 3)
        },
    )
    .await;
    assert_eq!(prefetches(&q.name), [3, 4, 5]);
    client.close().await;
}

/// A zero watchdog interval is refused with a message, not a panic in tokio's `interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_watchdog_interval_is_refused_clearly() {
    let q = TestQueue::new("watchdog-zero");
    let args = ["--queue", q.name.as_str(), "--watchdog-interval", "0s"];
    let mut command =
        tokio::process::Command::from(worker_command(&[("AMQP_URL", &amqp_url())], &args));
    command.stderr(Stdio::piped()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the worker exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("watchdog_interval must be more than 0") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typo_in_the_file_stops_the_worker_with_the_key_and_the_file() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    // The worker's exit status and stderr with `contents` as its file.
    let run = |contents: &'static str| async move {
        std::fs::write(path, contents).unwrap();
        let mut command = tokio::process::Command::from(worker_command(&[], &["--config", path]));
        command.stderr(Stdio::piped()).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("the worker exits on a bad file")
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (status, stderr) = run("concurency = 3\n").await;
    assert_eq!(status, Some(2), "{stderr}");
    assert!(
        stderr.contains("`concurency`") && stderr.contains(path),
        "names the key and the file: {stderr}"
    );

    // A bad duration names its key too.
    let (status, stderr) = run("time_limit = \"5 parsecs\"\n").await;
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("`time_limit`"), "{stderr}");

    // So does a pool table with a value that cannot work, found when the pools start.
    let (status, stderr) =
        run("[[pool]]\nfunctions = [\"f\"]\ncommand = [\"true\"]\nmax_jobs = 0\n").await;
    assert_eq!(status, Some(2), "{stderr}");
    assert!(stderr.contains("max_jobs"), "{stderr}");
}
