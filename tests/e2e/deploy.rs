//! The deployment files (`deploy/`) against the binaries: the systemd unit run the way systemd
//! runs it, the Kubernetes ConfigMap's files through the binaries' own loader, and the grace
//! periods of every supervisor against the worker's shutdown grace. (Schemas and the compose
//! file are checked by `deploy/check-deploy.sh`, which needs tools from outside Rust.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Command as Cli;
use warren_gateway::GatewayConfig;
use warren_shared::config::{self, Layered};
use warren_tests::{ChildGuard, TestQueue, amqp_url, binary, eventually, temp_dir};
use warren_worker::WorkerConfig;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Key=value` lines of the unit file's sections, in order, with systemd's `%i` (the instance)
/// and `%%` specifiers expanded.
fn unit_settings(unit: &str, instance: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.replace("%%", "\u{0}").replace("%i", instance);
            (k.to_owned(), v.replace('\u{0}', "%"))
        })
        .collect()
}

/// `KEY=VALUE` lines of an environment file, as systemd's `EnvironmentFile=` reads simple ones.
fn env_file(path: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new(); // `EnvironmentFile=-...`: optional
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The worker's `/readyz` details once it answers 200.
async fn ready_details(metrics: &str) -> serde_json::Value {
    let url = format!("http://{metrics}/readyz");
    let details = Arc::new(Mutex::new(serde_json::Value::Null));
    eventually("the worker to be ready", Duration::from_secs(30), || {
        let (url, details) = (url.clone(), details.clone());
        async move {
            let answer = tokio::task::spawn_blocking(move || {
                ureq::get(&url)
                    .call()
                    .ok()?
                    .body_mut()
                    .read_to_string()
                    .ok()
            })
            .await
            .ok()
            .flatten();
            match answer.and_then(|text| serde_json::from_str(&text).ok()) {
                Some(json) => {
                    *details.lock().unwrap() = json;
                    true
                }
                None => false,
            }
        }
    })
    .await;
    details.lock().unwrap().clone()
}

fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_unit_takes_every_setting_from_its_env_files() {
    let q = TestQueue::new("systemd");
    let unit = read("deploy/systemd/warren-worker@.service");
    let settings = unit_settings(&unit, &q.name);
    let etc = temp_dir("systemd-etc");
    let outbox = temp_dir("systemd-outbox");
    let metrics = free_loopback_addr();
    // The two environment files the unit names: every instance's, then this instance's.
    std::fs::write(
        etc.path().join("worker.env"),
        format!(
            "# every worker on this host\nAMQP_URL={}\nWARREN_CONCURRENCY=7\nWARREN_OUTBOX={}\nWARREN_METRICS_ADDR={metrics}\n",
            amqp_url(),
            outbox.path().display()
        ),
    )
    .unwrap();
    std::fs::write(
        etc.path().join(format!("worker-{}.env", q.name)),
        "WARREN_CONCURRENCY=5\n",
    )
    .unwrap();

    // What systemd does: Environment= lines, then each EnvironmentFile= in order (later
    // assignments win), then ExecStart= with that environment and nothing else.
    let mut env: Vec<(String, String)> = Vec::new();
    let mut exec: Option<Vec<String>> = None;
    let mut files = 0;
    for (key, value) in &settings {
        match key.as_str() {
            "Environment" => {
                let (k, v) = value.split_once('=').unwrap();
                env.push((k.to_owned(), v.to_owned()));
            }
            "EnvironmentFile" => {
                let path = value.trim_start_matches('-');
                let name = Path::new(path).file_name().unwrap();
                assert!(
                    path.starts_with("/etc/warren/"),
                    "environment file outside /etc/warren: {path}"
                );
                env.extend(env_file(&etc.path().join(name)));
                files += 1;
            }
            "ExecStart" => {
                assert!(
                    !value.contains(['"', '\'']),
                    "quoting in ExecStart: {value}"
                );
                exec = Some(value.split_whitespace().map(str::to_owned).collect());
            }
            _ => {}
        }
    }
    assert_eq!(files, 2, "worker.env and worker-%i.env");
    let exec = exec.expect("the unit has an ExecStart= line");
    assert_eq!(exec[0], "/usr/local/bin/warren-worker");

    let mut command = Command::new(binary("warren-worker"));
    command
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "warn")
        .env(
            "WARREN_FUNCTIONS_EXCHANGE",
            warren_tests::functions_exchange_of(&q.name),
        )
        .args(&exec[1..])
        .stdout(Stdio::null());
    let _worker = ChildGuard::spawn(command);

    // A flag in ExecStart= (say `--concurrency 16` or `--queue x`) would win over both files.
    let details = ready_details(&metrics).await;
    assert_eq!(
        details["queue"],
        q.name.as_str(),
        "the queue is the instance"
    );
    assert_eq!(
        details["concurrency"], 5,
        "this instance's file wins: {details}"
    );
}

/// The text of `key: |` in a YAML ConfigMap (the block indented under it).
fn configmap_file(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines
        .next()
        .unwrap_or_else(|| panic!("no {key} in the ConfigMap"));
    let indent = header.len() - header.trim_start().len() + 2;
    let text: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect();
    assert!(text.len() > 3, "{key} is empty");
    text.join("\n")
}

/// `C` loaded from `toml` by the binaries' own loader (a typo fails here as at start-up).
fn load<C: Layered>(name: &str, toml: &str) -> C {
    let dir = temp_dir("k8s-config");
    let path: PathBuf = dir.path().join(name);
    std::fs::write(&path, toml).unwrap();
    let args = ["probe", "--config", path.to_str().unwrap()];
    config::load_from(Cli::new("probe"), args).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The number after `key: ` in `yaml` (the first one).
fn yaml_seconds(yaml: &str, key: &str) -> u64 {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key}"))
}

/// Room between the end of the worker's grace and its supervisor's SIGKILL: handing back the
/// unfinished tasks and closing the connections.
const HAND_BACK_ROOM: Duration = Duration::from_secs(10);

#[test]
fn kubernetes_config_loads_and_the_grace_period_outlasts_the_drain() {
    let configmap = read("deploy/kubernetes/configmap.yaml");
    let worker: WorkerConfig = load("worker.toml", &configmap_file(&configmap, "worker.toml"));
    let gateway: GatewayConfig = load("gateway.toml", &configmap_file(&configmap, "gateway.toml"));

    // The files the pods mount are where the config files look for them.
    let worker_yaml = read("deploy/kubernetes/worker.yaml");
    let gateway_yaml = read("deploy/kubernetes/gateway.yaml");
    for (yaml, file, url_file) in [
        (&worker_yaml, "worker.toml", &worker.broker.amqp_url_file),
        (&gateway_yaml, "gateway.toml", &gateway.broker.amqp_url_file),
    ] {
        assert!(yaml.contains(&format!("value: /etc/warren/config/{file}")));
        assert!(yaml.contains("mountPath: /etc/warren/config"));
        assert!(yaml.contains("mountPath: /etc/warren/secret"));
        assert!(yaml.contains("path: amqp-url"));
        assert_eq!(
            url_file.as_deref(),
            Some(Path::new("/etc/warren/secret/amqp-url"))
        );
    }
    assert_eq!(
        gateway.token_file.as_deref(),
        Some(Path::new("/etc/warren/secret/token"))
    );
    assert!(
        gateway.no_declare,
        "the gateway's producer user cannot declare"
    );

    // Scale-down drains instead of killing: SIGKILL comes after the grace plus room.
    let worker_kill =
        Duration::from_secs(yaml_seconds(&worker_yaml, "terminationGracePeriodSeconds"));
    assert!(
        worker.shutdown_grace + HAND_BACK_ROOM <= worker_kill,
        "worker: grace {:?} + {HAND_BACK_ROOM:?} > terminationGracePeriodSeconds {worker_kill:?}",
        worker.shutdown_grace
    );
    let gateway_kill =
        Duration::from_secs(yaml_seconds(&gateway_yaml, "terminationGracePeriodSeconds"));
    assert!(
        gateway.shutdown_grace + HAND_BACK_ROOM <= gateway_kill,
        "gateway: grace {:?} + {HAND_BACK_ROOM:?} > {gateway_kill:?}",
        gateway.shutdown_grace
    );
}

#[test]
fn systemd_and_compose_outwait_the_default_shutdown_grace() {
    let grace = WorkerConfig::default().shutdown_grace;
    let unit = read("deploy/systemd/warren-worker@.service");
    let stop = unit_settings(&unit, "q")
        .into_iter()
        .find(|(k, _)| k == "TimeoutStopSec")
        .map(|(_, v)| humantime::parse_duration(&v).unwrap())
        .expect("TimeoutStopSec=");
    assert!(
        grace + HAND_BACK_ROOM <= stop,
        "systemd: {grace:?} vs {stop:?}"
    );
    let compose = read("deploy/docker-compose.yml");
    let stop = compose
        .lines()
        .find_map(|l| l.trim().strip_prefix("stop_grace_period: "))
        .map(|v| humantime::parse_duration(v.trim()).unwrap())
        .expect("stop_grace_period");
    assert!(
        grace + HAND_BACK_ROOM <= stop,
        "compose: {grace:?} vs {stop:?}"
    );
}
