// SPDX-License-Identifier: MIT
//! Guards and helpers for the privileged system tests: every test makes its own network
//! namespace and its own child cgroup, runs the fake host and the agent inside them, and
//! removes everything on drop — also when the test fails.
//!
//! Safety rules (never relaxed): the metadata addresses exist only on the loopback of a
//! namespace made here; the agent attaches only to a child cgroup made here; processes are
//! ended by their own pid.

use std::ffi::CString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short name for this test's resources (`gpa<pid>x<n>`, fits IFNAMSIZ-like limits).
pub fn unique(tag: &str) -> String {
    format!("gpa-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Why the privileged tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    #[expect(unsafe_code, reason = "one libc call")]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some("not root: eBPF, cgroups and network namespaces need root".into());
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup v2 mount".into());
    }
    for tool in ["ip", "nsenter", "curl", "setpriv", "python3"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} not installed"));
        }
    }
    if !Path::new("/sys/fs/bpf").exists() && !Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists() {
        return Some("kernel without BPF syscall".into());
    }
    None
}

/// Skips the calling test with a printed reason when the machine cannot run it.
#[macro_export]
macro_rules! require_privileged {
    () => {
        if let Some(reason) = $crate::harness::skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

/// The cgroup v2 mount point.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(PathBuf::from)
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A network namespace with loopback up and the metadata addresses on its loopback.
#[derive(Debug)]
pub struct Netns {
    /// `ip netns` name.
    pub name: String,
}

impl Netns {
    /// Creates the namespace.
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        for addr in ["169.254.169.254/32", "168.63.129.16/32"] {
            run(Command::new("ip").args(["-n", &ns.name, "addr", "add", addr, "dev", "lo"]));
        }
        ns
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A command that runs `program` inside the namespace (nsenter keeps /sys and the cgroup
    /// mounts, unlike `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it opens live there).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = fs::File::open(&path).expect("open netns");
                // SAFETY: a valid namespace fd; setns only affects this scoped thread.
                #[expect(unsafe_code, reason = "setns for the calling thread only")]
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// Writes a sysctl inside the namespace (`net.*` only).
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run(self.command("sh").args(["-c", &format!("echo {value} > {path}")]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        drop(Command::new("ip").args(["netns", "del", &self.name]).status());
    }
}

/// A child cgroup of the cgroup v2 root, made by this test.
#[derive(Debug)]
pub struct Cgroup {
    /// Its directory.
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates it.
    pub fn new(tag: &str) -> Self {
        let path = cgroup2_root().expect("cgroup2").join(unique(tag));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// Pids currently in it.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Only processes this test put there: end them by pid, then remove the directory.
        for pid in self.pids() {
            kill(pid, libc::SIGKILL);
        }
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) with a pid this test started.
    #[expect(unsafe_code, reason = "one libc call")]
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A child process ended by its pid on drop.
#[derive(Debug)]
pub struct Proc {
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(0)
    }

    /// Sends a signal, only while the child has not been reaped (a reaped pid may already
    /// belong to another process).
    pub fn signal(&mut self, signal: i32) {
        if let Ok(None) = self.child.try_wait() {
            kill(self.pid(), signal);
        }
    }

    /// Waits up to `timeout` for exit; returns the exit status if it exited.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_timeout(Duration::from_secs(3)).is_none() {
                self.signal(libc::SIGKILL);
                drop(self.child.wait());
            }
        }
    }
}

/// Path of a workspace binary (built by `build/system-tests` before the tests run).
pub fn binary(name: &str) -> PathBuf {
    let var = format!("GPA_BIN_{}", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| manifest.join("../target"), PathBuf::from);
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} not built (run build/system-tests, or set {var})", path.display());
    path
}

/// The fake MSP host running inside a namespace.
#[derive(Debug)]
pub struct FakeHost {
    /// The process.
    pub proc: Proc,
    /// Control API address (inside the namespace).
    pub control: SocketAddr,
}

impl FakeHost {
    /// Starts it on the real metadata addresses inside `ns`.
    pub fn start(ns: &Netns, mode: &str) -> Self {
        Self::start_with(ns, &["--mode", mode])
    }

