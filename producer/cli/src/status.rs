//! `warren status`: is it working? One screen per work queue: its queues (work, retry tiers,
//! dead letters) with depth, consumers, rates and the age of the oldest ready task, and the
//! worker processes consuming it.
//!
//! It reads RabbitMQ's management HTTP API (credentials from the AMQP URL unless
//! `--management-url` carries its own). When that API cannot be reached it says so and falls
//! back to what AMQP alone tells: depth and consumers of the work and dead-letter queues, by
//! passive declare.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::uri::AMQPUri;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde_json::Value;
use warren_client::{Client, ClientSettings};
use warren_shared::broker::BrokerSettings;
use warren_shared::topology;

/// The management API's port when `--management-url` is not given.
pub const DEFAULT_MANAGEMENT_PORT: u16 = 15672;

/// How long one management API request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// What `warren status` reports, also its `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The work queue; `None` for the whole deployment (every queue that serves a function,
    /// and `warren.tasks`, one row each).
    pub queue: Option<String>,
    /// Where the figures come from: `management` or `amqp`.
    pub source: &'static str,
    /// Why figures are missing, when they are.
    pub note: Option<String>,
    /// The work queue, its retry tiers and its dead-letter queue; for the deployment, its work
    /// queues.
    pub queues: Vec<QueueRow>,
    /// Processes consuming the work queue(s) (management API only).
    pub workers: Vec<WorkerRow>,
}

/// One queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueRow {
    /// Its name.
    pub name: String,
    /// `work`, `retry` or `dead`.
    pub role: &'static str,
    /// Tasks waiting for a worker.
    pub ready: u64,
    /// Tasks delivered and not yet acknowledged (management API only).
    pub unacked: Option<u64>,
    /// Consumers.
    pub consumers: u64,
    /// Publishes per second (management API only).
    pub publish_rate: Option<f64>,
    /// Deliveries per second (management API only).
    pub deliver_rate: Option<f64>,
    /// Acknowledgements per second (management API only).
    pub ack_rate: Option<f64>,
    /// Age of the oldest ready task, where the broker tells (`head_message_timestamp`, which
    /// RabbitMQ reports for classic queues only; Warren's quorum queues do not have it).
    pub oldest_ready_seconds: Option<u64>,
    /// The functions the queue serves (claims on the functions exchange), possibly none: in
    /// the deployment view from the management API, absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
}

/// One worker process (its consuming connection).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerRow {
    /// The connection's name, `warren-worker@host:pid/consume`.
    pub connection: String,
    /// Host it runs on.
    pub host: Option<String>,
    /// Its process id.
    pub pid: Option<u32>,
    /// The queue it consumes.
    pub queue: String,
    /// Tasks it runs at once (its prefetch).
    pub concurrency: Option<u64>,
    /// Seconds since it connected.
    pub uptime_seconds: Option<u64>,
}

/// Where to read from.
#[derive(Debug, Clone)]
pub struct StatusSource {
    /// The broker URL (credentials, host and vhost): the first of `broker`'s addresses.
    pub amqp_url: String,
    /// The broker settings (all addresses, TLS), for the AMQP fallback.
    pub broker: BrokerSettings,
    /// The management API, e.g. `http://user:pass@host:15672`; default: the AMQP host on
    /// port 15672 with the AMQP credentials.
    pub management_url: Option<String>,
}

/// Why the management API gave no answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unreachable(pub(crate) String);

/// RabbitMQ's management HTTP API, for one virtual host.
#[derive(Debug)]
pub(crate) struct Management {
    agent: ureq::Agent,
    /// `http://host:port`, without credentials.
    base: String,
    /// The `Authorization` header of the credentials.
    authorization: Option<String>,
    /// The virtual host, percent-encoded for a path.
    vhost: String,
}

impl Management {
    /// The management API `source` names, and where it is without its password.
    pub(crate) fn of(source: &StatusSource) -> Result<(Self, String), String> {
        let uri: AMQPUri = source
            .amqp_url
            .parse()
            .map_err(|e: String| format!("invalid AMQP URL: {e}"))?;
        let base = management_base(source, &uri);
        let shown = redact(&base);
        let (base, authorization) = basic_authorization(&base);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            .build()
            .into();
        let vhost = Self::encode(&uri.vhost);
        Ok((
            Self {
                agent,
                base,
                authorization,
                vhost,
            },
            shown,
        ))
    }

