//! kite (in progress)
