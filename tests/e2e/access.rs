//! Least privilege and secrets (issue 8.7, 8.8): the permission profiles of
//! `deploy/rabbitmq/users.sh` on real broker users, producers that do not declare, typed
//! refusals that name the permission, a refused login, and secrets read from files.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use warren_client::{Client, ClientSettings, Error};
use warren_shared::broker::{BrokerError, BrokerSettings};
use warren_tests::tasks::Flaky;
use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, deploy, eventually, temp_dir};
use warren_worker::{Mailer, builtin_registry};

/// A broker user made by `deploy/rabbitmq/users.sh ROLE NAME QUEUE`, deleted when dropped
/// (also when the test fails).
pub(crate) struct BrokerUser {
    pub(crate) name: String,
    password: String,
}

fn users_sh() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq/users.sh")
}

impl BrokerUser {
    fn create(role: &str, queue: &str, dir: &tempfile::TempDir) -> Self {
        Self::create_with_events(role, queue, warren_shared::events::DEFAULT_STREAM, dir)
    }

    /// [`BrokerUser::create`] for a deployment whose event stream is `events`.
    pub(crate) fn create_with_events(
        role: &str,
        queue: &str,
        events: &str,
        dir: &tempfile::TempDir,
    ) -> Self {
        let name = format!("warren-test-{role}-{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        let password_file = dir.path().join(format!("{role}.password"));
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        let user = Self { name, password };
        let out = Command::new("bash")
            .arg(users_sh())
            .args([role, &user.name, queue])
            .env("WARREN_USER_PASSWORD_FILE", &password_file)
            .env(
                "WARREN_FUNCTIONS_EXCHANGE",
                warren_tests::functions_exchange_of(queue),
            )
            .env("WARREN_EVENTS_STREAM", events)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "users.sh {role}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        user
    }

    /// The shared broker's URL with this user's credentials.
    pub(crate) fn url(&self) -> String {
        let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
        format!(
            "amqp://{}:{}@{}:{}/%2f",
            self.name, self.password, uri.authority.host, uri.authority.port
        )
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["--quiet", "delete_user", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn client_as(user: &BrokerUser, queue: &TestQueue, declare: bool) -> Result<Client, Error> {
    Client::connect(ClientSettings {
        broker: BrokerSettings::new(user.url()),
        queue: Some(queue.name.clone()),
        declare,
        ..ClientSettings::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_worker_profiles_are_enough_and_a_refused_declare_names_the_permission() {
    let dir = temp_dir("profiles");
    // The second retry waits in a delay queue, which the worker profile must let it declare.
    let delay = Duration::from_millis(200);
    let queue = TestQueue::new("profiles").with_retry_delays(&[delay]);
    let worker_user = BrokerUser::create("worker", &queue.name, &dir);
    let producer = BrokerUser::create("producer", &queue.name, &dir);

    // The worker profile declares the topology, consumes, replies and retries.
    let mut settings = queue.worker_settings(4);
    settings.broker = BrokerSettings::new(worker_user.url());
    settings.policy.backoff = vec![Duration::ZERO, delay];
    let registry = builtin_registry(Mailer::outbox(dir.path())).register::<Flaky>();
    let worker = queue.worker_with(registry, settings).await;

    // The producer profile (no configure) calls and enqueues with declaring off.
    let client = client_as(&producer, &queue, false)
        .await
        .expect("producer connects");
    let answer = client
        .call_json("echo", serde_json::json!("least privilege"))
        .await
        .expect("call as producer");
    assert_eq!(answer, serde_json::json!("least privilege"));
    // A task due later goes through the delay levels the worker declared and bound.
    let later = client
        .call_json_with(
            "echo",
            serde_json::json!("later"),
            &warren_client::CallOptions::default().delay(Duration::from_secs(1)),
        )
        .await
        .expect("a delayed call as producer");
    assert_eq!(later, serde_json::json!("later"));
    // The gateway's queue depth (a passive declare) needs no permission either.
    let stats = client
        .queue_stats(&queue.name)
        .await
        .expect("queue stats as producer");
    assert_eq!(stats.consumers, 1);
    let enqueued = client
        .enqueue_json("echo", serde_json::json!(1))
        .await
        .expect("enqueue as producer");
    // Its result, read from the task event stream: the producer profile may read it.
    let found = client
        .wait_result(&enqueued, Duration::from_secs(20))
        .await
        .expect("a result lookup as producer");
    assert!(found.outcome.succeeded(), "{found:?}");
    // A task that fails twice is retried at once (the worker publishes to `warren`), then
    // after a delay (it declares `<queue>.delay.200ms` and publishes to it), then succeeds.
    let third = client
        .call_with(
            &Flaky { succeed_on: 3 },
            &warren_client::CallOptions::default().max_attempts(3),
        )
        .await
        .expect("the third attempt succeeds");
    assert_eq!(third, 3);
    // A task that fails for good is parked and its failure replied.
    let failed = client
        .call_json_with(
            "fail",
            serde_json::json!({"message": "expected"}),
            &warren_client::CallOptions::default().max_attempts(2),
        )
        .await;
    assert!(
        failed
            .as_ref()
            .err()
            .and_then(Error::failure)
            .is_some_and(|f| f.message.contains("expected")),
        "{failed:?}"
    );
    client.close().await;

    // `warren --no-declare` as the producer, the URL from a file.
    let url_file = dir.path().join("producer-url");
    std::fs::write(&url_file, format!("{}\n", producer.url())).unwrap();
    let out = Command::new(binary("warren"))
        .args(["--no-declare", "call", "echo", "2", "--queue", &queue.name])
        .arg("--amqp-url-file")
        .arg(&url_file)
        .env_remove("AMQP_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");

    // Declaring on: a typed error naming the permission, the user, the resource and the fix.
    let client = client_as(&producer, &queue, true)
        .await
        .expect("producer connects");
    let err = client
        .enqueue_json("echo", serde_json::json!(3))
        .await
        .expect_err("a producer may not declare");
    match &err {
        Error::Broker(BrokerError::AccessRefused {
            permission,
            user,
            resource,
            ..
        }) => {
            assert_eq!(permission, "configure");
            assert_eq!(user, &producer.name);
            assert!(resource.contains("warren"), "{resource}");
        }
        other => panic!("expected AccessRefused, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("users.sh") && text.contains("--no-declare"),
        "{text}"
    );
    client.close().await;

    // The same from the CLI.
    let out = Command::new(binary("warren"))
        .args(["enqueue", "echo", "4", "--queue", &queue.name])
        .env("AMQP_URL", producer.url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`configure`") && stderr.contains(&producer.name),
        "{stderr}"
    );
    assert!(!stderr.contains(&producer.password), "{stderr}");

    worker.stop();
    let _ = worker.wait().await;
}

/// Issue 12.6: `users.sh` takes each role's permissions and tags from `definitions.json`, the one
/// place they are written, so a user it makes and a user imported from the definitions get the
/// same (for the file's queue and vhost; the queue name replaced for another queue).
#[test]
fn users_sh_gives_each_role_exactly_the_permissions_of_the_definitions() {
    let dir = temp_dir("users-sh-definitions");
    let calls = dir.path().join("calls");
    // A stand-in for rabbitmqctl that records its arguments, one call per line.
    let fake = dir.path().join("rabbitmqctl");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$*\" >> '{}'\n", calls.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let definitions: serde_json::Value =
        serde_json::from_slice(&std::fs::read(deploy::definitions_path()).unwrap()).unwrap();
    let users = definitions["users"].as_array().unwrap();
    let permissions = definitions["permissions"].as_array().unwrap();
    assert_eq!(users.len(), 3, "{users:?}");
    for user in users {
        let name = user["name"].as_str().unwrap();
        // No usable password ships: an empty hash is a user that cannot log in with one.
        assert_eq!(user["password_hash"], "", "{name}");
        let role = match name {
            "warren-app" => "producer",
            "warren-worker" => "worker",
            "warren-ops" => "operator",
            other => panic!("a user users.sh has no role for: {other}"),
        };
        let expected = permissions
            .iter()
            .find(|p| p["user"] == name)
            .unwrap_or_else(|| panic!("no permissions for {name}"));
        assert_eq!(expected["vhost"], deploy::VHOST);
        if role == "operator" {
            // Releasing a function's claim: its exchange, and no other.
            assert_eq!(expected["configure"], r"^warren\.functions\..+$");
        }
        // As the file says, and for another queue, functions exchange and event stream.
        for (queue, functions, events, q, f, e) in [
            (
                deploy::QUEUE,
                "warren.functions",
                "warren.events",
                r"warren\.tasks",
                r"warren\.functions",
                r"warren\.events",
            ),
            (
                "mail.bulk",
                "mail.functions",
                "mail.events",
                r"mail\.bulk",
                r"mail\.functions",
                r"mail\.events",
            ),
        ] {
            let _ = std::fs::remove_file(&calls);
            let out = Command::new("bash")
                .arg(deploy::users_sh_path())
                .args([role, name, queue, deploy::VHOST])
                .env("RABBITMQCTL", &fake)
                .env("WARREN_FUNCTIONS_EXCHANGE", functions)
                .env("WARREN_EVENTS_STREAM", events)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child.stdin.take().unwrap().write_all(b"secret\n")?;
                    child.wait_with_output()
                })
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let calls = std::fs::read_to_string(&calls).unwrap();
            let regex = |field: &str| {
                expected[field]
                    .as_str()
                    .unwrap()
                    .replace(r"warren\.tasks", q)
                    .replace(r"warren\.functions", f)
                    .replace(r"warren\.events", e)
            };
            let set = format!(
                "--quiet set_permissions -p {} {name} {} {} {}",
                deploy::VHOST,
                regex("configure"),
                regex("write"),
                regex("read")
            );
            assert!(calls.lines().any(|l| l == set), "{role} {queue}: {calls}");
            let tags: Vec<&str> = user["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            let set_tags = format!("--quiet set_user_tags {name} {}", tags.join(" "));
            assert!(
                calls.lines().any(|l| l.trim_end() == set_tags.trim_end()),
                "{role}: {calls}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_configure_permission_is_told_which_permission() {
    let dir = temp_dir("worker-refused");
    let queue = TestQueue::new("worker-refused");
    let producer = BrokerUser::create("producer", &queue.name, &dir);
    let mut settings = queue.worker_settings(1);
    settings.broker = BrokerSettings::new(producer.url());
    let started = queue
        .try_worker_with(builtin_registry(Mailer::outbox(dir.path())), settings)
        .await;
    let err = started
        .expect_err("a worker must declare its queues")
        .to_string();
    assert!(
        err.contains("`configure`") && err.contains(&producer.name),
        "{err}"
    );
}

/// A worker on a permission profile from before the delay levels (no `warren.run-at*`) still
/// starts and runs the tasks due now; only delayed delivery is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_may_not_declare_the_delay_levels_still_runs_tasks_due_now() {
    let dir = temp_dir("worker-no-levels");
    let queue = TestQueue::new("worker-no-levels");
    let worker_user = BrokerUser::create("worker", &queue.name, &dir);
    let current = Command::new("rabbitmqctl")
        .args(["--quiet", "list_user_permissions", &worker_user.name])
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&current.stdout)
        .lines()
        .find(|l| l.starts_with('/'))
        .map(str::to_owned)
        .expect("the worker's permissions");
    let strip = |regex: &str| {
        regex
            .replace(r"|warren\.run-at\..+", "")
            .replace(r"|warren\.run-at", "")
    };
    let fields: Vec<String> = line.split('\t').skip(1).map(strip).collect();
    assert_eq!(fields.len(), 3, "{line}");
    assert!(!fields[0].contains("run-at"), "{fields:?}");
    let status = Command::new("rabbitmqctl")
        .args(["--quiet", "set_permissions", "-p", "/", &worker_user.name])
        .args(&fields)
        .status()
        .unwrap();
    assert!(status.success());

    let mut settings = queue.worker_settings(1);
    settings.broker = BrokerSettings::new(worker_user.url());
    let worker = queue
        .try_worker_with(builtin_registry(Mailer::outbox(dir.path())), settings)
        .await
        .expect("the worker starts without the delay levels");
    let client = queue.client().await;
    let reply = client
        .call(&warren_shared::tasks::Echo(serde_json::json!("now")))
        .await
        .unwrap();
    assert_eq!(reply, serde_json::json!("now"));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_refused_login_not_a_missing_broker() {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let url = format!(
        "amqp://guest:wrong-{}@{}:{}/%2f",
        uuid::Uuid::new_v4().simple(),
        uri.authority.host,
        uri.authority.port
    );
    let queue = TestQueue::new("login");
    let err = Client::connect(ClientSettings {
        broker: BrokerSettings::new(url),
        queue: Some(queue.name.clone()),
        ..ClientSettings::default()
    })
    .await
    .expect_err("a wrong password is refused");
    assert!(
        matches!(&err, Error::Broker(BrokerError::LoginRefused { user, .. }) if user == "guest"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("password is wrong"), "{text}");
    assert!(
        text.contains("`guest` may only log in from localhost"),
        "{text}"
    );
    assert!(!text.contains("Is the broker running"), "{text}");
    assert!(!text.contains("wrong-"), "password hidden: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reads_its_token_from_a_file() {
    let dir = temp_dir("token-file");
    let queue = TestQueue::new("token-file");
    let worker = queue
        .worker(builtin_registry(Mailer::outbox(dir.path())), 2)
        .await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "file-token-123\n").unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    };
    let (http, text) = (free(), free());
    let mut gateway = Command::new(binary("warren-gateway"));
    gateway
        .args(["--queue", &queue.name])
        .args(["--http", &http.to_string(), "--text", &text.to_string()])
        .env("WARREN_GATEWAY_TOKEN_FILE", &token_file)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let _gateway = ChildGuard::spawn(gateway);
    let ask = |lines: &'static [&'static str]| async move {
        let until = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match tokio::net::TcpStream::connect(text).await {
                Ok(stream) => break stream,
                Err(e) => assert!(Instant::now() < until, "the gateway never listened: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (read, mut write) = stream.into_split();
        for line in lines {
            write.write_all(line.as_bytes()).await.unwrap();
        }
        let mut answers = BufReader::new(read).lines();
        tokio::time::timeout(Duration::from_secs(30), answers.next_line())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap_or_default()
    };
    // The file's token, without its trailing newline, is the token.
    let answer = ask(&[
        "{\"auth\":\"file-token-123\"}\n",
        "{\"function\":\"echo\",\"args\":5}\n",
    ])
    .await;
    assert_eq!(answer, "5");
    let refused = ask(&["{\"auth\":\"file-token-123\\n\"}\n"]).await;
    assert!(refused.contains("unauthorized"), "{refused}");
    let refused = ask(&["{\"function\":\"echo\",\"args\":6}\n"]).await;
    assert!(refused.contains("unauthorized"), "{refused}");

    // A missing token file stops the gateway with a clear error.
    let out = Command::new(binary("warren-gateway"))
        .args(["--http", "127.0.0.1:0", "--text", "127.0.0.1:0"])
        .arg("--token-file")
        .arg(dir.path().join("missing"))
        .env("AMQP_URL", amqp_url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read the secret file"), "{stderr}");
    worker.stop();
    let _ = worker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_profile_lists_replays_and_purges_dead_letters() {
    let dir = temp_dir("operator");
    let queue = TestQueue::new("operator");
    let operator = BrokerUser::create("operator", &queue.name, &dir);
    let worker = queue
        .worker(builtin_registry(Mailer::outbox(dir.path())), 2)
        .await;
    let client = queue.client().await;
    let park = warren_client::CallOptions::default().max_attempts(1);
    for n in 0..2 {
        let parked = client
            .call_json_with(
                "fail",
                serde_json::json!({"message": format!("park {n}")}),
                &park,
            )
            .await;
        assert!(parked.is_err(), "{parked:?}");
    }
    worker.stop();
    let _ = worker.wait().await;
    warren_tests::eventually("two parked tasks", Duration::from_secs(30), || async {
        queue.dead_count(&client).await == 2
    })
    .await;

    // The runbook of WarrenDelayedTasksParked reads warren.run-at.parked.
    {
        let connection = lapin::Connection::connect(&operator.url(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let got = channel
            .basic_get(
                warren_shared::delay::PARKED.into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await;
        match got {
            // Someone else's parked task: back where it was.
            Ok(Some(message)) => {
                let _ = message
                    .delivery
                    .nack(lapin::options::BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
            Ok(None) => {}
            Err(e) => panic!("the operator cannot read warren.run-at.parked: {e}"),
        }
        let _ = connection.close(200, "done".into()).await;
    }
    let url_file = dir.path().join("operator-url");
    std::fs::write(&url_file, format!("{}\n", operator.url())).unwrap();
    let fx = queue.functions_exchange();
    let warren = |args: &[&str]| {
        let out = Command::new(binary("warren"))
            .arg("--no-declare")
            .args(args)
            .args(["--queue", &queue.name])
            .env_remove("AMQP_URL")
            .env_remove("WARREN_MANAGEMENT_URL")
            .env("WARREN_AMQP_URL_FILE", &url_file)
            .env("WARREN_FUNCTIONS_EXCHANGE", &fx)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "warren {args:?} as operator: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listing = warren(&["dlq", "list"]);
    assert_eq!(listing.lines().count(), 2, "{listing}");
    let first = listing.split_whitespace().next().unwrap().to_owned();
    assert_eq!(warren(&["dlq", "replay", &first]).trim(), "replayed 1");
    assert_eq!(warren(&["dlq", "purge"]).trim(), "purged 1");
    assert_eq!(queue.dead_count(&client).await, 0);

    // The stopped worker left its functions claimed for the queue: the operator lists the
    // claims (management API) and gives one back (AMQP, `configure` on its exchange).
    let claims = |listing: &str| -> Vec<(String, String)> {
        let rows: Vec<serde_json::Value> = serde_json::from_str(listing).unwrap();
        rows.iter()
            .map(|r| (r["function"].to_string(), r["queue"].to_string()))
            .collect()
    };
    let owned = (format!("{:?}", "echo"), format!("{:?}", queue.name));
    let listed = claims(&warren(&["functions", "--json"]));
    assert!(listed.contains(&owned), "{listed:?}");
    // The replayed task waits in the queue: refused unless forced.
    let refused = Command::new(binary("warren"))
        .args(["--no-declare", "functions", "release", "echo"])
        .env_remove("AMQP_URL")
        .env("WARREN_AMQP_URL_FILE", &url_file)
        .env("WARREN_FUNCTIONS_EXCHANGE", &fx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("1 ready task"),
        "{stderr}"
    );
    let released = warren(&["functions", "release", "echo", "--force"]);
    assert!(
        released.starts_with(&format!("released echo from queue {}", queue.name)),
        "{released}"
    );
    let listed = claims(&warren(&["functions", "--json"]));
    assert!(!listed.iter().any(|(f, _)| f == "\"echo\""), "{listed:?}");
    client.close().await;
}

/// The code block in `docs/protocol.md` that follows the heading starting with `heading`, in
/// language `lang`: the examples are tested as the document shows them.
fn protocol_example(heading: &str, lang: &str) -> String {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"),
    )
    .unwrap();
    let mut lines = doc
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .skip_while(|l| *l != format!("```{lang}"))
        .skip(1);
    let code: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
    assert!(
        !code.is_empty(),
        "docs/protocol.md has no {lang} block under {heading:?}"
    );
    code.join("\n") + "\n"
}

/// Whether `program args` runs successfully (a tool the test needs is installed).
fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `program args` in `dir` as the broker user at `url` on `queue`, at most 60 s (then it
/// is stopped and the test fails), on a blocking thread: the test's in-process worker keeps
/// the runtime's threads.
async fn run_example(
    program: &str,
    args: &[&str],
    dir: &std::path::Path,
    url: &str,
    queue: &str,
    declare: bool,
) -> std::process::Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .env("AMQP_URL", url)
        .env("WARREN_QUEUE", queue)
        .env_remove("WARREN_DECLARE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if declare {
        command.env("WARREN_DECLARE", "1");
    }
    let shown = format!("{program} {args:?}");
    let ran = tokio::task::spawn_blocking(move || {
        // The guard stops the example if it hangs (or the test fails), and never signals a
        // process it has reaped.
        let mut child = ChildGuard::spawn(command);
        let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        };
        let stdout = read(child.take_stdout().map(|p| Box::new(p) as _));
        let stderr = read(child.take_stderr().map(|p| Box::new(p) as _));
        let status = child.wait_timeout(Duration::from_secs(60));
        drop(child);
        let (stdout, stderr) = (stdout.join(), stderr.join());
        status.map(|status| std::process::Output {
            status,
            stdout: stdout.unwrap_or_default(),
            stderr: stderr.unwrap_or_default(),
        })
    })
    .await;
    match ran {
        Ok(Some(output)) => output,
        Ok(None) => panic!("{shown} did not finish within 60 s"),
        Err(e) => panic!("{shown}: {e}"),
    }
}

/// The Python (pika) and PHP (php-amqplib) examples of docs/protocol.md §7, extracted from the
/// document and run unchanged as a producer made by `users.sh producer` (no `configure`): they
/// check the topology passively and publish, and get their answers. Declaring, which the
/// examples do on request, is refused to that user, as §1 says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protocol_examples_run_verbatim_as_the_least_privilege_producer() {
    const PHP_AUTOLOAD: &str = "/usr/share/php/PhpAmqpLib/autoload.php";
    // Debian's pika is for Debian's Python, which another `python3` on PATH may hide.
    let python3 = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|p| runs(p, &["-c", "import pika"]));
    let have_python = python3.is_some();
    let have_php = runs("php", &["-r", &format!("require '{PHP_AUTOLOAD}';")]);
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let installed = have_python && have_php;
    if !installed && !in_ci {
        println!(
            "SKIPPED the_protocol_examples_run_verbatim_as_the_least_privilege_producer: needs \
             python3 with pika and php with php-amqplib (apt-get install python3-pika \
             php-amqplib php-cli, or run deploy/test.sh, which installs them)"
        );
        return;
    }
    let dir = temp_dir("protocol-examples");
    let queue = TestQueue::new("protocol-examples");
    let producer = BrokerUser::create("producer", &queue.name, &dir);
    let worker = queue
        .worker(builtin_registry(Mailer::outbox(dir.path())), 2)
        .await;

    let python = dir.path().join("warren_call.py");
    std::fs::write(&python, protocol_example("### Python (pika)", "python")).unwrap();
    let script = python.to_str().unwrap();
    let python3 = python3.unwrap_or("python3");
    let out = run_example(
        python3,
        &[script, "echo", r#"{"x":1}"#],
        dir.path(),
        &producer.url(),
        &queue.name,
        false,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python example failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"x": 1}"#);
    // Declaring needs configure: the same example, asked to declare, is refused.
    let out = run_example(
        python3,
        &[script, "echo", "1"],
        dir.path(),
        &producer.url(),
        &queue.name,
        true,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ACCESS_REFUSED"), "{stderr}");

    // The PHP example: `composer require` puts the library's autoloader in vendor/; here
    // Debian's php-amqplib stands in for it.
    std::fs::create_dir(dir.path().join("vendor")).unwrap();
    std::fs::write(
        dir.path().join("vendor/autoload.php"),
        format!("<?php\nrequire '{PHP_AUTOLOAD}';\n"),
    )
    .unwrap();
    let php = dir.path().join("warren_call.php");
    std::fs::write(&php, protocol_example("### PHP (php-amqplib", "php")).unwrap();
    let out = run_example(
        "php",
        &[php.to_str().unwrap()],
        dir.path(),
        &producer.url(),
        &queue.name,
        false,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "php example failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("queued ")),
        "{stdout}"
    );
    assert_eq!(lines.get(1).copied(), Some(r#"{"x":1}"#), "{stdout}");
    // The enqueued mail was sent (into the outbox) by the worker.
    let id = lines[0].trim_start_matches("queued ").to_owned();
    eventually(
        "the enqueued mail in the outbox",
        Duration::from_secs(20),
        || {
            let dir = dir.path().to_owned();
            let id = id.clone();
            async move {
                std::fs::read_dir(&dir).is_ok_and(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().contains(&id))
                })
            }
        },
    )
    .await;
    worker.shutdown().await.unwrap();
}

/// The election refuses a user without configure permission on `warren.leader.*` by naming the
/// permission; the worker profile of the definitions may join it and fire schedules (declaring
/// and reading `warren.cron.log`, sending ticks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_profile_may_fire_schedules_and_others_are_told_which_permission() {
    use warren_shared::election::{self, Election, ElectionError, ElectionSettings};
    use warren_shared::link::Link;

    let dir = temp_dir("cron-access");
    let queue = TestQueue::new("cron-access");
    let role = format!("test-{}", uuid::Uuid::new_v4().simple());
    queue.also_delete(&election::queue_name(&role));
    queue.also_delete(warren_worker::cron::LOG_STREAM);
    let producer = BrokerUser::create("producer", &queue.name, &dir);
    let link = Link::open(
        &BrokerSettings::new(producer.url()),
        "refused",
        warren_shared::broker::Purpose::Consume,
        &[],
    )
    .await
    .unwrap();
    let refused = Election::join(&link, &role, ElectionSettings::default())
        .await
        .expect_err("a producer may not declare an election's queue");
    assert!(
        matches!(&refused, ElectionError::Broker(BrokerError::AccessRefused { permission, .. }) if permission == "configure"),
        "{refused}"
    );
    link.close().await;

    let worker_user = BrokerUser::create("worker", &queue.name, &dir);
    let mut settings = queue.worker_settings(2);
    settings.broker = BrokerSettings::new(worker_user.url());
    settings.cron_role = role.clone();
    let schedule = warren_worker::cron::ScheduleConfig {
        name: "access".into(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        function: "echo".into(),
        args: serde_json::json!("tick"),
        misfire: warren_worker::cron::Misfire::Skip,
        queue: None,
    };
    settings.schedules = vec![schedule.check().unwrap()];
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = ran.clone();
    let registry = warren_worker::Registry::new().register_fn(
        move |args: warren_shared::tasks::Echo, _ctx: warren_worker::TaskContext| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok(args.0) }
        },
    );
    let worker = queue.worker_with(registry, settings).await;
    eventually(
        "two ticks ran by function name",
        Duration::from_secs(10),
        || {
            let n = ran.load(std::sync::atomic::Ordering::SeqCst);
            async move { n >= 2 }
        },
    )
    .await;
    worker.shutdown().await.unwrap();
}
