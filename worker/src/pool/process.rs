//! One child process of a pool: started in a process group of its own with a parent-death
//! signal and a guard (see `guard`), with a minimal environment, its stdout read as runner
//! frames, its exit noticed as soon as it happens, its stderr forwarded to the worker's log, and
//! its whole group killed when it is dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_util::codec::{
    AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead, LinesCodec, LinesCodecError,
};

use super::guard;
use super::protocol::{self, Frame, MAX_FRAME_BYTES, PROTOCOL_ENV, RUNNER_PROTOCOL};

/// Longest stderr line forwarded as one log record.
const MAX_LOG_LINE: usize = 64 * 1024;

/// Variables of the worker's environment that every child gets when they are set: what a
/// program needs to find executables, its home, its user, its locale (with every `LC_*`), its
/// time zone and its temp dir. Nothing else of the worker's environment (the broker URL and its
/// password, SMTP and gateway secrets) reaches task code unless the pool's `env_pass` names it.
pub const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
];

/// After a child has exited, how long its stdout is still read for frames it wrote before it
/// exited. They are in the pipe already; the wait is bounded because a subprocess of the child
/// may hold the pipe open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// How to start a child.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) pool: Arc<str>,
    pub(crate) argv: Vec<String>,
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) env: BTreeMap<String, String>,
    /// Variables passed through from the worker's environment beyond [`INHERITED_ENV`].
    pub(crate) env_pass: Vec<String>,
}

