//! Attacker tests: link (filled in by its boundary).
