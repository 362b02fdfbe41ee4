//! Interactive calls next to bulk work (issue 12.8): calls go to a queue of their own, served by
//! a worker of their own, so they never queue behind a bulk backlog (docs/scaling.md,
//! "Interactive calls and bulk work").

use std::process::Output;
use std::time::{Duration, Instant};

use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually};

/// Tasks in the bulk backlog.
const BACKLOG: u32 = 10_000;

/// `warren` with `args`, without blocking the test's runtime; fails the test after `bound`.
async fn warren(args: &[&str], bound: Duration) -> Output {
    let mut command = tokio::process::Command::new(binary("warren"));
    command
        .args(args)
        .env("AMQP_URL", amqp_url())
        .kill_on_drop(true);
    match tokio::time::timeout(bound, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run warren: {e}"),
        Err(_) => panic!("warren {args:?} did not finish within {bound:?}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_calls_answer_while_a_bulk_backlog_drains() {
    let bulk = TestQueue::new("bulk");
    let calls = TestQueue::new("calls");
    let client = bulk.client().await;

    // The backlog first, all of it confirmed by the broker: 10,000 tasks of 20 ms each, which
    // one worker of concurrency 16 needs at least 12.5 s to drain.
    let mut enqueues = tokio::task::JoinSet::new();
    for chunk in 0..100 {
        let client = client.clone();
        enqueues.spawn(async move {
            for _ in 0..BACKLOG / 100 {
                client
                    .enqueue_json("sleep", serde_json::json!({ "ms": 20 }))
                    .await
                    .map_err(|e| format!("enqueue in chunk {chunk}: {e}"))?;
            }
            Ok::<(), String>(())
        });
    }
    while let Some(done) = enqueues.join_next().await {
        done.unwrap().unwrap();
    }
    let depth = || async {
        client
            .queue_stats(&bulk.name)
            .await
            .map(|s| s.ready)
            .unwrap_or(0)
    };
    assert_eq!(depth().await, BACKLOG);

    // One worker per queue: the bulk one, which claims no function (reached by its queue
    // name only), and one for the calls, which claims the functions it serves
    // (docs/protocol.md §1a), so interactive callers name only the function.
    let _bulk_worker = ChildGuard::worker(
        &bulk.name,
        &["--concurrency", "16", "--functions-exchange", ""],
    );
    let _calls_worker = ChildGuard::worker(&calls.name, &["--concurrency", "4"]);
    eventually(
        "the bulk backlog to start draining",
        Duration::from_secs(30),
        || async { depth().await < BACKLOG },
    )
    .await;
    let calls_client = calls.client().await;
    eventually(
        "the calls worker to consume",
        Duration::from_secs(30),
        || async {
            calls_client
                .queue_stats(&calls.name)
                .await
                .is_ok_and(|s| s.consumers == 1)
        },
    )
    .await;

    // While the backlog drains, `warren call` by function name answers each call. A call
    // behind the backlog would wait for thousands of tasks; these must all be answered while
    // most of the backlog is still there.
    let before = depth().await;
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let args = format!(r#"{{"i":{i}}}"#);
        let started = Instant::now();
        let out = warren(
            &[
                "call",
                "echo",
                &args,
                "--functions-exchange",
                &calls.functions_exchange(),
            ],
            Duration::from_secs(10),
        )
        .await;
        slowest = slowest.max(started.elapsed());
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("{args}\n"));
    }
    let after = depth().await;
    assert!(
        after >= BACKLOG / 4,
        "the calls were answered only after the backlog had drained to {after} (from {before})"
    );

    // The same call on the bulk queue waits behind the backlog: it is not answered in 1 s.
    let out = warren(
        &[
            "call",
            "echo",
            "{}",
            "--queue",
            &bulk.name,
            "--timeout",
            "1s",
        ],
        Duration::from_secs(10),
    )
    .await;
    assert!(!out.status.success(), "a call behind the backlog answered");
    assert!(
        text(&out.stderr).starts_with("error: timeout: "),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        depth().await > 0,
        "the backlog was gone before the bulk call"
    );
    eprintln!(
        "5 interactive calls answered, slowest {slowest:?} (process start included), while the \
         bulk backlog went from {before} to {after} ready tasks"
    );
    calls_client.close().await;
    client.close().await;
}