impl Spec {
    /// The child's whole environment: the worker's [`INHERITED_ENV`] and `LC_*` variables and
    /// those `env_pass` names (when set), then `env`, then the runner protocol's variables.
    pub(crate) fn environment(
        &self,
        worker: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> BTreeMap<std::ffi::OsString, std::ffi::OsString> {
        let mut env: BTreeMap<_, _> = worker
            .into_iter()
            .filter(|(name, _)| self.passes(name))
            .collect();
        env.extend(
            self.env
                .iter()
                .map(|(name, value)| (name.into(), value.into())),
        );
        env.insert(PROTOCOL_ENV.into(), RUNNER_PROTOCOL.to_string().into());
        env.insert("WARREN_POOL".into(), (*self.pool).into());
        env
    }

    /// Whether the worker's variable `name` reaches the children.
    fn passes(&self, name: &std::ffi::OsStr) -> bool {
        name.to_str().is_some_and(|name| {
            INHERITED_ENV.contains(&name)
                || name.starts_with("LC_")
                || self.env_pass.iter().any(|p| p == name)
        })
    }

    /// The names (never the values) of the worker's variables that the children do not get,
    /// sorted: what a pool's `env_pass` might have to name after an upgrade.
    pub(crate) fn withheld(
        &self,
        worker: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Vec<String> {
        let mut names: Vec<String> = worker
            .into_iter()
            .filter(|(name, _)| !self.passes(name))
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// What came out of a child's stdout.
#[derive(Debug)]
pub(crate) enum Output {
    /// A frame.
    Frame(Frame),
    /// stdout closed: the process exited (or closed it, which is as good as exiting).
    Closed,
    /// Something that is not a frame.
    Garbage(String),
}

/// A running child.
#[derive(Debug)]
pub(crate) struct Process {
    pool: Arc<str>,
    child: Child,
    pid: i32,
    stdin: Option<ChildStdin>,
    stdout: FramedRead<ChildStdout, LinesCodec>,
    /// The task it runs (or ran last), named in its forwarded log lines.
    task: Arc<Mutex<Option<String>>>,
    pub(crate) started: Instant,
    /// Tasks it has answered.
    pub(crate) jobs: u64,
    /// Its exit status has been collected: its pid may be reused from now on.
    reaped: bool,
    /// Its exit has been seen (reaped, or waiting for it failed).
    exited: bool,
    /// Its guard (see `guard`), the worker's child in its group: while it lives, the group's id
    /// is not reused, even after the process itself was reaped.
    guard: Option<Child>,
    /// SIGKILL has gone to its group (by [`terminate`](Self::terminate) or
    /// [`stop`](Self::stop)): nothing of it is left to kill on drop.
    group_killed: bool,
}

impl Process {
    /// Starts a child of `spec`.
    ///
    /// # Errors
    /// The command cannot be started (not found, not executable, bad working directory).
    pub(crate) fn spawn(spec: &Spec) -> std::io::Result<Self> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(std::io::Error::other("empty command"));
        };
        let mut command = Command::new(program);
        command
            .args(args)
            // Not the worker's environment: it holds the broker's password and other secrets.
            .env_clear()
            .envs(spec.environment(std::env::vars_os()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a time-limit kill reaches whatever the child started.
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| std::io::Error::other("child exited before its pid was read"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            // Unreaped, it still holds its group's id: nothing else can be in that group.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(std::io::Error::other("child pipes missing"));
        };
        // Only now that the program runs: a start that fails leaves no guard behind. Until the
        // guard has joined, the process has not been given a task yet.
        let guard = match guard::spawn(pid) {
            None => None,
            Some(Ok(guard)) => Some(guard),
            Some(Err(e)) => {
                tracing::warn!(pool = %spec.pool, pid, error = %e, "cannot start the pool process's guard; it runs without one");
                None
            }
        };
        let task = Arc::new(Mutex::new(None));
        tokio::spawn(forward_log(stderr, spec.pool.clone(), pid, task.clone()));
        Ok(Self {
            pool: spec.pool.clone(),
            child,
            pid,
            stdin: Some(stdin),
            stdout: FramedRead::new(stdout, LinesCodec::new_with_max_length(MAX_FRAME_BYTES)),
            task,
            started: Instant::now(),
            jobs: 0,
            reaped: false,
            exited: false,
            guard,
            group_killed: false,
        })
    }

    /// The process id (also its process group id).
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Names the task it runs in its log lines, from now until the next one.
    pub(crate) fn set_task(&self, id: &str) {
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(id.to_owned());
    }

    /// The next thing on stdout, or [`Output::Closed`] once the process has exited (noticed by
    /// waiting for it, not by the end of stdout, which a subprocess that inherited the pipe may
    /// hold open) and the frames it wrote before are read. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Output {
        if !self.exited {
            tokio::select! {
                biased;
                line = self.stdout.next() => return Self::output(line),
                status = self.child.wait() => {
                    self.exited = true;
                    self.reaped = status.is_ok();
                }
            }
        }
        match tokio::time::timeout(DRAIN_AFTER_EXIT, self.stdout.next()).await {
            Ok(line) => Self::output(line),
            Err(_) => Output::Closed,
        }
    }

    fn output(line: Option<Result<String, LinesCodecError>>) -> Output {
        match line {
            None => Output::Closed,
            Some(Ok(line)) => match protocol::parse(&line) {
                Ok(frame) => Output::Frame(frame),
                Err(e) => Output::Garbage(e.to_string()),
            },
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                Output::Garbage(format!("a stdout line longer than {MAX_FRAME_BYTES} bytes"))
            }
            Some(Err(LinesCodecError::Io(e))) => Output::Garbage(format!("reading stdout: {e}")),
        }
    }

    /// Whether its exit has been seen already (see [`next`](Self::next)).
    pub(crate) fn exit_seen(&self) -> bool {
        self.exited
    }

    /// Whether it has exited (reaping it if so).
    pub(crate) fn has_exited(&mut self) -> bool {
        if !self.exited && matches!(self.child.try_wait(), Ok(Some(_))) {
            self.exited = true;
            self.reaped = true;
        }
        self.exited
    }

    /// Writes one frame line to its stdin.
    ///
    /// # Errors
    /// The pipe is closed (the process exited).
    pub(crate) async fn send(&mut self, line: &[u8]) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        stdin.write_all(line).await?;
        stdin.flush().await
    }

    /// [`send`](Self::send), ending as soon as the process exits: a subprocess that holds its
    /// stdin open without reading it would otherwise keep a long line's write waiting.
    ///
    /// # Errors
    /// The pipe is closed, or the process exited before it took the whole line.
    pub(crate) async fn send_or_exit(&mut self, line: &[u8]) -> std::io::Result<()> {
        let exited = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the process exited");
        if self.exited {
            return Err(exited());
        }
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        tokio::select! {
            sent = async {
                stdin.write_all(line).await?;
                stdin.flush().await
            } => sent,
            status = self.child.wait() => {
                self.exited = true;
                self.reaped = status.is_ok();
                Err(exited())
            }
        }
    }

    /// Resident set size in bytes, from `/proc/<pid>/statm`.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid)).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096);
        Some(pages * page)
    }

