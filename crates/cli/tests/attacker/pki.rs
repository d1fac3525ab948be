//! Attacker tests: pki (filled in by its boundary).
