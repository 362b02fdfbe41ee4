//! Typed tasks: a Rust type that names a remote function and carries its arguments.
//!
//! A task type is its own argument struct (serialized as the request's `args`), with a constant
//! function name and the type of its result. Producers call it with `Client::call`, workers
//! register a handler for it. Untyped callers use the function name and a JSON value instead;
//! both meet on the same wire format.

use serde::{Serialize, de::DeserializeOwned};

/// A task type: its arguments are `Self`, its function name is [`Task::NAME`].
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use warren_shared::Task;
///
/// #[derive(Serialize, Deserialize)]
/// struct Resize { image: String, width: u32 }
///
/// impl Task for Resize {
///     const NAME: &'static str = "resize";
///     type Output = String; // where the resized image went
/// }
/// ```
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// The function name on the wire (`{"function": NAME, ...}`). Keep it stable: renaming it
    /// strands the tasks already queued under the old name.
    const NAME: &'static str;

    /// The work queue this task type goes to when the call names none
    /// (`CallOptions::queue`); `None`, the default, means the client's own default queue.
    /// Workers for it consume that queue.
    const QUEUE: Option<&'static str> = None;

    /// What a successful run returns to the caller.
    type Output: Serialize + DeserializeOwned + Send + 'static;
}
