"""A throw-away PKI made with the openssl command, for the TLS tests: CAs, a
server certificate for 127.0.0.1, client certificates (also expired ones and
ones from another CA). EC P-256 keys (fast to make), written 0600."""
import os
import subprocess


def openssl(*args, cwd=None):
    out = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout


class PKI:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def key(self, name):
        key = self.path(name + ".key")
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        os.chmod(key, 0o600)
        return key

    def ca(self, name, cn):
        """A self-signed CA: (certificate, key)."""
        key = self.key(name)
        pem = self.path(name + ".pem")
        openssl("req", "-x509", "-new", "-key", key, "-out", pem, "-days", "3", "-subj", f"/CN={cn}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return pem, key

    def sign(self, name, ca, subject, extensions, days=2):
        """A certificate for `subject` (openssl's /K=V/… form) signed by `ca`; (certificate, key).
        days=-1 makes one that expired (notAfter before now)."""
        key = self.key(name)
        csr, pem, ext = self.path(name + ".csr"), self.path(name + ".pem"), self.path(name + ".ext")
        with open(ext, "w") as f:
            f.write(extensions + "\n")
        openssl("req", "-new", "-key", key, "-out", csr, "-subj", subject)
        openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-out", pem,
                "-days", str(days), "-extfile", ext)
        return pem, key

    def server(self, name, ca):
        return self.sign(name, ca, "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                                    "extendedKeyUsage=serverAuth")

    def client(self, name, ca, cn, days=2):
        return self.sign(name, ca, f"/O=vhost-iotlb tests/CN={cn}", "extendedKeyUsage=clientAuth", days=days)

    @staticmethod
    def subject(pem):
        """The subject as RFC 4514 writes it (what --tls-client-scopes lines start with)."""
        out = openssl("x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in", pem).strip()
        assert out.startswith("subject="), out
        return out[len("subject="):]