    /// `text` percent-encoded for a path segment.
    pub(crate) fn encode(text: &str) -> String {
        utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
    }

    /// The virtual host, encoded for a path.
    pub(crate) fn vhost(&self) -> &str {
        &self.vhost
    }

    /// `GET /api/<path>` as JSON.
    pub(crate) fn get(&self, path: &str) -> Result<Value, Unreachable> {
        get_json(
            &self.agent,
            &format!("{}/api/{path}", self.base),
            self.authorization.as_deref(),
        )
    }
}

/// Reads the status of `queue`, or with `None` of the deployment (every queue that serves a
/// function claimed on `functions_exchange`, and `warren.tasks`): from the management API,
/// else (with a note) from AMQP.
///
/// # Errors
/// When neither the management API nor the broker answer.
pub async fn read(
    source: &StatusSource,
    queue: Option<&str>,
    functions_exchange: &str,
) -> Result<Status, String> {
    let (api, shown) = Management::of(source)?;
    let q = queue.map(str::to_owned);
    let functions = functions_exchange.to_owned();
    let from_api = tokio::task::spawn_blocking(move || match &q {
        Some(q) => from_management(&api, q),
        None => deployment_from_management(&api, &functions),
    })
    .await
    .map_err(|e| e.to_string())?;
    match from_api {
        Ok(status) => Ok(status),
        Err(Unreachable(reason)) => {
            let mut status = from_amqp(&source.broker, queue).await?;
            let missing = if queue.is_some() {
                "no unacked counts, rates, retry tiers or workers"
            } else {
                "only warren.tasks: the queues that serve functions are listed by the API"
            };
            status.note = Some(format!(
                "management API not reachable at {shown} ({reason}); showing what AMQP tells: \
                 depth and consumers only ({missing}). Enable the rabbitmq_management plugin \
                 or pass --management-url."
            ));
            Ok(status)
        }
    }
}

fn management_base(source: &StatusSource, uri: &AMQPUri) -> String {
    let encode = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let credentials = format!(
        "{}:{}@",
        encode(&uri.authority.userinfo.username),
        encode(&uri.authority.userinfo.password)
    );
    match &source.management_url {
        Some(url) => {
            let url = url.trim_end_matches('/');
            match url.split_once("://") {
                Some((scheme, rest)) if !rest.contains('@') => {
                    format!("{scheme}://{credentials}{rest}")
                }
                _ => url.to_owned(),
            }
        }
        None => format!(
            "http://{credentials}{}:{DEFAULT_MANAGEMENT_PORT}",
            uri.authority.host
        ),
    }
}

/// `base` without its password.
fn redact(base: &str) -> String {
    match (base.split_once("://"), base.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
            format!("{scheme}://{host}")
        }
        _ => base.to_owned(),
    }
}

/// `base` (`scheme://user:pass@host:port`, its user info percent-encoded) split into the URL
/// without credentials and their `Authorization: Basic` header, decoded. ureq would send the
/// user info as written, so a user `warren-ops` (encoded `warren%2Dops`) would be refused.
fn basic_authorization(base: &str) -> (String, Option<String>) {
    use base64::Engine as _;
    let Some((scheme, rest)) = base.split_once("://") else {
        return (base.to_owned(), None);
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return (base.to_owned(), None);
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let credentials = format!("{}:{}", decode(user), decode(password));
    (
        format!("{scheme}://{host}"),
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )),
    )
}

