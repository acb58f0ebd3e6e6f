"""The seccomp filter every local-sandbox tool call runs under: a classic BPF program, built here.

    prog = seccomp_program()          # bytes: struct sock_filter[] for `bwrap --seccomp FD`
    r, w = os.pipe(); os.write(w, prog); os.close(w)   # bwrap reads the program from r

What it refuses, with EPERM, as container runtimes' default profiles do (Docker's, containerd's):
changing or looking at mounts (mount, umount2, pivot_root, the new mount API: open_tree, move_mount,
fsopen, fsconfig, fsmount, fspick, mount_setattr), entering or making namespaces (setns, unshare,
clone with any CLONE_NEW* flag), reaching into other processes (ptrace, process_vm_readv/writev,
pidfd_getfd, kcmp), the kernel keyring (keyctl, add_key, request_key), bpf, perf_event_open,
userfaultfd, io_uring, kernel modules and kexec, swap, reboot, clocks, acct, quotactl, syslog and
handle-based opens (open_by_handle_at). clone3 answers ENOSYS (its flags sit in memory a BPF filter
cannot read; libc then falls back to clone, whose flags it can). Any other architecture than the
process's own (32-bit `int 0x80` on x86_64) and the x32 ABI are refused whole: the syscall numbers
above would mean other calls there.

Why a filter on top of dropped capabilities: a tool call is root inside the rollout's user
namespace; without capabilities the kernel already refuses most of this, but the filter also closes
what needs none (unshare of a new user namespace, which hands the caller every capability again;
perf, io_uring and keyring attack surface) and keeps holding if a capability leaks.

The numbers are the kernel's (x86_64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64: the generic
table, include/uapi/asm-generic/unistd.h). Other machines get no filter: `seccomp_problem()` says so
and the sandbox refuses to start there.
"""

from __future__ import annotations

import errno
import platform
import struct
from typing import Optional

# BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16  # struct seccomp_data (args are u64, little-endian)
_X32_BIT = 0x40000000
# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
# (CLONE_NEWTIME, 0x80, is not among them: in clone()'s flags that bit is part of the exit signal, and
# clone() cannot make a time namespace; unshare and clone3, which can, are refused whole)
CLONE_NEW_MASK = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

DENIED = ("mount", "umount2", "pivot_root", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
          "mount_setattr", "setns", "unshare", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
          "kcmp", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
          "io_uring_enter", "io_uring_register", "init_module", "finit_module", "delete_module", "kexec_load",
          "kexec_file_load", "swapon", "swapoff", "reboot", "settimeofday", "clock_settime", "adjtimex",
          "clock_adjtime", "acct", "quotactl", "syslog", "lookup_dcookie", "open_by_handle_at",
          "name_to_handle_at", "fanotify_init", "vhangup")

# (AUDIT_ARCH_*, syscall numbers) per machine; x86_64 adds its legacy port-I/O and module calls.
_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "clone": 56, "clone3": 435, "mount": 165, "umount2": 166, "pivot_root": 155, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "setns": 308, "unshare": 272, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "pidfd_getfd": 438, "kcmp": 312, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
        "kexec_file_load": 320, "swapon": 167, "swapoff": 168, "reboot": 169, "settimeofday": 164,
        "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305, "acct": 163, "quotactl": 179, "syslog": 103,
        "lookup_dcookie": 212, "open_by_handle_at": 304, "name_to_handle_at": 303, "fanotify_init": 300,
        "vhangup": 153, "iopl": 172, "ioperm": 173, "uselib": 134, "_sysctl": 156}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "mount": 40, "umount2": 39, "pivot_root": 41, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "setns": 268, "unshare": 97, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "pidfd_getfd": 438, "kcmp": 272, "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "kexec_file_load": 294, "swapon": 224, "swapoff": 225, "reboot": 142, "settimeofday": 170,
        "clock_settime": 112, "adjtimex": 171, "clock_adjtime": 266, "acct": 89, "quotactl": 60, "syslog": 116,
        "lookup_dcookie": 18, "open_by_handle_at": 265, "name_to_handle_at": 264, "fanotify_init": 262,
        "vhangup": 58}),
}
_EXTRA_DENIED = ("iopl", "ioperm", "uselib", "_sysctl")


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)  # struct sock_filter (host byte order: both arches are LE)


def seccomp_problem(machine: Optional[str] = None) -> Optional[str]:
    """None when a filter can be built for this machine, else why not."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        return f"no seccomp filter for {machine} (only {', '.join(_ARCHES)})"
    return None


def seccomp_program(machine: Optional[str] = None) -> bytes:
    """The filter (module docstring) as the bytes of a `struct sock_filter` array."""
    machine = machine or platform.machine()
    problem = seccomp_problem(machine)
    if problem:
        raise ValueError(problem)
    audit_arch, nr = _ARCHES[machine]
    denied = [nr[name] for name in DENIED + _EXTRA_DENIED if name in nr]
    # Layout: checks, then the shared tail [ALLOW, DENY(EPERM), ENOSYS, clone-flags check]; a jump's
    # offset counts instructions after the jump, so each check jumps (tail_start - its index - 1 + slot).
    head: list[tuple] = [("ld", _OFF_ARCH), ("jne_deny", audit_arch), ("ld", _OFF_NR)]
    if machine == "x86_64":
        head.append(("jge_deny", _X32_BIT))
    head += [("jeq_clone", nr["clone"]), ("jeq_enosys", nr["clone3"])]
    head += [("jeq_deny", n) for n in denied]
    n = len(head)
    allow, deny, enosys, clone = n, n + 1, n + 2, n + 3
    out = []
    for i, (op, k) in enumerate(head):
        rel = lambda target: target - i - 1  # noqa: E731
        if op == "ld":
            out.append(_ins(_LD_W_ABS, k))
        elif op == "jne_deny":
            out.append(_ins(_JEQ_K, k, 0, rel(deny)))
        elif op == "jge_deny":
            out.append(_ins(_JGE_K, k, rel(deny), 0))
        elif op == "jeq_clone":
            out.append(_ins(_JEQ_K, k, rel(clone), 0))
        elif op == "jeq_enosys":
            out.append(_ins(_JEQ_K, k, rel(enosys), 0))
        else:
            out.append(_ins(_JEQ_K, k, rel(deny), 0))
    out.append(_ins(_RET_K, _RET_ALLOW))                        # allow
    out.append(_ins(_RET_K, _RET_ERRNO | errno.EPERM))          # deny
    out.append(_ins(_RET_K, _RET_ERRNO | errno.ENOSYS))         # enosys
    out.append(_ins(_LD_W_ABS, _OFF_ARG0_LO))                   # clone: flags are its first argument
    out.append(_ins(_JSET_K, CLONE_NEW_MASK, 0, 1))             # any CLONE_NEW* -> deny
    out.append(_ins(_RET_K, _RET_ERRNO | errno.EPERM))
    out.append(_ins(_RET_K, _RET_ALLOW))
    if max(len(out), n) > 255:  # jump offsets are one byte
        raise ValueError("seccomp program too long for one-byte jumps")
    return b"".join(out)


def syscall_numbers(machine: str) -> dict[str, int]:
    """The table used for `machine` (tests compare it with the kernel headers)."""
    return dict(_ARCHES[machine][1])
