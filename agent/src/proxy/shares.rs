// SPDX-License-Identifier: MIT
//! Fair shares of the proxy's scarce resources (issue 13): connection slots, request body
//! buffers and upstream connections, counted per caller uid and per caller cgroup.
//!
//! The promise these serve: no unprivileged user can make a root caller (the provisioning and
//! guest agents) fail. So uid 0 is never capped here; it has reserves of its own on top (the
//! last connection slots and body buffers, see `limits.rs`). Every other uid, and every cgroup
//! a non-root caller runs in, may hold only its share; what is over the share is refused at
//! once (`503`) rather than queued, so a flood ends as soon as it stops. The caps come from
//! the configuration (`limits`, [`crate::config::Caps`]).

use std::collections::HashMap;

use crate::config::Caps;

/// What a caller holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    Connection,
    Body,
    Upstream,
}

#[derive(Clone, Copy, Debug, Default)]
struct Held {
    connections: usize,
    bodies: usize,
    upstreams: usize,
}

impl Held {
    fn count(&mut self, what: Resource) -> &mut usize {
        match what {
            Resource::Connection => &mut self.connections,
            Resource::Body => &mut self.bodies,
            Resource::Upstream => &mut self.upstreams,
        }
    }

    fn get(&self, what: Resource) -> usize {
        match what {
            Resource::Connection => self.connections,
            Resource::Body => self.bodies,
            Resource::Upstream => self.upstreams,
        }
    }

    fn is_empty(&self) -> bool {
        self.connections == 0 && self.bodies == 0 && self.upstreams == 0
    }
}

/// Per-uid and per-cgroup holdings of non-root callers.
#[derive(Debug)]
pub(crate) struct Shares {
    caps: Caps,
    by_uid: HashMap<u32, Held>,
    by_cgroup: HashMap<u64, Held>,
}

impl Shares {
    pub(crate) fn new(caps: Caps) -> Self {
        Self { caps, by_uid: HashMap::with_capacity(64), by_cgroup: HashMap::with_capacity(64) }
    }

    pub(crate) fn caps(&self) -> &Caps {
        &self.caps
    }

    fn uid_cap(&self, what: Resource) -> usize {
        match what {
            Resource::Connection => self.caps.per_uid_connections,
            Resource::Body => self.caps.per_uid_body_buffers,
            Resource::Upstream => self.caps.per_uid_upstreams,
        }
    }

    fn cgroup_cap(&self, what: Resource) -> usize {
        match what {
            Resource::Connection => self.caps.per_cgroup_connections,
            // A cgroup's bodies and upstreams are bounded through its connections.
            Resource::Body | Resource::Upstream => usize::MAX,
        }
    }

    /// Takes one `what` for a caller (`uid`, `cgroup`) if its shares allow; root always may.
    pub(crate) fn take(&mut self, uid: u32, cgroup: u64, what: Resource) -> bool {
        if uid == 0 {
            return true;
        }
        let by_uid = self.by_uid.get(&uid).map_or(0, |h| h.get(what));
        let by_cgroup = self.by_cgroup.get(&cgroup).map_or(0, |h| h.get(what));
        if by_uid >= self.uid_cap(what) || by_cgroup >= self.cgroup_cap(what) {
            return false;
        }
        *self.by_uid.entry(uid).or_default().count(what) += 1;
        *self.by_cgroup.entry(cgroup).or_default().count(what) += 1;
        true
    }

    /// Gives back one `what` taken with [`Self::take`].
    pub(crate) fn give_back(&mut self, uid: u32, cgroup: u64, what: Resource) {
        if uid == 0 {
            return;
        }
        if let Some(h) = self.by_uid.get_mut(&uid) {
            *h.count(what) = h.count(what).saturating_sub(1);
            if h.is_empty() {
                self.by_uid.remove(&uid);
            }
        }
        if let Some(h) = self.by_cgroup.get_mut(&cgroup) {
            *h.count(what) = h.count(what).saturating_sub(1);
            if h.is_empty() {
                self.by_cgroup.remove(&cgroup);
            }
        }
    }

    /// How many `what` a uid holds now.
    #[cfg(test)]
    fn held_by_uid(&self, uid: u32, what: Resource) -> usize {
        self.by_uid.get(&uid).map_or(0, |h| h.get(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            per_uid_connections: 3,
            per_cgroup_connections: 4,
            per_uid_body_buffers: 1,
            per_uid_upstreams: 2,
            ..Caps::for_table(1024)
        }
    }

    #[test]
    fn a_uid_stops_at_its_share_and_root_never_does() {
        let mut s = Shares::new(caps());
        assert!((0..3).all(|_| s.take(1000, 7, Resource::Connection)));
        assert!(!s.take(1000, 8, Resource::Connection), "uid share");
        assert!((0..100).all(|_| s.take(0, 7, Resource::Connection)), "root is never capped");
        s.give_back(1000, 7, Resource::Connection);
        assert!(s.take(1000, 7, Resource::Connection), "a freed share is available again");
        assert!(s.take(1001, 7, Resource::Connection));
        assert!(!s.take(1002, 7, Resource::Connection), "cgroup 7 is at its share (4)");
        assert!(s.take(1002, 9, Resource::Connection), "another cgroup is not");
        assert!(s.take(1000, 7, Resource::Body));
        assert!(!s.take(1000, 7, Resource::Body), "one body buffer per uid here");
        assert!(s.take(1000, 7, Resource::Upstream) && s.take(1000, 7, Resource::Upstream));
        assert!(!s.take(1000, 7, Resource::Upstream));
        assert_eq!(s.held_by_uid(1000, Resource::Upstream), 2);
    }

    #[test]
    fn giving_back_everything_forgets_the_uid() {
        let mut s = Shares::new(caps());
        assert!(s.take(1000, 7, Resource::Connection) && s.take(1000, 7, Resource::Body));
        s.give_back(1000, 7, Resource::Body);
        s.give_back(1000, 7, Resource::Connection);
        s.give_back(1000, 7, Resource::Connection); // an extra give-back never underflows
        assert!(s.by_uid.is_empty() && s.by_cgroup.is_empty());
    }
}
