// SPDX-License-Identifier: MIT
//! The sub-commands' bodies: what `guest-proxy-agent <command>` does once [`crate::cli`] has
//! parsed it, from loading the config to printing the result and choosing the exit status.
//!
//! Here rather than in `main.rs` so the binary stays a thin shell (block signals, start the
//! big-stack thread, report) and each body sits in the library next to what it calls. The
//! daemon itself is `run_daemon`; everything else is an operator command that reads and
//! prints.

#![expect(clippy::print_stdout, clippy::print_stderr, reason = "a CLI prints its results")]

use core::fmt;

use crate::cli::{self, Command};
use crate::config::ValidatedConfig;
use crate::exit::ExitStatus;
use crate::proxy::EventLoop;
use crate::{logger, sys};

/// Why a command stopped, mapped to the documented exit statuses (see `--help`).
#[derive(Debug)]
pub enum CommandError {
    /// The command line is wrong.
    Usage(cli::UsageError),
    /// The configuration file is missing or invalid.
    Config(crate::config::ConfigError),
    /// The daemon could not start.
    Start(crate::proxy::startup::StartError),
    /// A read, a write or the event loop failed.
    Run(std::io::Error),
}

impl CommandError {
    /// The exit status this failure ends the process with.
    pub const fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Usage(_) => ExitStatus::Usage,
            Self::Config(_) => ExitStatus::Config,
            Self::Start(_) | Self::Run(_) => ExitStatus::Software,
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(u) => write!(f, "{u}"),
            Self::Config(c) => write!(f, "{c}"),
            Self::Start(s) => write!(f, "cannot start: {s}"),
            Self::Run(r) => write!(f, "event loop failed: {r}"),
        }
    }
}

/// Parses the arguments (without the program name) and runs the command they name.
pub fn parse_and_run(args: &[String]) -> Result<ExitStatus, CommandError> {
    run(cli::parse(args).map_err(CommandError::Usage)?)
}

/// Runs one parsed command.
pub fn run(command: Command) -> Result<ExitStatus, CommandError> {
    match command {
        Command::Help => {
            print!("{}", cli::USAGE);
            Ok(ExitStatus::Success)
        }
        Command::SelfTestHardening => self_test_hardening(),
        Command::Version => {
            let program = std::env::args().next().unwrap_or_default();
            println!("{}", cli::version_line(&program));
            Ok(ExitStatus::Success)
        }
        Command::Detach { config } => detach(&config),
        Command::Status { config, wait_secs } => provisioning_status(&config, wait_secs),
        Command::AuditVerify { key_file, files } => audit_verify(key_file.as_deref(), &files),
        Command::PolicyExplain(args) => explain(&args),
        Command::ShowStatus { config, json } => show_status(&config, json),
        Command::Doctor { config, json } => doctor(&config, json),
        Command::Run { config, early } => run_daemon(&config, early),
    }
}

/// `self-test-hardening`: drops capabilities, installs the seccomp filter and checks that a
/// forbidden syscall is refused.
fn self_test_hardening() -> Result<ExitStatus, CommandError> {
    sys::harden::drop_capabilities().map_err(CommandError::Run)?;
    sys::harden::install_seccomp().map_err(CommandError::Run)?;
    let err = sys::harden::forbidden_call_result();
    if err.raw_os_error() == Some(libc::EPERM) {
        println!("forbidden syscall refused: {err}");
        Ok(ExitStatus::Success)
    } else {
        println!("forbidden syscall NOT refused: {err}");
        Ok(ExitStatus::Failure)
    }
}

/// `detach`: removes the pinned eBPF programs and maps.
fn detach(config: &std::path::Path) -> Result<ExitStatus, CommandError> {
    let config = ValidatedConfig::load(config).map_err(CommandError::Config)?;
    let Some(pins) = config.pin_dir else {
        println!("pinning is off (pinPath is empty): nothing to detach");
        return Ok(ExitStatus::Success);
    };
    match crate::redirect::detach_pinned(&pins) {
        Ok(n) => {
            println!("removed {n} pins under {}", pins.display());
            Ok(ExitStatus::Success)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("nothing pinned under {}", pins.display());
            Ok(ExitStatus::Success)
        }
        Err(e) => {
            eprintln!("guest-proxy-agent: detach failed: {e}");
            Ok(ExitStatus::Failure)
        }
    }
}

/// `--status [--wait N]`: asks the running agent whether provisioning finished.
fn provisioning_status(config: &std::path::Path, wait_secs: u64) -> Result<ExitStatus, CommandError> {
    let config = ValidatedConfig::load(config).map_err(CommandError::Config)?;
    let recorded = crate::listener::address_in_use(&config.state_dir, config.listen);
    let mut candidates = vec![recorded];
    if recorded != config.listen {
        candidates.push(config.listen);
    }
    let status_file = cli::StatusFile {
        log_dir: &config.log_dir,
        max_age: std::time::Duration::from_secs(
            2 * config.status_interval_secs + crate::limits::STATUS_FILE_GRACE_SECS,
        ),
    };
    let outcome = cli::status(&candidates, status_file, wait_secs);
    println!("{}", outcome.message);
    Ok(outcome.exit_code)
}

