// SPDX-License-Identifier: MIT
//! Start-up: the table sized to the descriptors, the listener bound (or taken from the early
//! agent), the redirector attached, the process hardened; and the retries of a start step
//! that failed. A failed step does not stop the daemon: it is reported (`status.json`,
//! `/provision`, `--status`) and retried with backoff, because a process that exits loses
//! the cause and systemd gives up on it after a few restarts (issue 14).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::unix::SourceFd;
use mio::{Interest, Poll};

use super::body_pool::BodyPool;
use super::connection::Buffers;
use super::handover::Handover;
use super::services::{Provision, Services, StartStep, Stats};
use super::shares::Shares;
use super::upstream_pool::UpstreamPool;
use super::{EventLoop, HANDOVER_OFFER, LISTENER, SIGNALS, Slot};
use crate::audit::AuditTrail;
use crate::config::{CallerIdentity, ValidatedConfig};
use crate::identity::Resolver;
use crate::limits::{BIND_ATTEMPTS_AT_START, BIND_RETRY_MS, LISTEN_BACKLOG, START_RETRY_FIRST_MS, START_RETRY_MAX_MS};
use crate::msp::key_keeper::{KeeperConfig, KeyKeeper};
use crate::policy::Policy;
use crate::redirect::{AttachOptions, RedirectError, Redirector, TaskIdentity};
use crate::status::{StatusWriter, Summaries};
use crate::sys::SignalFd;
use crate::telemetry::metadata::OsInfo;
use crate::telemetry::{Uploader, UploaderConfig};
use crate::{clock, logger, telemetry};

/// Which start step failed (for [`EventLoop::start_step_failed`]).
#[derive(Debug, Clone, Copy)]
enum Step {
    Listener,
    Redirector,
}

/// Why the daemon could not start.
#[derive(Debug)]
pub enum StartError {
    /// `mio::Poll` or the signalfd could not be created.
    Poll(io::Error),
    /// The listener could not be bound.
    Bind(SocketAddrV4, io::Error),
    /// The redirector could not load or attach.
    Redirect(RedirectError),
    /// No cgroup v2 mount was found and none was configured.
    NoCgroup2,
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Poll(e) => write!(f, "cannot create the event loop: {e}"),
            Self::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            Self::Redirect(e) => write!(f, "{e}"),
            Self::NoCgroup2 => f.write_str("no cgroup v2 mount found (mount one or set cgroupPath)"),
        }
    }
}

impl std::error::Error for StartError {}

