//! sniff (in progress)
