//! What became of a task, for the gateway's callers, whoever enqueued it and whether or not its
//! caller is still connected: `GET /api/tasks/<id>` and the websocket's
//! `{"result": "<task id>"}`, both answered from the task event stream
//! ([`Client::result`](warren_client::Client::result)). `docs/gateway.md` has the shapes.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::value::RawValue;
use warren_client::{Error, LookupError, Outcome, TaskOutcome};
use warren_shared::TaskId;

use crate::admission::Admitted;
use crate::limits::{GatewayError, Kind};
use crate::{Shared, error_response, refuse_without_bearer};

/// `GET /api/tasks/<id>`: 200 with the outcome (settled or pending), 404 `not_found` naming
/// the stream's retention, 400 for an id that cannot be one, 503 when the stream cannot be
/// read; the bearer token is required when one is configured, as on `/api/*`.
pub(crate) async fn http(
    State(shared): State<Arc<Shared>>,
    Extension(admitted): Extension<Arc<Admitted>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refused) = refuse_without_bearer(shared.limits(), &headers, &admitted) {
        return refused;
    }
    match look_up(&shared, &id).await {
        Ok(TaskOutcome {
            outcome: Outcome::NotFound { message, .. },
            ..
        }) => error_response(
            StatusCode::NOT_FOUND,
            &GatewayError::new(Kind::NotFound, message),
        ),
        Ok(found) => axum::Json(found).into_response(),
        Err(error) if error.kind == Kind::BadRequest => {
            error_response(StatusCode::BAD_REQUEST, &error)
        }
        Err(error) => error_response(StatusCode::SERVICE_UNAVAILABLE, &error),
    }
}

/// The answer to a websocket's `{"result": <task>}`: `{"result": {...outcome...}}`, or
/// `{"result": {"task_id": ..., "error": {...}}}` when it cannot be looked up.
pub(crate) async fn ws_answer(shared: &Shared, task: &RawValue) -> String {
    let Ok(id) = serde_json::from_str::<String>(task.get()) else {
        return ws_error(
            task,
            &GatewayError::new(Kind::BadRequest, "\"result\" takes a task id (a string)"),
        );
    };
    match look_up(shared, &id).await {
        Ok(found) => {
            #[derive(Serialize)]
            struct Answer<'a> {
                result: &'a TaskOutcome,
            }
            // An outcome is JSON text, strings and numbers: it always serializes.
            serde_json::to_string(&Answer { result: &found }).unwrap_or_default()
        }
        Err(error) => ws_error(task, &error),
    }
}

/// `{"result": {"task_id": <as sent>, "error": {...}}}`.
pub(crate) fn ws_error(task: &RawValue, error: &GatewayError) -> String {
    #[derive(Serialize)]
    struct Failed<'a> {
        task_id: &'a RawValue,
        error: &'a GatewayError,
    }
    #[derive(Serialize)]
    struct Answer<'a> {
        result: Failed<'a>,
    }
    // JSON text and a typed error always serialize.
    serde_json::to_string(&Answer {
        result: Failed {
            task_id: task,
            error,
        },
    })
    .unwrap_or_default()
}

/// Looks `id` up with the gateway's client: `bad_request` for an id that cannot be one,
/// `unavailable` when the stream cannot be read.
async fn look_up(shared: &Shared, id: &str) -> Result<TaskOutcome, GatewayError> {
    shared
        .client
        .result(&TaskId::from(id))
        .await
        .map_err(|e| match e {
            Error::Lookup(LookupError::BadId(bad)) => {
                GatewayError::new(Kind::BadRequest, format!("bad task id: {bad}"))
            }
            other => GatewayError::new(Kind::Unavailable, other.to_string()),
        })
}
