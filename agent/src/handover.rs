// SPDX-License-Identifier: MIT
//! Hand-over of the proxy listener from the initramfs agent to the root file system's agent,
//! so that no connect to a metadata endpoint is ever refused while one replaces the other
//! (issue 6; design in docs/EARLY-BOOT.md).
//!
//! The early agent (`--early`) *offers*: it listens on a Unix socket (`handoverSocket`, in a
//! root-only directory). The next agent *takes*: at start it connects there and receives the
//! very same listening TCP socket with `SCM_RIGHTS` — the socket object never closes, so its
//! accept queue keeps taking SYNs whichever process accepts them. The taker arms itself
//! (adopts the pinned programs and maps, latches the key) while the early agent keeps
//! serving, then registers the shared listener and sends `stop`. The early agent stops
//! accepting, finishes the exchanges it has (bounded by the usual timeouts) and exits
//! without unpinning.
//!
//! Both ends check the peer's uid (`SO_PEERCRED`) equals their own effective uid: only the
//! agent's own user can offer or take the listener.

use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};

/// First line of the offer; the listener's address follows, then `\n`. The listening socket
/// travels as the message's `SCM_RIGHTS` descriptor.
const OFFER: &str = "GPA-HANDOVER/1 listener ";
/// What the taker sends once it serves.
const STOP: &[u8] = b"GPA-HANDOVER/1 stop\n";

/// The offering (early) side: a Unix listener plus at most one taker talking to it.
#[derive(Debug)]
pub struct Offer {
    listener: UnixListener,
    path: PathBuf,
    peer: Option<(UnixStream, u32)>,
    input: heapless::Vec<u8, 64>,
}

/// What the taker said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// Nothing complete yet.
    Pending,
    /// The taker serves now: stop accepting and drain. Carries the taker's pid.
    Stop(u32),
    /// The taker went away before `stop` (it failed to start): keep serving, keep offering.
    Gone,
}

impl Offer {
    /// Listens on `path` (a stale socket file left by an earlier boot stage is replaced; any
    /// other kind of file is not touched). The socket file is made 0600.
    pub fn bind(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self { listener, path: path.to_owned(), peer: None, input: heapless::Vec::new() })
    }

    /// The Unix listener, to register with the event loop.
    pub fn listener(&mut self) -> &mut UnixListener {
        &mut self.listener
    }

    /// The taker's socket, if one is connected, to register with the event loop.
    pub fn peer(&mut self) -> Option<&mut UnixStream> {
        self.peer.as_mut().map(|(s, _)| s)
    }

    /// Where the offer listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts a waiting taker and sends it `tcp_listener`. Returns the taker's pid when one
    /// was accepted (the caller registers [`Offer::peer`]); a connection from another uid is
    /// closed unanswered.
    pub fn accept(&mut self, tcp_listener: BorrowedFd<'_>, listen: SocketAddrV4) -> io::Result<Option<u32>> {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let (uid, pid) = crate::sys::peer_uid_pid(stream.as_fd())?;
            if uid != crate::sys::geteuid() {
                log::warn!(target: "gpa::handover", "hand-over refused: peer pid={pid} uid={uid} is not the agent's user");
                continue;
            }
            let message = format!("{OFFER}{listen}\n");
            crate::sys::send_with_fd(stream.as_fd(), message.as_bytes(), tcp_listener)?;
            // A newer taker replaces an older one that never said stop.
            self.peer = Some((stream, pid));
            self.input.clear();
            return Ok(Some(pid));
        }
    }

    /// Reads what the taker sent.
    pub fn read_peer(&mut self) -> PeerEvent {
        let Some((stream, pid)) = self.peer.as_mut() else { return PeerEvent::Pending };
        let pid = *pid;
        let mut chunk = [0u8; 32];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    if self.input.extend_from_slice(&chunk[..n]).is_err() {
                        break;
                    }
                    if self.input.as_slice() == STOP {
                        return PeerEvent::Stop(pid);
                    }
                    if !STOP.starts_with(&self.input) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return PeerEvent::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Closed, or said something that is not `stop`: forget this taker.
        self.peer = None;
        self.input.clear();
        PeerEvent::Gone
    }
}

/// The taking side's connection to the early agent, kept until it is told to stop.
#[derive(Debug)]
pub struct Taker {
    stream: std::os::unix::net::UnixStream,
    /// The early agent's pid (for the logs).
    pub early_pid: u32,
}

