// SPDX-License-Identifier: MIT
//! `fake-host`: a faithful fake WireServer/HostGAPlugin/IMDS for system tests and the demo.
//! All logic lives in `gpa_system_tests::fake_host`; see `fake-host --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    gpa_system_tests::fake_host::run(std::env::args().skip(1))
}