    /// Starts it with extra arguments.
    pub fn start_with(ns: &Netns, extra: &[&str]) -> Self {
        let mut cmd = ns.command(binary("fake-host").to_str().expect("utf-8 path"));
        cmd.args([
            "--imds",
            "169.254.169.254:80",
            "--wireserver",
            "168.63.129.16:80",
            "--hostga",
            "168.63.129.16:32526",
            "--control",
            "127.0.0.1:8899",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn fake-host");
        let stdout = child.stdout.take().expect("stdout");
        let proc = Proc { child };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("fake-host ready line");
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("fake-host said {line:?}: {e}"));
        let control = ready["control"].as_str().expect("control address").parse().expect("address");
        Self { proc, control }
    }

    /// GET on the control API.
    pub fn get(&self, ns: &Netns, path: &str) -> Value {
        let body = http(ns, self.control, "GET", path, &[], b"").1;
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("control {path}: {e}: {}", String::from_utf8_lossy(&body)))
    }

    /// POST /control with a JSON patch.
    pub fn control(&self, ns: &Netns, patch: &Value) -> Value {
        let body = http(
            ns,
            self.control,
            "POST",
            "/control",
            &[("content-type", "application/json")],
            patch.to_string().as_bytes(),
        )
        .1;
        serde_json::from_slice(&body).expect("control answer")
    }

    /// Every request recorded so far.
    pub fn requests(&self, ns: &Netns) -> Vec<Value> {
        self.get(ns, "/requests").as_array().cloned().unwrap_or_default()
    }

    /// Clears the request record.
    pub fn reset_requests(&self, ns: &Netns) {
        http(ns, self.control, "POST", "/reset-requests", &[], b"");
    }
}

/// One blocking HTTP/1.1 request from inside `ns` (no redirect: the test process is not in
/// the agent's cgroup). Returns (status, body).
pub fn http(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let (method, path) = (method.to_owned(), path.to_owned());
    let headers: Vec<(String, String)> = headers.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
    let body = body.to_vec();
    ns.within(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in &headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("write");
        s.write_all(&body).expect("write body");
        let mut resp = Vec::new();
        drop(s.read_to_end(&mut resp));
        let text = String::from_utf8_lossy(&resp);
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let at = resp.windows(4).position(|w| w == b"\r\n\r\n").map_or(resp.len(), |p| p + 4);
        (status, resp[at..].to_vec())
    })
}

/// The agent running inside a namespace, attached to a test cgroup.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its state directory (keys).
    pub state_dir: PathBuf,
    /// Its log directory (status, audit).
    pub log_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// stderr capture.
    pub stderr: PathBuf,
    /// A base directory this guard created and removes on drop.
    owned_base: Option<PathBuf>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Stop the process first (Proc's own drop runs after this body).
        self.proc.signal(libc::SIGTERM);
        let _exited = self.proc.wait_timeout(Duration::from_secs(3));
        if let Some(base) = &self.owned_base {
            drop(fs::remove_dir_all(base));
        }
    }
}

/// The one scratch-directory guard of the system tests: a directory under the temp dir (an
/// agent's state/log root that must survive a restart, request files, a file to upload),
/// removed with everything in it on drop, also when the test fails. World-traversable (0755)
/// whatever the umask, so non-root clients (`setpriv` callers) can read files placed in it.
/// Derefs to its path; declare it before the agents that use it, so they stop first.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        fs::create_dir_all(&path).expect("temp dir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        Self(path)
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(fs::remove_dir_all(&self.0));
    }
}

/// The usual test world before its agent: a network namespace made here, the fake host on
/// the metadata addresses inside it, and a child cgroup for the agent. One builder for the
/// test files whose worlds are this and nothing more; a file that needs more (a scratch
/// directory, its own checks) wraps or extends it. Fields drop in declaration order: the fake
/// host stops, then the cgroup is emptied and removed, then the namespace is deleted.
#[derive(Debug)]
pub struct World {
    pub host: FakeHost,
    pub cg: Cgroup,
    pub ns: Netns,
}

impl World {
    /// Namespace and cgroup named after `tag`, the fake host started with `fake_host_args`
    /// (e.g. `["--mode", "enforce"]`).
    pub fn new(tag: &str, fake_host_args: &[&str]) -> Self {
        let ns = Netns::new(tag);
        let cg = Cgroup::new(tag);
        let host = FakeHost::start_with(&ns, fake_host_args);
        Self { host, cg, ns }
    }

    /// Changes the fake host through its control port; panics if it refuses the patch.
    pub fn control(&self, patch: &Value) {
        let answer = self.host.control(&self.ns, patch);
        assert!(answer.get("error").is_none(), "control {patch} refused: {answer}");
    }