    /// How it ended, waiting at most `wait` for it to be reaped: `exited with status 1`,
    /// `killed by SIGKILL`, or `still running`.
    pub(crate) async fn exit_description(&mut self, wait: Duration) -> String {
        match self.wait(wait).await {
            Ok(Ok(status)) => describe(status),
            Ok(Err(e)) => format!("cannot be waited for: {e}"),
            Err(_) => "still running".to_owned(),
        }
    }

    fn signal_group(&self, signal: Signal) {
        // ESRCH (the group is gone) is what we want anyway.
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }

    /// SIGKILL to its group, then reaps its guard (which was in it).
    async fn kill_group(&mut self) {
        self.signal_group(Signal::SIGKILL);
        self.group_killed = true;
        if let Some(guard) = &mut self.guard {
            // SIGKILL cannot be blocked: this returns.
            let _ = guard.wait().await;
        }
    }

    /// SIGTERM to its group, SIGKILL after `grace`; returns once it is reaped.
    pub(crate) async fn terminate(&mut self, grace: Duration) {
        self.signal_group(Signal::SIGTERM);
        if self.wait(grace).await.is_err() {
            tracing::warn!(pool = %self.pool, pid = self.pid, ?grace, "process ignored SIGTERM; killing it");
        }
        self.kill_group().await;
        // SIGKILL cannot be ignored: this returns.
        if self.child.wait().await.is_ok() {
            self.reaped = true;
            self.exited = true;
        }
    }

    /// Waits at most `limit` for it to exit, and reaps it.
    async fn wait(
        &mut self,
        limit: Duration,
    ) -> Result<std::io::Result<std::process::ExitStatus>, tokio::time::error::Elapsed> {
        let waited = tokio::time::timeout(limit, self.child.wait()).await;
        if matches!(waited, Ok(Ok(_))) {
            self.reaped = true;
            self.exited = true;
        }
        waited
    }

    /// The polite stop between tasks: closes its stdin (a runner exits on end of input), then
    /// [`terminate`](Self::terminate) if it is still there after `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        self.stdin = None;
        if self.wait(grace).await.is_err() {
            self.terminate(grace).await;
        } else {
            // Whatever it started in its group goes with it.
            self.kill_group().await;
        }
    }

    /// Whether its guard is still running (reaping it if not).
    fn guard_alive(&mut self) -> bool {
        self.guard
            .as_mut()
            .is_some_and(|guard| matches!(guard.try_wait(), Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Whatever happened to the supervisor, no child (nor anything it started) outlives its
        // handle: the group goes unless it was killed already. The group's id is still its own
        // while the process is unreaped or while its guard, a member, lives; otherwise it may
        // belong to someone else by now: leave it alone.
        if !self.group_killed && (!self.reaped || self.guard_alive()) {
            self.signal_group(Signal::SIGKILL);
        }
        // A guard still running is killed above (it is in the group) and reaped by the runtime.
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("was killed by {s}"),
            Err(_) => format!("was killed by signal {signal}"),
        },
        (None, None) => format!("ended ({status})"),
    }
}

/// Makes the child die with SIGKILL when the worker dies, even by `kill -9`. The rest of its
/// process group goes through its guard (see `guard`), so that neither a pool process nor what
/// it started in its group outlives the worker.
fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl(2) and
    // getppid(2), both async-signal-safe, and allocates nothing (errors are raw OS errors).
    // PR_SET_PDEATHSIG is tied to the thread that forks; pools start their processes from the
    // runtime's worker threads, which live as long as the worker.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The worker died between fork and prctl: the signal will never come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
}

