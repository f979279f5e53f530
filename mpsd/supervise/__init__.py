"""Processes and fault domains: MPS daemons, engines, GPU groups, their states, the supervisor."""
