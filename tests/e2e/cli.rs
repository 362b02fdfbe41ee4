//! The `warren` command line against a `warren-worker` process started by the test.

use std::process::{Command, Output};
use std::time::Duration;

use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually, temp_dir};

fn warren(args: &[&str]) -> Output {
    let output = Command::new(binary("warren"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .output();
    match output {
        Ok(output) => output,
        Err(e) => panic!("cannot run warren: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn cli_call_and_enqueue_against_a_worker_process() {
    let q = TestQueue::new("cli");
    let outbox = temp_dir("cli-outbox");
    let outbox_arg = outbox.path().to_string_lossy().into_owned();
    let _worker = ChildGuard::worker(&q.name, &["--outbox", &outbox_arg, "--concurrency", "4"]);
    let client = q.client().await;
    eventually(
        "the worker process to consume",
        Duration::from_secs(20),
        || async {
            client
                .queue_stats(&q.name)
                .await
                .map(|s| s.consumers)
                .unwrap_or(0)
                >= 1
        },
    )
    .await;

    let out = warren(&["call", "echo", r#"{"x":1}"#, "--queue", &q.name]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "{\"x\":1}\n");

    let out = warren(&["call", "no_such_function", "{}", "--queue", &q.name]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).starts_with("error: unknown_function: "),
        "stderr: {}",
        text(&out.stderr)
    );

    let out = warren(&["call", "echo", "{not json", "--queue", &q.name]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ARGS is not valid JSON"),
        "stderr: {}",
        text(&out.stderr)
    );

    let mail = r#"{"from":"a@shop.example","to":"b@example.com","subject":"hi","body":"hello"}"#;
    let out = warren(&["enqueue", "send_mail", mail, "--queue", &q.name]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "not a task id: {id:?}");
    let eml = outbox.path().join(format!("{id}.eml"));
    eventually(
        "the enqueued mail in the outbox",
        Duration::from_secs(20),
        || async { eml.exists() },
    )
    .await;
}

#[tokio::test]
async fn cli_reports_an_unreachable_broker_clearly() {
    let out = Command::new(binary("warren"))
        .args(["call", "echo", "1"])
        .env("AMQP_URL", "amqp://guest:secret@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"));
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Reading parked tasks never declares: a mistyped `--queue` is an error naming the queue it
/// looked for, and leaves no queue behind.
#[tokio::test]
async fn cli_dlq_on_a_queue_that_does_not_exist_says_so_and_creates_nothing() {
    let q = TestQueue::new("cli-dlq-typo");
    for command in [
        &["dlq", "list"][..],
        &["dlq", "purge"],
        &["dlq", "replay", "--all"],
    ] {
        let out = warren(&[&["--queue", q.name.as_str()][..], command].concat());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {stderr}");
        assert!(
            stderr.contains(&format!("no queue {}.dead", q.name)),
            "{command:?}: {stderr}"
        );
    }
    for name in [q.name.clone(), format!("{}.dead", q.name)] {
        // A channel each: a passive declare that finds nothing closes its channel.
        let (_connection, channel) = warren_tests::raw_channel().await;
        let found = warren_tests::inspect_queue(&channel, &name).await;
        assert!(found.is_err(), "{name} was created");
    }
}

#[tokio::test]
async fn cli_dlq_lists_shows_replays_and_purges() {
    use warren_shared::tasks::Echo;
    let q = TestQueue::new("cli-dlq");
    let client = q.client().await;
    // A worker that does not serve `echo`: both tasks are parked as unknown functions.
    let wrong = q
        .worker(
            warren_worker::Registry::new().register::<warren_shared::tasks::Sleep>(),
            2,
        )
        .await;
    let first = client.enqueue(&Echo(serde_json::json!(1))).await.unwrap();
    let second = client.enqueue(&Echo(serde_json::json!(2))).await.unwrap();
    eventually("two dead letters", Duration::from_secs(10), || async {
        q.dead_count(&client).await == 2
    })
    .await;
    wrong.shutdown().await.unwrap();

    let out = warren(&["dlq", "list", "--queue", &q.name]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let listing = text(&out.stdout);
    assert_eq!(listing.lines().count(), 2, "{listing}");
    for id in [&first, &second] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .expect("a line per task");
        assert!(
            line.contains("echo  rejected  unknown_function  attempts=1"),
            "{line}"
        );
    }

    let out = warren(&["dlq", "show", first.as_str(), "--queue", &q.name]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["id"], first.as_str());
    assert_eq!(shown["reason"], "rejected");
    assert_eq!(shown["body"]["function"], "echo");

    // Replayed to a worker that serves `echo`, the first task runs and leaves the queue.
    let right = q
        .worker(warren_worker::Registry::new().register::<Echo>(), 2)
        .await;
    let out = warren(&["dlq", "replay", first.as_str(), "--queue", &q.name]);
    assert_eq!(
        text(&out.stdout),
        "replayed 1\n",
        "stderr: {}",
        text(&out.stderr)
    );
    eventually("one dead letter left", Duration::from_secs(10), || async {
        q.dead_count(&client).await == 1
    })
    .await;

    let out = warren(&["dlq", "purge", "--queue", &q.name]);
    assert_eq!(
        text(&out.stdout),
        "purged 1\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(q.dead_count(&client).await, 0);

    let out = warren(&["dlq", "show", "no-such-id", "--queue", &q.name]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no dead letter with id no-such-id"),
        "{}",
        text(&out.stderr)
    );
    right.shutdown().await.unwrap();
}

/// Runs `warren` with `args` without blocking the test's runtime, within `bound`.
async fn warren_within(args: &[&str], envs: &[(&str, &str)], bound: Duration) -> Output {
    let mut command = tokio::process::Command::new(binary("warren"));
    command
        .args(args)
        .env("AMQP_URL", amqp_url())
        .envs(envs.iter().copied())
        .kill_on_drop(true);
    match tokio::time::timeout(bound, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run warren: {e}"),
        Err(_) => panic!("warren {args:?} did not finish within {bound:?}"),
    }
}

#[tokio::test]
async fn cli_dlq_replay_all_replays_what_was_parked_once_even_if_it_fails_again() {
    use warren_shared::tasks::Echo;
    let q = TestQueue::new("cli-replay-all");
    let client = q.client().await;
    // A worker that does not serve `echo` keeps running: every replayed copy is parked again
    // while the replay goes on.
    let wrong = q
        .worker(
            warren_worker::Registry::new().register::<warren_shared::tasks::Sleep>(),
            4,
        )
        .await;
    for i in 0..5 {
        client.enqueue(&Echo(serde_json::json!(i))).await.unwrap();
    }
    eventually("five dead letters", Duration::from_secs(10), || async {
        q.dead_count(&client).await == 5
    })
    .await;

    let out = warren_within(
        &["dlq", "replay", "--all", "--queue", &q.name],
        &[],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        text(&out.stdout),
        "replayed 5\n",
        "stderr: {}",
        text(&out.stderr)
    );
    // They failed again and are parked again, once each.
    eventually("the five parked again", Duration::from_secs(10), || async {
        q.dead_count(&client).await == 5
    })
    .await;
    let parked = client.dead_letters(&q.name, 100).await.unwrap();
    assert_eq!(parked.len(), 5, "{parked:?}");
    wrong.shutdown().await.unwrap();
}

#[tokio::test]
async fn cli_demo_uses_workers_that_are_reconnecting() {
    let relay = warren_tests::relay::Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("cli-demo");
    let client = q.client().await;
    let outbox = warren_tests::temp_dir("demo-outbox");
    let mut settings = q.worker_settings(4);
    settings.broker = warren_shared::broker::BrokerSettings::new(relay.url(5));
    let worker = q
        .worker_with(
            warren_worker::builtin_registry(warren_worker::Mailer::outbox(outbox.path())),
            settings,
        )
        .await;
    eventually("the worker to consume", Duration::from_secs(20), || async {
        client
            .queue_stats(&q.name)
            .await
            .map(|s| s.consumers)
            .unwrap_or(0)
            == 1
    })
    .await;
    // The worker's connection drops: for a moment the queue has no consumer, then the worker
    // is back.
    relay.cut();
    eventually(
        "the consumer to be gone",
        Duration::from_secs(20),
        || async {
            client
                .queue_stats(&q.name)
                .await
                .map(|s| s.consumers)
                .unwrap_or(1)
                == 0
        },
    )
    .await;
    let demo_outbox = warren_tests::temp_dir("demo-own-outbox");
    let out = warren_within(
        &[
            "demo",
            "--queue",
            &q.name,
            "--tasks",
            "3",
            "--workers",
            "1",
            "--worker-wait",
            "30s",
            "--outbox",
            &demo_outbox.path().to_string_lossy(),
        ],
        &[],
        Duration::from_secs(120),
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains("1 worker(s) already consume"),
        "the demo must wait for the reconnecting worker: {stderr}"
    );
    assert!(!stderr.contains("starting"), "{stderr}");
    assert!(
        text(&out.stdout).contains("3 messages -> outbox"),
        "{}",
        text(&out.stdout)
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_enqueue_during_a_connection_loss_fails_clearly_without_a_panic() {
    // A private node: the test raises an alarm on it and stops it.
    let node = warren_tests::node::BrokerNode::start("cli-enqueue").await;
    node.ctl_ok(&["set_vm_memory_high_watermark", "0.0001"]);
    let url = node.url();
    let enqueue = tokio::spawn(async move {
        warren_within(
            &["enqueue", "echo", "1", "--queue", "cli.enqueue.lost"],
            &[("AMQP_URL", url.as_str())],
            Duration::from_secs(120),
        )
        .await
    });
    // The publish is held by the alarm: the connection is blocked, the enqueue in progress.
    eventually(
        "the enqueue to be blocked",
        Duration::from_secs(30),
        || async {
            let states = node.ctl(&["list_connections", "state"]);
            String::from_utf8_lossy(&states.stdout).contains("blocked")
        },
    )
    .await;
    // Now the connection is lost (and the broker refuses new ones).
    node.stop_app();
    let out = enqueue.await.expect("the enqueue task");
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "stdout: {}", text(&out.stdout));
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Tokio context"), "{stderr}");
}

/// `warren dlq list | head`: a reader that closes the pipe early ends the listing quietly
/// (exit 0, nothing on stderr), not with a "failed printing to stdout" panic.
#[tokio::test]
async fn cli_dlq_list_into_a_closed_pipe_exits_quietly() {
    let q = TestQueue::new("cli-pipe");
    let client = q.client().await;
    // A worker that does not serve `echo`: the task is parked as an unknown function.
    let wrong = q
        .worker(
            warren_worker::Registry::new().register::<warren_shared::tasks::Sleep>(),
            1,
        )
        .await;
    client
        .enqueue(&warren_shared::tasks::Echo(serde_json::json!(1)))
        .await
        .unwrap();
    eventually("a dead letter", Duration::from_secs(10), || async {
        q.dead_count(&client).await == 1
    })
    .await;
    wrong.shutdown().await.unwrap();

    let mut child = tokio::process::Command::new(binary("warren"))
        .args(["dlq", "list", "--queue", &q.name])
        .env("AMQP_URL", amqp_url())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Close the read end before the listing is written: its first line meets a closed pipe.
    drop(child.stdout.take());
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("warren dlq list did not exit")
        .unwrap();
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr), "", "stderr");
    // The listing left the dead letter where it was (put back as its channel closed).
    eventually("the dead letter back", Duration::from_secs(10), || async {
        q.dead_count(&client).await == 1
    })
    .await;
}

/// `warren <args>` on the functions exchange `functions_exchange`, reading the management API
/// at its default place.
fn warren_on(functions_exchange: &str, args: &[&str]) -> Output {
    let output = Command::new(binary("warren"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange)
        .env_remove("WARREN_MANAGEMENT_URL")
        .env_remove("WARREN_QUEUE")
        .output();
    match output {
        Ok(output) => output,
        Err(e) => panic!("cannot run warren: {e}"),
    }
}

/// `warren functions --json`: the claimed functions by name, as JSON rows.
fn functions_json(functions_exchange: &str) -> Vec<serde_json::Value> {
    let out = warren_on(functions_exchange, &["functions", "--json"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn claim_of<'a>(rows: &'a [serde_json::Value], function: &str) -> Option<&'a serde_json::Value> {
    rows.iter().find(|r| r["function"] == function)
}

/// The experiment that left `echo` claimed for good: a worker on a test queue serving the
/// built-ins, stopped. `warren functions` shows the claim, `status` without `--queue` shows the
/// queue, `release` is refused while the queue is in use and frees the function otherwise, and
/// a worker on another queue then starts and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_functions_lists_a_stopped_workers_claims_and_release_frees_them_for_another_queue() {
    let first = TestQueue::new("claims-first");
    let second = TestQueue::new("claims-second");
    // One deployment of their own: both queues claim on the first queue's functions exchange.
    let fx = first.functions_exchange();
    let client = first.client().await;

    let mut worker = ChildGuard::worker(&first.name, &["--builtins", "echo,sleep"]);
    eventually(
        "the first worker to consume",
        Duration::from_secs(20),
        || async {
            client
                .queue_stats(&first.name)
                .await
                .is_ok_and(|s| s.consumers >= 1)
        },
    )
    .await;
    // The management API's figures lag by a few seconds.
    eventually(
        "functions to show the consumer",
        Duration::from_secs(30),
        || async { claim_of(&functions_json(&fx), "echo").is_some_and(|r| r["consumers"] == 1) },
    )
    .await;
    let rows = functions_json(&fx);
    let echo = claim_of(&rows, "echo").unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(echo["queue"], first.name.as_str());
    assert_eq!(echo["routed"], true);
    // Refused while a worker consumes the queue.
    let out = warren_on(&fx, &["functions", "release", "echo"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("1 consumer") && stderr.contains("--force"),
        "{stderr}"
    );

    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let stopped = worker.wait_timeout(Duration::from_secs(30));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");

    // The claim outlives the worker: a worker on another queue that serves echo cannot start,
    // and says which queue owns the function and the command that frees it.
    let dir = temp_dir("claims");
    let log = dir.path().join("refused.log");
    let mut command = Command::new(binary("warren-worker"));
    command
        .args(["--queue", &second.name, "--builtins", "echo"])
        .args(["--functions-exchange", &fx])
        .env("AMQP_URL", amqp_url())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut refused = ChildGuard::spawn(command);
    let exit = refused.wait_timeout(Duration::from_secs(30));
    assert!(exit.is_some_and(|s| !s.success()), "{exit:?}");
    let said = std::fs::read_to_string(&log).unwrap();
    // The owner's name as the broker's refusal has it: cut at 255 bytes with the names of
    // test queues, so only its start is certain.
    assert!(
        said.contains("already served by queue \"test.claims-first.")
            && said.contains("warren functions release echo"),
        "{said}"
    );

    // `functions` shows the claim with no consumer; `status` without --queue shows the queue.
    eventually(
        "functions to show no consumer",
        Duration::from_secs(30),
        || async { claim_of(&functions_json(&fx), "echo").is_some_and(|r| r["consumers"] == 0) },
    )
    .await;
    let rows = functions_json(&fx);
    let echo = claim_of(&rows, "echo").unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(echo["queue"], first.name.as_str());
    assert_eq!(echo["consumers"], 0, "{echo}");
    assert_eq!(echo["ready"], 0, "{echo}");
    assert!(claim_of(&rows, "sleep").is_some_and(|r| r["queue"] == first.name.as_str()));
    let text_out = warren_on(&fx, &["functions"]);
    let listing = text(&text_out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("echo ") && l.contains(&first.name)),
        "{listing}"
    );
    let out = warren_on(&fx, &["status", "--json"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["queue"].is_null(), "{status}");
    let rows = status["queues"].as_array().unwrap();
    let mine: Vec<_> = rows
        .iter()
        .filter(|r| r["name"] == first.name.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "one row per queue: {status}");
    assert_eq!(mine[0]["functions"], serde_json::json!(["echo", "sleep"]));
    assert!(
        rows.iter().all(|r| r["role"] == "work"),
        "work queues only: {status}"
    );

    // Refused while a task waits in the queue, unless forced.
    client
        .enqueue_json("echo", serde_json::json!("waiting"))
        .await
        .unwrap();
    let out = warren_on(&fx, &["functions", "release", "echo"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("1 ready task"), "{stderr}");
    let out = warren_on(&fx, &["functions", "release", "echo", "--force"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("released echo from queue {}", first.name)),
        "{}",
        text(&out.stdout)
    );
    let rows = functions_json(&fx);
    assert!(claim_of(&rows, "echo").is_none(), "{rows:?}");
    let out = warren_on(&fx, &["functions", "release", "echo"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not claimed"),
        "{}",
        text(&out.stderr)
    );

    // The function is free: a worker on the second queue claims it and serves calls by name.
    let _second_worker = ChildGuard::worker(
        &second.name,
        &["--builtins", "echo", "--functions-exchange", &fx],
    );
    eventually(
        "echo claimed by the second queue",
        Duration::from_secs(30),
        || async {
            claim_of(&functions_json(&fx), "echo")
                .is_some_and(|r| r["queue"] == second.name.as_str() && r["consumers"] == 1)
        },
    )
    .await;
    let out = warren_on(&fx, &["call", "echo", "\"moved\""]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "\"moved\"");
    client.close().await;
}

/// A queue whose name the broker cuts: its AMQP refusal, which names a function's owner, is cut
/// at 255 bytes. `release` does not take the cut name for a queue that does not exist (and so
/// is not in use): without the management API it refuses unless forced, and with it, it checks
/// the queue the API names in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_functions_release_checks_an_owner_whose_name_the_broker_cuts() {
    // The longest test queue whose functions exchange is valid (74 bytes with `.functions`).
    let queue = TestQueue::new("a-long-owner-cut-by-broker");
    let fx = queue.functions_exchange();
    assert_eq!(
        fx.len(),
        warren_shared::topology::MAX_FUNCTIONS_EXCHANGE,
        "{fx}"
    );
    let client = queue.client().await;
    let _worker = ChildGuard::worker(&queue.name, &["--builtins", "echo"]);
    eventually("the worker to consume", Duration::from_secs(20), || async {
        client
            .queue_stats(&queue.name)
            .await
            .is_ok_and(|s| s.consumers >= 1)
    })
    .await;
    let unreachable = format!("http://127.0.0.1:{}", warren_tests::free_port());
    let out = warren_on(
        &fx,
        &[
            "functions",
            "--management-url",
            &unreachable,
            "release",
            "echo",
        ],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "released: {}", text(&out.stdout));
    assert!(
        stderr.contains("cut at 255 bytes") && stderr.contains("--force"),
        "{stderr}"
    );
    let rows = functions_json(&fx);
    assert!(
        claim_of(&rows, "echo").is_some_and(|r| r["queue"] == queue.name.as_str()),
        "the claim stays: {rows:?}"
    );
    // The management API names the owner in full: its consumer refuses the release.
    let out = warren_on(&fx, &["functions", "release", "echo"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "released: {}", text(&out.stdout));
    assert!(
        stderr.contains(&format!("queue \"{}\", which has 1 consumer", queue.name)),
        "{stderr}"
    );
    client.close().await;
}

/// `warren status` without `--queue` and without the management API shows what AMQP can tell,
/// `warren.tasks` alone, and says so: it neither claims to show every queue that serves a
/// function nor says that none exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_of_the_deployment_without_the_api_says_it_shows_warren_tasks_only() {
    let queue = TestQueue::new("status-no-api");
    let fx = queue.functions_exchange();
    let unreachable = format!("http://127.0.0.1:{}", warren_tests::free_port());
    let out = warren_on(&fx, &["status", "--management-url", &unreachable]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let header = shown.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("Warren deployment: warren.tasks only (figures from AMQP only"),
        "{shown}"
    );
    assert!(
        shown.contains("note: management API not reachable"),
        "{shown}"
    );
    assert!(!shown.contains("serves a function yet"), "{shown}");
    let out = warren_on(&fx, &["status", "--json", "--management-url", &unreachable]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["source"], "amqp", "{status}");
    let rows = status["queues"].as_array().unwrap();
    // Whether another test left warren.tasks on the shared broker decides the one row.
    assert!(rows.iter().all(|r| r["name"] == "warren.tasks"), "{status}");
    if rows.is_empty() {
        assert!(
            shown.contains("(no such queue: nothing has declared warren.tasks yet)"),
            "{shown}"
        );
    }
}
