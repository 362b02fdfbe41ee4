//! A private RabbitMQ node, for tests that must stop a broker, raise an alarm on it or cut it
//! off, without disturbing the shared broker at `AMQP_URL` that every other test uses.
//!
//! The node is the machine's installed `rabbitmq-server`, started as a child process in its own
//! process group with its own node name, ports, data directory and Erlang cookie (all under a
//! temporary directory). It needs no `rabbitmqctl` set-up and no root-owned files: the test
//! that starts it owns it, and [`Drop`] kills the whole process group and deletes the
//! directory, also when the test fails. [`NodeOptions`] give nodes a shared cookie (to form a
//! [`Cluster`](crate::cluster::Cluster)), more listening addresses (the host end of a test's
//! veth pair) and more `rabbitmq.conf` lines (definitions to load, say). With
//! `WARREN_KEEP_NODE_DIRS=1` in the environment the directory (data and logs) is kept for a
//! post-mortem.
//!
//! ```no_run
//! # async fn demo() {
//! let node = warren_tests::node::BrokerNode::start("outage").await;
//! let url = node.url(); // amqp://guest:guest@127.0.0.1:<port>/%2f
//! node.stop_app();      // connections drop, the port refuses
//! node.start_app();
//! # }
//! ```

use std::net::{IpAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Where Debian's package puts the real scripts (`/usr/sbin/*` are wrappers that switch to the
/// `rabbitmq` user and the system node's cookie).
const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// How long a node may take to boot and accept AMQP connections.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a node needs beyond [`BrokerNode::start`]'s defaults.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The Erlang cookie. Nodes that form a cluster share one; by default each node gets a
    /// random cookie of its own.
    pub cookie: Option<String>,
    /// Addresses the AMQP listener binds to on the node's port besides 127.0.0.1 (the host end
    /// of a test's veth pair, say: only test-made namespaces reach it).
    pub listen: Vec<IpAddr>,
    /// More `rabbitmq.conf` lines.
    pub config: Vec<String>,
    /// RabbitMQ's Prometheus plugin on, its endpoint on a loopback port of its own
    /// ([`BrokerNode::prometheus_url`]).
    pub prometheus: bool,
}

