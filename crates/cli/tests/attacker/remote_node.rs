//! Attacker tests: remote_node (filled in by its boundary).
