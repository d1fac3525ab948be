//! Attacker tests: names (filled in by its boundary).