/// `audit verify [--key-file K] FILE...`: checks the audit hash chain.
fn audit_verify(key_file: Option<&std::path::Path>, files: &[std::path::PathBuf]) -> Result<ExitStatus, CommandError> {
    let key = match key_file {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path).map_err(CommandError::Run)?;
            let doc = crate::msp::key_doc::KeyDoc::parse(&bytes)
                .map_err(|e| CommandError::Run(std::io::Error::other(format!("{}: {e:?}", path.display()))))?;
            let key = doc.signing_key().map_err(|e| CommandError::Run(std::io::Error::other(format!("{e:?}"))))?;
            Some(crate::audit::derive_checkpoint_key(|label| key.mac(label)))
        }
    };
    let report = crate::audit::verify_files(files, key.as_ref());
    println!("{report}");
    Ok(ExitStatus::success_if(report.is_ok()))
}

/// `policy explain`: the decision for one hypothetical request, from a rules file or the
/// newest rules snapshot the running agent wrote (`--live`).
fn explain(args: &cli::ExplainArgs) -> Result<ExitStatus, CommandError> {
    use crate::policy::decide::CallerView;
    let rules = match &args.rules {
        Some(path) => std::fs::read(path).map_err(CommandError::Run)?,
        None => {
            let config = ValidatedConfig::load(&args.config).map_err(CommandError::Config)?;
            crate::policy::snapshot::latest_input_rules(&config.log_dir).map_err(CommandError::Run)?
        }
    };
    let endpoint = match args.endpoint.as_str() {
        "imds" => crate::redirect::Endpoint::Imds,
        "wireserver" => crate::redirect::Endpoint::WireServer,
        _ => crate::redirect::Endpoint::HostGaPlugin,
    };
    let groups: Vec<&str> = args.groups.iter().map(String::as_str).collect();
    let caller = CallerView {
        uid: args.uid,
        user_name: args.user.as_deref(),
        groups: &groups,
        exe_path: args.exe.as_deref().map(str::as_bytes),
        process_name: None,
    };
    let report =
        crate::policy::explain::explain(&rules, endpoint, &caller, args.method.as_bytes(), args.url.as_bytes());
    let mut out = String::new();
    let written = if args.json { report.write_json(&mut out) } else { report.write_human(&mut out) };
    written.map_err(|e| CommandError::Run(std::io::Error::other(e)))?;
    println!("{}", out.trim_end());
    Ok(ExitStatus::Success)
}

/// `status [--json]`: shows `<logDirectory>/status.json`.
fn show_status(config: &std::path::Path, json: bool) -> Result<ExitStatus, CommandError> {
    let config = ValidatedConfig::load(config).map_err(CommandError::Config)?;
    let (exit, text) = crate::status::view::show(&config.log_dir, json, wall_ms());
    if exit == crate::status::view::ShowExit::Unreadable {
        eprintln!("guest-proxy-agent: {text}");
    } else {
        println!("{}", text.trim_end());
    }
    Ok(exit.exit_status())
}

/// `doctor [--json]`: read-only health checks.
fn doctor(config: &std::path::Path, json: bool) -> Result<ExitStatus, CommandError> {
    let config = ValidatedConfig::load(config).map_err(CommandError::Config)?;
    let (status, text) = crate::doctor::run(&config, json, &crate::doctor::Environment::system(wall_ms()));
    println!("{}", text.trim_end());
    Ok(status)
}

/// The daemon: loads the config, starts the event loop, hardens, tells systemd and runs
/// until SIGTERM or SIGINT.
fn run_daemon(config: &std::path::Path, early: bool) -> Result<ExitStatus, CommandError> {
    let mut config = ValidatedConfig::load(config).map_err(CommandError::Config)?;
    if early {
        // Before the network the host's modes are unknown: intercept everything and
        // let the first status document narrow it (docs/EARLY-BOOT.md).
        config.early = true;
        config.redirect = crate::config::RedirectPolicy::All;
    }
    logger::init(config.log_level, config.telemetry.as_ref().map(|t| t.level));
    // No core dumps and no same-uid ptrace: the key lives in this process.
    if let Err(e) = sys::set_not_dumpable() {
        log::warn!(target: "gpa::main", "cannot clear the dumpable flag: {e}");
    }
    let mut event_loop = EventLoop::start(config).map_err(CommandError::Start)?;
    // Everything privileged is done: keep only what the loop needs (sys::harden). After
    // a failed attach it waits for the retry that succeeds.
    event_loop.harden();
    logger::milestone(&format!("started, version {}", crate::VERSION));
    // Type=notify: the unit is "started" only now that the redirect is armed and the
    // listener serves, so units ordered after it (network-pre) wait for protection. A
    // redirector that failed is reported instead (`--status` exits 2 with the cause)
    // and retried: waiting here would only let systemd kill the one process that can
    // say what went wrong.
    if let Err(e) = sys::sd_notify("READY=1") {
        log::warn!(target: "gpa::main", "cannot notify systemd: {e}");
    }
    event_loop.run().map_err(CommandError::Run)?;
    logger::milestone("stopped");
    Ok(ExitStatus::Success)
}

/// Wall-clock now in Unix milliseconds.
fn wall_ms() -> u64 {
    u64::try_from(crate::clock::wall_now().as_millis()).unwrap_or(u64::MAX)
}