/// A RabbitMQ node of the test's own, stopped and deleted on drop.
#[derive(Debug)]
pub struct BrokerNode {
    name: String,
    port: u16,
    dist_port: u16,
    prometheus_port: Option<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl BrokerNode {
    /// Starts a node for the test `label` and waits until it accepts AMQP connections.
    ///
    /// # Panics
    ///
    /// When RabbitMQ is not installed or the node does not come up within a minute (the
    /// node's log is printed then).
    pub async fn start(label: &str) -> Self {
        Self::start_with(label, NodeOptions::default()).await
    }

    /// [`BrokerNode::start`] with RabbitMQ's Prometheus plugin (`rabbitmq_prometheus`) on, its
    /// endpoint on a loopback port of its own ([`BrokerNode::prometheus_url`]).
    pub async fn start_with_prometheus(label: &str) -> Self {
        let options = NodeOptions {
            prometheus: true,
            ..NodeOptions::default()
        };
        Self::start_with(label, options).await
    }

    /// Starts a node with `options` and waits until it answers AMQP connections (a refused
    /// login counts: a node that loads definitions has no `guest` user).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_with(label: &str, options: NodeOptions) -> Self {
        let port = free_port();
        let mut dist_port = free_port();
        while dist_port == port {
            dist_port = free_port();
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("warren-node-{label}-"))
            .tempdir()
            .expect("temporary directory for the node");
        let name = format!(
            "warren-{label}-{}@localhost",
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .get(..8)
                .unwrap_or("node")
        );
        let mut config = vec![
            format!("listeners.tcp.local = 127.0.0.1:{port}"),
            "loopback_users = none".to_owned(),
            "log.console = false".to_owned(),
            "log.file.level = info".to_owned(),
        ];
        for (i, ip) in options.listen.iter().enumerate() {
            config.push(format!("listeners.tcp.extra{i} = {ip}:{port}"));
        }
        let mut plugins = "[].\n";
        let prometheus_port = options.prometheus.then(free_port);
        if let Some(metrics_port) = prometheus_port {
            config.push("prometheus.tcp.ip = 127.0.0.1".to_owned());
            config.push(format!("prometheus.tcp.port = {metrics_port}"));
            plugins = "[rabbitmq_prometheus].\n";
        }
        config.extend(options.config);
        std::fs::write(dir.path().join("rabbitmq.conf"), config.join("\n") + "\n")
            .expect("node config");
        if let Some(cookie) = options.cookie {
            // Erlang refuses a cookie file that others can read.
            let path = dir.path().join(".erlang.cookie");
            std::fs::write(&path, cookie).expect("cookie file");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400))
                .expect("cookie file mode");
        }
        std::fs::write(dir.path().join("enabled_plugins"), plugins).expect("plugins file");
        let mut node = Self {
            name,
            port,
            dist_port,
            prometheus_port,
            dir,
            child: None,
        };
        node.boot().await;
        node
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`, this node's URL (a node that loads
    /// definitions has no `guest` user).
    pub fn url(&self) -> String {
        self.url_as("guest", "guest", "%2f")
    }

    /// `amqp://<user>:<password>@127.0.0.1:<port>/<vhost>` (`vhost` as it goes in a URL: `%2f`
    /// for `/`).
    pub fn url_as(&self, user: &str, password: &str, vhost: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/{vhost}", self.port)
    }

    /// `http://127.0.0.1:<port>`, where the Prometheus plugin answers (`/metrics`,
    /// `/metrics/per-object`), when the node was started with it.
    pub fn prometheus_url(&self) -> Option<String> {
        self.prometheus_port
            .map(|port| format!("http://127.0.0.1:{port}"))
    }

    /// The AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name (`warren-<label>-<id>@localhost`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command line that runs `rabbitmqctl` against this node, for scripts that take one
    /// (`RABBITMQCTL` of `deploy/rabbitmq/users.sh`); run it with [`env`](Self::env) applied,
    /// which gives it the node's cookie.
    pub fn ctl_command_line(&self) -> String {
        format!("{RABBITMQ_BIN}/rabbitmqctl -n {}", self.name)
    }

    /// Runs `rabbitmqctl -n <node> ARGS` against this node and returns its output.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.env(&mut Command::new(
            Path::new(RABBITMQ_BIN).join("rabbitmqctl"),
        ))
        .arg("-n")
        .arg(&self.name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rabbitmqctl")
    }

    /// Runs `rabbitmqctl ARGS` and panics with its output when it fails.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?} on {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the RabbitMQ application (the Erlang VM stays up): every connection is closed and
    /// the port refuses new ones, as in a broker restart.
    pub fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]);
    }

    /// Starts the application again and waits until the port accepts AMQP connections.
    pub fn start_app(&self) {
        self.ctl_ok(&["start_app"]);
        self.ctl_ok(&["await_startup"]);
    }

    /// Kills the node outright (SIGKILL to its process group), as in a crashed host.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Boots the node again after [`kill`](Self::kill), with the same name, port and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.boot().await;
    }

    /// Gives `command` this node's environment: its cookie (through `HOME`), name, ports and
    /// directories, as `rabbitmq-server` and `rabbitmqctl` read them.
    pub fn env<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        let dir = self.dir.path();
        command
            // Its own cookie: the node and rabbitmqctl both read $HOME/.erlang.cookie.
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
    }

    async fn boot(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.out")).expect("server log");
        let child = self
            .env(&mut Command::new(
                Path::new(RABBITMQ_BIN).join("rabbitmq-server"),
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start rabbitmq-server (is RabbitMQ installed?)");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if self.answers().await {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "node {} exited at start-up ({status}):\n{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                started.elapsed() < BOOT_TIMEOUT,
                "node {} did not accept connections within {BOOT_TIMEOUT:?}:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the node answers AMQP: a connection as `guest`, or a refused login (a node that
    /// loaded definitions has no `guest`; refusing it means the node is serving).
    async fn answers(&self) -> bool {
        let url = self.url();
        let settings = warren_shared::BrokerSettings::new(&url);
        let connected = warren_shared::broker::connect(
            &settings,
            &url,
            "warren-test-node-probe",
            warren_shared::broker::Purpose::Publish,
            &[],
        )
        .await;
        match connected {
            Ok(connection) => {
                let _ = connection.close(200, "ready".into()).await;
                true
            }
            Err(warren_shared::broker::BrokerError::LoginRefused { .. }) => true,
            Err(_) => false,
        }
    }

    /// The node's start-up output and log, for failure messages.
    pub fn logs(&self) -> String {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let log = read(
            self.dir
                .path()
                .join("log")
                .join(format!("{}.log", self.name)),
        );
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "{}\n{}",
            read(self.dir.path().join("server.out")),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        self.kill();
        // For a post-mortem of a failed test: WARREN_KEEP_NODE_DIRS=1 keeps data and logs.
        if std::env::var_os("WARREN_KEEP_NODE_DIRS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept {} for {}", self.dir.path().display(), self.name);
        }
    }
}

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}