fn get_json(
    agent: &ureq::Agent,
    url: &str,
    authorization: Option<&str>,
) -> Result<Value, Unreachable> {
    let mut request = agent.get(url);
    if let Some(authorization) = authorization {
        request = request.header("Authorization", authorization);
    }
    let mut response = request.call().map_err(|e| Unreachable(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(Unreachable(format!("HTTP {status}")));
    }
    response
        .body_mut()
        .read_json()
        .map_err(|e| Unreachable(format!("unexpected answer: {e}")))
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn from_management(api: &Management, queue: &str) -> Result<Status, Unreachable> {
    let queues = api.get(&format!("queues/{}", api.vhost()))?;
    let consumers = api.get(&format!("consumers/{}", api.vhost()))?;
    let connections = api.get("connections")?;
    let now = now();
    let workers = worker_rows(&consumers, &connections, |q| q == queue, now);
    let mut queues = queue_rows(&queues, queue, now);
    // The queue's own consumer count is refreshed every few seconds; the consumer list may be
    // newer (a worker that just started).
    if let Some(work) = queues.iter_mut().find(|q| q.role == "work") {
        work.consumers = work.consumers.max(workers.len() as u64);
    }
    Ok(Status {
        queue: Some(queue.to_owned()),
        source: "management",
        note: None,
        queues,
        workers,
    })
}

/// Every queue that owns a function on `functions_exchange`, and `warren.tasks`: one row each.
fn deployment_from_management(
    api: &Management,
    functions_exchange: &str,
) -> Result<Status, Unreachable> {
    let claims = crate::functions::list(api, functions_exchange)?;
    let queues = api.get(&format!("queues/{}", api.vhost()))?;
    let consumers = api.get(&format!("consumers/{}", api.vhost()))?;
    let connections = api.get("connections")?;
    let now = now();
    let mut names: Vec<&str> = claims.iter().map(|c| c.queue.as_str()).collect();
    names.push(topology::DEFAULT_QUEUE);
    names.sort_unstable();
    names.dedup();
    let workers = worker_rows(&consumers, &connections, |q| names.contains(&q), now);
    let rows = queues
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| {
            let name = q.get("name")?.as_str()?;
            if !names.contains(&name) {
                return None;
            }
            let mut row = queue_row(q, name, "work", now);
            row.functions = Some(
                claims
                    .iter()
                    .filter(|c| c.queue == name)
                    .map(|c| c.function.clone())
                    .collect(),
            );
            let seen = workers.iter().filter(|w| w.queue == name).count() as u64;
            row.consumers = row.consumers.max(seen);
            Some(row)
        })
        .collect::<Vec<_>>();
    let mut rows = rows;
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Status {
        queue: None,
        source: "management",
        note: None,
        queues: rows,
        workers,
    })
}

fn role_of(name: &str, queue: &str) -> Option<&'static str> {
    if name == queue {
        Some("work")
    } else if name == format!("{queue}.dead") {
        Some("dead")
    } else if topology::is_retry_queue_of(name, queue) {
        Some("retry")
    } else {
        None
    }
}

fn rate(stats: &Value, key: &str) -> Option<f64> {
    stats.get(key)?.get("rate")?.as_f64()
}

/// The row of queue `q` (an element of the management API's queue list).
fn queue_row(q: &Value, name: &str, role: &'static str, now: Duration) -> QueueRow {
    let stats = q.get("message_stats").cloned().unwrap_or(Value::Null);
    QueueRow {
        name: name.to_owned(),
        role,
        ready: q.get("messages_ready").and_then(Value::as_u64).unwrap_or(0),
        unacked: Some(
            q.get("messages_unacknowledged")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        ),
        consumers: q.get("consumers").and_then(Value::as_u64).unwrap_or(0),
        publish_rate: Some(rate(&stats, "publish_details").unwrap_or(0.0)),
        deliver_rate: Some(rate(&stats, "deliver_get_details").unwrap_or(0.0)),
        ack_rate: Some(rate(&stats, "ack_details").unwrap_or(0.0)),
        oldest_ready_seconds: q
            .get("head_message_timestamp")
            .and_then(Value::as_u64)
            .map(|sent| now.as_secs().saturating_sub(sent)),
        functions: None,
    }
}

fn queue_rows(queues: &Value, queue: &str, now: Duration) -> Vec<QueueRow> {
    let mut rows: Vec<QueueRow> = queues
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| {
            let name = q.get("name")?.as_str()?;
            let role = role_of(name, queue)?;
            Some(queue_row(q, name, role, now))
        })
        .collect();
    let order = |r: &QueueRow| match r.role {
        "work" => 0,
        "retry" => 1,
        _ => 2,
    };
    rows.sort_by(|a, b| order(a).cmp(&order(b)).then_with(|| a.name.cmp(&b.name)));
    rows
}

