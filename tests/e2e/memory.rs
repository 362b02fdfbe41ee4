//! Memory bounded by bytes: what a burst of large messages costs the gateway and the worker,
//! measured on the real binaries (`target/debug/warren-gateway`, `warren-worker`) from
//! `/proc/<pid>/status`. Each test resets the process's peak (`clear_refs`) once it is
//! started, and compares the peak after the burst with the resident size before it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use warren_client::CallOptions;
use warren_shared::ErrorKind;
use warren_tests::{
    ChildGuard, TestQueue, amqp_url, binary, eventually, free_addr, functions_exchange_of,
};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(120);

const MIB: u64 = 1024 * 1024;

/// A field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
fn status_bytes(pid: Pid, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    kib * 1024
}

/// Resets the process's peak resident size (`VmHWM`) to its current size, so that the peak
/// read later is the burst's.
fn reset_peak(pid: Pid) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// `warren-gateway` sending every task to `q`'s queue, with `extra` flags; its addresses.
async fn gateway(q: &TestQueue, extra: &[&str]) -> (ChildGuard, SocketAddr, SocketAddr) {
    let queue = q.name.as_str();
    // Declared (and deleted with `q`) before the gateway polls its depth.
    q.client().await.declare_queue(queue).await.unwrap();
    let (http, text) = (free_addr(), free_addr());
    let mut command = std::process::Command::new(binary("warren-gateway"));
    command
        .args(["--queue", queue, "--allow", "echo"])
        .args(["--http", &http.to_string(), "--text", &text.to_string()])
        .args(extra)
        .env("AMQP_URL", amqp_url())
        .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange_of(queue))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null());
    let child = ChildGuard::spawn(command);
    eventually("the gateway listens", WAIT, || async {
        TcpStream::connect(text).await.is_ok() && TcpStream::connect(http).await.is_ok()
    })
    .await;
    (child, http, text)
}

/// A websocket batch of 1 MiB whose every element is refusable (`[0,0,...]`), sent on four
/// connections that never read: each is refused once, as one `bad_request` naming the batch
/// limit, and the gateway grows by less than 64 MB in all (it used to expand each into a list
/// of half a million refusals before writing any: about 110 MB a message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_unread_one_mib_websocket_batches_grow_the_gateway_by_less_than_64_mb() {
    let q = TestQueue::new("mem-ws");
    let (gw, http, _) = gateway(&q, &[]).await;
    let url = format!("ws://{http}/ws");
    // Under the default --max-message-bytes (1 MiB).
    let batch = format!("[{}]", vec!["0"; 524_000].join(","));
    assert!(batch.len() < 1024 * 1024);
    let before = status_bytes(gw.pid(), "VmRSS");
    reset_peak(gw.pid());

    let mut sockets = Vec::new();
    for _ in 0..4 {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::text(batch.clone())).await.unwrap();
        sockets.push(ws);
    }
    // Only now read the first answer of each: what a socket holds was all made before.
    let mut answers = Vec::new();
    for ws in &mut sockets {
        let answer = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
        answers.push(match answer {
            Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).unwrap(),
            other => panic!("expected an answer, got {other:?}"),
        });
    }
    let grown = status_bytes(gw.pid(), "VmHWM").saturating_sub(before);
    assert!(
        grown < 64 * MIB,
        "the gateway grew by {} MiB for 4 MiB of batches",
        grown / MIB
    );
    for (ws, answer) in sockets.iter_mut().zip(answers) {
        assert_eq!(answer["id"], Value::Null, "{answer}");
        assert_eq!(answer["error"]["kind"], "bad_request", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("at most 1000 tasks") && message.contains("max_batch"),
            "{message}"
        );
        // Once: the next message is the answer to the next request.
        ws.send(Message::text(
            json!({"id": "after", "function": "nope"}).to_string(),
        ))
        .await
        .unwrap();
        let next = match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).unwrap(),
            other => panic!("expected an answer, got {other:?}"),
        };
        assert_eq!(next["id"], "after", "{next}");
        assert_eq!(next["error"]["kind"], "forbidden", "{next}");
    }

    // The connections are still usable, and an overlong id is refused without being echoed.
    let ws = &mut sockets[0];
    let id = "i".repeat(300);
    ws.send(Message::text(
        json!({"id": id, "function": "echo", "args": 1}).to_string(),
    ))
    .await
    .unwrap();
    let answer = match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(text))) => serde_json::from_str::<Value>(&text).unwrap(),
        other => panic!("expected an answer, got {other:?}"),
    };
    assert_eq!(answer["id"], Value::Null, "{answer}");
    assert_eq!(answer["error"]["kind"], "bad_request", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("256 bytes")),
        "{answer}"
    );
    drop(gw);
}

