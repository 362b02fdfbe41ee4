//! Operations (issue 11): Prometheus metrics scraped by a real Prometheus server, the health
//! endpoints across a broker cut, and `warren status`.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use warren_tests::relay::Relay;
use warren_tests::{
    ChildGuard, TestQueue, amqp_url, binary, eventually, free_addr, http_get, percent_encode,
    temp_dir,
};

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

/// A `warren-gateway` on `broker` allowing `echo` and `fail`, its operations listener on
/// `metrics`.
fn gateway(
    broker: &str,
    queue: &str,
    http: SocketAddr,
    text: SocketAddr,
    metrics: SocketAddr,
) -> ChildGuard {
    let mut command = Command::new(binary("warren-gateway"));
    command
        .args(["--queue", queue, "--allow", "echo,fail"])
        .args(["--http", &http.to_string(), "--text", &text.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .env("AMQP_URL", broker)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    ChildGuard::spawn(command)
}

/// A connection to a gateway's Text bridge: one request line, one answer line.
struct TextSession {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl TextSession {
    async fn connect(addr: SocketAddr) -> Self {
        let (read, write) = TcpStream::connect(addr).await.unwrap().into_split();
        Self {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    /// Sends `request` (a JSON task) and returns the answer line.
    async fn call(&mut self, request: &Value) -> String {
        self.write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        self.lines.next_line().await.unwrap().unwrap()
    }
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
    // Task events off: their appends are confirmed publishes too, and how many messages they
    // take depends on how the writer packed them; the counts here are of outcomes.
    let _worker = ChildGuard::worker(
        &q.name,
        &[
            "--concurrency",
            "4",
            "--metrics",
            &worker_metrics.to_string(),
            "--events",
            "off",
        ],
    );
    let (http, text, gateway_metrics) = (free_addr(), free_addr(), free_addr());
    let _gateway = gateway(&amqp_url(), &q.name, http, text, gateway_metrics);
    until_ready(worker_metrics).await;
    until_ready(gateway_metrics).await;
    let prometheus = Prometheus::start(&[worker_metrics, gateway_metrics]);

    // The workload, through the gateway's Text bridge: OK echoes, DEAD failures, one forbidden.
    let mut session = TextSession::connect(text).await;
    for i in 0..OK {
        let answer = session.call(&json!({"function": "echo", "args": i})).await;
        assert_eq!(answer, i.to_string());
    }
    for _ in 0..DEAD {
        let answer = session.call(&json!({"function": "fail", "args": {}})).await;
        assert!(answer.contains("handler_failed"), "{answer}");
    }
    let answer = session
        .call(&json!({"function": "sleep", "args": {"ms": 1}}))
        .await;
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
    drop(session);
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

/// `command` (a worker binary) on `queue`, logging its task spans as JSON lines to `log`.
fn logging_worker(mut command: Command, queue: &str, log: &std::path::Path) -> Command {
    command
        .args(["--queue", queue])
        .env("AMQP_URL", amqp_url())
        .env(
            "WARREN_FUNCTIONS_EXCHANGE",
            warren_tests::functions_exchange_of(queue),
        )
        .env("RUST_LOG", "warn,warren_worker=debug")
        .env("WARREN_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    command
}

/// The JSON log lines in `path`.
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first of `lines` whose message is `message`.
fn line_saying(lines: &[Value], message: &str) -> Value {
    lines
        .iter()
        .find(|l| l["fields"]["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} line in {lines:#?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_id_is_on_the_workers_process_span_and_logs_across_a_retry() {
    let q = TestQueue::new("trace");
    let dir = temp_dir("trace");
    let log_path = dir.path().join("worker.log");
    let command = logging_worker(
        Command::new(env!("CARGO_BIN_EXE_warren-test-worker")),
        &q.name,
        &log_path,
    );
    let _worker = ChildGuard::spawn(command);
    // By function name: the first attempt arrives with routing key `flaky`, the retry with the
    // queue's name, and both spans are named after the queue.
    let client = q.client_with(|s| s.queue = None).await;
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

    let lines = json_lines(&log_path);
    let in_task = |message: &str| line_saying(&lines, message);
    let attempts = [in_task("attempt failed; retrying"), in_task("task done")];
    // Both attempts' lines name the same task: the retry is the same task id, in the same trace.
    let task_id = attempts[0]["span"]["task.id"].as_str().unwrap();
    assert_eq!(task_id.len(), 36, "{:?}", attempts[0]);
    assert_eq!(attempts[1]["span"]["task.id"], task_id, "{:?}", attempts[1]);
    for line in attempts {
        let span = &line["span"];
        assert_eq!(span["trace_id"], root.trace_id.to_string(), "{line}");
        assert_eq!(span["otel.name"], format!("process {}", q.name), "{line}");
        let parent = span["parent_span_id"].as_str().unwrap();
        assert_ne!(
            parent,
            root.span_id.to_string(),
            "the parent is the caller's send span: {line}"
        );
        assert_ne!(span["span_id"], parent, "{line}");
    }
    client.close().await;
}

/// One span an OTLP exporter sent, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    name: String,
    kind: i32,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: std::collections::HashMap<String, String>,
}

/// An OTLP/HTTP receiver on loopback (`POST /v1/traces`, protobuf bodies), keeping every span
/// it is sent; stops when dropped.
struct OtlpReceiver {
    addr: SocketAddr,
    spans: std::sync::Arc<std::sync::Mutex<Vec<ExportedSpan>>>,
    _stop: tokio_util::sync::DropGuard,
}

impl OtlpReceiver {
    async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message as _;

        type Spans = std::sync::Arc<std::sync::Mutex<Vec<ExportedSpan>>>;
        async fn traces(
            axum::extract::State(spans): axum::extract::State<Spans>,
            body: axum::body::Bytes,
        ) -> (axum::http::StatusCode, Vec<u8>) {
            let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
            };
            let text = |value: Option<&Any>| match value {
                Some(Any::StringValue(s)) => s.clone(),
                Some(Any::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
            let mut received = spans.lock().unwrap();
            for resource_spans in request.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                    received.push(ExportedSpan {
                        service: service.clone(),
                        name: span.name,
                        kind: span.kind,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|a| {
                                (
                                    a.key.clone(),
                                    text(a.value.as_ref().and_then(|v| v.value.as_ref())),
                                )
                            })
                            .collect(),
                    });
                }
            }
            (
                axum::http::StatusCode::OK,
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
        }

        let spans = Spans::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(traces))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await
        });
        Self {
            addr,
            spans,
            _stop: stop.drop_guard(),
        }
    }

    /// The spans received so far named `name`.
    fn named(&self, name: &str) -> Vec<ExportedSpan> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }

    /// The `OTEL_*` variables that point an exporter here, as service `service`.
    fn env(&self, command: &mut Command, service: &str) {
        command
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", self.addr),
            )
            .env("OTEL_SERVICE_NAME", service)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SDK_DISABLED")
            .env_remove("OTEL_TRACES_EXPORTER");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_joins_the_callers_send_span_and_the_workers_process_span_in_one_trace() {
    let receiver = OtlpReceiver::start().await;
    let q = TestQueue::new("otlp");
    let dir = temp_dir("otlp");
    let log_path = dir.path().join("worker.log");
    let mut worker = logging_worker(Command::new(binary("warren-worker")), &q.name, &log_path);
    receiver.env(&mut worker, "otlp-test-worker");
    let _worker = ChildGuard::spawn(worker);

    // One call through the CLI, a process of its own that exports its `send` span on exit.
    let mut call = Command::new(binary("warren"));
    call.args(["call", "echo", r#"{"traced":true}"#, "--queue", &q.name])
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    receiver.env(&mut call, "otlp-test-caller");
    let output = tokio::task::spawn_blocking(move || call.output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        r#"{"traced":true}"#
    );

    let send_name = format!("send {}", q.name);
    let process_name = format!("process {}", q.name);
    eventually(
        "both spans to be exported",
        Duration::from_secs(20),
        || async {
            !receiver.named(&send_name).is_empty() && !receiver.named(&process_name).is_empty()
        },
    )
    .await;
    let [send] = receiver.named(&send_name).try_into().unwrap();
    let [process] = receiver.named(&process_name).try_into().unwrap();
    assert_eq!(send.service, "otlp-test-caller");
    assert_eq!(process.service, "otlp-test-worker");
    // One trace: the worker's span is the child of the caller's (a root: no trace was given).
    assert_eq!(process.trace_id, send.trace_id);
    assert_eq!(process.parent_span_id, send.span_id);
    assert!(send.parent_span_id.is_empty(), "{send:?}");
    // Span kinds producer (4) and consumer (5), and the messaging attributes.
    assert_eq!((send.kind, process.kind), (4, 5));
    let task_id = send.attributes["messaging.message.id"].clone();
    assert_eq!(task_id.len(), 36, "a task id: {send:?}");
    for (span, operation) in [(&send, "send"), (&process, "process")] {
        let a = &span.attributes;
        assert_eq!(a["messaging.system"], "rabbitmq", "{span:?}");
        assert_eq!(a["messaging.operation.type"], operation, "{span:?}");
        assert_eq!(a["messaging.destination.name"], q.name, "{span:?}");
        assert_eq!(a["messaging.message.id"], task_id, "{span:?}");
        assert_eq!(a["warren.task.function"], "echo", "{span:?}");
    }
    assert_eq!(process.attributes["warren.task.attempt"], "1");

    // The worker's log lines of the task carry the exported ids and the task id.
    let done = line_saying(&json_lines(&log_path), "task done");
    let span = &done["span"];
    assert_eq!(span["trace_id"], process.trace_id.as_str(), "{done}");
    assert_eq!(span["span_id"], process.span_id.as_str(), "{done}");
    assert_eq!(span["parent_span_id"], send.span_id.as_str(), "{done}");
    assert_eq!(span["task.id"], task_id.as_str(), "{done}");
}

/// An OTLP setting Warren cannot honour stops each of its programs at once with status 2 (as
/// a bad flag does) and says which variable, before anything else happens.
#[test]
fn an_unusable_otlp_setting_stops_every_program_with_status_2() {
    let queue = TestQueue::new("otlp-grpc");
    for (program, args) in [
        (
            "warren",
            &["--queue", queue.name.as_str(), "call", "echo", "1"][..],
        ),
        ("warren-worker", &["--queue", queue.name.as_str()][..]),
        (
            "warren-gateway",
            &["--http", "127.0.0.1:0", "--text", "127.0.0.1:0"][..],
        ),
    ] {
        for (variable, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ] {
            let mut command = Command::new(binary(program));
            command
                .args(args)
                .env("AMQP_URL", amqp_url())
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
                .env(variable, value)
                .stdin(Stdio::null());
            let output = command.output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{program} with {variable}={value}: {stderr}"
            );
            assert!(
                stderr.contains(&format!("{variable}={value}")),
                "{program}: {stderr}"
            );
        }
    }
}

/// `deploy/<path>` in this repository.
fn deploy_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

#[test]
fn alert_rules_pass_promtool_and_fire_only_when_they_should() {
    let dir = deploy_file("prometheus");
    for args in [
        &["check", "rules", "warren-alerts.yml"][..],
        &["test", "rules", "warren-alerts.test.yml"][..],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("promtool (Debian's prometheus package) cannot run: {e}"));
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The metric names in Prometheus text exposition `text`: every series' name and every name
/// in a `# TYPE` line (a histogram's own name is only there).
fn exposed_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `warren_*` and `rabbitmq_*` names that `text` mentions.
fn referenced_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["warren_", "rabbitmq_"] {
        for (at, _) in text.match_indices(prefix) {
            let starts_word =
                at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            let end = text[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| at + n);
            if starts_word {
                names.insert(text[at..end].to_owned());
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_name_only_series_that_a_real_scrape_has() {
    // Grafana's JSON must parse, and every panel query a series.
    let dashboard = std::fs::read_to_string(deploy_file("grafana/warren-dashboard.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).unwrap();
    let queries: Vec<&str> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| p["targets"].as_array().unwrap())
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert!(queries.len() >= 20, "{queries:?}");
    assert!(
        queries.iter().all(|q| !referenced_names(q).is_empty()),
        "{queries:?}"
    );
    let rules = std::fs::read_to_string(deploy_file("prometheus/warren-alerts.yml")).unwrap();
    let mut wanted = referenced_names(&dashboard);
    wanted.extend(referenced_names(&rules));

    // A broker of its own with RabbitMQ's Prometheus plugin, a worker and a gateway on it, and
    // a little of every kind of traffic: a success, a dead letter, a refusal.
    let node = warren_tests::node::BrokerNode::start_with_prometheus("dashboard").await;
    // On the private node, which goes with its queues: no TestQueue clean-up on the shared one.
    let queue = format!("test.dashboard.{}", uuid::Uuid::new_v4().simple());
    let worker_metrics = free_addr();
    let mut worker = Command::new(binary("warren-worker"));
    worker
        .args(["--queue", &queue, "--metrics", &worker_metrics.to_string()])
        .env("AMQP_URL", node.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let _worker = ChildGuard::spawn(worker);
    let (http, text, gateway_metrics) = (free_addr(), free_addr(), free_addr());
    let _gateway = gateway(&node.url(), &queue, http, text, gateway_metrics);
    until_ready(worker_metrics).await;
    until_ready(gateway_metrics).await;
    let mut session = TextSession::connect(text).await;
    assert_eq!(
        session.call(&json!({"function": "echo", "args": 1})).await,
        "1"
    );
    let failed = session.call(&json!({"function": "fail", "args": {}})).await;
    assert!(failed.contains("handler_failed"), "{failed}");
    let refused = session
        .call(&json!({"function": "sleep", "args": {}}))
        .await;
    assert!(refused.contains("forbidden"), "{refused}");

    let broker_metrics = format!("{}/metrics/per-object", node.prometheus_url().unwrap());
    let mut exposed = std::collections::BTreeSet::new();
    for url in [
        format!("http://{worker_metrics}/metrics"),
        format!("http://{gateway_metrics}/metrics"),
        broker_metrics,
    ] {
        let (status, body) = http_get(url.clone()).await.unwrap();
        assert_eq!(status, 200, "{url}: {body}");
        exposed.extend(exposed_names(&body));
    }
    let missing: Vec<&String> = wanted.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the alert rules name series no scrape has: {missing:?}"
    );
    assert!(wanted.len() >= 20, "{wanted:?}");
}
