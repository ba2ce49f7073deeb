// SPDX-License-Identifier: MIT
//! The fixed buffers of a connection slot, carved for the whole table at start-up.

use crate::limits::{CONNECTION_BUFFER_BYTES, REQUEST_HEAD_MAX_BYTES, UPSTREAM_HEAD_MAX_BYTES};

/// The fixed buffers of one connection slot: a slice of one arena allocated at start-up for
/// the whole table (see [`Buffers::arena`]) and reused by every connection in that slot.
#[derive(Debug)]
pub struct Buffers {
    /// Client bytes: the request head, then body bytes or a pipelined next request.
    pub(super) req: &'static mut [u8],
    /// The serialised upstream request head.
    pub(super) up: &'static mut [u8],
    /// Response bytes on their way to the client.
    pub(super) resp: &'static mut [u8],
}

impl Buffers {
    /// Buffers for `slots` connections, carved from one zeroed allocation. It is large
    /// (`slots` × [`CONNECTION_BUFFER_BYTES`]), so the allocator takes it straight from
    /// `mmap`: pages cost memory only once a connection touches them. It lives as long as
    /// the process (leaked on purpose: the table is never freed).
    pub fn arena(slots: usize) -> Vec<Self> {
        let arena: &'static mut [u8] = Box::leak(vec![0u8; slots * CONNECTION_BUFFER_BYTES].into_boxed_slice());
        arena
            .chunks_exact_mut(CONNECTION_BUFFER_BYTES)
            .map(|chunk| {
                let (req, rest) = chunk.split_at_mut(REQUEST_HEAD_MAX_BYTES);
                let (up, resp) = rest.split_at_mut(UPSTREAM_HEAD_MAX_BYTES);
                Self { req, up, resp }
            })
            .collect()
    }
}