/// The processes consuming the queues that `watched` accepts.
fn worker_rows(
    consumers: &Value,
    connections: &Value,
    watched: impl Fn(&str) -> bool,
    now: Duration,
) -> Vec<WorkerRow> {
    // Consumers name their connection by its internal name (`peer -> broker`); the connection
    // carries the name Warren gave it and its client properties.
    let connection_of = |internal: &str| {
        connections
            .as_array()?
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(internal))
    };
    let mut rows: Vec<WorkerRow> = consumers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let queue = c.pointer("/queue/name")?.as_str()?;
            if !watched(queue) {
                return None;
            }
            let internal = c.pointer("/channel_details/connection_name")?.as_str()?;
            let connection = connection_of(internal);
            let property = |key: &str| {
                connection?
                    .pointer(&format!("/client_properties/{key}"))?
                    .as_str()
                    .map(str::to_owned)
            };
            let name = connection
                .and_then(|c| c.get("user_provided_name"))
                .and_then(Value::as_str)
                .unwrap_or(internal)
                .to_owned();
            // Older workers without client properties: `role@host:pid/consume`.
            let place = name
                .split('/')
                .next()
                .and_then(|p| p.split_once('@'))
                .and_then(|(_, place)| place.rsplit_once(':'));
            let host = property("host").or_else(|| place.map(|(h, _)| h.to_owned()));
            let pid = property("pid")
                .or_else(|| place.map(|(_, p)| p.to_owned()))
                .and_then(|p| p.parse().ok());
            let uptime_seconds = connection
                .and_then(|c| c.get("connected_at"))
                .and_then(Value::as_u64)
                .map(|ms| now.as_secs().saturating_sub(ms / 1000));
            Some(WorkerRow {
                host,
                pid,
                queue: queue.to_owned(),
                concurrency: c.get("prefetch_count").and_then(Value::as_u64),
                uptime_seconds,
                connection: name,
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.queue, &a.connection).cmp(&(&b.queue, &b.connection)));
    rows
}