impl EventLoop {
    /// Binds, loads and attaches everything; the redirect policy starts empty and follows the
    /// key keeper (or intercepts everything with `redirect: all`).
    pub fn start(config: ValidatedConfig) -> Result<Self, StartError> {
        let started = clock::now();
        // Two descriptors per slot (client and upstream) plus the loop's own: a full table must
        // never run the process out of descriptors (issue 13). The unit's LimitNOFILE allows it.
        let wanted = 2 * config.max_connections as u64 + crate::limits::FD_RESERVE;
        let max_connections = match crate::sys::raise_nofile(wanted) {
            Ok((soft, _)) if soft < wanted => {
                // A table the descriptors cannot back would end in EMFILE, where the queue
                // stalls; a smaller table ends in `503`, which drains it and keeps the root
                // reserve meaningful.
                let fits = usize::try_from(soft.saturating_sub(crate::limits::FD_RESERVE) / 2).unwrap_or(0);
                let fits = fits.max(config.caps.root_reserved_connections + 1).min(config.max_connections);
                log::warn!(
                    target: "gpa::loop",
                    "descriptor limit {soft} is below the {wanted} a table of {} needs (raise LimitNOFILE): serving {fits} connections",
                    config.max_connections
                );
                fits
            }
            Ok(_) => config.max_connections,
            Err(e) => {
                log::warn!(target: "gpa::loop", "cannot read or raise RLIMIT_NOFILE: {e}");
                config.max_connections
            }
        };
        // The caps follow the table actually served: a smaller table scales the shares down.
        let mut caps = config.caps;
        if max_connections < config.max_connections {
            let fit = crate::config::Caps::for_table(max_connections);
            caps.per_uid_connections = caps.per_uid_connections.min(fit.per_uid_connections);
            caps.per_cgroup_connections = caps.per_cgroup_connections.min(fit.per_cgroup_connections);
            caps.root_reserved_connections = caps.root_reserved_connections.min(fit.root_reserved_connections);
            caps.per_uid_upstreams = caps.per_uid_upstreams.min(fit.per_uid_upstreams);
        }
        // Early boot has `lo` down; the listener needs it. Failure shows up at bind.
        drop(crate::sys::loopback_up());
        let poll = Poll::new().map_err(StartError::Poll)?;
        let signals = SignalFd::new().map_err(StartError::Poll)?;
        poll.registry()
            .register(&mut SourceFd(&signals.raw()), SIGNALS, Interest::READABLE)
            .map_err(StartError::Poll)?;
        // A listener that cannot be bound does not stop the daemon either: it is reported
        // and retried like the redirector (issue 14).
        let (listener, taker, shared_listener) = match listener_for(&config, BIND_ATTEMPTS_AT_START) {
            Ok((listener, taker, shared)) => (Ok(listener), taker, shared),
            Err(e @ StartError::Bind(..)) => (Err(e.to_string()), None, false),
            Err(e) => return Err(e),
        };

        let cgroup = match &config.cgroup {
            Some(p) => p.clone(),
            None => crate::redirect::find_cgroup2_root().ok_or(StartError::NoCgroup2)?,
        };
        // Read now: the seccomp filter installed after start does not allow `sysinfo`.
        let telemetry = config.telemetry.map(|t| {
            let uploader = UploaderConfig {
                wire_server: config.wire_server,
                imds: config.imds,
                mark: config.agent_mark,
                timeout_ms: config.host_timeout_ms,
                interval: Duration::from_secs(t.interval_secs),
            };
            Uploader::new(uploader, OsInfo::collect(), clock::now())
        });

        secure_rules_dir(&config.state_dir.join("rules"));
        let keeper = KeyKeeper::new(
            KeeperConfig {
                host: config.wire_server,
                mark: config.agent_mark,
                timeout_ms: config.host_timeout_ms,
                interval: Duration::from_secs(config.poll_interval_secs),
            },
            &config.state_dir,
            clock::now(),
        );
        let handover = match taker {
            Some(taker) => Handover::taking(taker, started),
            None if config.early => Handover::offer(&config, poll.registry(), HANDOVER_OFFER),
            None => Handover::None,
        };
        let slots = Buffers::arena(max_connections)
            .into_iter()
            .map(|bufs| Slot { conn: None, spare: Some(bufs) })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let free = (0..max_connections).rev().collect();
        let mut this = Self {
            poll,
            listener: None,
            accepting: false,
            handover,
            listen: config.listen,
            signals,
            slots,
            free,
            live: 0,
            no_identity_live: 0,
            redrive: Vec::new(),
            accept_retry: None,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            services: Services {
                pool: BodyPool::new(),
                upstream_pool: UpstreamPool::default(),
                agent_mark: config.agent_mark,
                upstream_timeout_ms: config.upstream_timeout_ms,
                stats: Stats::default(),
                keeper,
                provision: Provision::new(clock::now()),
                policy: Policy::new(),
                rules_dir: config.state_dir.join("rules"),
                summaries: Summaries::new(),
                status_writer: StatusWriter::new(&config.log_dir),
                status_buf: crate::status::new_buffer(),
                log_dir: config.log_dir.clone(),
                ebpf: StartStep::starting("eBPF redirector is starting"),
                listener: StartStep::starting("Proxy listener is starting"),
                draining: false,
                telemetry,
                shares: Shares::new(caps),
                audit: match AuditTrail::open(&config.log_dir, &caps) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        log::error!(target: "gpa::loop", "audit log disabled: cannot open it in {}: {e}", config.log_dir.display());
                        None
                    }
                },
            },
            redirector: None,
            cgroup,
            keep_records: shared_listener,
            start_retry: None,
            harden_pending: false,
            resolver: Resolver::new(),
            config,
            routes: [false; 3],
            netns_cookie: 0,
            next_status: clock::now(),
            audited_key: None,
        };
        match listener {
            Ok(listener) => {
                this.install_listener(listener, shared_listener, started).map_err(StartError::Poll)?;
                this.attach_redirector(started);
            }
            Err(why) => this.listener_unavailable(&why, clock::now()),
        }
        let started = format!(
            "pid {}, version {}, caller identity {}, {} connections",
            std::process::id(),
            env!("CARGO_PKG_VERSION"),
            match this.redirector.as_ref().map(Redirector::task_identity) {
                Some(TaskIdentity::Kernel) => "kernel",
                Some(TaskIdentity::Procfs(_)) => "procfs",
                None => "none (redirector not attached)",
            },
            max_connections
        );
        this.audit_event("start", &started);
        Ok(this)
    }

    /// Takes `listener` into the loop: registered unless it is shared with an early agent
    /// that still accepts from it (it is registered at the hand-over), its address recorded
    /// for `--status`, its namespace noted for the redirect.
    fn install_listener(&mut self, mut listener: TcpListener, shared: bool, started: Instant) -> io::Result<()> {
        // A listener shared with the early agent is accepted on only once this agent is armed
        // and latched; until then the early agent keeps accepting from the same queue.
        if !shared {
            self.poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        }
        self.accepting = !shared;
        self.netns_cookie = crate::sys::netns_cookie(listener.as_fd()).unwrap_or(0);
        self.listen = match listener.local_addr() {
            Ok(std::net::SocketAddr::V4(a)) => a,
            _ => self.config.listen,
        };
        if let Err(e) = crate::listener::record_address(&self.config.state_dir, self.listen) {
            log::warn!(target: "gpa::loop", "cannot record the listener address for --status: {e}");
        }
        logger::milestone(&format!(
            "proxy listener ready on {}{}",
            self.listen,
            if shared { " (shared by the early agent)" } else { "" }
        ));
        self.services.listener.succeeded(format!(
            "Started proxy listener, ready to accept request - {}",
            clock::now().saturating_duration_since(started).as_millis()
        ));
        self.next_status = clock::now();
        telemetry::module_status("ProxyServer", &self.services.listener.message);
        self.listener = Some(listener);
        Ok(())
    }

    /// The listener could not be bound: report it (`proxyListenerStatus` `STOPPED`, read by
    /// `--status` from `status.json`, since no socket answers `/provision`) and retry. The
    /// redirector waits: its redirect needs this socket.
    fn listener_unavailable(&mut self, why: &str, now: Instant) {
        self.services.ebpf.message = "eBPF redirector waits for the proxy listener".to_owned();
        self.start_step_failed(Step::Listener, format!("Failed to start proxy listener - {why}"), now);
    }

    /// A start step failed: said once (milestone, telemetry, status written now) until it
    /// succeeds, logged at each retry; the next try follows the backoff, 1 s doubling to
    /// [`START_RETRY_MAX_MS`]. A process that exits instead loses the cause, and systemd
    /// gives up on it after a few restarts.
    fn start_step_failed(&mut self, step: Step, message: String, now: Instant) {
        let wait_ms = self.start_retry.map_or(START_RETRY_FIRST_MS, |(_, wait)| wait);
        let (state, module) = match step {
            Step::Listener => (&mut self.services.listener, "ProxyServer"),
            Step::Redirector => (&mut self.services.ebpf, "Redirector"),
        };
        if state.record_failure(message) {
            logger::milestone(&format!("{}; retrying, nothing is redirected meanwhile", state.message));
            telemetry::module_status(module, &state.message);
            self.next_status = now;
        } else {
            log::warn!(target: "gpa::loop", "{}; next try in {wait_ms} ms", state.message);
        }
        self.start_retry = Some((clock::after(now, wait_ms), (wait_ms * 2).min(START_RETRY_MAX_MS)));
    }

    /// The retry timer fired: bind the listener if it is still missing (one attempt, the
    /// loop must not sleep), then attach the redirector.
    pub(super) fn retry_start(&mut self, now: Instant) {
        if self.listener.is_none() {
            match bind_listener(self.config.listen, 1) {
                Ok(listener) => {
                    if let Err(e) = self.install_listener(listener, false, now) {
                        self.listener_unavailable(&format!("cannot watch the listener: {e}"), now);
                        return;
                    }
                    self.start_retry = None;
                }
                Err(e) => {
                    self.listener_unavailable(&e.to_string(), now);
                    return;
                }
            }
        }
        self.attach_redirector(now);
    }

    /// Loads and attaches the redirector. A failure does not stop the agent: it is reported
    /// (`ebpfProgramStatus`, `/provision`, `--status`) and retried
    /// ([`Self::start_step_failed`]).
    fn attach_redirector(&mut self, started: Instant) {
        let Some(listener) = self.listener.as_ref() else { return };
        let attached = Redirector::attach(
            &self.cgroup,
            &AttachOptions {
                agent_mark: self.config.agent_mark,
                agent_tgid: crate::sys::getpid(),
                pins: self.config.pin_dir.as_deref(),
                listener: listener.as_fd(),
                netns_cookie: self.netns_cookie,
                kernel_identity: self.config.caller_identity == CallerIdentity::Kernel,
                keep_records: self.keep_records,
            },
        );
        let now = clock::now();
        let redirector = match attached {
            Ok(r) => r,
            Err(e) => {
                self.start_step_failed(Step::Redirector, format!("Failed to start redirector: {e}"), now);
                return;
            }
        };
        let attach_ms = now.saturating_duration_since(started).as_millis();
        let identity = match redirector.task_identity() {
            TaskIdentity::Kernel => "executable identity from the kernel's connect-time record".to_owned(),
            TaskIdentity::Procfs(why) => format!("executable identity from /proc only ({why})"),
        };
        logger::milestone(&format!(
            "eBPF redirector attached to {} in {attach_ms} ms; {identity}",
            self.cgroup.display()
        ));
        self.services.ebpf.succeeded(format!("Started Redirector with eBPF maps - {attach_ms}; {identity}"));
        self.start_retry = None;
        self.next_status = now;
        telemetry::module_status("Redirector", &self.services.ebpf.message);
        // Adopted pinned state keeps the previous agent's routes until the key latch decides.
        for (i, destination) in
            [self.config.wire_server, self.config.imds, self.config.host_ga_plugin].into_iter().enumerate()
        {
            self.routes[i] = redirector.routed(destination);
        }
        self.redirector = Some(redirector);
        self.apply_routes();
        if self.harden_pending {
            self.harden();
        }
    }

    /// Drops the capabilities and installs the seccomp filter (`sys::harden`) once everything
    /// privileged is done: now, or after the redirector's retry succeeds.
    pub fn harden(&mut self) {
        if self.redirector.is_none() {
            self.harden_pending = true;
            log::info!(target: "gpa::main", "hardening waits for the redirector (its retries need bpf())");
            return;
        }
        self.harden_pending = false;
        match crate::sys::harden::drop_capabilities().and_then(|()| crate::sys::harden::install_seccomp()) {
            Ok(()) => log::info!(target: "gpa::main", "hardened: capabilities dropped, seccomp filter installed"),
            Err(e) => log::error!(target: "gpa::main", "hardening failed, running with full privileges: {e}"),
        }
    }
}

