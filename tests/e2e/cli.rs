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