/// The same 1 MiB batches with `--max-batch` above their length: every element is refused on
/// its own, and the refusals (half a million a message, about 60 MB of answers) are written one
/// by one as they are made, so four connections that do not read grow the gateway by less than
/// 64 MB; read later, they come in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_unread_one_mib_websocket_batches_are_written_one_by_one() {
    let q = TestQueue::new("mem-ws-each");
    let (gw, http, _) = gateway(&q, &["--max-batch", "1000000"]).await;
    let url = format!("ws://{http}/ws");
    let batch = format!("[{}]", vec!["0"; 524_000].join(","));
    assert!(batch.len() < 1024 * 1024);
    let before = status_bytes(gw.pid(), "VmRSS");
    reset_peak(gw.pid());

    let mut sockets = Vec::new();
    for _ in 0..4 {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::text(batch.clone())).await.unwrap();
        sockets.push(ws);
    }
    // Read one answer from each only once all four were sent; the gateway is by then blocked
    // on the unread sockets, holding what it made.
    let mut firsts = Vec::new();
    for ws in &mut sockets {
        firsts.push(ws_next(ws).await);
    }
    let grown = status_bytes(gw.pid(), "VmHWM").saturating_sub(before);
    assert!(
        grown < 64 * MIB,
        "the gateway grew by {} MiB for 4 MiB of batches refused one by one",
        grown / MIB
    );
    for (ws, first) in sockets.iter_mut().zip(firsts) {
        for answer in [first, ws_next(ws).await, ws_next(ws).await] {
            assert_eq!(answer["id"], Value::Null, "{answer}");
            assert_eq!(answer["error"]["kind"], "bad_request", "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("expected {"),
                "one refusal per element: {message}"
            );
        }
    }
    drop(sockets);
    drop(gw);
}

/// A thousand pipelined Text lines of 1 MiB each for a queue nobody consumes: the calls hold
/// at most the connection's byte budget (`--max-in-flight-bytes`, 16 MiB by default), every
/// line past it is answered `busy`, and the gateway's peak stays within that budget plus its
/// buffers (it used to keep every line's parsed arguments, about 40 times the line, for all
/// 1000 calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_one_mib_text_lines_with_no_worker_stay_within_the_byte_budget() {
    let q = TestQueue::new("mem-text");
    let (gw, _, text) = gateway(&q, &["--call-timeout", "30s"]).await;
    let args = vec!["0"; 520_000].join(",");
    let line = format!("{{\"function\":\"echo\",\"args\":[{args}]}}\n");
    assert!(line.len() < 1024 * 1024);
    let lines = 1000;
    let before = status_bytes(gw.pid(), "VmRSS");
    reset_peak(gw.pid());

    let stream = TcpStream::connect(text).await.unwrap();
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..lines {
            write.write_all(line.as_bytes()).await.unwrap();
        }
        write
    });
    let mut answers = BufReader::new(read).lines();
    let (mut busy, mut timed_out) = (0, 0);
    for n in 0..lines {
        let answer = tokio::time::timeout(WAIT, answers.next_line())
            .await
            .unwrap_or_else(|_| panic!("answer {n} did not come"))
            .unwrap()
            .unwrap_or_else(|| panic!("closed before answer {n}"));
        let answer: Value = serde_json::from_str(&answer).unwrap();
        match answer["error"]["kind"].as_str() {
            Some("busy") => {
                busy += 1;
                let message = answer["error"]["message"].as_str().unwrap();
                assert!(message.contains("max_in_flight_bytes"), "{message}");
            }
            // Published, then no result: nothing consumes the queue.
            Some("timeout") => timed_out += 1,
            _ => panic!("unexpected answer {n}: {answer}"),
        }
    }
    let _write = writer.await.unwrap();
    let grown = status_bytes(gw.pid(), "VmHWM").saturating_sub(before);
    // 16 MiB of 1 MiB lines: at most 16 calls at once (some may have ended before the last
    // lines came in, making room for more).
    assert!(timed_out >= 1, "no call was made");
    assert!(
        busy >= lines / 2,
        "only {busy} of {lines} lines were answered busy"
    );
    let budget = 16 * MIB;
    assert!(
        grown < budget + 48 * MIB,
        "the gateway grew by {} MiB; its budget is {} MiB",
        grown / MIB,
        budget / MIB
    );
    drop(gw);
}

