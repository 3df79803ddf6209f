"""What the systemd tests share (integration/test_systemd.py): the unit's
files, `make`, reading a unit, systemd-analyze, the seccomp sandbox the unit
declares (`Sandbox`), and `InstalledUnit` (`make install` into a folder of
the test class's own)."""
import ctypes
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import ROOT  # noqa: E402

PREFIX = "/usr/local"
UNIT_SOURCE = os.path.join(ROOT, "examples", "systemd", "iotlbd.service")
TLS_DROPIN = os.path.join(ROOT, "examples", "systemd", "iotlbd-tls.conf")
MAX_EXPOSURE = 2.5


def make(*args, timeout=1200):
    out = subprocess.run(["make", "-C", ROOT, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out


def read_unit(path):
    """The unit as {section: [(key, value)…]}, comments and blank lines dropped."""
    sections, current = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
            else:
                key, _, value = line.partition("=")
                current.append((key.strip(), value.strip()))
    return sections


def systemd_analyze(*args, cwd=None):
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


# --- The unit's seccomp sandbox, applied the way systemd 252 applies it ----------------------

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 1, 4, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10


def scmp_act_errno(e):
    return 0x00050000 | (e & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def syscall_groups():
    """Every @group of `systemd-analyze syscall-filter`: {name: [member…]} (members may be @groups)."""
    out = systemd_analyze("syscall-filter")
    groups, current = {}, None
    for line in out.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip() or line.startswith("#"):
            current = None
    return groups


def expand(names, groups):
    calls = set()
    for n in names:
        if n.startswith("@"):
            calls |= expand(groups[n], groups)
        else:
            calls.add(n)
    return calls


class Sandbox:
    """Seccomp filters built from the unit's own settings: SystemCallFilter= (allow list, then
    ~removals; blocked calls fail with SystemCallErrorNumber=), MemoryDenyWriteExecute= (the rules
    of systemd's seccomp_memory_deny_write_execute), RestrictAddressFamilies= (other families get
    EAFNOSUPPORT) and LockPersonality=. Built in the parent; loaded in the child before exec."""

    def __init__(self, service):
        self.lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(ArgCmp)]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        settings = {}
        for key, value in service:
            settings.setdefault(key, []).append(value)
        self.settings = settings
        self.filters = []
        if settings.get("MemoryDenyWriteExecute") == ["yes"]:
            f = self.new(SCMP_ACT_ALLOW)
            deny = scmp_act_errno(errno.EPERM)
            self.rule(f, deny, "mmap", ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE))
            self.rule(f, deny, "mprotect", ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
            self.rule(f, deny, "pkey_mprotect", ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
            self.rule(f, deny, "shmat", ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        if settings.get("LockPersonality") == ["yes"]:
            f = self.new(SCMP_ACT_ALLOW)
            self.rule(f, scmp_act_errno(errno.EPERM), "personality", ArgCmp(0, SCMP_CMP_NE, 0, 0))
        for families in settings.get("RestrictAddressFamilies", []):
            names = {"AF_UNIX": AF_UNIX, "AF_INET": AF_INET, "AF_INET6": AF_INET6}
            allowed = {names[n] for n in families.split()}
            f = self.new(SCMP_ACT_ALLOW)
            for fam in range(0, 64):
                if fam not in allowed:
                    self.rule(f, scmp_act_errno(errno.EAFNOSUPPORT), "socket", ArgCmp(0, SCMP_CMP_EQ, fam, 0))
        if "SystemCallFilter" in settings:
            groups = syscall_groups()
            allowed = set()
            for i, value in enumerate(settings["SystemCallFilter"]):
                if value.startswith("~"):
                    allowed -= expand(value[1:].split(), groups)
                else:
                    assert i == 0, "an allow list after a deny list is not what this sandbox models"
                    allowed |= expand(["@default", *value.split()], groups)
            self.allowed = allowed
            err = getattr(errno, settings.get("SystemCallErrorNumber", ["EPERM"])[-1])
            f = self.new(scmp_act_errno(err))
            for name in sorted(allowed):
                self.rule(f, SCMP_ACT_ALLOW, name)
            # Loaded last: the loads before it need seccomp() and prctl().
            self.filters.append(self.filters.pop(self.filters.index(f)))

    def new(self, default):
        f = self.lib.seccomp_init(default)
        assert f, "seccomp_init failed"
        self.filters.append(f)
        return f

    def rule(self, f, action, name, *cmps):
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call on this architecture (or a multiplexed one): systemd skips it too
            return
        array = (ArgCmp * max(len(cmps), 1))(*cmps)
        self.lib.seccomp_rule_add_array(f, action, nr, len(cmps), array)  # errors ignored, as systemd does

    def apply(self):
        """In the child, after fork and before exec (seccomp_load also sets no_new_privs)."""
        for f in self.filters:
            if self.lib.seccomp_load(f) != 0:
                os._exit(121)


class InstalledUnit:
    """A TestCase mix-in: `make install` into a folder once per class."""

    @classmethod
    def setUpClass(cls):
        if shutil.which("systemd-analyze") is None:
            raise AssertionError("systemd-analyze is missing: install Debian's systemd (make test-systemd does)")
        cls.tmp = tempfile.mkdtemp(prefix="iotlbd-systemd-")
        os.chmod(cls.tmp, 0o755)  # the sandboxed run reads the installed binary as nobody
        cls.dest = os.path.join(cls.tmp, "root")
        t0 = time.time()
        make("install", f"DESTDIR={cls.dest}", f"PREFIX={PREFIX}")
        cls.install_seconds = time.time() - t0
        cls.binary = os.path.join(cls.dest, PREFIX.lstrip("/"), "bin", "iotlbd")
        cls.unit = os.path.join(cls.dest, PREFIX.lstrip("/"), "lib", "systemd", "system", "iotlbd.service")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def exec_start(self):
        lines = [v for k, v in read_unit(self.unit)["Service"] if k == "ExecStart"]
        self.assertEqual(len(lines), 1, lines)
        return lines[0]
