//! Run at a time from the gateway: the `run_at` and `delay_ms` fields of a request object, on
//! the websocket and on the Text bridge alike.
//!
//! `"run_at": "2026-12-08T09:00:00Z"` (RFC 3339, UTC) or `"delay_ms": 90000`, not both. The
//! task waits in the broker's delay levels and runs no earlier than that; see
//! `warren_shared::delay`.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::limits::{GatewayError, Kind};

/// The timing fields of a request object; every other field is ignored here.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Due {
    /// When the task is due, RFC 3339 in UTC.
    #[serde(default)]
    run_at: Option<String>,
    /// How long from now the task is due, in milliseconds.
    #[serde(default)]
    delay_ms: Option<u64>,
}

impl Due {
    /// The fields of a Text bridge line, read only when it names one of them (the line was
    /// already parsed as a request).
    pub(crate) fn of_line(line: &[u8]) -> Result<Self, GatewayError> {
        let names = |name: &[u8]| line.windows(name.len()).any(|w| w == name);
        if !names(b"\"run_at\"") && !names(b"\"delay_ms\"") {
            return Ok(Self::default());
        }
        serde_json::from_slice(line)
            .map_err(|e| bad(format!("bad \"run_at\" or \"delay_ms\": {e}")))
    }

    /// The fields of a websocket message, each as the JSON text it was sent as (`null` is as
    /// good as absent).
    pub(crate) fn of_fields(
        run_at: Option<&serde_json::value::RawValue>,
        delay_ms: Option<&serde_json::value::RawValue>,
    ) -> Result<Self, GatewayError> {
        Ok(Self {
            run_at: read(run_at)?,
            delay_ms: read(delay_ms)?,
        })
    }

    /// When the task is due, if it is due later.
    pub(crate) fn run_at(&self) -> Result<Option<SystemTime>, GatewayError> {
        match (&self.run_at, self.delay_ms) {
            (Some(_), Some(_)) => Err(bad("give \"run_at\" or \"delay_ms\", not both")),
            (Some(text), None) => humantime::parse_rfc3339_weak(text).map(Some).map_err(|e| {
                bad(format!(
                    "\"run_at\" must be an RFC 3339 time in UTC such as \"2026-12-08T09:00:00Z\": {e}"
                ))
            }),
            (None, Some(ms)) => Ok(Some(SystemTime::now() + Duration::from_millis(ms))),
            (None, None) => Ok(None),
        }
    }
}

/// One timing field read from its JSON text; absent and `null` are `None`.
fn read<T: serde::de::DeserializeOwned>(
    raw: Option<&serde_json::value::RawValue>,
) -> Result<Option<T>, GatewayError> {
    raw.map_or(Ok(None), |raw| serde_json::from_str(raw.get()))
        .map_err(|e| bad(format!("bad \"run_at\" or \"delay_ms\": {e}")))
}

fn bad(message: impl Into<String>) -> GatewayError {
    GatewayError::new(Kind::BadRequest, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(line: &str) -> Result<Option<SystemTime>, GatewayError> {
        Due::of_line(line.as_bytes())?.run_at()
    }

    #[test]
    fn a_time_or_a_delay_or_neither() {
        assert_eq!(due(r#"{"function":"f"}"#).map_err(|e| e.message), Ok(None));
        let at = due(r#"{"function":"f","run_at":"2026-12-08T09:00:00Z"}"#).map_err(|e| e.message);
        assert_eq!(
            at.map(|t| t.map(|t| humantime::format_rfc3339_seconds(t).to_string())),
            Ok(Some("2026-12-08T09:00:00Z".to_owned()))
        );
        let later = due(r#"{"function":"f","delay_ms":90000}"#).map_err(|e| e.message);
        let ahead = later
            .ok()
            .flatten()
            .and_then(|t| t.duration_since(SystemTime::now()).ok());
        assert!(ahead.is_some_and(|a| a > Duration::from_secs(89) && a <= Duration::from_secs(90)));
    }

    #[test]
    fn bad_timing_is_a_bad_request() {
        for line in [
            r#"{"function":"f","run_at":"tomorrow"}"#,
            r#"{"function":"f","run_at":5}"#,
            r#"{"function":"f","delay_ms":-1}"#,
            r#"{"function":"f","delay_ms":"90s"}"#,
            r#"{"function":"f","delay_ms":1,"run_at":"2026-12-08T09:00:00Z"}"#,
        ] {
            let got = due(line);
            assert!(
                matches!(&got, Err(e) if e.kind == Kind::BadRequest),
                "{line}: {got:?}"
            );
        }
    }
}
