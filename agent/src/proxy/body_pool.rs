// SPDX-License-Identifier: MIT
//! Request body buffers shared by every connection: only a request with a signed body needs
//! one, and metadata callers almost never send bodies, so a small pool serves the table.

use crate::limits::{BODY_BUFFERS, REQUEST_BODY_MAX_BYTES, ROOT_RESERVED_BODY_BUFFERS};

/// The pool: at most [`BODY_BUFFERS`] buffers of [`REQUEST_BODY_MAX_BYTES`], allocated on
/// first use and reused.
#[derive(Debug)]
pub(crate) struct BodyPool {
    free: Vec<Box<[u8]>>,
    allocated: usize,
}

impl BodyPool {
    pub(crate) fn new() -> Self {
        Self { free: Vec::with_capacity(BODY_BUFFERS), allocated: 0 }
    }

    /// A body buffer; the last `ROOT_RESERVED_BODY_BUFFERS` go to root callers only, so slow
    /// uploads of other users can never hold every buffer (issue 13).
    pub(crate) fn take(&mut self, for_root: bool) -> Option<Box<[u8]>> {
        let in_use = self.allocated - self.free.len();
        if !for_root && in_use + ROOT_RESERVED_BODY_BUFFERS >= BODY_BUFFERS {
            return None;
        }
        if let Some(b) = self.free.pop() {
            return Some(b);
        }
        if self.allocated == BODY_BUFFERS {
            return None;
        }
        self.allocated += 1;
        Some(vec![0; REQUEST_BODY_MAX_BYTES].into_boxed_slice())
    }

    pub(crate) fn give_back(&mut self, buf: Box<[u8]>) {
        self.free.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_body_buffers_are_roots() {
        let mut pool = BodyPool::new();
        let mut held = Vec::new();
        while let Some(b) = pool.take(false) {
            held.push(b);
        }
        assert_eq!(held.len(), BODY_BUFFERS - ROOT_RESERVED_BODY_BUFFERS, "others stop at the reserve");
        while let Some(b) = pool.take(true) {
            held.push(b);
        }
        assert_eq!(held.len(), BODY_BUFFERS, "root gets the reserve");
        pool.give_back(held.pop().expect("one"));
        assert!(pool.take(false).is_none(), "a freed reserved buffer is still root's");
        assert!(pool.take(true).is_some());
    }
}
