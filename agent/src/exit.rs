// SPDX-License-Identifier: MIT
//! The process exit statuses, named: every exit code the binary can produce comes from here,
//! so the numbers `--help` documents (see [`crate::cli::USAGE`]) and operators script against
//! are written once.
//!
//! The daemon's failures use the `sysexits.h` codes (64, 70, 78); the operator commands answer
//! with 0, 1 and 2, whose meaning each command's help line gives.

use std::process::ExitCode;

/// How the process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// 0: done, and the answer is "good" (ready, intact, no check failed, `SUCCESS`); the
    /// daemon stopped by SIGTERM or SIGINT.
    Success,
    /// 1: the command ran and the answer is "not good": provisioning has not finished
    /// (`--status`), the document says `ERROR` (`status`), a check failed (`doctor`), the
    /// chain is broken (`audit verify`), detaching failed, or the forbidden syscall was not
    /// refused (`self-test-hardening`).
    Failure,
    /// 2: worse than [`Self::Failure`], waiting will not change it: provisioning finished with
    /// an error (`--status`), or there is no readable status document (`status`).
    Severe,
    /// 64 (`EX_USAGE`): the command line is wrong.
    Usage,
    /// 70 (`EX_SOFTWARE`): the daemon could not start or its event loop failed.
    Software,
    /// 78 (`EX_CONFIG`): the configuration file is missing or invalid.
    Config,
}

impl ExitStatus {
    /// The number the process exits with.
    pub const fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Failure => 1,
            Self::Severe => 2,
            Self::Usage => 64,
            Self::Software => 70,
            Self::Config => 78,
        }
    }

    /// [`Self::Success`] when `ok`, else [`Self::Failure`].
    pub const fn success_if(ok: bool) -> Self {
        if ok { Self::Success } else { Self::Failure }
    }
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        Self::from(status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_the_documented_ones() {
        let all = [
            ExitStatus::Success,
            ExitStatus::Failure,
            ExitStatus::Severe,
            ExitStatus::Usage,
            ExitStatus::Software,
            ExitStatus::Config,
        ];
        assert_eq!(all.map(ExitStatus::code), [0, 1, 2, 64, 70, 78]);
        assert_eq!(ExitStatus::success_if(true), ExitStatus::Success);
        assert_eq!(ExitStatus::success_if(false), ExitStatus::Failure);
    }
}
