//! The registry: function name to a type-erased decode-run-encode function.
//!
//! Registration is explicit and typed (`Registry::new().register_handler::<SendMail>(mailer)`,
//! `.register_fn::<Add, _>(add)`); nothing is discovered by name or macro, and the state a
//! handler needs is in it when it is registered. Each entry decodes the arguments into the task
//! type (a mismatch is `invalid_args`), runs its handler, and encodes the output back to JSON.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use serde_json::Value;
use warren_shared::pool::BoxFuture;
use warren_shared::{Policy, RawJson};

use crate::handler::{Handler, Run, TaskContext, TaskError, handler_fn};
use warren_shared::Task;

/// A handler's outcome before it becomes a reply: the result as JSON text (serialized once,
/// never held as a tree), or the failure with its retry advice.
pub(crate) type HandlerResult = Result<RawJson, HandlerFailure>;

/// Why a registered function did not produce a result.
#[derive(Debug, Clone)]
pub(crate) enum HandlerFailure {
    /// The arguments did not decode into the task type.
    InvalidArgs(String),
    /// The handler returned an error.
    Task(TaskError),
}

/// A registered function on JSON text: the arguments as the task carried them in, the result
/// out.
pub(crate) type ErasedHandler =
    Arc<dyn Fn(RawJson, TaskContext) -> BoxFuture<HandlerResult> + Send + Sync>;

/// A handler on JSON text: arguments in, passed on unparsed, a result or a typed error out.
pub(crate) type DynamicHandler =
    Arc<dyn Fn(RawJson, TaskContext) -> BoxFuture<Result<RawJson, TaskError>> + Send + Sync>;

/// A registered function: how to run it, and its policy when it has one of its own.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) run: ErasedHandler,
    pub(crate) policy: Option<Policy>,
}

