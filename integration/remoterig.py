"""What integration/test_remote.py shares between its classes: the
throw-away PKI and credential files (`M`, made by `make_material` once per
run), TLS client contexts, and `Daemon` (iotlbd with TLS on a loopback port,
called with certificates or tokens)."""
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tlspki import PKI  # noqa: E402
from iotlbtest import IOTLBD, free_port, wait_listening  # noqa: E402

TOKENS = {"read": "r3ad-t0ken-5ecret-0001", "translate": "tr4nslate-t0ken-5ecret-0002", "admin": "adm1n-t0ken-5ecret-0003"}
SCOPES = ["read", "translate", "admin"]
MEM = {"regions": [{"guest_phys_addr": 0, "memory_size": "0x40000000", "userspace_addr": "0x7f0000000000"}]}
RING = {"num": 256, "desc_addr": "0x800000", "avail_addr": "0x801000", "used_addr": "0x802000"}


class Material:
    """Filled by make_material(): TMP, P (the PKI), CA, SERVER, CERTS, TOKEN_FILE, SCOPES_FILE."""


M = Material()


def make_material():
    """The throw-away CA, certificates and credential files, into `M`."""
    for tool in ("openssl", "curl"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} is missing")
    M.TMP = tempfile.mkdtemp(prefix="iotlbd-remote-")
    M.P = PKI(os.path.join(M.TMP, "pki"))
    M.CA = M.P.ca("ca", "vhost-iotlb test CA")
    other = M.P.ca("other", "another CA")
    M.SERVER = M.P.server("server", M.CA)
    M.CERTS = {
        "orch1": M.P.client("orch1", M.CA, "orch1"),          # translate
        "dashboard": M.P.client("dashboard", M.CA, "dashboard"),  # read
        "ops": M.P.client("ops", M.CA, "ops"),                # admin
        "stranger": M.P.client("stranger", M.CA, "stranger"),  # verified, in no scope line
        "foreign": M.P.client("foreign", other, "orch1"),    # another CA
        "expired": M.P.client("expired", M.CA, "orch1", days=-1),
    }
    M.TOKEN_FILE = os.path.join(M.TMP, "tokens")
    with open(M.TOKEN_FILE, "w") as f:
        f.write("# token scope name\n" + "".join(f"{TOKENS[s]} {s} {s}-token\n" for s in SCOPES))
    M.SCOPES_FILE = os.path.join(M.TMP, "client-scopes")
    with open(M.SCOPES_FILE, "w") as f:
        f.write(f"{M.P.subject(M.CERTS['orch1'][0])} translate orch1\n"
                f"{M.P.subject(M.CERTS['dashboard'][0])} read dashboard\n"
                f"{M.P.subject(M.CERTS['ops'][0])} admin ops\n")


def remove_material():
    shutil.rmtree(M.TMP, ignore_errors=True)


def context(ca=None, cert=None):
    """TLS as a client: trust `ca` (default the test CA), show `cert` (a name of CERTS, or a (pem, key) pair)."""
    ctx = ssl.create_default_context(cafile=(ca or M.CA[0]))
    if cert:
        pem, key = M.CERTS[cert] if isinstance(cert, str) else cert
        ctx.load_cert_chain(pem, key)
    return ctx


class Daemon:
    """iotlbd on 127.0.0.1 with TLS (server certificate SERVER, client CA CA unless told otherwise)."""

    def __init__(self, *extra, tls=True, cert=None, key=None, client_ca=True, directory=None):
        self.port = free_port()
        self.dir = directory or tempfile.mkdtemp(dir=M.TMP)
        self.log_path = os.path.join(self.dir, "iotlbd.log")
        argv = [IOTLBD, "--listen", f"127.0.0.1:{self.port}", "--log-level", "info", *extra]
        if tls:
            argv += ["--tls-cert", cert or M.SERVER[0], "--tls-key", key or M.SERVER[1]]
            if client_ca:
                argv += ["--tls-client-ca", M.CA[0]]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log)
        try:
            wait_listening(self.port, self.proc, 15, self.log_text)
        except RuntimeError as e:
            raise AssertionError(str(e))
        self.scheme = "https" if tls else "http"

    def log_text(self):
        with open(self.log_path) as f:
            return f.read()

    def connection(self, cert="ops", ca=None, source=None):
        src = (source, 0) if source else None
        if self.scheme == "http":
            return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=src)
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30, context=context(ca, cert),
                                           source_address=src)

    def call(self, method, path, body=None, cert="ops", token=None, conn=None, ca=None, source=None):
        """(status, JSON or text, headers). `token`: a scope name of TOKENS, or a literal string."""
        c = conn or self.connection(cert, ca, source)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = "Bearer " + TOKENS.get(token, token)
        try:
            c.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
            r = c.getresponse()
            raw = r.read()
        finally:
            if conn is None:
                c.close()
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            value = raw.decode(errors="replace")
        return r.status, value, dict(r.getheaders())

    def must(self, method, path, body=None, status=200, **kw):
        got, value, _ = self.call(method, path, body, **kw)
        assert got == status, f"{method} {path}: {got} {value}"
        return value

    def metric(self, name, **kw):
        """The value of one sample of /metrics (as the admin certificate)."""
        _, text, _ = self.call("GET", "/metrics", cert="ops", token=kw.pop("token", None))
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                labels = line[len(name):].split(" ")[0]
                if all(f'{k}="{v}"' in labels for k, v in kw.items()):
                    return float(line.rsplit(" ", 1)[1])
        return None

    def curl(self, path, *args):
        """curl's exit status, HTTP status and body."""
        out = subprocess.run(["curl", "-s", "-m", "10", "-w", "\n%{http_code}", *args,
                              f"https://127.0.0.1:{self.port}{path}"], capture_output=True, text=True, timeout=30)
        body, _, code = out.stdout.rpartition("\n")
        return out.returncode, int(code or 0), body

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.log.close()


def error_code(value):
    return value.get("error", {}).get("code") if isinstance(value, dict) else None