fn tasks_py() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("pools/tasks.py")
        .to_string_lossy()
        .into_owned()
}

/// `warren-worker` on `queue` serving `big` from a Python pool, with `extra` flags and its
/// result limit from the environment (`WARREN_MAX_RESULT_BYTES`) when `max_result_bytes` is
/// given.
fn big_worker(queue: &str, extra: &[&str], max_result_bytes: Option<usize>) -> ChildGuard {
    let mut command = std::process::Command::new(binary("warren-worker"));
    command
        .args(["--queue", queue, "--exec"])
        .arg(format!("python3 {}", tasks_py()))
        .args(["--exec-functions", "big", "--exec-processes", "1"])
        .args(["--max-attempts", "1"])
        .args(extra)
        .env("AMQP_URL", amqp_url())
        .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange_of(queue))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null());
    if let Some(limit) = max_result_bytes {
        command.env("WARREN_MAX_RESULT_BYTES", limit.to_string());
    }
    ChildGuard::spawn(command)
}

/// A result of almost 16 MiB from a Python pool (the largest a runner line may carry) peaks
/// the worker at less than 4 times its size: the result is kept as the child wrote it and
/// published from a borrow (it used to be parsed into a tree and cloned twice, three copies
/// and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_pool_result_peaks_the_worker_below_four_times_its_size() {
    let q = TestQueue::new("mem-result");
    let worker = big_worker(&q.name, &[], Some(16 * 1024 * 1024));
    let client = q.client().await;
    let options = CallOptions::default().timeout(WAIT);
    // Warmed up: the worker consumes and its Python process answers.
    eventually("the worker serves big", WAIT, || async {
        client
            .call_json_with("big", json!({"n": 10}), &options)
            .await
            .is_ok()
    })
    .await;
    let before = status_bytes(worker.pid(), "VmRSS");
    reset_peak(worker.pid());

    let size = 16 * 1024 * 1024 - 1024;
    let result = client
        .call_json_with("big", json!({"n": size}), &options)
        .await
        .unwrap();
    assert_eq!(result.as_str().map(str::len), Some(size));
    let grown = status_bytes(worker.pid(), "VmHWM").saturating_sub(before);
    assert!(
        grown < 4 * 16 * MIB,
        "the worker grew by {} MiB for a 16 MiB result",
        grown / MIB
    );
    drop(worker);
}

/// A result over `--max-result-bytes` is not published: the caller gets `too_large`, and the
/// task is parked (the same task would make the same result).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_max_result_bytes_is_answered_too_large() {
    let q = TestQueue::new("mem-too-large");
    let _worker = big_worker(&q.name, &["--max-result-bytes", "1000"], None);
    let client = q.client().await;
    let options = CallOptions::default().timeout(WAIT);
    eventually("the worker serves big", WAIT, || async {
        client
            .call_json_with("big", json!({"n": 10}), &options)
            .await
            .is_ok()
    })
    .await;
    // 998 bytes and its two quotes fit; one more does not.
    let fits = client
        .call_json_with("big", json!({"n": 998}), &options)
        .await
        .unwrap();
    assert_eq!(fits.as_str().map(str::len), Some(998));
    let refused = client
        .call_json_with("big", json!({"n": 999}), &options)
        .await
        .unwrap_err();
    let failure = refused.failure().expect("the worker's answer");
    assert_eq!(failure.kind, ErrorKind::TooLarge, "{failure:?}");
    assert!(
        failure.message.contains("1001 bytes") && failure.message.contains("max_result_bytes"),
        "{}",
        failure.message
    );
    eventually("the task parked", WAIT, || async {
        q.dead_count(&client).await == 1
    })
    .await;
}

