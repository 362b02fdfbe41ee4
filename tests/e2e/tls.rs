//! `amqps://` is really TLS (issue 8.1): through a TLS endpoint with a test CA made at test
//! time, in front of the shared broker's plaintext port.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use warren_client::{Client, ClientSettings, Error};
use warren_shared::broker::{BrokerError, BrokerSettings, TlsSettings};
use warren_tests::tls::{TestCa, TlsEndpoint};
use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually, temp_dir};
use warren_worker::{Mailer, builtin_registry};

fn settings(url: String, tls: TlsSettings) -> BrokerSettings {
    BrokerSettings {
        tls,
        connect_timeout: Duration::from_secs(10),
        ..BrokerSettings::new(url)
    }
}

fn ca_only(path: &std::path::Path) -> TlsSettings {
    TlsSettings {
        ca_file: Some(path.to_owned()),
        ..TlsSettings::default()
    }
}

async fn connect(queue: &TestQueue, broker: BrokerSettings) -> Result<Client, Error> {
    Client::connect(ClientSettings {
        broker,
        queue: Some(queue.name.clone()),
        ..ClientSettings::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_to_the_plaintext_port_fails_fast_with_a_tls_error() {
    let queue = TestQueue::new("tls-plain");
    let plain = amqp_url().replacen("amqp://", "amqps://", 1);
    let started = Instant::now();
    let err = connect(&queue, settings(plain, TlsSettings::default()))
        .await
        .expect_err("a TLS handshake with a plaintext AMQP port must fail");
    assert!(
        matches!(err, Error::Broker(BrokerError::Tls { .. })),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("TLS handshake"), "{text}");
    assert!(
        text.contains("5671"),
        "the error names the usual TLS port: {text}"
    );
    assert!(!text.contains(":guest@"), "password hidden: {text}");
    // Not a silent retry until the connect timeout.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_through_a_tls_endpoint_serves_an_in_process_worker_and_call() {
    let dir = temp_dir("tls-ok");
    let ca = TestCa::new("warren test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let endpoint = TlsEndpoint::start(
        &ca.issue(&["127.0.0.1", "localhost"]),
        None,
        warren_tests::broker_addr(),
    )
    .await;
    let queue = TestQueue::new("tls-ok");
    let broker = settings(endpoint.url(), ca_only(&ca_file));
    let mut worker_settings = queue.worker_settings(4);
    worker_settings.broker = broker.clone();
    let worker = queue
        .worker_with(
            builtin_registry(Mailer::outbox(dir.path())),
            worker_settings,
        )
        .await;
    let client = connect(&queue, broker).await.expect("client over TLS");
    let answer = client
        .call_json("echo", serde_json::json!({"over": "tls"}))
        .await
        .expect("call over TLS");
    assert_eq!(answer, serde_json::json!({"over": "tls"}));
    // Every connection of the worker and the client went through the TLS endpoint.
    assert!(endpoint.handshakes() >= 3, "{}", endpoint.handshakes());
    client.close().await;
    worker.stop();
    let _ = worker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_tls_ca_serves_the_worker_binary_warren_call_and_the_gateway() {
    let dir = temp_dir("tls-bins");
    let ca = TestCa::new("warren test CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let endpoint =
        TlsEndpoint::start(&ca.issue(&["127.0.0.1"]), None, warren_tests::broker_addr()).await;
    let queue = TestQueue::new("tls-bins");
    // The URL from a file: no password in any argv.
    let url_file = dir.path().join("amqp-url");
    std::fs::write(&url_file, format!("{}\n", endpoint.url())).unwrap();
    let ca_arg = ca_file.to_str().unwrap();
    let url_arg = url_file.to_str().unwrap();

    let mut worker = Command::new(binary("warren-worker"));
    worker
        .args([
            "--queue",
            &queue.name,
            "--tls-ca",
            ca_arg,
            "--amqp-url-file",
            url_arg,
        ])
        .arg("--outbox")
        .arg(dir.path())
        .env(
            "WARREN_FUNCTIONS_EXCHANGE",
            warren_tests::functions_exchange_of(&queue.name),
        )
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let _worker = ChildGuard::spawn(worker);
    let client = queue.client().await;
    eventually(
        "the TLS worker consumes",
        Duration::from_secs(30),
        || async {
            client
                .queue_stats(&queue.name)
                .await
                .is_ok_and(|s| s.consumers == 1)
        },
    )
    .await;

    // `warren call` with the CA and the URL from the environment (WARREN_* forms).
    let out = Command::new(binary("warren"))
        .args(["call", "echo", "[1,2]", "--queue", &queue.name])
        .env_remove("AMQP_URL")
        .env("WARREN_AMQP_URL_FILE", &url_file)
        .env("WARREN_TLS_CA", &ca_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "[1,2]");

    // The gateway binary over TLS, asked through its Text port.
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    };
    let (http, text) = (free(), free());
    let mut gateway = Command::new(binary("warren-gateway"));
    gateway
        .args([
            "--queue",
            &queue.name,
            "--tls-ca",
            ca_arg,
            "--amqp-url-file",
            url_arg,
        ])
        .args(["--http", &http.to_string(), "--text", &text.to_string()])
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let _gateway = ChildGuard::spawn(gateway);
    let until = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match tokio::net::TcpStream::connect(text).await {
            Ok(stream) => break stream,
            Err(e) => assert!(Instant::now() < until, "the gateway never listened: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (read, mut write) = stream.into_split();
    write
        .write_all(b"{\"function\":\"echo\",\"args\":\"via gateway\"}\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(read).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the gateway answers")
        .unwrap()
        .expect("an answer line");
    assert_eq!(line, "\"via gateway\"");
    // Worker (2), warren call (1) and gateway (1) connections were all TLS.
    assert!(endpoint.handshakes() >= 4, "{}", endpoint.handshakes());
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused() {
    let dir = temp_dir("tls-other-ca");
    let trusted = TestCa::new("trusted CA");
    let other = TestCa::new("other CA");
    let ca_file = trusted.write(dir.path(), "ca.crt");
    let endpoint = TlsEndpoint::start(
        &other.issue(&["127.0.0.1"]),
        None,
        warren_tests::broker_addr(),
    )
    .await;
    let queue = TestQueue::new("tls-other-ca");
    let err = connect(&queue, settings(endpoint.url(), ca_only(&ca_file)))
        .await
        .expect_err("a certificate from an untrusted CA must be refused");
    assert!(
        matches!(err, Error::Broker(BrokerError::Tls { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("certificate"), "{err}");
    assert_eq!(endpoint.handshakes(), 0);
    // And without --tls-ca, the test CA is not trusted either (system roots only).
    let err = connect(&queue, settings(endpoint.url(), TlsSettings::default()))
        .await
        .expect_err("a private CA is not in the system roots");
    assert!(
        matches!(err, Error::Broker(BrokerError::Tls { .. })),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_when_the_endpoint_requires_one() {
    let dir = temp_dir("tls-client-cert");
    let ca = TestCa::new("server CA");
    let clients = TestCa::new("client CA");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let (cert_file, key_file) = clients
        .issue(&["warren-client"])
        .write(dir.path(), "client");
    let endpoint = TlsEndpoint::start(
        &ca.issue(&["127.0.0.1"]),
        Some(&clients),
        warren_tests::broker_addr(),
    )
    .await;
    let queue = TestQueue::new("tls-client-cert");
    let with_cert = TlsSettings {
        ca_file: Some(ca_file.clone()),
        cert_file: Some(cert_file),
        key_file: Some(key_file),
    };
    let mut worker_settings = queue.worker_settings(2);
    worker_settings.broker = settings(endpoint.url(), with_cert.clone());
    let worker = queue
        .worker_with(
            builtin_registry(Mailer::outbox(dir.path())),
            worker_settings,
        )
        .await;
    let client = connect(&queue, settings(endpoint.url(), with_cert))
        .await
        .expect("client with a certificate");
    let answer = client
        .call_json("echo", serde_json::json!(7))
        .await
        .unwrap();
    assert_eq!(answer, serde_json::json!(7));
    let accepted = endpoint.handshakes();
    assert!(accepted >= 3, "{accepted}");
    // Without a certificate the endpoint refuses the handshake.
    let without = BrokerSettings {
        connect_timeout: Duration::from_secs(3),
        ..settings(endpoint.url(), ca_only(&ca_file))
    };
    let err = connect(&queue, without)
        .await
        .expect_err("the endpoint requires a client certificate");
    assert!(
        matches!(err, Error::Broker(BrokerError::Tls { .. })),
        "a TLS error, not a timeout: {err}"
    );
    assert_eq!(
        endpoint.handshakes(),
        accepted,
        "no handshake without a certificate"
    );
    client.close().await;
    worker.stop();
    let _ = worker.wait().await;
}
