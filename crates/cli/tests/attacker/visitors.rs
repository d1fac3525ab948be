//! Attacker tests: visitors (filled in by its boundary).