/// `--max-result-bytes` bounds what is published: a task enqueued with nobody waiting that
/// returns more did its work and is done, not parked (a replay would repeat its effects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_of_an_enqueued_task_is_dropped_not_parked() {
    let q = TestQueue::new("mem-enqueue-large");
    // One task at a time: the call below runs once the enqueued task is finished.
    let flags = ["--max-result-bytes", "1000", "--concurrency", "1"];
    let _worker = big_worker(&q.name, &flags, None);
    let client = q.client().await;
    let options = CallOptions::default().timeout(WAIT);
    eventually("the worker serves big", WAIT, || async {
        client
            .call_json_with("big", json!({"n": 10}), &options)
            .await
            .is_ok()
    })
    .await;
    client
        .enqueue_json("big", json!({"n": 5000}))
        .await
        .unwrap();
    let after = client
        .call_json_with("big", json!({"n": 10}), &options)
        .await
        .unwrap();
    assert_eq!(after.as_str().map(str::len), Some(10));
    assert_eq!(
        q.dead_count(&client).await,
        0,
        "the enqueued task was parked"
    );
    assert_eq!(client.queue_stats(&q.name).await.unwrap().ready, 0);
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The next websocket message, as JSON.
async fn ws_next(ws: &mut Ws) -> Value {
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Text(text))) => serde_json::from_str(&text).unwrap(),
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// The gateway's budget is shared by its connections: while a websocket call holds most of
/// `--max-gateway-in-flight-bytes`, a Text line that does not fit is answered `busy`, naming
/// the limit; once that call is answered, the bytes are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_wide_byte_budget_is_shared_by_every_connection() {
    let q = TestQueue::new("mem-shared");
    let flags = [
        "--max-message-bytes",
        "1200",
        "--max-in-flight-bytes",
        "1500",
        "--max-gateway-in-flight-bytes",
        "1500",
        "--call-timeout",
        "3s",
    ];
    let (_gw, http, text) = gateway(&q, &flags).await;
    let args = "x".repeat(1000);
    let task = json!({"id": 1, "function": "echo", "args": args}).to_string();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    ws.send(Message::text(task)).await.unwrap();
    // Published, so its bytes are held: nobody consumes the queue.
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");

    let stream = TcpStream::connect(text).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut answers = BufReader::new(read).lines();
    let line = format!("{{\"function\":\"echo\",\"args\":\"{args}\"}}\n");
    write.write_all(line.as_bytes()).await.unwrap();
    let answer: Value = serde_json::from_str(&answers.next_line().await.unwrap().unwrap()).unwrap();
    assert_eq!(answer["error"]["kind"], "busy", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1500 bytes") && message.contains("max_gateway_in_flight_bytes"),
        "{message}"
    );

    // The websocket call ends (no worker: timeout) and gives its bytes back: its bytes are
    // freed once its answer is written, just after the client may have read it, so the next
    // line may still meet them; it is taken once they are back.
    assert_eq!(ws_next(&mut ws).await["error"]["kind"], "timeout");
    let answers = tokio::sync::Mutex::new(answers);
    let write = tokio::sync::Mutex::new(write);
    eventually("the bytes are given back", WAIT, || async {
        write.lock().await.write_all(line.as_bytes()).await.unwrap();
        let answer: Value = serde_json::from_str(
            &tokio::time::timeout(WAIT, answers.lock().await.next_line())
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        if answer["error"]["kind"] == "busy" {
            return false;
        }
        assert_eq!(
            answer["error"]["kind"], "timeout",
            "taken this time, published, and timed out: {answer}"
        );
        true
    })
    .await;
}

