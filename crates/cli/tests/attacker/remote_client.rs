//! Attacker tests: remote_client (filled in by its boundary).
