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
    /// The queue that owns it.
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
    if functions_exchange.is_empty() {
        return Ok(Vec::new()); // workers with no functions exchange claim nothing
    }
    let exchanges = api.get(&format!("exchanges/{}?columns=name,arguments", api.vhost()))?;
    let names = |e: &Value| e.get("name").and_then(Value::as_str).map(str::to_owned);
    let all: Vec<String> = exchanges
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(names)
        .collect();
    let prefix = format!("{functions_exchange}.");
    if !all.iter().any(|name| name.starts_with(&prefix)) {
        return Ok(Vec::new());
    }
    let bindings = if all.iter().any(|name| name == functions_exchange) {
        api.get(&format!(
            "exchanges/{}/{}/bindings/source",
            api.vhost(),
            Management::encode(functions_exchange)
        ))?
    } else {
        Value::Null
    };
    let queues = api.get(&format!(
        "queues/{}?columns=name,messages_ready,messages_unacknowledged,consumers",
        api.vhost()
    ))?;
    let consumers = api.get(&format!("consumers/{}", api.vhost()))?;
    Ok(claims(
        functions_exchange,
        &exchanges,
        &bindings,
        &queues,
        &consumers,
    ))
}

/// The queue that owns `function` on `functions_exchange` as the management API lists it, in
/// full (the broker's AMQP refusal, which `release` reads otherwise, cuts long names); `None`
/// when the function's exchange names none.
///
/// # Errors
/// [`Unreachable`] when the management API does not answer, or has no such exchange.
pub(crate) fn owner(
    api: &Management,
    functions_exchange: &str,
    function: &str,
) -> Result<Option<String>, Unreachable> {
    let exchange = warren_shared::topology::function_exchange(functions_exchange, function);
    let found = api.get(&format!(
        "exchanges/{}/{}",
        api.vhost(),
        Management::encode(&exchange)
    ))?;
    Ok(alternate_exchange(&found).map(str::to_owned))
}

/// The `alternate-exchange` argument of an exchange in the management API's JSON.
fn alternate_exchange(exchange: &Value) -> Option<&str> {
    exchange
        .pointer("/arguments/alternate-exchange")
        .and_then(Value::as_str)
        .filter(|owner| !owner.is_empty())
}

/// The claims on `functions_exchange`, from the management API's lists of exchanges, of the
/// functions exchange's bindings, of queues and of consumers.
fn claims(
    functions_exchange: &str,
    exchanges: &Value,
    bindings: &Value,
    queues: &Value,
    consumers: &Value,
) -> Vec<FunctionRow> {
    let prefix = format!("{functions_exchange}.");
    let routed: HashSet<&str> = bindings
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b.get("destination_type").and_then(Value::as_str) == Some("exchange"))
        .filter_map(|b| {
            let function = b.get("routing_key")?.as_str()?;
            let destination = b.get("destination")?.as_str()?;
            (destination.strip_prefix(&prefix) == Some(function)).then_some(function)
        })
        .collect();
    // The consumer list is current; a queue's own consumer count lags by a few seconds.
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
    };
    let mut rows: Vec<FunctionRow> = exchanges
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let function = e.get("name")?.as_str()?.strip_prefix(&prefix)?;
            // An exchange under the prefix that names no queue is no claim.
            let owner = alternate_exchange(e)?;
            let q = queue(owner);
            let figure = |key: &str| q.map(|q| q.get(key).and_then(Value::as_u64).unwrap_or(0));
            Some(FunctionRow {
                function: function.to_owned(),
                queue: owner.to_owned(),
                routed: routed.contains(function),
                consumers: q.map(|_| consuming(owner)),
                ready: figure("messages_ready"),
                unacked: figure("messages_unacknowledged"),
            })
        })
        .collect();
    rows.sort_by(|a, b| a.function.cmp(&b.function));
    rows
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn claims_name_their_queue_figures_and_whether_they_are_routed() {
        let exchanges = json!([
            {"name": "warren.functions", "arguments": {}},
            {"name": "warren.functions.echo", "arguments": {"alternate-exchange": "test"}},
            {"name": "warren.functions.half", "arguments": {"alternate-exchange": "test"}},
            {"name": "warren.functions.gone", "arguments": {"alternate-exchange": "deleted"}},
            {"name": "warren.functionsx.no", "arguments": {"alternate-exchange": "test"}},
            {"name": "other.functions.echo", "arguments": {"alternate-exchange": "test"}},
            {"name": "warren.functions.mine", "arguments": {}},
            {"name": "warren.functions.blank", "arguments": {"alternate-exchange": ""}},
        ]);
        let bindings = json!([
            {"destination": "warren.functions.echo", "destination_type": "exchange", "routing_key": "echo"},
            {"destination": "warren.functions.gone", "destination_type": "exchange", "routing_key": "gone"},
            {"destination": "warren.functions.half", "destination_type": "queue", "routing_key": "half"},
        ]);
        let queues = json!([
            {"name": "test", "messages_ready": 3, "messages_unacknowledged": 1, "consumers": 0},
        ]);
        let consumers = json!([{"queue": {"name": "test"}}, {"queue": {"name": "elsewhere"}}]);
        let rows = claims(
            "warren.functions",
            &exchanges,
            &bindings,
            &queues,
            &consumers,
        );
        let row = |f: &str, q: &str, routed, figures: Option<(u64, u64, u64)>| FunctionRow {
            function: f.into(),
            queue: q.into(),
            routed,
            consumers: figures.map(|f| f.0),
            ready: figures.map(|f| f.1),
            unacked: figures.map(|f| f.2),
        };
        assert_eq!(
            rows,
            [
                row("echo", "test", true, Some((1, 3, 1))),
                row("gone", "deleted", true, None),
                row("half", "test", false, Some((1, 3, 1))),
            ]
        );
        let text = render("warren.functions", &rows);
        assert!(
            text.lines()
                .any(|l| l.starts_with("gone ") && l.contains(" - "))
        );
        assert!(render("f", &[]).contains("no function is claimed"));
        assert_eq!(
            alternate_exchange(&json!({"arguments": {"alternate-exchange": "q"}})),
            Some("q")
        );
        assert_eq!(alternate_exchange(&json!({"arguments": {}})), None);
    }
}