/// A websocket message that only looks like JSON (a number out of range, a lone surrogate) is
/// refused `bad_request` as the Text port refuses it, before anything is published; the
/// connection goes on (writing such an id back used to panic the connection, or the call
/// after it had published the task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_id_out_of_range_or_a_lone_surrogate_is_bad_request() {
    let q = TestQueue::new("mem-ws-strict");
    let (_gw, http, _text) = gateway(&q, &[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    for message in [
        r#"{"id":1e400,"function":"echo","args":1}"#,
        r#"{"id":"\ud800","function":"echo","args":1}"#,
        r#"{"id":1,"function":"echo","args":[1e400]}"#,
        r#"{"id":-1e999,"function":"nope"}"#,
        r#"[{"id":"\udfff","function":"echo"}]"#,
    ] {
        ws.send(Message::text(message)).await.unwrap();
        let answer = ws_next(&mut ws).await;
        assert_eq!(answer["id"], Value::Null, "{message}: {answer}");
        assert_eq!(
            answer["error"]["kind"], "bad_request",
            "{message}: {answer}"
        );
        let error = answer["error"]["message"].as_str().unwrap();
        assert!(error.contains("not valid JSON"), "{message}: {error}");
    }
    ws.send(Message::text(r#"{"id":2,"function":"echo","args":1}"#))
        .await
        .unwrap();
    let answer = ws_next(&mut ws).await;
    assert_eq!(answer["status"], "enqueued", "{answer}");
    assert_eq!(answer["id"], 2, "{answer}");
    let client = q.client().await;
    let stats = client.queue_stats(&q.name).await.unwrap();
    assert_eq!(stats.ready, 1, "only the valid task was published");
}

/// Byte limits that could never admit a request the size limit lets in (or of 0) stop
/// `warren-gateway` at start with an error naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_byte_limits_out_of_order_at_start() {
    for flags in [
        &["--max-gateway-in-flight-bytes", "1000"][..],
        &[
            "--max-message-bytes",
            "2000",
            "--max-in-flight-bytes",
            "1000",
        ][..],
        &["--max-in-flight-bytes", "0"][..],
    ] {
        let mut command = std::process::Command::new(binary("warren-gateway"));
        command
            .args(["--queue", "unused", "--allow", "echo"])
            .args(["--text", &free_addr().to_string()])
            .args(flags)
            .env("AMQP_URL", amqp_url())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut gateway = ChildGuard::spawn(command);
        let status = gateway
            .wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("{flags:?}: the gateway started"));
        assert!(!status.success(), "{flags:?}");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut gateway.take_stderr().unwrap(), &mut stderr).unwrap();
        assert!(
            stderr.contains(&format!(
                "--{}",
                flags[flags.len() - 2].trim_start_matches("--")
            )),
            "{flags:?}: {stderr}"
        );
    }
}

/// `warren_gateway_held_bytes` shows what calls hold: a call's request while it waits, and
/// nothing once it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bytes_calls_hold_are_a_gauge() {
    let q = TestQueue::new("mem-gauge");
    let metrics = free_addr();
    let flags = ["--call-timeout", "3s", "--metrics", &metrics.to_string()];
    let (_gw, http, _text) = gateway(&q, &flags).await;
    let held = || async move {
        let (_, body) = warren_tests::http_get(format!("http://{metrics}/metrics")).await?;
        body.lines().find_map(|line| {
            line.strip_prefix("warren_gateway_held_bytes ")?
                .parse::<f64>()
                .ok()
        })
    };
    eventually("nothing held", WAIT, || async { held().await == Some(0.0) }).await;
    let task = json!({"id": 1, "function": "echo", "args": "x".repeat(5000)}).to_string();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .unwrap();
    ws.send(Message::text(task.clone())).await.unwrap();
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    let during = held().await.unwrap();
    #[allow(clippy::cast_precision_loss)]
    let size = task.len() as f64;
    assert!(during >= size, "{during} bytes held for a {size}-byte task");
    // Nobody consumes: the call times out, its answer is written, its bytes given back.
    assert_eq!(ws_next(&mut ws).await["error"]["kind"], "timeout");
    eventually("the bytes given back", WAIT, || async {
        held().await == Some(0.0)
    })
    .await;
}
