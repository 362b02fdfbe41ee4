//! Routing by function (docs/protocol.md §1a): callers name a function, the broker takes the
//! task to the one queue that serves it, and a function nobody serves fails at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use warren_client::{Client, ClientSettings, Error};
use warren_shared::{BrokerSettings, ErrorKind, Task};
use warren_tests::raw::RawPeer;
use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually, free_port, temp_dir};
use warren_worker::{Mailer, WorkerError, WorkerSettings, builtin_registry};

fn tasks_php() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|repo| repo.join("tests/pools/tasks.php"))
        .unwrap_or_default()
}

/// A client that sends by function name through `functions_exchange`.
async fn by_function(functions_exchange: &str) -> Client {
    Client::connect(ClientSettings {
        broker: BrokerSettings::new(amqp_url()),
        queue: None,
        functions_exchange: functions_exchange.to_owned(),
        ..ClientSettings::default()
    })
    .await
    .unwrap()
}

/// Deletes `queue` as an operator would.
async fn delete_queue(queue: &str) {
    let (connection, channel) = warren_tests::raw_channel().await;
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "deleted".into()).await;
}

fn kind(result: &Result<Value, Error>) -> Option<ErrorKind> {
    result
        .as_ref()
        .err()
        .and_then(Error::failure)
        .map(|f| f.kind)
}

/// `warren call <args>` by function name through `functions_exchange`: exit status, stdout,
/// stderr. Async, so that the test's in-process worker runs meanwhile.
async fn warren_call(functions_exchange: &str, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(binary("warren"))
        .arg("call")
        .args(args)
        .args(["--timeout", "20s"])
        .env("AMQP_URL", amqp_url())
        .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange)
        .env_remove("WARREN_QUEUE")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A PHP pool (`warren-worker --exec`) on one queue and the Rust built-ins on another, in one
