//! `warren functions`: which queue serves each function, with its consumers and depth, from
//! RabbitMQ's management API (AMQP cannot list exchanges).
//!
//! A function is claimed by the exchange `<functions exchange>.<function>`, whose
//! `alternate-exchange` argument names the queue that owns it, bound from the functions
//! exchange with the function's name (docs/protocol.md §1a). A claim whose binding is missing
//! (a worker killed between claiming and binding) is listed as not routed. Releasing a claim is
//! `warren_client::Client::release_function`, over AMQP.

use std::collections::HashSet;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::status::{Management, Unreachable};

/// One claimed function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionRow {
    /// The function's name.
    pub function: String,
    /// The queue that owns it (`?` when its exchange names none).
    pub queue: String,
    /// Whether the functions exchange routes the function to its exchange (a claim without
    /// this binding routes nothing: callers get `unknown_function`).
    pub routed: bool,
    /// Consumers of the queue; `None` when the queue does not exist.
    pub consumers: Option<u64>,
    /// Tasks ready in the queue.
    pub ready: Option<u64>,
    /// Tasks delivered and not yet acknowledged.
    pub unacked: Option<u64>,
}

/// Every function claimed on `functions_exchange`, by name.
///
/// # Errors
/// [`Unreachable`] when the management API does not answer.
pub(crate) fn list(
    api: &Management,
    functions_exchange: &str,
) -> Result<Vec<FunctionRow>, Unreachable> {
    let exchanges = api.get(&format!("exchanges/{}?columns=name,arguments", api.vhost()))?;
    let prefix = format!("{functions_exchange}.");
    let claims: Vec<(String, String)> = exchanges
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.get("name")?.as_str()?;
            let function = name.strip_prefix(&prefix)?;
            let owner = e
                .pointer("/arguments/alternate-exchange")
                .and_then(Value::as_str)
                .unwrap_or("?");
            Some((function.to_owned(), owner.to_owned()))
        })
        .collect();
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let exists = exchanges
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e.get("name").and_then(Value::as_str) == Some(functions_exchange));
    let routed: HashSet<String> = if exists {
        let bindings = api.get(&format!(
            "exchanges/{}/{}/bindings/source",
            api.vhost(),
            Management::encode(functions_exchange)
        ))?;
        bindings
            .as_array()
            .into_iter()
            .flatten()
            .filter(|b| {
                b.get("destination_type").and_then(Value::as_str) == Some("exchange")
                    && b.get("destination")
                        .and_then(Value::as_str)
                        .and_then(|d| d.strip_prefix(&prefix))
                        == b.get("routing_key").and_then(Value::as_str)
            })
            .filter_map(|b| Some(b.get("routing_key")?.as_str()?.to_owned()))
            .collect()
    } else {
        HashSet::new()
    };
    let queues = api.get(&format!(
        "queues/{}?columns=name,messages_ready,messages_unacknowledged,consumers",
        api.vhost()
    ))?;
    // The consumer list is current; a queue's own consumer count lags by a few seconds.
    let consumers = api.get(&format!("consumers/{}", api.vhost()))?;
    let consuming = |name: &str| {
        consumers
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c.pointer("/queue/name").and_then(Value::as_str) == Some(name))
            .count() as u64
    };
    let queue = |name: &str| {
        queues
            .as_array()?
            .iter()
            .find(|q| q.get("name").and_then(Value::as_str) == Some(name))
            .cloned()
    };
    let mut rows: Vec<FunctionRow> = claims
        .into_iter()
        .map(|(function, owner)| {
            let q = queue(&owner);
            let figure = |key: &str| {
                q.as_ref()
                    .map(|q| q.get(key).and_then(Value::as_u64).unwrap_or(0))
            };
            FunctionRow {
                routed: routed.contains(&function),
                consumers: q.as_ref().map(|_| consuming(&owner)),
                ready: figure("messages_ready"),
                unacked: figure("messages_unacknowledged"),
                function,
                queue: owner,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.function.cmp(&b.function));
    Ok(rows)
}

fn or_dash(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The claims as text, for people.
pub fn render(functions_exchange: &str, rows: &[FunctionRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "no function is claimed on exchange {functions_exchange:?}: no worker has served one"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<40} {:>9} {:>8} {:>8}  ROUTED",
        "FUNCTION", "QUEUE", "CONSUMERS", "READY", "UNACKED"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:<40} {:>9} {:>8} {:>8}  {}",
            r.function,
            r.queue,
            or_dash(r.consumers),
            or_dash(r.ready),
            or_dash(r.unacked),
            if r.routed { "yes" } else { "no" },
        );
    }
    out
}
