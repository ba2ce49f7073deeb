// SPDX-License-Identifier: MIT
//! Process hardening (issue 8 item 5): after start-up the agent keeps only the capabilities it
//! needs, cannot gain privileges, and runs under a seccomp filter that refuses other calls.

#![allow(clippy::tests_outside_test_module, reason = "integration test crate: every function here is a test")]

use gpa_system_tests::harness::{NO_EXTRA, World, binary};
use gpa_system_tests::require_privileged;

/// CAP_NET_ADMIN (12) and CAP_SYS_PTRACE (19).
const KEPT: u64 = (1 << 12) | (1 << 19);

fn field(status: &str, name: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default()
}

#[test]
fn the_running_event_loop_thread_is_hardened() {
    require_privileged!();
    let e = World::new("harden", &["--mode", "enforce"]).ready(NO_EXTRA);
    let agent = &e.agent;
    let pid = agent.proc.pid();
    // The event loop runs on the thread named "gpa" (see main.rs).
    let task = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(Result::ok)
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "gpa"))
        .expect("event loop thread");
    let status = std::fs::read_to_string(task.path().join("status")).expect("status");
    let eff = u64::from_str_radix(&field(&status, "CapEff:"), 16).expect("CapEff");
    let bnd = u64::from_str_radix(&field(&status, "CapBnd:"), 16).expect("CapBnd");
    assert_eq!(eff, KEPT, "effective capabilities: {eff:x}\n{}", agent.log());
    assert_eq!(bnd, KEPT, "bounding set: {bnd:x}");
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    assert_eq!(field(&status, "Seccomp:"), "2", "seccomp filter mode");
    assert!(agent.log().contains("hardened: capabilities dropped, seccomp filter installed"), "{}", agent.log());
}

#[test]
fn a_forbidden_syscall_is_refused_under_the_filter() {
    require_privileged!();
    let out =
        std::process::Command::new(binary("guest-proxy-agent")).arg("--self-test-hardening").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("forbidden syscall refused"), "{text}");
}