/// The functions a worker serves, each with its handler (and the state the handler owns).
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<&'static str, Entry>,
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

    /// Serves task type `T` under `T::NAME` with `handler` and the worker's default [`Policy`].
    /// Registering a name twice keeps the last handler.
    #[must_use]
    pub fn register_handler<T: Task>(self, handler: impl Handler<T>) -> Self {
        self.insert::<T, _>(handler, None)
    }

    /// [`Registry::register_handler`] with a [`Policy`] of its own (attempts, backoff, time
    /// limit). A caller can still override it per task.
    #[must_use]
    pub fn register_handler_with<T: Task>(self, handler: impl Handler<T>, policy: Policy) -> Self {
        self.insert::<T, _>(handler, Some(policy))
    }

    /// Serves task type `T` with an `async fn` or closure `(args, ctx) -> Result<Output,
    /// TaskError>`; what it needs, it captures. The task type is the function's first
    /// argument type (or `register_fn::<T, _, _>`).
    ///
    /// ```
    /// use warren_shared::tasks::Sleep;
    /// use warren_worker::{Registry, TaskContext};
    ///
    /// let registry = Registry::new().register_fn(|args: Sleep, _ctx: TaskContext| async move {
    ///     tokio::time::sleep(std::time::Duration::from_millis(args.ms)).await;
    ///     Ok(warren_shared::tasks::Slept { slept_ms: args.ms })
    /// });
    /// # assert_eq!(registry.functions(), ["sleep"]);
    /// ```
    #[must_use]
    pub fn register_fn<T, F, Fut>(self, f: F) -> Self
    where
        T: Task,
        F: Fn(T, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T::Output, TaskError>> + Send + 'static,
    {
        self.register_handler::<T>(handler_fn(f))
    }

    /// Serves a task type that runs itself ([`Run`]) with the worker's default [`Policy`].
    #[must_use]
    pub fn register<T: Run>(self) -> Self {
        self.register_fn::<T, _, _>(T::run)
    }

    /// [`Registry::register`] with a [`Policy`] of its own.
    #[must_use]
    pub fn register_with<T: Run>(self, policy: Policy) -> Self {
        self.register_handler_with::<T>(handler_fn(T::run), policy)
    }

    fn insert<T: Task, H: Handler<T>>(mut self, handler: H, policy: Option<Policy>) -> Self {
        let handler = Arc::new(handler);
        let run: ErasedHandler = Arc::new(move |args: RawJson, ctx: TaskContext| {
            let handler = handler.clone();
            Box::pin(async move {
                // Missing arguments (null) also fit a task whose fields all have defaults.
                let task: T = match args.get() {
                    "null" => serde_json::from_value(Value::Null)
                        .or_else(|_| serde_json::from_value(Value::Object(Default::default()))),
                    // A repeated key is an error for a struct read straight from text; read
                    // through a tree, as producers' JSON always was, the last value counts.
                    _ => args.parse().or_else(|e: serde_json::Error| {
                        if e.to_string().starts_with("duplicate field") {
                            args.parse::<Value>().and_then(serde_json::from_value)
                        } else {
                            Err(e)
                        }
                    }),
                }
                .map_err(|e| {
                    HandlerFailure::InvalidArgs(format!("arguments of {:?}: {e}", T::NAME))
                })?;
                let output = handler.run(task, ctx).await.map_err(HandlerFailure::Task)?;
                RawJson::to_json(&output).map_err(|e| {
                    HandlerFailure::Task(TaskError::permanent(format!(
                        "result of {:?} does not serialize: {e}",
                        T::NAME
                    )))
                })
            })
        });
        if self
            .handlers
            .insert(T::NAME, Entry { run, policy })
            .is_some()
        {
            tracing::warn!(
                function = T::NAME,
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
        let run: ErasedHandler = Arc::new(move |args: RawJson, ctx: TaskContext| {
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

    /// Keeps only the functions `keep` says yes to.
    #[cfg(feature = "builtins")]
    pub(crate) fn retain(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.handlers.retain(|function, _| keep(function));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use serde_json::json;
    use warren_shared::TaskId;

    #[derive(Serialize, Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    impl Task for Add {
        const NAME: &'static str = "add";
        type Output = i64;
    }

    /// A handler that owns its typed state.
    struct Offset(i64);

    impl Handler<Add> for Offset {
        async fn run(&self, args: Add, _ctx: TaskContext) -> Result<i64, TaskError> {
            Ok(args.a + args.b + self.0)
        }
    }

    /// Runs `add`, with its result parsed back into a `Value`.
    async fn run(registry: &Registry, args: Value) -> Result<Value, HandlerFailure> {
        let entry = registry.get("add").expect("registered");
        let args = RawJson::to_json(&args).expect("test value");
        (entry.run)(args, TaskContext::new(TaskId::new(), "add"))
            .await
            .map(|result| result.parse().expect("a result is JSON"))
    }

    #[tokio::test]
    async fn a_struct_handler_runs_with_its_state_and_decodes_its_arguments() {
        let registry = Registry::new().register_handler::<Add>(Offset(100));
        assert_eq!(registry.functions(), ["add"]);
        assert_eq!(
            run(&registry, json!({"a": 1, "b": 2})).await.unwrap(),
            json!(103)
        );
        assert!(matches!(
            run(&registry, json!({"a": "x"})).await,
            Err(HandlerFailure::InvalidArgs(m)) if m.starts_with("arguments of \"add\"")
        ));
    }

    #[tokio::test]
    async fn a_repeated_argument_keeps_its_last_value_as_a_tree_would() {
        let registry = Registry::new().register_handler::<Add>(Offset(0));
        let entry = registry.get("add").expect("registered");
        let args = RawJson::from_string(r#"{"a": 1, "b": 2, "a": 40}"#.into()).expect("JSON");
        let result = (entry.run)(args, TaskContext::new(TaskId::new(), "add"))
            .await
            .expect("runs");
        assert_eq!(result.get(), "42");
    }

    #[tokio::test]
    async fn a_function_handler_and_its_errors_pass_through() {
        let registry = Registry::new().register_fn(|args: Add, _ctx: TaskContext| async move {
            if args.b == 0 {
                return Err(TaskError::permanent("b must not be 0"));
            }
            Ok(args.a / args.b)
        });
        assert_eq!(
            run(&registry, json!({"a": 6, "b": 3})).await.unwrap(),
            json!(2)
        );
        match run(&registry, json!({"a": 6, "b": 0})).await {
            Err(HandlerFailure::Task(e)) => {
                assert_eq!(e.retry(), crate::Retry::Permanent);
                assert_eq!(e.message(), "b must not be 0");
            }
            other => panic!("{other:?}"),
        }
    }
}
