// SPDX-License-Identifier: MIT
//! Thin binary: block signals, run the command on a thread with a big stack, report a failure
//! and exit with its status. Parsing and the commands' bodies live in the library
//! ([`gpa::cli`], [`gpa::commands`]).

#![deny(unsafe_code)]
#![expect(clippy::print_stderr, reason = "a failure is reported on stderr")]

use std::process::ExitCode;

use gpa::exit::ExitStatus;
use gpa::{commands, logger, sys};

/// Stack of the thread that runs everything. Parsing the status document with fixed-capacity
/// serde-json-core structures needs deep frames (a few MiB in debug builds); the reservation
/// is virtual memory, only touched pages count.
const MAIN_STACK_BYTES: usize = 32 * 1024 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Before any thread exists: termination signals are only read through the signalfd.
    if let Err(e) = sys::block_signals() {
        eprintln!("guest-proxy-agent: cannot block signals: {e}");
        return ExitStatus::Software.into();
    }
    let worker = std::thread::Builder::new()
        .name("gpa".into())
        .stack_size(MAIN_STACK_BYTES)
        .spawn(move || run_and_report(&args));
    match worker.map(std::thread::JoinHandle::join) {
        Ok(Ok(status)) => status.into(),
        _ => ExitStatus::Software.into(),
    }
}

fn run_and_report(args: &[String]) -> ExitStatus {
    commands::parse_and_run(args).unwrap_or_else(|e| {
        eprintln!("guest-proxy-agent: {e}");
        logger::milestone(&format!("exiting: {e}"));
        e.exit_status()
    })
}
