//! The broker set-up files of `deploy/rabbitmq`, applied to a private node the way the docs tell
//! an operator to: `rabbitmqctl import_definitions definitions.json` (or the `definitions.*`
//! settings that load it at boot), then a password for each user with `users.sh`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::node::BrokerNode;

/// The vhost `deploy/rabbitmq/definitions.json` makes.
pub const VHOST: &str = "warren";

/// The work queue its users' permissions are for.
pub const QUEUE: &str = "warren.tasks";

/// The functions exchange its users' permissions are for.
pub const FUNCTIONS_EXCHANGE: &str = "warren.functions";

/// `deploy/rabbitmq/definitions.json`.
pub fn definitions_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq/definitions.json")
}

/// `deploy/rabbitmq/users.sh`.
pub fn users_sh_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/rabbitmq/users.sh")
}

/// The `rabbitmq.conf` lines that load the definitions at every boot, importing them only when
/// the file changed (so a restart keeps the passwords set since), as `deploy/README.md` says.
pub fn load_definitions_config() -> Vec<String> {
    vec![
        "definitions.import_backend = local_filesystem".to_owned(),
        format!("definitions.local.path = {}", definitions_path().display()),
        "definitions.skip_if_unchanged = true".to_owned(),
    ]
}

/// Imports the definitions into `node` with `rabbitmqctl import_definitions`.
pub fn import_definitions(node: &BrokerNode) {
    let path = definitions_path();
    node.ctl_ok(&["import_definitions", &path.to_string_lossy()]);
}

/// Gives `user` (`role`: producer, worker or operator) `password` on `node` with `users.sh`,
/// the password read from a file as the docs say; the script also sets the role's permissions
/// on [`VHOST`] for [`QUEUE`] and [`FUNCTIONS_EXCHANGE`].
///
/// # Panics
///
/// When the script fails (its output is in the message).
pub fn set_password(node: &BrokerNode, role: &str, user: &str, password: &str) {
    let file = tempfile::NamedTempFile::new().expect("password file");
    std::fs::write(file.path(), format!("{password}\n")).expect("password file");
    let mut command = Command::new("bash");
    node.env(&mut command)
        .arg(users_sh_path())
        .args([role, user, QUEUE, VHOST])
        .env("RABBITMQCTL", node.ctl_command_line())
        .env("WARREN_FUNCTIONS_EXCHANGE", FUNCTIONS_EXCHANGE)
        .env("WARREN_USER_PASSWORD_FILE", file.path())
        .stdin(Stdio::null());
    let out = command.output().expect("run users.sh");
    assert!(
        out.status.success(),
        "users.sh {role} {user}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The users on `node` (`rabbitmqctl list_users`).
pub fn users(node: &BrokerNode) -> Vec<String> {
    node.ctl_ok(&["list_users", "--no-table-headers", "-q"])
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}
