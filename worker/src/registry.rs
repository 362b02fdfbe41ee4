//! The registry: function name to a type-erased decode-run-encode function.
//!
//! Registration is explicit (`Registry::new().register::<SendMail>()`); nothing is discovered by
//! name or macro. Each entry decodes the arguments into the task type (a mismatch is
//! `invalid_args`), runs its [`Handler`], and encodes the output back to JSON.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use warren_shared::Policy;
use warren_shared::pool::BoxFuture;

use crate::handler::{Handler, StateMap, TaskContext, TaskError};

/// A handler's outcome before it becomes a reply: the result, or the failure with its retry
/// advice.
pub(crate) type HandlerResult = Result<Value, HandlerFailure>;

/// Why a registered function did not produce a result.
#[derive(Debug, Clone)]
pub(crate) enum HandlerFailure {
    /// The arguments did not decode into the task type.
    InvalidArgs(String),
    /// The handler returned an error.
    Task(TaskError),
}

pub(crate) type ErasedHandler =
    Arc<dyn Fn(Value, TaskContext) -> BoxFuture<HandlerResult> + Send + Sync>;

/// A handler on raw JSON: arguments in, a result or a typed error out.
pub(crate) type DynamicHandler =
    Arc<dyn Fn(Value, TaskContext) -> BoxFuture<Result<Value, TaskError>> + Send + Sync>;

/// A registered function: how to run it, and its policy when it has one of its own.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) run: ErasedHandler,
    pub(crate) policy: Option<Policy>,
}

/// The functions a worker serves, and the state their handlers share.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Entry>,
    state: StateMap,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("functions", &self.functions())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves task type `H` under `H::NAME` with the worker's default [`Policy`]. Registering a
    /// name twice keeps the last handler.
    #[must_use]
    pub fn register<H: Handler>(self) -> Self {
        self.insert::<H>(None)
    }

    /// Serves task type `H` with a [`Policy`] of its own (attempts, backoff, time limit).
    /// A caller can still override it per task.
    #[must_use]
    pub fn register_with<H: Handler>(self, policy: Policy) -> Self {
        self.insert::<H>(Some(policy))
    }

    fn insert<H: Handler>(mut self, policy: Option<Policy>) -> Self {
        let run: ErasedHandler = Arc::new(|args: Value, ctx: TaskContext| {
            Box::pin(async move {
                // Missing arguments (null) also fit a task whose fields all have defaults.
                let task: H = match args {
                    Value::Null => serde_json::from_value(Value::Null)
                        .or_else(|_| serde_json::from_value(Value::Object(Default::default()))),
                    args => serde_json::from_value(args),
                }
                .map_err(|e| {
                    HandlerFailure::InvalidArgs(format!("arguments of {:?}: {e}", H::NAME))
                })?;
                let output = task.run(ctx).await.map_err(HandlerFailure::Task)?;
                serde_json::to_value(output).map_err(|e| {
                    HandlerFailure::Task(TaskError::permanent(format!(
                        "result of {:?} does not serialize: {e}",
                        H::NAME
                    )))
                })
            })
        });
        if self
            .handlers
            .insert(H::NAME, Entry { run, policy })
            .is_some()
        {
            tracing::warn!(
                function = H::NAME,
                "function registered twice; the last one wins"
            );
        }
        self
    }

    /// Serves `function` with a handler that takes the raw JSON arguments and returns a JSON
    /// result or a typed [`TaskError`] (a handler pool, see
    /// [`Registry::register_pool`](crate::Registry::register_pool)), under the worker's default
    /// [`Policy`].
    pub(crate) fn insert_dynamic(mut self, function: &'static str, run: DynamicHandler) -> Self {
        let run: ErasedHandler = Arc::new(move |args: Value, ctx: TaskContext| {
            let run = run.clone();
            Box::pin(async move { run(args, ctx).await.map_err(HandlerFailure::Task) })
        });
        if self
            .handlers
            .insert(function, Entry { run, policy: None })
            .is_some()
        {
            tracing::warn!(function, "function registered twice; the last one wins");
        }
        self
    }

    /// Makes `value` available to handlers through [`TaskContext::state`]. One value per type.
    #[must_use]
    pub fn with_state<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.state.insert(value);
        self
    }

    /// The registered function names, sorted.
    pub fn functions(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.handlers.keys().copied().collect();
        names.sort_unstable();
        names
    }

    pub(crate) fn get(&self, function: &str) -> Option<Entry> {
        self.handlers.get(function).cloned()
    }

    pub(crate) fn state(&self) -> Arc<StateMap> {
        Arc::new(self.state.clone())
    }
}
