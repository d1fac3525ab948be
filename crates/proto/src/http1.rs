//! http1 (in progress)