    /// Starts the agent with `extra` config keys (listening, not yet necessarily ready).
    pub fn with_agent(self, extra: &[&str]) -> Env {
        let agent = Agent::start(&self.ns, &self.cg, extra);
        Env { agent, host: self.host, cg: self.cg, ns: self.ns }
    }

    /// Starts the agent and waits until its key is latched.
    pub fn ready(self, extra: &[&str]) -> Env {
        let e = self.with_agent(extra);
        e.agent.wait_ready(&e.ns);
        e
    }
}

/// A [`World`] with its agent. Fields drop in declaration order: the agent stops first, then
/// the fake host, then the cgroup is emptied and removed, then the namespace is deleted.
#[derive(Debug)]
pub struct Env {
    pub agent: Agent,
    pub host: FakeHost,
    pub cg: Cgroup,
    pub ns: Netns,
}

impl Env {
    /// Changes the fake host through its control port; panics if it refuses the patch.
    pub fn control(&self, patch: &Value) {
        let answer = self.host.control(&self.ns, patch);
        assert!(answer.get("error").is_none(), "control {patch} refused: {answer}");
    }
}

/// Extra config keys for [`Agent::start`], as JSON fragments (`"key":value`).
pub const NO_EXTRA: &[&str] = &[];

impl Agent {
    /// Starts the agent in `ns`, attached to `cg`, with a fresh state directory.
    pub fn start(ns: &Netns, cg: &Cgroup, extra: &[&str]) -> Self {
        let agent = Self::spawn(ns, cg, extra);
        agent.wait_listening(ns);
        agent
    }

    /// Starts the agent with `base` as its state/log root (reused across restarts).
    pub fn start_in(ns: &Netns, cg: &Cgroup, base: &Path, extra: &[&str]) -> Self {
        Self::start_with_args(ns, cg, base, extra, &[])
    }

    /// Like [`Agent::start_in`], with extra command-line arguments (e.g. `--early`).
    pub fn start_with_args(ns: &Netns, cg: &Cgroup, base: &Path, extra: &[&str], args: &[&str]) -> Self {
        Self::start_full(ns, cg, base, extra, args, &[])
    }

    /// Like [`Agent::start_with_args`], with extra environment variables for the agent.
    pub fn start_full(
        ns: &Netns,
        cg: &Cgroup,
        base: &Path,
        extra: &[&str],
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        let agent = Self::spawn_full(ns, cg, base, extra, args, envs);
        agent.wait_listening(ns);
        agent
    }

    /// Starts the agent with a fresh state directory and returns at once, without waiting
    /// for its listener (for an agent that is expected not to have one).
    pub fn spawn(ns: &Netns, cg: &Cgroup, extra: &[&str]) -> Self {
        let base = std::env::temp_dir().join(unique("agent"));
        fs::create_dir_all(&base).expect("temp dir");
        let mut agent = Self::spawn_full(ns, cg, &base, extra, &[], &[]);
        agent.owned_base = Some(base);
        agent
    }

