//! What a handler is given: an event ([`EventRequest`]) and its request
//! body, streamed from the caller ([`RequestBody`]).

use std::io;

use bytes::{Bytes, BytesMut};
use kitepipe_proto::event::Caller;

use super::stream::EventBody;

/// An event as a handler sees it.
pub struct EventRequest {
    /// Handler name, e.g. `get_time_utc`.
    pub name: String,
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path after the route, percent-encoded, e.g. `/cat//hello%20/world`.
    pub path: String,
    /// Arguments (after `//` in the path).
    pub args: Vec<String>,
    /// Query string without `?`.
    pub query: String,
    /// Request headers that travelled with the event (lowercase names).
    pub headers: Vec<(String, String)>,
    /// Who called.
    pub caller: Caller,
    /// The request body, streamed from the caller.
    pub body: RequestBody,
}

impl EventRequest {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A request body arriving over the link. Reading it grants the caller
/// window to send more, so a handler that reads slowly slows the caller.
pub struct RequestBody(pub(crate) EventBody);

impl RequestBody {
    /// The next chunk, `None` at the end. Cancel-safe.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.0.chunk().await
    }

    /// The whole body, refusing more than `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> io::Result<Bytes> {
        let mut all = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            if all.len() + chunk.len() > limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("request body larger than {limit} bytes"),
                ));
            }
            all.extend_from_slice(&chunk);
        }
        Ok(all.freeze())
    }
}