/// Creates the customer rules folder 0700 and closes it to others if it exists (MSP §2.1);
/// `policy::local_rules` refuses files in a folder that is not.
fn secure_rules_dir(dir: &std::path::Path) {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let made = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
    let fixed = made.and_then(|()| {
        let meta = std::fs::symlink_metadata(dir)?;
        if meta.is_dir() && meta.uid() == crate::sys::geteuid() && meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    });
    if let Err(e) = fixed {
        log::warn!(target: "gpa::loop", "rules folder {} not secured: {e}", dir.display());
    }
}

/// The proxy listener: the early agent's own socket when it offers one (hand-over), else a
/// fresh bind. Returns the listener, the line to the early agent, and whether the socket is
/// shared with it.
fn listener_for(
    config: &ValidatedConfig,
    attempts: u32,
) -> Result<(TcpListener, Option<crate::handover::Taker>, bool), StartError> {
    // Without pins the early agent's programs and maps would go with it: nothing to adopt.
    if let (false, Some(path), Some(_)) = (config.early, &config.handover_socket, &config.pin_dir) {
        match crate::handover::take(path, config.listen) {
            Ok(Some(taken)) => {
                logger::milestone(&format!("taking over from the early agent (pid {})", taken.taker.early_pid));
                return Ok(match taken.listener {
                    Some(shared) => (TcpListener::from_std(shared), Some(taken.taker), true),
                    None => (bind_listener(config.listen, attempts)?, Some(taken.taker), false),
                });
            }
            Ok(None) => {}
            Err(e) => log::warn!(target: "gpa::handover", "no hand-over from {}: {e}", path.display()),
        }
    }
    Ok((bind_listener(config.listen, attempts)?, None, false))
}

