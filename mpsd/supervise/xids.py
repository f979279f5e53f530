"""What mpsd does about an NVML Xid: recover the GPU's group, fail it, or only log it.

Policy, not plumbing: :mod:`mpsd.host.nvml` only watches and reports Xids; the supervisor asks
:func:`classify_xid` what each one means for the group.
"""

from __future__ import annotations

from typing import Literal

XidClass = Literal["application", "hardware", "informational"]

# Xids that mean "a CUDA context on this GPU faulted". Under MPS the fault reaches every client of
# the server (mps.md §1.1), so the whole group recovers; the GPU itself is fine. This is the set
# NVIDIA's k8s-device-plugin treats as application errors (mps.md §4).
APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})

# Xids after which the GPU needs an operator (reset, reboot, RMA): restarting engines would only
# loop, so the group goes FAILED with this reason. Source: NVIDIA's Xid catalogue
# (docs.nvidia.com/deploy/xid-errors), mostly the rows whose immediate action is RESET_GPU or a
# reboot, plus the memory-health events whose fix only takes effect after a GPU reset.
HARDWARE_XIDS: dict[int, str] = {
    46: "GPU stopped processing; the catalogue asks for a GPU reset",
    48: "double-bit ECC error: GPU memory contents are corrupt",
    62: "internal micro-controller halted; needs a GPU reset",
    63: "row remapping recorded; the remap only takes effect after a GPU reset",
    64: "row remapping failed; needs a GPU reset and likely service",
    74: "NVLink error; link state is unreliable until reset",
    79: "GPU has fallen off the bus; needs a reboot",
    92: "high single-bit ECC error rate: memory is degrading",
    94: "contained ECC error; the page must be retired/remapped by a GPU reset",
    95: "uncontained ECC error; needs a GPU reset",
    110: "security fault; needs a GPU reset",
    119: "GSP firmware RPC timeout; needs a GPU reset",
    120: "GSP firmware error; needs a GPU reset",
    121: "C2C (chip-to-chip) link error",
    136: "link training failed; needs a GPU reset",
    140: "unrecovered ECC error; needs a GPU reset",
    143: "GPU initialisation failed; needs a GPU reset",
    144: "NVLink5 SAW error",
    145: "NVLink5 RLW error",
    146: "NVLink5 TLW error",
    147: "NVLink5 TREX error",
    148: "NVLink5 NVLPW_CTRL error",
    149: "NVLink5 NETIR error",
    150: "NVLink5 MSE error",
    151: "confidential-computing key rotation failed; needs a VM restart",
    154: "driver changed the GPU recovery action (GPU reset or node reboot required)",
    155: "NVLink software-defined error; needs a GPU reset",
    156: "resource retirement event; needs a GPU reset",
    158: "GPU fatal timeout; needs a GPU reset",
    167: "PCIe fatal timeout",
    169: "SEC2 micro-controller halted",
    171: "uncorrectable DRAM error (detail of Xid 48)",
    172: "uncorrectable SRAM error (detail of Xid 48)",
}


def classify_xid(xid: int) -> XidClass:
    """Map an Xid to what mpsd does about it: recover the group, fail it, or just log it."""
    if xid in APPLICATION_XIDS:
        return "application"
    if xid in HARDWARE_XIDS:
        return "hardware"
    return "informational"
