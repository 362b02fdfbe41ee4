//! Operations (issue 11): Prometheus metrics scraped by a real Prometheus server, the health
//! endpoints across a broker cut, and `warren status`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use warren_tests::relay::Relay;
use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually, temp_dir};

/// A loopback address nobody listens on now (bound, read and released).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// `GET url`: the status and body, whatever the status (none when nothing answers).
async fn http_get(url: String) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut response = agent.get(&url).call().ok()?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().ok()?;
        Some((status, body))
    })
    .await
    .unwrap()
}

/// A Prometheus server of its own (Debian's `prometheus` package), scraping `targets` every
/// 200 ms; killed and its data removed when dropped.
struct Prometheus {
    addr: SocketAddr,
    _child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[SocketAddr]) -> Self {
        let dir = temp_dir("prometheus");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n\
             scrape_configs:\n  - job_name: warren\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = free_addr();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self {
            addr,
            _child: ChildGuard::spawn(command),
            _dir: dir,
        }
    }

    /// The value of the instant query `expr` (summed to one number), if it has one.
    async fn value(&self, expr: &str) -> Option<f64> {
        let url = format!(
            "http://{}/api/v1/query?query={}",
            self.addr,
            percent_encode(&format!("sum({expr})"))
        );
        let (status, body) = http_get(url).await?;
        if status != 200 {
            return None;
        }
        let answer: Value = serde_json::from_str(&body).ok()?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Waits until `expr` reads `expected`; panics with the last value read otherwise.
    async fn expect(&self, expr: &str, expected: f64) {
        let mut last = None;
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            last = self.value(expr).await.or(last);
            if last == Some(expected) {
                return;
            }
            assert!(
                std::time::Instant::now() < until,
                "{expr}: expected {expected}, Prometheus last read {last:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn gateway(queue: &str, http: SocketAddr, text: SocketAddr, metrics: SocketAddr) -> ChildGuard {
    let mut command = Command::new(binary("warren-gateway"));
    command
        .args(["--queue", queue, "--allow", "echo,fail"])
        .args(["--http", &http.to_string(), "--text", &text.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    ChildGuard::spawn(command)
}

async fn until_ready(addr: SocketAddr) {
    eventually(
        "the /readyz endpoint to answer 200",
        Duration::from_secs(20),
        || async {
            matches!(
                http_get(format!("http://{addr}/readyz")).await,
                Some((200, _))
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_exact_task_counts_from_a_worker_and_a_gateway() {
    const OK: usize = 7;
    const DEAD: usize = 3;
    let q = TestQueue::new("prom");
    let worker_metrics = free_addr();
    let _worker = ChildGuard::worker(
        &q.name,
        &[
            "--concurrency",
            "4",
            "--metrics",
            &worker_metrics.to_string(),
        ],
    );
    let (http, text, gateway_metrics) = (free_addr(), free_addr(), free_addr());
    let _gateway = gateway(&q.name, http, text, gateway_metrics);
    until_ready(worker_metrics).await;
    until_ready(gateway_metrics).await;
    let prometheus = Prometheus::start(&[worker_metrics, gateway_metrics]);

    // The workload, through the gateway's Text bridge: OK echoes, DEAD failures, one forbidden.
    let stream = TcpStream::connect(text).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    for i in 0..OK {
        write
            .write_all(format!("{}\n", json!({"function": "echo", "args": i})).as_bytes())
            .await
            .unwrap();
        assert_eq!(lines.next_line().await.unwrap().unwrap(), i.to_string());
    }
    for _ in 0..DEAD {
        write
            .write_all(b"{\"function\":\"fail\",\"args\":{}}\n")
            .await
            .unwrap();
        let answer = lines.next_line().await.unwrap().unwrap();
        assert!(answer.contains("handler_failed"), "{answer}");
    }
    write
        .write_all(b"{\"function\":\"sleep\",\"args\":{\"ms\":1}}\n")
        .await
        .unwrap();
    let answer = lines.next_line().await.unwrap().unwrap();
    assert!(answer.contains("forbidden"), "{answer}");

    let queue = &q.name;
    let ok = OK as f64;
    let dead = DEAD as f64;
    prometheus
        .expect(
            &format!(
                r#"warren_worker_tasks_total{{queue="{queue}",function="echo",outcome="ok"}}"#
            ),
            ok,
        )
        .await;
    prometheus
        .expect(
            &format!(
                r#"warren_worker_tasks_total{{queue="{queue}",function="fail",outcome="dead_lettered",reason="permanent_failure"}}"#
            ),
            dead,
        )
        .await;
    // Nothing else was counted: no retries, no hand-backs, no other functions.
    prometheus
        .expect(
            &format!(r#"warren_worker_tasks_total{{queue="{queue}"}}"#),
            ok + dead,
        )
        .await;
    prometheus
        .expect(
            &format!(r#"warren_worker_task_duration_seconds_count{{queue="{queue}"}}"#),
            ok + dead,
        )
        .await;
    prometheus
        .expect(
            &format!(r#"warren_worker_queue_latency_seconds_count{{queue="{queue}"}}"#),
            ok + dead,
        )
        .await;
    prometheus
        .expect(
            &format!(r#"warren_worker_slots_free{{queue="{queue}"}}"#),
            4.0,
        )
        .await;
    prometheus
        .expect(&format!(r#"warren_worker_ready{{queue="{queue}"}}"#), 1.0)
        .await;
    // Each outcome was confirmed by the broker: a reply per task, plus a dead letter per failure.
    prometheus
        .expect(
            &format!(
                r#"warren_publish_confirm_duration_seconds_count{{instance="{worker_metrics}"}}"#
            ),
            ok + dead + dead,
        )
        .await;
    prometheus
        .expect(
            r#"warren_gateway_tasks_total{function="echo",outcome="ok"}"#,
            ok,
        )
        .await;
    prometheus
        .expect(
            r#"warren_gateway_tasks_total{function="fail",outcome="failed"}"#,
            dead,
        )
        .await;
    prometheus
        .expect(r#"warren_gateway_rejected_total{reason="forbidden"}"#, 1.0)
        .await;
    prometheus
        .expect(r#"warren_gateway_connections{protocol="text"}"#, 1.0)
        .await;
    drop(write);
    drop(lines);
    prometheus
        .expect(r#"warren_gateway_connections{protocol="text"}"#, 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_broker_connection_is_cut_and_200_after_recovery() {
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("readyz");
    let mut settings = q.worker_settings(2);
    settings.broker = warren_shared::BrokerSettings::new(relay.url(5));
    let worker = q
        .worker_with(
            warren_worker::builtin_registry(warren_worker::Mailer::outbox("outbox")),
            settings,
        )
        .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let ops = warren_worker::ops::Ops {
        probe: worker.probe(),
        metrics: None,
        queue: q.name.clone(),
        concurrency: 2,
    };
    let (addr, _) = warren_worker::ops::bind(free_addr(), ops, shutdown)
        .await
        .unwrap();
    let (status, body) = http_get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let details: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(details["state"], "consuming");
    assert_eq!(details["connections"]["consume"], true);

    relay.refuse();
    relay.cut();
    eventually("/readyz to answer 503", Duration::from_secs(10), || async {
        matches!(
            http_get(format!("http://{addr}/readyz")).await,
            Some((503, _))
        )
    })
    .await;
    let (status, body) = http_get(format!("http://{addr}/healthz")).await.unwrap();
    assert_eq!(status, 200, "alive while reconnecting: {body}");
    let (_, body) = http_get(format!("http://{addr}/readyz")).await.unwrap();
    let details: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(details["ready"], false, "{details}");

    relay.accept();
    eventually(
        "/readyz to answer 200 again",
        Duration::from_secs(30),
        || async {
            matches!(
                http_get(format!("http://{addr}/readyz")).await,
                Some((200, _))
            )
        },
    )
    .await;
    worker.shutdown().await.unwrap();
    let (status, _) = http_get(format!("http://{addr}/healthz")).await.unwrap();
    assert_eq!(status, 503, "a stopped worker is not alive");
}

/// `warren status --queue <queue> [extra]`: (success, stdout, stderr).
fn warren_status(queue: &str, extra: &[&str]) -> (bool, String, String) {
    let output = Command::new(binary("warren"))
        .args(["status", "--queue", queue])
        .args(extra)
        .env("AMQP_URL", amqp_url())
        .env_remove("WARREN_MANAGEMENT_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn status_json(queue: &str) -> Value {
    let (ok, stdout, stderr) = warren_status(queue, &["--json"]);
    assert!(ok, "warren status failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

fn work_row(status: &Value) -> Value {
    status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["role"] == "work")
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warren_status_shows_depth_consumers_and_workers_and_degrades_without_the_api() {
    const WAITING: u64 = 5;
    let q = TestQueue::new("status");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    for i in 0..WAITING {
        client
            .enqueue(&warren_shared::tasks::Echo(json!(i)))
            .await
            .unwrap();
    }

    // Without the management API: AMQP alone gives depth and consumers, with a note.
    let nowhere = format!("http://{}", free_addr());
    let (ok, text, stderr) = warren_status(&q.name, &["--management-url", &nowhere]);
    assert!(ok, "{stderr}");
    assert!(text.contains("management API not reachable"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{} ", q.name)))
        .unwrap();
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns[1], WAITING.to_string(), "{line}");
    assert_eq!(columns[3], "0", "{line}");
    let (ok, json_out, _) = warren_status(&q.name, &["--management-url", &nowhere, "--json"]);
    assert!(ok);
    let degraded: Value = serde_json::from_str(json_out.trim()).unwrap();
    assert_eq!(degraded["source"], "amqp");
    assert_eq!(work_row(&degraded)["ready"], WAITING);

    // From the management API (its figures are refreshed every few seconds).
    eventually(
        "status to show the waiting tasks",
        Duration::from_secs(30),
        || async {
            let status = status_json(&q.name);
            status["source"] == "management" && work_row(&status)["ready"] == WAITING
        },
    )
    .await;
    let status = status_json(&q.name);
    assert!(status["note"].is_null(), "{status}");
    assert_eq!(work_row(&status)["consumers"], 0);
    assert!(
        status["queues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["role"] == "dead")
    );
    assert_eq!(status["workers"], json!([]));

    // A worker drains the queue and shows up with its pid and concurrency.
    let worker = ChildGuard::worker(&q.name, &["--concurrency", "3"]);
    let pid = u64::try_from(worker.pid().as_raw()).unwrap();
    eventually(
        "status to show the worker and an empty queue",
        Duration::from_secs(30),
        || async {
            let status = status_json(&q.name);
            let row = work_row(&status);
            row["ready"] == 0
                && row["consumers"] == 1
                && status["workers"].as_array().is_some_and(|w| w.len() == 1)
        },
    )
    .await;
    let status = status_json(&q.name);
    let w = &status["workers"][0];
    assert_eq!(w["pid"], pid, "{status}");
    assert_eq!(w["concurrency"], 3);
    assert_eq!(w["queue"], q.name.as_str());
    assert!(
        w["connection"]
            .as_str()
            .unwrap()
            .starts_with("warren-worker@")
    );
    let (ok, text, _) = warren_status(&q.name, &[]);
    assert!(ok);
    assert!(text.contains("WORKERS (1)"), "{text}");
    assert!(
        text.contains(&format!(
            "warren-worker@{}:{pid}/consume",
            w["host"].as_str().unwrap()
        )),
        "{text}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_id_is_on_the_workers_process_span_and_logs_across_a_retry() {
    let q = TestQueue::new("trace");
    let dir = temp_dir("trace");
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_warren-test-worker"));
    command
        .args(["--queue", &q.name])
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn,warren_worker=debug")
        .env("WARREN_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(log);
    let _worker = ChildGuard::spawn(command);
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    eventually("the worker to consume", Duration::from_secs(20), || async {
        client
            .queue_stats(&q.name)
            .await
            .is_ok_and(|s| s.consumers == 1)
    })
    .await;

    let root = warren_shared::trace::TraceContext::new_root();
    let options = warren_client::CallOptions::default().trace(root.clone());
    let attempt = client
        .call_with(&warren_tests::tasks::Flaky { succeed_on: 2 }, &options)
        .await
        .unwrap();
    assert_eq!(attempt, 2, "the first attempt failed and was retried");

    let lines: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let in_task = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
            .clone()
    };
    for line in [in_task("attempt failed; retrying"), in_task("task done")] {
        let span = &line["span"];
        assert_eq!(span["trace_id"], root.trace_id.as_str(), "{line}");
        assert_eq!(span["otel.name"], format!("process {}", q.name), "{line}");
        let parent = span["parent_span_id"].as_str().unwrap();
        assert_ne!(
            parent, root.span_id,
            "the parent is the caller's send span: {line}"
        );
        assert_ne!(span["span_id"], parent, "{line}");
    }
    client.close().await;
}