    fn spawn_full(ns: &Netns, cg: &Cgroup, base: &Path, extra: &[&str], args: &[&str], envs: &[(&str, &str)]) -> Self {
        let state_dir = base.join("state");
        let log_dir = base.join("log");
        let config = base.join("config.json");
        let mut json = format!(
            "{{\"cgroupPath\":\"{}\",\"stateDirectory\":\"{}\",\"logDirectory\":\"{}\",\"logLevel\":\"debug\",\"hostTimeoutMs\":1000",
            cg.path.display(),
            state_dir.display(),
            log_dir.display()
        );
        // Pinning is tested on purpose (with a private bpffs, see [`Bpffs`]); elsewhere it is
        // off so an aborted test run leaves nothing attached.
        if !extra.iter().any(|e| e.contains("\"pinPath\"")) {
            json.push_str(",\"pinPath\":\"\"");
        }
        // Likewise the listener hand-over: never the system's /run path from a test.
        if !extra.iter().any(|e| e.contains("\"handoverSocket\"")) {
            json.push_str(",\"handoverSocket\":\"\"");
        }
        for e in extra {
            json.push(',');
            json.push_str(e);
        }
        json.push('}');
        fs::write(&config, json).expect("config");
        let stderr = base.join("agent.stderr");
        let log = fs::OpenOptions::new().create(true).append(true).open(&stderr).expect("stderr file");
        let child = ns
            .command(binary("guest-proxy-agent").to_str().expect("utf-8"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        Self { proc: Proc { child }, state_dir, log_dir, config, stderr, owned_base: None }
    }

    fn wait_listening(&self, ns: &Netns) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let up = ns.within(|| {
                TcpStream::connect_timeout(&"127.0.0.1:3080".parse().expect("addr"), Duration::from_millis(200)).is_ok()
            });
            if up && self.log().contains("started, version") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent did not start:\n{}", self.log());
    }

    /// Waits until `/provision` says finished (key latched, or MSP disabled).
    pub fn wait_ready(&self, ns: &Netns) {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let (status, body) =
                http(ns, "127.0.0.1:3080".parse().expect("addr"), "GET", "/provision", &[("Metadata", "true")], b"");
            if status == 200 && String::from_utf8_lossy(&body).contains("\"finished\":true") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("agent never became ready:\n{}", self.log());
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The audit records so far (one JSON value per line).
    pub fn audit(&self) -> Vec<Value> {
        fs::read_to_string(self.log_dir.join("audit.ndjson"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// A private bpf filesystem mounted by this test (never the machine's `/sys/fs/bpf`), for
/// pinning tests; on drop every pin is removed (detaching what it held) and it is unmounted.
#[derive(Debug)]
pub struct Bpffs {
    /// Mount point.
    pub path: PathBuf,
}

impl Bpffs {
    /// Mounts a new instance.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        fs::create_dir_all(&path).expect("bpffs dir");
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path));
        Self { path }
    }

    /// The agent's `pinPath` config fragment for this mount.
    pub fn config(&self) -> String {
        format!("\"pinPath\":\"{}\"", self.path.join("gpa").display())
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        drop(Command::new("rm").arg("-rf").arg(self.path.join("gpa")).status());
        drop(Command::new("umount").arg(&self.path).status());
        drop(fs::remove_dir(&self.path));
    }
}

/// Programs attached to a cgroup, as `bpftool cgroup show` lists them (attach types).
pub fn attached_programs(cg: &Cgroup) -> Vec<String> {
    let out = Command::new("bpftool").args(["cgroup", "show"]).arg(&cg.path).output().expect("bpftool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// Retries `probe` every 200 ms until it yields a value; panics naming `what` after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every value of header `name` (case-insensitive) in a fake host request record, in arrival
/// order.
pub fn header_values(record: &Value, name: &str) -> Vec<String> {
    record["headers"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
                .filter_map(|h| h[1].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// How to run a client.
#[derive(Debug, Clone, Copy)]
pub struct As<'a> {
    /// `None`: root; `Some((uid, gid))`: via setpriv.
    pub ids: Option<(u32, u32)>,
    /// Put the client in this cgroup (the agent's), or leave it outside.
    pub cgroup: Option<&'a Cgroup>,
}

/// Root, inside the agent's cgroup.
pub fn root_in(cg: &Cgroup) -> As<'_> {
    As { ids: None, cgroup: Some(cg) }
}

/// A client process in `ns`: optionally moved into a cgroup first and run as another user.
pub fn client(ns: &Netns, who: As<'_>, argv: &[&str]) -> Output {
    let mut script = String::new();
    if let Some(cg) = who.cgroup {
        script.push_str(&format!("echo $$ > {}/cgroup.procs || exit 99; ", cg.path.display()));
    }
    script.push_str("exec ");
    if let Some((uid, gid)) = who.ids {
        script.push_str(&format!("setpriv --reuid={uid} --regid={gid} --clear-groups "));
    }
    script.push_str("\"$@\"");
    let out = ns.command("sh").arg("-c").arg(script).arg("sh").args(argv).output().expect("spawn client");
    assert_ne!(out.status.code(), Some(99), "could not join the cgroup");
    out
}

/// `curl -s -i` output of a client as (status, headers+body text).
pub fn curl(ns: &Netns, who: As<'_>, args: &[&str]) -> (u16, String) {
    let mut argv = vec!["curl", "-s", "-i", "-m", "10"];
    argv.extend_from_slice(args);
    let out = client(ns, who, &argv);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // The final status: interim `1xx` heads (`100 Continue` to a large upload) come first.
    let status = text
        .split("\r\n\r\n")
        .filter_map(|head| head.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()))
        .find(|status| *status >= 200)
        .unwrap_or(0);
    (status, text)
}

/// Runs a python3 snippet as a client; returns stdout.
pub fn python(ns: &Netns, who: As<'_>, code: &str) -> String {
    let out = client(ns, who, &["python3", "-c", code]);
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `CString` helper for callers that need raw paths.
pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL")
}
