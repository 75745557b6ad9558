"""PTL6xx: checkpoint conversion (cross-file)."""