/// Binds `addr`, `attempts` times [`BIND_RETRY_MS`] apart.
fn bind_listener(addr: SocketAddrV4, attempts: u32) -> Result<TcpListener, StartError> {
    // MSP §5.1: a busy port is retried (an old instance may still be exiting).
    let mut last = None;
    for attempt in 1..=attempts {
        match crate::sys::listen_tcp(addr, LISTEN_BACKLOG) {
            Ok(l) => return Ok(TcpListener::from_std(l)),
            Err(e) => last = Some(e),
        }
        if attempt < attempts {
            std::thread::sleep(Duration::from_millis(BIND_RETRY_MS));
        }
    }
    let last = last.unwrap_or_else(|| io::Error::other("bind failed"));
    if last.kind() != io::ErrorKind::AddrInUse {
        return Err(StartError::Bind(addr, last));
    }
    // Someone else holds the port (a squatter, or a stuck process). The kernel redirects only
    // to this agent's own socket, wherever it listens, so take a free port on the same address
    // rather than leave the callers unprotected; the holder never receives a caller.
    let holders = crate::listener::owners_now(addr);
    let l = crate::sys::listen_tcp(SocketAddrV4::new(*addr.ip(), 0), LISTEN_BACKLOG)
        .map_err(|e| StartError::Bind(addr, e))?;
    let actual = l.local_addr().map_err(|e| StartError::Bind(addr, e))?;
    log::error!(
        target: "gpa::loop",
        "listenAddress {addr} is held by another socket (owner uid {holders:?}); listening on {actual} instead. \
         Redirected callers reach only this agent; find the holder with `ss -ltnp`"
    );
    Ok(TcpListener::from_std(l))
}
