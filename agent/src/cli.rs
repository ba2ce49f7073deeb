// SPDX-License-Identifier: MIT
//! Command-line parsing (hand-rolled: a security appliance does not need a parser crate) and
//! the `--status` client of MSP §6.5.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::exit::ExitStatus;
use crate::limits::{STATUS_CONNECT_TIMEOUT_MS, STATUS_POLL_MS, STATUS_READ_TIMEOUT_MS};

/// Usage text (also the man page's synopsis).
pub const USAGE: &str = "\
guest-proxy-agent: Metadata Security Protocol guest agent

USAGE:
    guest-proxy-agent [--config FILE] [--early]
                                               run the daemon (foreground); --early: the
                                               initramfs instance (intercept every endpoint
                                               at once, offer the listener to the next agent)
    guest-proxy-agent --status [--wait N]      query provisioning; exit 0 ready,
                                               1 not finished, 2 finished with error
    guest-proxy-agent detach [--config FILE]   remove the pinned eBPF programs and maps
                                               (the endpoints become reachable directly)
    guest-proxy-agent status [--json]          show <logDirectory>/status.json; exit 0
                                               SUCCESS, 1 ERROR, 2 missing or unreadable
    guest-proxy-agent doctor [--json]          read-only health checks; exit 0 when none
                                               failed, 1 otherwise
    guest-proxy-agent audit verify [--key-file K] FILE...
                                               check the audit hash chain (oldest file first);
                                               names the first broken record; exit 0 intact
    guest-proxy-agent policy explain (--rules FILE | --live) --endpoint E --url URL
                        [--method M] [--uid N] [--user U] [--group G]... [--exe PATH] [--json]
                                               the allowlist decision for one request and why
    guest-proxy-agent --version | --help

OPTIONS:
    -c, --config FILE   configuration (default /etc/guest-proxy-agent/config.json)
    -s, --status        ask the running agent whether provisioning finished
    -w, --wait N        with --status: keep asking for up to N seconds
        --json          with status or doctor: print JSON
    -v, --version       print the version
    -h, --help          print this help

EXIT CODES (daemon):
    0 stopped by SIGTERM/SIGINT, 64 usage error, 70 start failure (event loop, no cgroup
    v2), 78 configuration error. A redirector (eBPF) that fails to attach or a listener that
    cannot be bound does not stop the daemon: it is retried, and --status reports it (exit 2).
";

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Config file.
        config: PathBuf,
        /// `--early`: the initramfs instance.
        early: bool,
    },
    /// `--status [--wait N]`.
    Status {
        /// Config file (for the listen address).
        config: PathBuf,
        /// Seconds to keep polling.
        wait_secs: u64,
    },
    /// `detach`: remove the pinned programs and maps.
    Detach {
        /// Config file (for the pin path).
        config: PathBuf,
    },
    /// `--self-test-hardening` (undocumented, for tests): harden this process, then prove a
    /// forbidden syscall is refused.
    SelfTestHardening,
    /// `status [--json]`: show the status file.
    ShowStatus {
        /// Config file (for the log directory).
        config: PathBuf,
        /// Print the raw document.
        json: bool,
    },
    /// `doctor [--json]`: read-only health checks.
    Doctor {
        /// Config file.
        config: PathBuf,
        /// Print a JSON array.
        json: bool,
    },
    /// `audit verify [--key-file K] FILE...`.
    AuditVerify {
        /// Key file of the MSP key the checkpoints were made with (`<guid>.key`).
        key_file: Option<PathBuf>,
        /// Audit files, oldest first.
        files: Vec<PathBuf>,
    },
    /// `policy explain ...`.
    PolicyExplain(ExplainArgs),
    /// `--version`.
    Version,
    /// `--help`.
    Help,
}

/// A command line that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl core::fmt::Display for UsageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} (see --help)", self.0)
    }
}

/// Parses the arguments after the program name.
/// Arguments of `policy explain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainArgs {
    /// Config (for `--live`: the log directory holding rules snapshots).
    pub config: PathBuf,
    /// Rules file, or `None` for the live rules (newest snapshot).
    pub rules: Option<PathBuf>,
    /// `imds`, `wireserver` or `hostgaplugin`.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Request target (`/path?query`).
    pub url: String,
    /// Caller uid.
    pub uid: u32,
    /// Caller user name.
    pub user: Option<String>,
    /// Caller groups.
    pub groups: Vec<String>,
    /// Caller executable.
    pub exe: Option<String>,
    /// Print JSON.
    pub json: bool,
}

