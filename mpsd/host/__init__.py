"""What this host is: GPU inventory and live samples over NVML, usable cores, the MPS binary."""
