"""Fault injection under a live writer (issue 8). SOAK_CYCLES sets the cycles per scenario."""