/// Forwards the child's stderr to the worker's log, one record per line, naming the pool, the
/// pid and the task it was running.
async fn forward_log(
    stderr: tokio::process::ChildStderr,
    pool: Arc<str>,
    pid: i32,
    task: Arc<Mutex<Option<String>>>,
) {
    // Nothing a child writes may stop the reading, or its next write to stderr would meet a
    // closed pipe: lines are bytes (not `LinesCodec`, which fails on bad UTF-8), and after a
    // line that is too long (the codec skips the rest of it) `FramedRead` ends its stream once
    // and then reads on.
    let codec = AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), MAX_LOG_LINE);
    let mut lines = FramedRead::new(stderr, codec);
    let mut after_cut = false;
    loop {
        let line = match lines.next().await {
            Some(Ok(line)) => {
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                String::from_utf8_lossy(line).into_owned()
            }
            Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded)) => {
                after_cut = true;
                format!("(a log line longer than {MAX_LOG_LINE} bytes was cut)")
            }
            None if after_cut => {
                after_cut = false;
                continue;
            }
            Some(Err(AnyDelimiterCodecError::Io(_))) | None => break,
        };
        let task = task.lock().unwrap_or_else(PoisonError::into_inner).clone();
        tracing::info!(
            target: "warren_worker::pool::child",
            pool = %pool,
            pid,
            task = %task.as_deref().unwrap_or("-"),
            "{line}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_childs_environment_is_the_allowlist_then_env_pass_then_env() {
        let spec = Spec {
            pool: "p".into(),
            argv: vec!["x".into()],
            cwd: None,
            env: BTreeMap::from([
                ("APP_ENV".into(), "prod".into()),
                ("HOME".into(), "/srv".into()),
            ]),
            env_pass: vec!["DATABASE_URL".into()],
        };
        let worker = [
            ("PATH", "/bin"),
            ("HOME", "/root"),
            ("LC_TIME", "C"),
            ("AMQP_URL", "amqp://u:secret@h"),
            ("WARREN_SMTP_URL", "smtp://u:pw@relay"),
            ("DATABASE_URL", "postgres://db"),
            ("WARREN_POOL", "spoofed"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let env = spec.environment(worker);
        let get = |k: &str| env.get(std::ffi::OsStr::new(k)).and_then(|v| v.to_str());
        assert_eq!(get("PATH"), Some("/bin"));
        assert_eq!(get("LC_TIME"), Some("C"));
        assert_eq!(get("DATABASE_URL"), Some("postgres://db"));
        assert_eq!(get("APP_ENV"), Some("prod"));
        assert_eq!(get("HOME"), Some("/srv"), "env wins over the worker's");
        assert_eq!(get("AMQP_URL"), None);
        assert_eq!(get("WARREN_SMTP_URL"), None);
        assert_eq!(get("WARREN_POOL"), Some("p"));
        assert_eq!(get("WARREN_RUNNER_PROTOCOL"), Some("1"));
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }

    #[tokio::test]
    async fn a_process_dropped_after_it_was_reaped_kills_its_guarded_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let spec = Spec {
            pool: "p".into(),
            // A subprocess in its group, then an exit at the end of its input.
            argv: ["sh", "-c", "sleep 600 & echo $! > \"$0\"; read x"]
                .map(String::from)
                .into_iter()
                .chain([pidfile.to_string_lossy().into_owned()])
                .collect(),
            cwd: None,
            env: BTreeMap::new(),
            env_pass: Vec::new(),
        };
        let mut process = Process::spawn(&spec).unwrap();
        // A stand-in for the guard (test binaries have none): a live member of the group.
        let guard = Command::new("sleep")
            .arg("600")
            .process_group(process.pid())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        process.guard = Some(guard);
        let until = Instant::now() + Duration::from_secs(10);
        let sleep = loop {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                break pid;
            }
            assert!(Instant::now() < until, "the subprocess did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Reaped, as `next` does when it sees the exit, and dropped before any group kill (a
        // slot future dropped in between).
        process.stdin = None;
        assert!(process.wait(Duration::from_secs(10)).await.is_ok());
        assert!(process.reaped);
        drop(process);
        let until = Instant::now() + Duration::from_secs(5);
        while alive(sleep) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let outlived = alive(sleep);
        if outlived {
            let _ = nix::sys::signal::kill(Pid::from_raw(sleep), Signal::SIGKILL);
        }
        assert!(!outlived, "the subprocess outlived its dropped process");
    }

    #[test]
    fn the_withheld_variables_are_named_without_their_values() {
        let spec = Spec {
            pool: "p".into(),
            argv: vec!["x".into()],
            cwd: None,
            env: BTreeMap::new(),
            env_pass: vec!["DATABASE_URL".into()],
        };
        let worker = [
            ("PATH", "/bin"),
            ("LC_ALL", "C"),
            ("AMQP_URL", "amqp://u:secret@h"),
            ("DATABASE_URL", "postgres://db"),
            ("HTTPS_PROXY", "http://proxy:3128"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        assert_eq!(spec.withheld(worker), ["AMQP_URL", "HTTPS_PROXY"]);
    }
}
