"""Inside the sandbox: the child interpreter's first code. It contains itself, sets its limits, then
runs program.py as __main__. execution.py runs this file's source (`python -I -c <source> <config>`)
rather than importing it, as the sandbox user may be unable to read this checkout; so it uses the
standard library only, and few modules of it: every program pays for their import.

Two ways to contain, chosen by execution.py (config "isolation"):
- "namespaces": new mount, network, PID and IPC namespaces (and a user namespace unless we are
  root), and a minimal read-only view of the filesystem: the system (/usr, /lib*, ...), the Python
  running us, a few devices, and the program's own directory, its only writable place. Its
  processes see nothing outside and all die with it; no interface is up; the caller's files are
  not there to read.
- "seccomp": where the kernel allows no namespaces. A seccomp filter refuses sockets, signals to
  anything but the program's own process group (and ptrace), and leaving that group, so that
  killing the group kills all of it. Files stay as readable as the sandbox user's rights allow.
"""

import ctypes
import json
import os
import resource
import runpy
import struct
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_RELATIME = 4096  # statvfs's name for MS_RELATIME; the other flags have the same bits in both
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
SIGKILL = 9
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

# seccomp: the audit arch of each machine and its syscall numbers (pidfd_* and io_uring are the same on all)
ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
                            "rt_tgsigqueueinfo": 297, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
                            "setsid": 112, "setpgid": 109}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
                             "rt_tgsigqueueinfo": 240, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
                             "setsid": 157, "setpgid": 154}),
}
COMMON_SYSCALLS = {"pidfd_send_signal": 424, "io_uring_setup": 425, "pidfd_open": 434}
EPERM = 1
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
LD_ABS_W, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 numbering would slip past the table

libc = ctypes.CDLL(None, use_errno=True)


def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target, fstype=None, flags=0, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()),
          f"mount {target}")


def enter_namespaces(user, work):
    """Unshares the namespaces and pivots into the view; as root (the kernel needs no user namespace
    then), drops to `user`, which clears our capabilities. Otherwise we keep our uid, mapped to
    itself, and drop the capabilities the new user namespace gave us."""
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | (0 if uid == 0 else CLONE_NEWUSER)), "unshare")
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    enter_view(work)
    if uid == 0:
        drop_to(user)
    else:
        header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        check(libc.capset(header, bytes(24)), "capset")  # no effective, permitted or inheritable capability


def enter_view(work):
    """Makes a tmpfs (mounted on <work>/../root) our root, holding read-only binds of the system and
    our Python, the devices, and `work` at its own path, the one writable place."""
    mount(None, "/", flags=MS_REC | MS_PRIVATE)  # nothing we mount shows outside
    root = os.path.join(os.path.dirname(work), "root")
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in dict.fromkeys((*SYSTEM, sys.base_prefix, sys.prefix)):
        if os.path.lexists(path) and not any(path.startswith(p + "/") for p in SYSTEM):
            bind(path, root + path, read_only=True)
    for path in DEVICES:
        bind(path, root + path)
    bind(work, root + work)
    os.chdir(root)
    check(libc.pivot_root(b".", b"."), "pivot_root")  # the old root now lies over the new one
    check(libc.umount2(b".", MNT_DETACH), "umount old root")
    mount(None, "/", flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(work)


def bind(source, target, read_only=False):
    """Binds `source` at `target` in the new root (a symlink is copied as a symlink)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    if os.path.isdir(source):
        os.mkdir(target)
    else:
        open(target, "w").close()
    mount(source, target, flags=MS_BIND | MS_REC)
    if read_only:  # a remount must keep the flags the kernel locked on the original mount
        kept = os.statvfs(source).f_flag
        flags = kept & (MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME) | (MS_RELATIME if kept & ST_RELATIME else 0)
        mount(None, target, flags=MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)


def drop_to(user):
    os.setgroups([])
    os.setgid(user[1])
    os.setuid(user[0])


def seccomp_filter():
    """A BPF program for the seccomp filter: refuse (EPERM) sockets, ptrace, leaving our process
    group, and signals except to our own group (kill(0), kill(-pgid)) or its leader (kill(pgid));
    kill the process for a syscall of another architecture."""
    machine = os.uname().machine
    if machine not in ARCHES:
        raise OSError(f"the sandbox has no seccomp filter for {machine} (only {', '.join(ARCHES)}), and no namespaces")
    arch, numbers = ARCHES[machine]
    numbers = numbers | COMMON_SYSCALLS
    pgid = os.getpgrp()

    def op(code, k, jt=0, jf=0):
        return struct.pack("HBBI", code, jt, jf, k)

    deny, allow = op(RET_K, RET_ERRNO | EPERM), op(RET_K, RET_ALLOW)
    program = [op(LD_ABS_W, 4), op(JEQ_K, arch, 1, 0), op(RET_K, RET_KILL_PROCESS),  # seccomp_data.arch
               op(LD_ABS_W, 0), op(JGE_K, X32_SYSCALL_BIT, 0, 1), op(RET_K, RET_KILL_PROCESS)]  # seccomp_data.nr
    for name, number in numbers.items():
        if name != "kill":
            program += [op(JEQ_K, number, 0, 1), deny]
    program += [op(JEQ_K, numbers["kill"], 1, 0), allow, op(LD_ABS_W, 16)]  # the low word of kill's pid
    for target in (0, pgid, -pgid & 0xFFFFFFFF):
        program += [op(JEQ_K, target, 0, 1), allow]
    return b"".join([*program, deny])


def install_seccomp():
    filter_ = seccomp_filter()
    buffer = ctypes.create_string_buffer(filter_)
    fprog = struct.pack("HxxxxxxP", len(filter_) // 8, ctypes.addressof(buffer))  # struct sock_fprog
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0), "seccomp")


def become_pid_1():
    """Forks into the new PID namespace, whose PID 1 runs the program: when it dies, all its
    processes do. We wait outside and exit as it did."""
    if os.fork():
        _, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    # Killing our group (which holds the waiting parent) kills PID 1 too, even once it has left the group.
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "pdeathsig")


def main(config):
    user = config["user"]
    if config["isolation"] == "namespaces":
        enter_namespaces(user, config["work"])
    elif user:
        drop_to(user)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # no setuid program gives privileges back
    if config["isolation"] == "seccomp":
        install_seccomp()
    for name, value in config["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if config["isolation"] == "namespaces":
        become_pid_1()
    sys.argv = ["program.py"]
    runpy.run_path("program.py", run_name="__main__")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