fn parse_audit(args: &[String]) -> Result<Command, UsageError> {
    let mut key_file = None;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--key-file" => {
                key_file = Some(PathBuf::from(it.next().ok_or_else(|| UsageError("--key-file needs a file".into()))?))
            }
            // The configuration plays no part in verifying files.
            "-c" | "--config" => {
                let _config = it.next();
            }
            flag if flag.starts_with('-') => return Err(UsageError(format!("audit verify: unknown option {flag}"))),
            file => files.push(PathBuf::from(file)),
        }
    }
    if files.is_empty() {
        return Err(UsageError("audit verify needs at least one file".into()));
    }
    Ok(Command::AuditVerify { key_file, files })
}

fn parse_explain(args: &[String]) -> Result<Command, UsageError> {
    let mut a = ExplainArgs {
        config: PathBuf::from(DEFAULT_CONFIG_PATH),
        rules: None,
        endpoint: String::new(),
        method: "GET".into(),
        url: String::new(),
        uid: 0,
        user: None,
        groups: Vec::new(),
        exe: None,
        json: false,
    };
    let mut live = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| UsageError(format!("{arg} needs a value")));
        match arg.as_str() {
            "-c" | "--config" => a.config = PathBuf::from(value()?),
            "--rules" => a.rules = Some(PathBuf::from(value()?)),
            "--live" => live = true,
            "--endpoint" => a.endpoint = value()?,
            "--method" => a.method = value()?,
            "--url" => a.url = value()?,
            "--uid" => {
                let v = value()?;
                a.uid = v.parse().map_err(|e| UsageError(format!("--uid: {v}: {e}")))?;
            }
            "--user" => a.user = Some(value()?),
            "--group" => a.groups.push(value()?),
            "--exe" => a.exe = Some(value()?),
            "--json" => a.json = true,
            other => return Err(UsageError(format!("policy explain: unknown argument {other}"))),
        }
    }
    if live == a.rules.is_some() {
        return Err(UsageError("policy explain needs exactly one of --rules FILE or --live".into()));
    }
    if !matches!(a.endpoint.as_str(), "imds" | "wireserver" | "hostgaplugin") {
        return Err(UsageError("--endpoint must be imds, wireserver or hostgaplugin".into()));
    }
    if !a.url.starts_with('/') {
        return Err(UsageError("--url must be an origin-form target such as /metadata/instance".into()));
    }
    Ok(Command::PolicyExplain(a))
}

/// The program name of the reference agent, which tools and cloud-init call.
pub const REFERENCE_PROGRAM_NAME: &str = "azure-proxy-agent";

/// What `--version` prints for a program invoked as `program` (its `argv[0]`): the bare
/// version under the reference agent's name, as tools that call that name parse it, else
/// `guest-proxy-agent <version>`.
pub fn version_line(program: &str) -> String {
    let invoked_as = program.rsplit('/').next().unwrap_or(program);
    if invoked_as == REFERENCE_PROGRAM_NAME {
        crate::VERSION.to_owned()
    } else {
        format!("guest-proxy-agent {}", crate::VERSION)
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, UsageError> {
    // `--help` wherever it stands, also after a subcommand (`policy explain --help`): asking
    // for help is never a usage error.
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    // Two-word subcommands may follow `--config FILE`; their own options come after them.
    for (i, pair) in args.windows(2).enumerate() {
        let rest = || args[..i].iter().chain(&args[i + 2..]).cloned().collect::<Vec<_>>();
        match (pair[0].as_str(), pair[1].as_str()) {
            ("audit", "verify") => return parse_audit(&rest()),
            ("policy", "explain") => return parse_explain(&rest()),
            _ => {}
        }
    }
    if args.iter().any(|a| a == "audit" || a == "policy") {
        return Err(UsageError("expected audit verify or policy explain".into()));
    }
    parse_flags(args)
}

fn parse_flags(args: &[String]) -> Result<Command, UsageError> {
    let mut config = PathBuf::from(DEFAULT_CONFIG_PATH);
    let mut status = false;
    let mut wait: Option<u64> = None;
    let mut detach = false;
    let mut show_status = false;
    let mut doctor = false;
    let mut json = false;
    let mut early = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-v" | "--version" => return Ok(Command::Version),
            "--self-test-hardening" => return Ok(Command::SelfTestHardening),
            "-s" | "--status" => status = true,
            "-w" | "--wait" => {
                let n = it.next().ok_or_else(|| UsageError("--wait needs a number of seconds".into()))?;
                wait = Some(n.parse().map_err(|e| UsageError(format!("--wait: not a number of seconds: {n} ({e})")))?);
            }
            "detach" => detach = true,
            "status" => show_status = true,
            "doctor" => doctor = true,
            "--json" => json = true,
            "--early" => early = true,
            "-c" | "--config" => {
                config = PathBuf::from(it.next().ok_or_else(|| UsageError("--config needs a file".into()))?);
            }
            other => return Err(UsageError(format!("unknown argument: {other}"))),
        }
    }
    if early && (status || detach || show_status || doctor) {
        return Err(UsageError("--early goes with running the daemon only".into()));
    }
    if wait.is_some() && !status {
        return Err(UsageError("--wait requires --status".into()));
    }
    if usize::from(detach) + usize::from(show_status) + usize::from(doctor) > 1 {
        return Err(UsageError("give one of detach, status, doctor".into()));
    }
    if json && !(show_status || doctor) {
        return Err(UsageError("--json goes with status or doctor".into()));
    }
    if status && (show_status || doctor) {
        return Err(UsageError("--status is its own command; status and doctor take no --status".into()));
    }
    if show_status {
        return Ok(Command::ShowStatus { config, json });
    }
    if doctor {
        return Ok(Command::Doctor { config, json });
    }
    if detach {
        return if status {
            Err(UsageError("detach takes no --status".into()))
        } else {
            Ok(Command::Detach { config })
        };
    }
    Ok(if status { Command::Status { config, wait_secs: wait.unwrap_or(0) } } else { Command::Run { config, early } })
}