impl Taker {
    /// Tells the early agent to stop accepting and exit.
    pub fn stop(mut self) -> io::Result<()> {
        self.stream.write_all(STOP)
    }
}

/// What [`take`] found.
#[derive(Debug)]
pub struct Taken {
    /// The shared listening socket (non-blocking), if the offer carried one bound to the
    /// address this agent is configured to listen on.
    pub listener: Option<std::net::TcpListener>,
    /// The line to the early agent.
    pub taker: Taker,
}

/// Connects to an offer at `path`. `Ok(None)` when nobody offers (no socket file, or nobody
/// listening on it any more).
pub fn take(path: &Path, listen: SocketAddrV4) -> io::Result<Option<Taken>> {
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (uid, pid) = crate::sys::peer_uid_pid(stream.as_fd())?;
    if uid != crate::sys::geteuid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the hand-over socket belongs to pid {pid} uid {uid}, not the agent's user"),
        ));
    }
    stream.set_read_timeout(Some(Duration::from_millis(crate::limits::HANDOVER_OFFER_TIMEOUT_MS)))?;
    let mut buf = [0u8; 64];
    let (n, fd) = crate::sys::recv_with_fd(stream.as_fd(), &mut buf)?;
    let line = buf.get(..n).and_then(|b| core::str::from_utf8(b).ok()).unwrap_or("");
    let offered = line.strip_prefix(OFFER).and_then(|rest| rest.trim_end().parse::<SocketAddrV4>().ok());
    let Some(offered) = offered else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a hand-over offer"));
    };
    let listener = match fd {
        Some(fd) if crate::sys::listening_tcp_v4(fd.as_fd()) == Some(listen) => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            Some(listener)
        }
        _ => {
            log::warn!(target: "gpa::handover", "the early agent offered {offered}, this agent listens on {listen}: binding its own");
            None
        }
    };
    Ok(Some(Taken { listener, taker: Taker { stream, early_pid: pid } }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gpa-handover-{name}-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The first non-pending event from the taker, waiting up to 2 s.
    fn next_peer_event(offer: &mut Offer) -> PeerEvent {
        for _ in 0..200 {
            let event = offer.read_peer();
            if event != PeerEvent::Pending {
                return event;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        PeerEvent::Pending
    }

    #[test]
    fn the_taker_receives_the_same_listening_socket_and_stop_reaches_the_offer() {
        let dir = temp_dir("roundtrip");
        let sock = dir.join("handover.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = match tcp.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        let mut offer = Offer::bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);

        let taker = std::thread::spawn(move || take(&sock, listen));
        let mut pid = None;
        for _ in 0..200 {
            pid = offer.accept(tcp.as_fd(), listen).unwrap();
            if pid.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(pid, Some(std::process::id()));
        let taken = taker.join().unwrap().unwrap().unwrap();
        let shared = taken.listener.expect("the listener travels with the offer");
        // One socket object: a connect to the address is accepted through the received fd.
        let _client = std::net::TcpStream::connect(listen).unwrap();
        shared.set_nonblocking(false).unwrap();
        assert!(shared.accept().is_ok());

        assert_eq!(offer.read_peer(), PeerEvent::Pending);
        taken.taker.stop().unwrap();
        let event = next_peer_event(&mut offer);
        assert_eq!(event, PeerEvent::Stop(std::process::id()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_offer_is_not_an_error_and_a_non_socket_file_is_never_replaced() {
        let dir = temp_dir("absent");
        let sock = dir.join("handover.sock");
        let listen: SocketAddrV4 = "127.0.0.1:3080".parse().unwrap();
        assert!(take(&sock, listen).unwrap().is_none());
        std::fs::write(&sock, b"not a socket").unwrap();
        assert!(Offer::bind(&sock).is_err());
        assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_taker_that_goes_away_before_stop_leaves_the_offer_standing() {
        let dir = temp_dir("gone");
        let sock = dir.join("handover.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(listen) = tcp.local_addr().unwrap() else { unreachable!() };
        let mut offer = Offer::bind(&sock).unwrap();
        let path = sock.clone();
        let taker = std::thread::spawn(move || take(&path, listen));
        while offer.accept(tcp.as_fd(), listen).unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(taker.join().unwrap().unwrap().unwrap());
        let event = next_peer_event(&mut offer);
        assert_eq!(event, PeerEvent::Gone);
        assert!(offer.peer().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
