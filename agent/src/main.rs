// SPDX-License-Identifier: MIT
//! Thin binary: parse the command line, load the config, run the loop, map errors to exit
//! codes. Everything else lives in the library.

#![deny(unsafe_code)]
#![expect(clippy::print_stdout, clippy::print_stderr, reason = "a CLI prints its results")]

use std::process::ExitCode;

use gpa::cli::{self, Command};
use gpa::config::ValidatedConfig;
use gpa::proxy::EventLoop;
use gpa::{logger, sys};

/// Why the daemon stopped, mapped to documented exit codes (see `--help`).
#[derive(Debug)]
enum MainError {
    Usage(cli::UsageError),
    Config(gpa::config::ConfigError),
    Start(gpa::proxy::startup::StartError),
    Run(std::io::Error),
}

impl From<MainError> for ExitCode {
    fn from(e: MainError) -> Self {
        ExitCode::from(match e {
            MainError::Usage(_) => 64,
            MainError::Config(_) => 78,
            MainError::Start(_) | MainError::Run(_) => 70,
        })
    }
}

/// Stack of the thread that runs everything. Parsing the status document with fixed-capacity
/// serde-json-core structures needs deep frames (a few MiB in debug builds); the reservation
/// is virtual memory, only touched pages count.
const MAIN_STACK_BYTES: usize = 32 * 1024 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Before any thread exists: termination signals are only read through the signalfd.
    if let Err(e) = sys::block_signals() {
        eprintln!("guest-proxy-agent: cannot block signals: {e}");
        return ExitCode::from(70);
    }
    let worker = std::thread::Builder::new()
        .name("gpa".into())
        .stack_size(MAIN_STACK_BYTES)
        .spawn(move || run_and_report(&args));
    match worker.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        _ => ExitCode::from(70),
    }
}

fn run_and_report(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            let text = match &e {
                MainError::Usage(u) => u.to_string(),
                MainError::Config(c) => c.to_string(),
                MainError::Start(s) => format!("cannot start: {s}"),
                MainError::Run(r) => format!("event loop failed: {r}"),
            };
            eprintln!("guest-proxy-agent: {text}");
            logger::milestone(&format!("exiting: {text}"));
            e.into()
        }
    }
}

/// `policy explain`: the decision for one hypothetical request, from a rules file or the
/// newest rules snapshot the running agent wrote (`--live`).
fn explain(args: &cli::ExplainArgs) -> Result<ExitCode, MainError> {
    use gpa::policy::decide::CallerView;
    let rules = match &args.rules {
        Some(path) => std::fs::read(path).map_err(MainError::Run)?,
        None => {
            let config = ValidatedConfig::load(&args.config).map_err(MainError::Config)?;
            gpa::policy::snapshot::latest_input_rules(&config.log_dir).map_err(MainError::Run)?
        }
    };
    let endpoint = match args.endpoint.as_str() {
        "imds" => gpa::redirect::Endpoint::Imds,
        "wireserver" => gpa::redirect::Endpoint::WireServer,
        _ => gpa::redirect::Endpoint::HostGaPlugin,
    };
    let groups: Vec<&str> = args.groups.iter().map(String::as_str).collect();
    let caller = CallerView {
        uid: args.uid,
        user_name: args.user.as_deref(),
        groups: &groups,
        exe_path: args.exe.as_deref().map(str::as_bytes),
        process_name: None,
    };
    let report = gpa::policy::explain::explain(&rules, endpoint, &caller, args.method.as_bytes(), args.url.as_bytes());
    let mut out = String::new();
    let written = if args.json { report.write_json(&mut out) } else { report.write_human(&mut out) };
    written.map_err(|e| MainError::Run(std::io::Error::other(e)))?;
    println!("{}", out.trim_end());
    Ok(ExitCode::SUCCESS)
}

