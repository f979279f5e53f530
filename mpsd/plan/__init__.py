"""From a validated config and this host's facts to the exact plan of what will run (no I/O)."""