async fn from_amqp(broker: &BrokerSettings, asked: Option<&str>) -> Result<Status, String> {
    let queue = asked.unwrap_or(topology::DEFAULT_QUEUE);
    let client = Client::connect(ClientSettings {
        broker: broker.clone(),
        queue: Some(queue.to_owned()),
        name: warren_shared::broker::process_name("warren-status"),
        ..ClientSettings::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut queues = Vec::new();
    let mut names = vec![(queue.to_owned(), "work")];
    if asked.is_some() {
        names.push((format!("{queue}.dead"), "dead"));
    }
    for (name, role) in names {
        if let Ok(stats) = client.queue_stats(&name).await {
            queues.push(QueueRow {
                name,
                role,
                ready: u64::from(stats.ready),
                unacked: None,
                consumers: u64::from(stats.consumers),
                publish_rate: None,
                deliver_rate: None,
                ack_rate: None,
                oldest_ready_seconds: None,
                functions: None,
            });
        }
    }
    client.close().await;
    Ok(Status {
        queue: asked.map(str::to_owned),
        source: "amqp",
        note: None,
        queues,
        workers: Vec::new(),
    })
}

fn or_dash<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn rate_text(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

fn age(seconds: Option<u64>) -> String {
    seconds.map_or_else(
        || "-".to_owned(),
        |s| humantime::format_duration(Duration::from_secs(s)).to_string(),
    )
}

/// The status as text, for people.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let source = match status.source {
        "management" => "the management API",
        _ => "AMQP only",
    };
    match &status.queue {
        Some(queue) => {
            let _ = writeln!(out, "Warren queue {queue} (figures from {source})");
        }
        // Which queues serve functions only the management API tells.
        None if status.source == "amqp" => {
            let _ = writeln!(
                out,
                "Warren deployment: {} only (figures from {source}; --queue shows one queue \
                 and its dead letters)",
                topology::DEFAULT_QUEUE
            );
        }
        None => {
            let _ = writeln!(
                out,
                "Warren deployment: every queue that serves a function, and {} (figures from \
                 {source}; --queue shows one queue with its retry tiers and dead letters)",
                topology::DEFAULT_QUEUE
            );
        }
    }
    if let Some(note) = &status.note {
        let _ = writeln!(out, "note: {note}");
    }
    let _ = writeln!(out);
    let deployment = status.queue.is_none();
    let _ = writeln!(
        out,
        "{:<40} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}  {}",
        "QUEUE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "PUBLISH/s",
        "DELIVER/s",
        "ACK/s",
        if deployment { "FUNCTIONS" } else { "OLDEST" }
    );
    if status.queues.is_empty() {
        let _ = match (&status.queue, status.source) {
            (Some(queue), _) => writeln!(out, "(no such queue: nothing has declared {queue} yet)"),
            (None, "amqp") => writeln!(
                out,
                "(no such queue: nothing has declared {} yet)",
                topology::DEFAULT_QUEUE
            ),
            (None, _) => writeln!(
                out,
                "(no queue: no queue that serves a function exists, and nothing has declared \
                 {} yet)",
                topology::DEFAULT_QUEUE
            ),
        };
    }
    for q in &status.queues {
        let last = if deployment {
            match q.functions.as_deref() {
                Some(functions) if !functions.is_empty() => functions.join(","),
                _ => "-".to_owned(),
            }
        } else {
            age(q.oldest_ready_seconds)
        };
        let _ = writeln!(
            out,
            "{:<40} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}  {}",
            q.name,
            q.ready,
            or_dash(q.unacked),
            q.consumers,
            rate_text(q.publish_rate),
            rate_text(q.deliver_rate),
            rate_text(q.ack_rate),
            last,
        );
    }
    let _ = writeln!(out);
    if status.source == "management" {
        let _ = writeln!(out, "WORKERS ({})", status.workers.len());
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>11} {:>10}  CONNECTION",
            "HOST", "PID", "CONCURRENCY", "UPTIME"
        );
        for w in &status.workers {
            // In the deployment view each worker says which queue it consumes.
            let queue = if deployment {
                format!(" (queue {})", w.queue)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{:<24} {:>8} {:>11} {:>10}  {}{queue}",
                or_dash(w.host.as_deref()),
                or_dash(w.pid),
                or_dash(w.concurrency),
                age(w.uptime_seconds),
                w.connection,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_rows_have_functions_even_when_none() {
        let row = |functions| QueueRow {
            name: "warren.tasks".into(),
            role: "work",
            ready: 0,
            unacked: None,
            consumers: 0,
            publish_rate: None,
            deliver_rate: None,
            ack_rate: None,
            oldest_ready_seconds: None,
            functions,
        };
        let json = |r: QueueRow| serde_json::to_value(r).unwrap_or_default();
        assert_eq!(
            json(row(Some(Vec::new())))["functions"],
            serde_json::json!([])
        );
        assert!(json(row(None)).get("functions").is_none());
    }

    #[test]
    fn queues_of_a_work_queue_are_recognised() {
        assert_eq!(role_of("q", "q"), Some("work"));
        assert_eq!(role_of("q.dead", "q"), Some("dead"));
        assert_eq!(role_of("q.retry.10s", "q"), Some("retry"));
        let delay = topology::retry_queue_name("q", Duration::from_millis(500));
        assert_eq!(role_of(&delay, "q"), Some("retry"));
        assert_eq!(role_of("qq", "q"), None);
        assert_eq!(role_of("q.other", "q"), None);
    }

    #[test]
    fn management_url_gets_the_amqp_credentials_unless_it_has_its_own() {
        let uri: AMQPUri = "amqp://u:p%40ss@broker:5672/%2f"
            .parse()
            .unwrap_or_default();
        let source = |m: Option<&str>| StatusSource {
            amqp_url: String::new(),
            broker: BrokerSettings::new(String::new()),
            management_url: m.map(str::to_owned),
        };
        assert_eq!(
            management_base(&source(None), &uri),
            "http://u:p%40ss@broker:15672"
        );
        assert_eq!(
            management_base(&source(Some("https://mgmt:443/")), &uri),
            "https://u:p%40ss@mgmt:443"
        );
        assert_eq!(
            management_base(&source(Some("http://a:b@mgmt:1")), &uri),
            "http://a:b@mgmt:1"
        );
        assert_eq!(redact("http://a:b@mgmt:1"), "http://mgmt:1");
    }

    #[test]
    fn management_credentials_are_sent_decoded_in_a_header() {
        use base64::Engine as _;
        let (url, authorization) = basic_authorization("http://warren%2Dops:p%40ss@mgmt:15672");
        assert_eq!(url, "http://mgmt:15672");
        let expected = base64::engine::general_purpose::STANDARD.encode("warren-ops:p@ss");
        assert_eq!(authorization, Some(format!("Basic {expected}")));
        assert_eq!(
            basic_authorization("http://mgmt:1"),
            ("http://mgmt:1".to_owned(), None)
        );
    }
}