/// The `/provision` answer.
#[derive(Debug, Deserialize)]
struct Provision {
    finished: bool,
    #[serde(rename = "errorMessage")]
    error_message: heapless::String<2048>,
}

/// Result of `--status`: the exit code and the text to print.
#[derive(Debug, PartialEq, Eq)]
pub struct StatusOutcome {
    /// Success: ready; Failure: not finished; Severe: finished with an error.
    pub exit_code: ExitStatus,
    /// What to print.
    pub message: String,
}

fn query_provision(listen: SocketAddrV4, tick_ns: u64, notify: bool) -> Result<Provision, String> {
    // Only the agent's (root's) socket is asked: a user who squats the port while the agent
    // is down must not be able to answer "ready". Checked before and after the exchange.
    crate::listener::held_by_root_only(listen)?;
    let provision = exchange_provision(listen, tick_ns, notify).ok_or_else(String::new)?;
    crate::listener::held_by_root_only(listen)?;
    Ok(provision)
}

fn exchange_provision(listen: SocketAddrV4, tick_ns: u64, notify: bool) -> Option<Provision> {
    let mut s = TcpStream::connect_timeout(&listen.into(), Duration::from_millis(STATUS_CONNECT_TIMEOUT_MS)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(STATUS_READ_TIMEOUT_MS))).ok()?;
    let notify = if notify { "x-ms-azure-notify: true\r\n" } else { "" };
    let req = format!(
        "GET /provision HTTP/1.1\r\nHost: {listen}\r\nMetadata: true\r\nx-ms-azure-time-tick: {tick_ns}\r\n{notify}Connection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut resp = Vec::new();
    s.take(64 * 1024).read_to_end(&mut resp).ok()?;
    let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if !resp.starts_with(b"HTTP/1.1 200") {
        return None;
    }
    let mut unescape = [0u8; 2048];
    serde_json_core::from_slice_escaped::<Provision>(&resp[body_at..], &mut unescape).ok().map(|(p, _)| p)
}

/// The agent's `status.json`, where `--status` looks when no agent socket answers.
#[derive(Debug, Clone, Copy)]
pub struct StatusFile<'a> {
    /// The configured log directory.
    pub log_dir: &'a Path,
    /// Older than this, the file is a dead agent's (it is rewritten on every change and at
    /// least every status interval).
    pub max_age: Duration,
}

/// A listener that failed to bind has no socket to answer `/provision`: the running agent
/// says so in its `status.json` (`proxyListenerStatus` `STOPPED`). Trusted only when the
/// file is root's, writable by no one else, and fresh.
fn listener_failure_from_status_file(file: StatusFile<'_>) -> Option<String> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    // The checks are on the file that is read: opened once, never through a link, and
    // without blocking on a FIFO.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file.log_dir.join(crate::status::writer::STATUS_FILE_NAME))
        .ok()?;
    let meta = opened.metadata().ok()?;
    let fresh = meta.modified().ok()?.elapsed().is_ok_and(|age| age <= file.max_age);
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 || !fresh {
        return None;
    }
    let view = crate::status::view::parse(&crate::status::view::read_open(opened).ok()?).ok()?;
    let listener = &view.proxy_agent_status.proxy_listener_status;
    (listener.status == "STOPPED").then(|| format!("proxyListenerStatus - {}", listener.message))
}