/// deployment: the client, the CLI, the gateway's Text bridge and a foreign AMQP client reach
/// each function by its name alone, and an unserved function fails at once, queuing nothing.
#[tokio::test]
async fn a_php_pool_and_rust_handlers_on_two_queues_are_reached_by_function_name() {
    let php = TestQueue::new("route-php");
    let rust = TestQueue::new("route-rust");
    let functions = php.functions_exchange();
    // The PHP worker serves `add` and `pid` only (a pool replaces the built-ins); it claims
    // them for its queue in this test's functions exchange (ChildGuard::worker sets it).
    let _php_worker = ChildGuard::worker(
        &php.name,
        &[
            "--exec",
            &format!("php {}", tasks_php().display()),
            "--exec-functions",
            "add,pid",
            "--exec-processes",
            "2",
        ],
    );
    let outbox = temp_dir("route-outbox");
    let rust_worker = rust
        .worker_with(
            builtin_registry(Mailer::outbox(outbox.path())),
            WorkerSettings {
                functions_exchange: functions.clone(),
                ..rust.worker_settings(4)
            },
        )
        .await;
    let client = by_function(&functions).await;
    eventually(
        "the PHP worker claims add",
        Duration::from_secs(20),
        || async {
            client
                .call_json("add", json!({"a": 1, "b": 1}))
                .await
                .is_ok()
        },
    )
    .await;

    // The Rust client.
    let sum = client.call_json("add", json!({"a": 40, "b": 2})).await;
    assert_eq!(sum.unwrap()["sum"], 42);
    let echoed = client.call_json("echo", json!({"x": 1})).await;
    assert_eq!(echoed.unwrap(), json!({"x": 1}));
    let started = Instant::now();
    let unknown = client.call_json("resize_image", json!({})).await;
    assert_eq!(
        kind(&unknown),
        Some(ErrorKind::UnknownFunction),
        "{unknown:?}"
    );
    let enqueued = client.enqueue_json("resize_image", json!({})).await;
    assert!(
        matches!(&enqueued, Err(Error::Failed(f)) if f.kind == ErrorKind::UnknownFunction),
        "{enqueued:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "fails fast");

    // The CLI.
    let (ok, out, err) = warren_call(&functions, &["add", r#"{"a":2,"b":3}"#]).await;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["sum"], 5);
    let (ok, out, err) = warren_call(&functions, &["echo", r#""hi""#]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), r#""hi""#);
    let started = Instant::now();
    let (ok, _, err) = warren_call(&functions, &["resize_image"]).await;
    assert!(!ok && err.contains("unknown_function"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not the 20 s timeout"
    );

    // The gateway, one for every function of the deployment.
    let text_port = free_port();
    let _gateway = ChildGuard::spawn({
        let mut command = Command::new(binary("warren-gateway"));
        command
            .args(["--text", &format!("127.0.0.1:{text_port}")])
            .args(["--http", &format!("127.0.0.1:{}", free_port())])
            .args(["--allow", "add,echo,resize_image"])
            .env("AMQP_URL", amqp_url())
            .env("WARREN_FUNCTIONS_EXCHANGE", &functions)
            .env_remove("WARREN_QUEUE");
        command
    });
    eventually("the gateway listens", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", text_port))
            .await
            .is_ok()
    })
    .await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", text_port))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(
            b"{\"function\":\"add\",\"args\":{\"a\":20,\"b\":1}}\n\
              {\"function\":\"echo\",\"args\":[1,2]}\n\
              {\"function\":\"resize_image\",\"args\":{}}\n",
        )
        .await
        .unwrap();
    let mut lines = BufReader::new(read).lines();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        answers.push(serde_json::from_str::<Value>(&line.unwrap().unwrap().unwrap()).unwrap());
    }
    assert_eq!(answers[0]["sum"], 21);
    assert_eq!(answers[1], json!([1, 2]));
    assert_eq!(answers[2]["error"]["kind"], "unknown_function");

    // A foreign AMQP client: the functions exchange, the function as routing key, mandatory.
    let mut raw = RawPeer::connect().await;
    let properties = |id: &str| {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(warren_shared::protocol::DIRECT_REPLY_TO.into())
            .with_correlation_id(id.into())
            .with_message_id(id.into())
    };
    let body = br#"{"function":"add","args":{"a":7,"b":7}}"#;
    assert!(
        raw.publish_mandatory(&functions, "add", body, properties("raw-1"))
            .await
    );
    let (id, reply) = raw.next_reply(Duration::from_secs(20)).await;
    assert_eq!(id, "raw-1");
    assert_eq!(reply.into_result().unwrap()["sum"], 14);
    let body = br#"{"function":"resize_image","args":{}}"#;
    assert!(
        !raw.publish_mandatory(&functions, "resize_image", body, properties("raw-2"))
            .await,
        "an unserved function comes back unroutable"
    );
    raw.close().await;

    // Nothing unserved was queued or dead-lettered anywhere.
    for q in [&php, &rust] {
        let work = client.queue_stats(&q.name).await.unwrap();
        assert_eq!(work.ready, 0, "{}", q.name);
        assert_eq!(q.dead_count(&client).await, 0, "{}", q.name);
    }
    client.close().await;
    rust_worker.shutdown().await.unwrap();
}

/// A function belongs to one queue: a worker of a second queue that serves it does not start,
/// and says who owns it. Once the owner's queue is gone, the function is free again.
#[tokio::test]
async fn a_function_is_claimed_by_one_queue_and_freed_with_it() {
    let first = TestQueue::new("claim-a");
    let second = TestQueue::new("claim-b");
    let functions = first.functions_exchange();
    let outbox = temp_dir("claim-outbox");
    let registry = || builtin_registry(Mailer::outbox(outbox.path()));
    let settings = |q: &TestQueue| WorkerSettings {
        functions_exchange: functions.clone(),
        ..q.worker_settings(2)
    };
    let owner = first.worker_with(registry(), settings(&first)).await;
    let refused = second.try_worker_with(registry(), settings(&second)).await;
    match refused {
        Err(WorkerError::FunctionClaimed {
            function, owner, ..
        }) => {
            assert!(["echo", "fail", "send_mail", "sleep"].contains(&function.as_str()));
            // The broker cuts its error text at 255 bytes: a long name may end in "...".
            assert!(
                first.name.starts_with(owner.trim_end_matches("...")),
                "{owner}"
            );
        }
        Err(other) => panic!("expected FunctionClaimed, got {other}"),
        Ok(_) => panic!("a second queue claimed functions another queue serves"),
    }
    // Workers of the owner's queue claim together, on any number of hosts.
    let twin = first.worker_with(registry(), settings(&first)).await;

    owner.shutdown().await.unwrap();
    twin.shutdown().await.unwrap();
    let client = by_function(&functions).await;
    delete_queue(&first.name).await;
    let echoed = client.call_json("echo", json!(1)).await;
    assert_eq!(
        kind(&echoed),
        Some(ErrorKind::UnknownFunction),
        "{echoed:?}"
    );

    let heir = second.worker_with(registry(), settings(&second)).await;
    let echoed = client.call_json("echo", json!(2)).await;
    assert_eq!(echoed.unwrap(), json!(2));
    client.close().await;
    heir.shutdown().await.unwrap();
}

/// A function only the refused worker serves, sorted before the built-ins it cannot claim.
#[derive(serde::Serialize, serde::Deserialize)]
struct OnlyHere;

impl Task for OnlyHere {
    const NAME: &'static str = "aaa_only_here";
    type Output = ();
}

impl warren_worker::Run for OnlyHere {
    async fn run(self, _ctx: warren_worker::TaskContext) -> Result<(), warren_worker::TaskError> {
        Ok(())
    }
}

/// A worker refused one function claims none: the functions it claimed before the refusal are
/// given back, so their callers get `unknown_function` at once instead of waiting for a worker
/// that never started, and another queue can claim them.
#[tokio::test]
async fn a_refused_worker_leaves_no_function_claimed() {
    let owner_q = TestQueue::new("claim-owner");
    let refused_q = TestQueue::new("claim-refused");
    let heir_q = TestQueue::new("claim-heir");
    let functions = owner_q.functions_exchange();
    let settings = |q: &TestQueue| WorkerSettings {
        functions_exchange: functions.clone(),
        ..q.worker_settings(2)
    };
    let echo_only = || warren_worker::Registry::new().register::<warren_shared::tasks::Echo>();
    let owner = owner_q.worker_with(echo_only(), settings(&owner_q)).await;
    let refused = refused_q
        .try_worker_with(echo_only().register::<OnlyHere>(), settings(&refused_q))
        .await;
    assert!(
        matches!(&refused, Err(WorkerError::FunctionClaimed { function, .. }) if function == "echo"),
        "{:?}",
        refused.err()
    );
    let client = by_function(&functions).await;
    let result = client.call_json(OnlyHere::NAME, json!(null)).await;
    assert_eq!(
        kind(&result),
        Some(ErrorKind::UnknownFunction),
        "{result:?}"
    );
    let heir = heir_q
        .worker_with(
            warren_worker::Registry::new().register::<OnlyHere>(),
            settings(&heir_q),
        )
        .await;
    let result = client.call_json(OnlyHere::NAME, json!(null)).await;
    assert_eq!(result.unwrap(), Value::Null);
    client.close().await;
    heir.shutdown().await.unwrap();
    owner.shutdown().await.unwrap();
}

/// A worker whose functions exchange is empty claims nothing (a bulk queue next to an
/// interactive one): its queue is reached by name, and its functions by name are not routed to
/// it.
#[tokio::test]
async fn a_worker_without_a_functions_exchange_is_reached_by_queue_name_only() {
    let bulk = TestQueue::new("route-bulk");
    let functions = bulk.functions_exchange();
    let outbox = temp_dir("bulk-outbox");
    let worker = bulk
        .worker_with(
            builtin_registry(Mailer::outbox(outbox.path())),
            WorkerSettings {
                functions_exchange: String::new(),
                ..bulk.worker_settings(2)
            },
        )
        .await;
    let by_queue = bulk.client().await;
    assert_eq!(
        by_queue.call_json("echo", json!(3)).await.unwrap(),
        json!(3)
    );
    let by_name = by_function(&functions).await;
    let echoed = by_name.call_json("echo", json!(4)).await;
    assert_eq!(
        kind(&echoed),
        Some(ErrorKind::UnknownFunction),
        "{echoed:?}"
    );
    by_queue.close().await;
    by_name.close().await;
    worker.shutdown().await.unwrap();
}