fn run(args: &[String]) -> Result<ExitCode, MainError> {
    match cli::parse(args).map_err(MainError::Usage)? {
        Command::Help => {
            print!("{}", cli::USAGE);
            Ok(ExitCode::SUCCESS)
        }
        Command::SelfTestHardening => {
            sys::harden::drop_capabilities().map_err(MainError::Run)?;
            sys::harden::install_seccomp().map_err(MainError::Run)?;
            let err = sys::harden::forbidden_call_result();
            if err.raw_os_error() == Some(libc::EPERM) {
                println!("forbidden syscall refused: {err}");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("forbidden syscall NOT refused: {err}");
                Ok(ExitCode::from(1))
            }
        }
        Command::Version => {
            let program = std::env::args().next().unwrap_or_default();
            println!("{}", cli::version_line(&program));
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { config } => {
            let config = ValidatedConfig::load(&config).map_err(MainError::Config)?;
            let Some(pins) = config.pin_dir else {
                println!("pinning is off (pinPath is empty): nothing to detach");
                return Ok(ExitCode::SUCCESS);
            };
            match gpa::redirect::detach_pinned(&pins) {
                Ok(n) => {
                    println!("removed {n} pins under {}", pins.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    println!("nothing pinned under {}", pins.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("guest-proxy-agent: detach failed: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Status { config, wait_secs } => {
            let config = ValidatedConfig::load(&config).map_err(MainError::Config)?;
            let recorded = gpa::listener::address_in_use(&config.state_dir, config.listen);
            let mut candidates = vec![recorded];
            if recorded != config.listen {
                candidates.push(config.listen);
            }
            let status_file = cli::StatusFile {
                log_dir: &config.log_dir,
                max_age: std::time::Duration::from_secs(2 * config.status_interval_secs + 5),
            };
            let outcome = cli::status(&candidates, status_file, wait_secs);
            println!("{}", outcome.message);
            Ok(ExitCode::from(outcome.exit_code))
        }
        Command::AuditVerify { key_file, files } => {
            let key = match key_file {
                None => None,
                Some(path) => {
                    let bytes = std::fs::read(&path).map_err(MainError::Run)?;
                    let doc = gpa::msp::key_doc::KeyDoc::parse(&bytes)
                        .map_err(|e| MainError::Run(std::io::Error::other(format!("{}: {e:?}", path.display()))))?;
                    let key = doc.signing_key().map_err(|e| MainError::Run(std::io::Error::other(format!("{e:?}"))))?;
                    Some(gpa::audit::derive_checkpoint_key(|label| key.mac(label)))
                }
            };
            let report = gpa::audit::verify_files(&files, key.as_ref());
            println!("{report}");
            Ok(if report.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::PolicyExplain(args) => explain(&args),
        Command::ShowStatus { config, json } => {
            let config = ValidatedConfig::load(&config).map_err(MainError::Config)?;
            let (exit, text) = gpa::status::view::show(&config.log_dir, json, wall_ms());
            if exit == gpa::status::view::ShowExit::Unreadable {
                eprintln!("guest-proxy-agent: {text}");
            } else {
                println!("{}", text.trim_end());
            }
            Ok(ExitCode::from(exit.code()))
        }
        Command::Doctor { config, json } => {
            let config = ValidatedConfig::load(&config).map_err(MainError::Config)?;
            let (code, text) = gpa::doctor::run(&config, json, &gpa::doctor::Environment::system(wall_ms()));
            println!("{}", text.trim_end());
            Ok(ExitCode::from(code))
        }
        Command::Run { config, early } => {
            let mut config = ValidatedConfig::load(&config).map_err(MainError::Config)?;
            if early {
                // Before the network the host's modes are unknown: intercept everything and
                // let the first status document narrow it (docs/EARLY-BOOT.md).
                config.early = true;
                config.redirect = gpa::config::RedirectPolicy::All;
            }
            logger::init(config.log_level, config.telemetry.as_ref().map(|t| t.level));
            // No core dumps and no same-uid ptrace: the key lives in this process.
            if let Err(e) = sys::set_not_dumpable() {
                log::warn!(target: "gpa::main", "cannot clear the dumpable flag: {e}");
            }
            let mut event_loop = EventLoop::start(config).map_err(MainError::Start)?;
            // Everything privileged is done: keep only what the loop needs (sys::harden). After
            // a failed attach it waits for the retry that succeeds.
            event_loop.harden();
            logger::milestone(&format!("started, version {}", gpa::VERSION));
            // Type=notify: the unit is "started" only now that the redirect is armed and the
            // listener serves, so units ordered after it (network-pre) wait for protection. A
            // redirector that failed is reported instead (`--status` exits 2 with the cause)
            // and retried: waiting here would only let systemd kill the one process that can
            // say what went wrong.
            if let Err(e) = sys::sd_notify("READY=1") {
                log::warn!(target: "gpa::main", "cannot notify systemd: {e}");
            }
            event_loop.run().map_err(MainError::Run)?;
            logger::milestone("stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Wall-clock now in Unix milliseconds.
fn wall_ms() -> u64 {
    u64::try_from(gpa::clock::wall_now().as_millis()).unwrap_or(u64::MAX)
}