/// Runs `--status [--wait N]` against the agent: at the address it recorded, else at the
/// configured one (`candidates`, in that order; a killed agent leaves a stale record). When
/// none answers, a listener failure the agent reported in `status.json` finishes it.
pub fn status(candidates: &[SocketAddrV4], status_file: StatusFile<'_>, wait_secs: u64) -> StatusOutcome {
    let start = crate::clock::now();
    let tick_ns = u64::try_from(crate::clock::wall_now().as_nanos()).unwrap_or(0);
    let mut first = true;
    let mut why = Vec::new();
    loop {
        why.clear();
        let mut answer = None;
        for listen in candidates {
            match query_provision(*listen, tick_ns, first) {
                Ok(p) => {
                    answer = Some(p);
                    break;
                }
                Err(e) if !e.is_empty() && !why.contains(&e) => why.push(e),
                Err(_) => {}
            }
        }
        if answer.is_none()
            && let Some(failure) = listener_failure_from_status_file(status_file)
        {
            return StatusOutcome {
                exit_code: ExitStatus::Severe,
                message: format!("Provisioning finished with errors: {failure}"),
            };
        }
        if let Some(p) = answer
            && p.finished
        {
            return if p.error_message.is_empty() {
                StatusOutcome {
                    exit_code: ExitStatus::Success,
                    message: "Provisioning finished: the guest proxy agent is ready.".into(),
                }
            } else {
                StatusOutcome {
                    exit_code: ExitStatus::Severe,
                    message: format!("Provisioning finished with errors: {}", p.error_message.trim_end()),
                }
            };
        }
        first = false;
        if crate::clock::now().saturating_duration_since(start) >= Duration::from_secs(wait_secs) {
            let message = if why.is_empty() {
                "Provisioning has not finished.".to_owned()
            } else {
                format!("Provisioning has not finished ({}).", why.join("; "))
            };
            return StatusOutcome { exit_code: ExitStatus::Failure, message };
        }
        std::thread::sleep(Duration::from_millis(STATUS_POLL_MS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--status` takes a listener failure from `status.json` only when the file could only
    /// have been written by the agent: root's, not group- or world-writable, and fresh.
    #[test]
    fn a_listener_failure_is_read_from_status_json_only_when_it_is_roots_fresh_and_private() {
        use crate::status::document::{ModuleStatus, sample_json};
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let dir = std::env::temp_dir().join(format!("gpa-cli-status-file-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status.json");
        let failed =
            "Failed to start proxy listener - cannot listen on 127.0.0.2:3080: Cannot assign requested address";
        std::fs::write(&path, sample_json(ModuleStatus::stopped(failed), 0, None)).unwrap();
        let set_mode = |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        set_mode(0o644);
        let file = StatusFile { log_dir: &dir, max_age: Duration::from_secs(60) };
        let roots = std::fs::metadata(&path).unwrap().uid() == 0;
        let expected = roots.then(|| format!("proxyListenerStatus - {failed}"));
        assert_eq!(listener_failure_from_status_file(file), expected);
        for writable_by_others in [0o664, 0o646] {
            set_mode(writable_by_others);
            assert_eq!(listener_failure_from_status_file(file), None, "mode {writable_by_others:o}");
        }
        set_mode(0o644);
        let an_hour_ago = std::time::UNIX_EPOCH + crate::clock::wall_now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(an_hour_ago).unwrap();
        assert_eq!(listener_failure_from_status_file(file), None, "a dead agent's file");
        std::fs::write(&path, sample_json(ModuleStatus::running("Started proxy listener"), 0, None)).unwrap();
        assert_eq!(listener_failure_from_status_file(file), None, "a running listener");
        drop(std::fs::remove_dir_all(&dir));
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_audit_verify_and_policy_explain() {
        assert_eq!(
            parse(&args(&["audit", "verify", "--key-file", "/k", "a.1", "a"])).unwrap(),
            Command::AuditVerify { key_file: Some("/k".into()), files: vec!["a.1".into(), "a".into()] }
        );
        assert!(parse(&args(&["audit", "verify"])).is_err());
        let Command::PolicyExplain(e) = parse(&args(&[
            "policy",
            "explain",
            "--rules",
            "r.json",
            "--endpoint",
            "imds",
            "--url",
            "/x",
            "--uid",
            "7",
            "--group",
            "g",
        ]))
        .unwrap() else {
            panic!("not explain")
        };
        assert_eq!((e.uid, e.groups.as_slice(), e.method.as_str()), (7, &["g".to_owned()][..], "GET"));
        assert!(parse(&args(&["policy", "explain", "--endpoint", "imds", "--url", "/x"])).is_err());
        assert!(parse(&args(&["policy", "explain", "--live", "--endpoint", "nope", "--url", "/x"])).is_err());
    }

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse(&args(&[])).unwrap(), Command::Run { config: DEFAULT_CONFIG_PATH.into(), early: false });
        assert_eq!(
            parse(&args(&["--config", "/x.json"])).unwrap(),
            Command::Run { config: "/x.json".into(), early: false }
        );
        assert_eq!(
            parse(&args(&["--early"])).unwrap(),
            Command::Run { config: DEFAULT_CONFIG_PATH.into(), early: true }
        );
        assert!(parse(&args(&["--early", "--status"])).is_err());
        assert_eq!(
            parse(&args(&["-s", "-w", "5"])).unwrap(),
            Command::Status { config: DEFAULT_CONFIG_PATH.into(), wait_secs: 5 }
        );
        assert_eq!(parse(&args(&["--version"])).unwrap(), Command::Version);
        assert!(parse(&args(&["--wait", "5"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
        assert!(parse(&args(&["-s", "-w", "x"])).is_err());
    }

    #[test]
    fn parses_status_and_doctor_subcommands() {
        let c = || PathBuf::from(DEFAULT_CONFIG_PATH);
        assert_eq!(parse(&args(&["status"])).unwrap(), Command::ShowStatus { config: c(), json: false });
        assert_eq!(parse(&args(&["status", "--json"])).unwrap(), Command::ShowStatus { config: c(), json: true });
        assert_eq!(
            parse(&args(&["--json", "status", "-c", "/x.json"])).unwrap(),
            Command::ShowStatus { config: "/x.json".into(), json: true }
        );
        assert_eq!(parse(&args(&["doctor"])).unwrap(), Command::Doctor { config: c(), json: false });
        assert_eq!(
            parse(&args(&["doctor", "--json", "--config", "/y.json"])).unwrap(),
            Command::Doctor { config: "/y.json".into(), json: true }
        );
        // --json alone, with the daemon or with --status is a usage error.
        assert!(parse(&args(&["--json"])).is_err());
        assert!(parse(&args(&["-s", "--json"])).is_err());
        assert!(parse(&args(&["detach", "--json"])).is_err());
        // One subcommand at a time; `status` is not `--status`.
        assert!(parse(&args(&["status", "doctor"])).is_err());
        assert!(parse(&args(&["detach", "status"])).is_err());
        assert!(parse(&args(&["status", "--status"])).is_err());
        assert!(parse(&args(&["doctor", "-w", "3"])).is_err());
        // The existing forms are unchanged.
        assert_eq!(parse(&args(&["detach"])).unwrap(), Command::Detach { config: c() });
        assert_eq!(parse(&args(&["--status"])).unwrap(), Command::Status { config: c(), wait_secs: 0 });
    }

    #[test]
    fn help_is_answered_after_every_subcommand() {
        for line in [
            &["--help"][..],
            &["policy", "explain", "--help"],
            &["policy", "explain", "--rules", "r.json", "-h"],
            &["audit", "verify", "--help"],
            &["detach", "--help"],
            &["status", "--json", "--help"],
            &["doctor", "-h"],
            &["--status", "--wait", "5", "--help"],
        ] {
            assert_eq!(parse(&args(line)), Ok(Command::Help), "{line:?}");
        }
    }

    #[test]
    fn the_version_is_bare_under_the_reference_name() {
        let v = crate::VERSION;
        assert_eq!(version_line("/usr/sbin/azure-proxy-agent"), v);
        assert_eq!(version_line("azure-proxy-agent"), v);
        assert_eq!(version_line("/usr/sbin/guest-proxy-agent"), format!("guest-proxy-agent {v}"));
        assert_eq!(version_line("/tmp/azure-proxy-agent-old"), format!("guest-proxy-agent {v}"));
    }

    #[test]
    fn status_without_an_agent_is_not_finished() {
        // Port 9 on loopback: nothing listens there.
        let nowhere = std::env::temp_dir().join(format!("gpa-cli-no-agent-{}", std::process::id()));
        let file = StatusFile { log_dir: &nowhere, max_age: Duration::from_secs(60) };
        let outcome = status(&["127.0.0.1:9".parse().unwrap()], file, 0);
        assert_eq!(outcome.exit_code.code(), 1);
    }
}
