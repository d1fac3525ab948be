//! Attacker tests: gateway (filled in by its boundary).
