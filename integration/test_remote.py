#!/usr/bin/env python3
"""Remote control (issue 24), against live daemons: TLS with client
certificates from a throw-away CA made with openssl, scoped tokens and
certificate subjects, every route of api/openapi.yaml tried with every scope,
certificates reloaded on SIGHUP under a long-poll, the audit log, the failure
limit, refusals at start-up, the Unix socket staying plain, and the example
orchestrator over TLS. Run by `make test-remote` (stdlib unittest, curl,
openssl, PyYAML); fails, never skips, when one is missing."""
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from iotlbtest import IOTLBD, ROOT, free_port  # noqa: E402
from remoterig import (  # noqa: E402
    Daemon, error_code, M, make_material, MEM, remove_material, RING, SCOPES, TOKENS)


def setUpModule():
    make_material()


def tearDownModule():
    remove_material()


class TLSListener(unittest.TestCase):
    """One daemon: TLS, client certificates required, tokens and subjects with scopes,
    --metrics-auth, an audit log, a failure limit too wide to matter here."""

    @classmethod
    def setUpClass(cls):
        cls.audit = os.path.join(M.TMP, "audit.log")
        cls.d = Daemon("--token-file", M.TOKEN_FILE, "--tls-client-scopes", M.SCOPES_FILE, "--metrics-auth",
                       "--audit-log", cls.audit, "--auth-failure-limit", "100000/1")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def test_curl_with_the_client_certificate_works(self):
        pem, key = M.CERTS["dashboard"]
        rc, status, body = self.d.curl("/v1/devices", "--cacert", M.CA[0], "--cert", pem, "--key", key)
        self.assertEqual((rc, status), (0, 200), body)
        self.assertIn("devices", json.loads(body))
        rc, status, body = self.d.curl("/healthz", "--cacert", M.CA[0])  # open, no certificate
        self.assertEqual((rc, status, json.loads(body)), (0, 200, {"status": "ok"}))

    def test_refused_with_the_right_error(self):
        before = {r: self.d.metric("iotlbd_auth_failures_total", reason=r) or 0
                  for r in ("no_client_cert", "untrusted_cert", "expired_cert", "unknown_subject", "tls_handshake")}
        cases = {
            "no_client_cert": ([], "requires a client certificate"),
            "untrusted_cert": (["--cert", M.CERTS["foreign"][0], "--key", M.CERTS["foreign"][1]], "not signed by a CA"),
            "expired_cert": (["--cert", M.CERTS["expired"][0], "--key", M.CERTS["expired"][1]], "has expired"),
            "unknown_subject": (["--cert", M.CERTS["stranger"][0], "--key", M.CERTS["stranger"][1]],
                                "is not in --tls-client-scopes"),
        }
        for reason, (args, message) in cases.items():
            with self.subTest(reason=reason):
                rc, status, body = self.d.curl("/v1/devices", "--cacert", M.CA[0], *args)
                self.assertEqual((rc, status), (0, 401), body)
                err = json.loads(body)["error"]
                self.assertEqual(err["code"], "unauthorized")
                self.assertIn(message, err["message"])
        # Plain HTTP against the TLS port: no HTTP answer at all, the connection is closed.
        out = subprocess.run(["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://127.0.0.1:{self.d.port}/v1/devices"], capture_output=True, text=True)
        self.assertIn(out.returncode, (52, 56), out)
        self.assertEqual(out.stdout, "000")
        # TLS 1.1 and older: refused in the handshake.
        rc, status, _ = self.d.curl("/healthz", "--cacert", M.CA[0], "--tls-max", "1.1")
        self.assertEqual((rc, status), (35, 0))
        after = {r: self.d.metric("iotlbd_auth_failures_total", reason=r) for r in before}
        for r in cases:
            self.assertEqual(after[r] - before[r], 1, r)
        self.assertGreaterEqual(after["tls_handshake"] - before["tls_handshake"], 2)

    def test_scopes_by_token_and_by_certificate(self):
        d = self.d
        d.must("POST", "/v1/devices", {"id": "sc0", "translator": "external"}, status=201, token="admin")
        d.must("PUT", "/v1/devices/sc0/mem-table", MEM, token="admin")
        update = {"iova": "0x100000", "size": 4096, "uaddr": "0x7f0000100000", "perm": "rw"}
        for who in ({"token": "read"}, {"cert": "dashboard"}):
            status, value, _ = d.call("POST", "/v1/devices/sc0/iotlb/updates", update, **who)
            self.assertEqual((status, error_code(value)), (403, "forbidden"), who)
            self.assertIn("needs scope translate", value["error"]["message"])
            self.assertEqual(d.call("GET", "/v1/devices/sc0/iotlb/entries", **who)[0], 200, who)
        for who in ({"token": "translate"}, {"cert": "orch1"}):
            self.assertEqual(d.call("POST", "/v1/devices/sc0/iotlb/updates", update, **who)[0], 200, who)
            self.assertEqual(d.call("POST", "/v1/devices/sc0/iotlb/invalidations", {"iova": 0, "size": 4096}, **who)[0], 200)
            status, value, _ = d.call("DELETE", "/v1/devices/sc0", **who)
            self.assertEqual((status, error_code(value)), (403, "forbidden"), who)
            self.assertIn("needs scope admin", value["error"]["message"])
        # A token decides over the certificate it came with.
        self.assertEqual(d.call("DELETE", "/v1/devices/sc0", cert="ops", token="read")[0], 403)
        # admin does all of it.
        for who in ({"token": "admin", "cert": "dashboard"}, {"cert": "ops"}):
            name = "sc-" + ("t" if "token" in who else "c")
            d.must("POST", "/v1/devices", {"id": name, "translator": "external"}, status=201, **who)
            d.must("PUT", f"/v1/devices/{name}/mem-table", MEM, **who)
            d.must("POST", f"/v1/devices/{name}/iotlb/updates", update, **who)
            d.must("PUT", f"/v1/devices/{name}/vrings/1", RING, **who)
            d.must("DELETE", f"/v1/devices/{name}/iotlb", **who)
            d.must("GET", "/v1/config", **who)
            d.must("DELETE", f"/v1/devices/{name}", status=204, **who)
        d.must("DELETE", "/v1/devices/sc0", status=204, token="admin")

    def test_every_route_of_the_document_with_every_scope(self):
        import yaml
        with open(os.path.join(ROOT, "api", "openapi.yaml")) as f:
            doc = yaml.safe_load(f)
        tried = 0
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in ("get", "put", "post", "delete"):
                    continue
                requirements = op.get("security", doc.get("security", []))
                scopes = {s for req in requirements for s in req.get("bearer", [])}
                if path == "/healthz":
                    self.assertEqual(requirements, [], "/healthz is open")
                    continue
                self.assertEqual(len(scopes), 1, f"{method} {path}: {requirements}")
                needed = scopes.pop()
                self.assertIn({"clientCertificate": [needed]}, requirements, f"{method} {path}")
                if SCOPES.index(needed) > 0:
                    ref = op["responses"].get("403", {}).get("$ref", "")
                    self.assertTrue(ref.endswith("/Forbidden"), f"{method} {path} documents no 403 Forbidden")
                url = path.replace("{id}", "rt0").replace("{n}", "1")
                if url.endswith("/iotlb/translate"):
                    url += "?iova=0&perm=ro"
                elif url.endswith("/guest-iommu/translate"):
                    url += "?iova=0"
                elif url.endswith("/iotlb/misses"):
                    url += "?timeout_ms=0"
                for scope in SCOPES:
                    if self.d.call("GET", "/v1/devices/rt0", token="admin")[0] == 404:
                        self.d.must("POST", "/v1/devices", {"id": "rt0"}, status=201, token="admin")
                    status, value, _ = self.d.call(method.upper(), url, token=scope)
                    tried += 1
                    with self.subTest(method=method, path=path, scope=scope):
                        if SCOPES.index(scope) < SCOPES.index(needed):
                            self.assertEqual((status, error_code(value)), (403, "forbidden"), value)
                            self.assertIn(f"needs scope {needed}", value["error"]["message"])
                        else:
                            self.assertNotIn(status, (401, 429), value)
                            self.assertNotEqual(error_code(value), "forbidden", value)
        self.assertGreaterEqual(tried, 3 * 20)
        print(f"\n  {tried} requests: every documented operation with every scope", file=sys.stderr)

    def test_metrics_needs_read_and_healthz_is_open(self):
        self.assertEqual(self.d.call("GET", "/metrics", cert="dashboard")[0], 200)
        self.assertEqual(self.d.call("GET", "/metrics", cert="stranger")[0], 401)
        self.assertEqual(self.d.call("GET", "/healthz", cert=None)[0], 200)
        self.assertEqual(self.d.call("GET", "/metrics", cert=None)[0], 401)

    def test_audit_log_one_line_per_state_change_and_no_secrets(self):
        def lines():
            with open(self.audit) as f:
                return [json.loads(line) for line in f]
        time.sleep(0.3)
        start = len(lines())
        d = self.d
        expected = [  # (method, route, status, credential)
            ("POST", "/v1/devices", 201, "admin-token"),
            ("PUT", "/v1/devices/{id}/mem-table", 200, "ops"),
            ("POST", "/v1/devices/{id}/iotlb/updates", 200, "orch1"),
            ("POST", "/v1/devices/{id}/iotlb/updates", 403, "read-token"),
            ("DELETE", "/v1/devices/{id}", 403, "orch1"),
            ("POST", "/v1/devices/{id}/iotlb/invalidations", 401, "-"),
            ("PUT", "/v1/devices/{id}/vrings/{n}", 404, "ops"),
            ("DELETE", "/v1/devices/{id}", 403, "translate-token"),
            ("DELETE", "/v1/devices/{id}", 204, "ops"),
        ]
        d.call("POST", "/v1/devices", {"id": "au0"}, token="admin")
        d.call("PUT", "/v1/devices/au0/mem-table", MEM)
        d.call("GET", "/v1/devices/au0")  # not audited
        d.call("POST", "/v1/devices/au0/iotlb/updates", {"iova": 0, "size": 4096, "uaddr": "0x7f0000000000", "perm": "ro"},
               cert="orch1")
        d.call("POST", "/v1/devices/au0/iotlb/updates", {"iova": 0, "size": 4096, "uaddr": 0, "perm": "ro"}, token="read")
        d.call("DELETE", "/v1/devices/au0", cert="orch1")
        d.call("GET", "/v1/devices/au0/iotlb/entries", cert="dashboard")  # not audited
        d.call("POST", "/v1/devices/au0/iotlb/invalidations", {"iova": 0, "size": 1}, token="wrong-" + TOKENS["admin"])
        d.call("PUT", "/v1/devices/nope/vrings/1", RING)
        d.call("DELETE", "/v1/devices/au0", token="translate")
        d.call("DELETE", "/v1/devices/au0")
        deadline = time.time() + 5
        while len(lines()) < start + len(expected) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        got = lines()[start:]
        self.assertEqual([(g["method"], g["route"], g["status"], g["credential"]) for g in got], expected)
        for g in got:
            self.assertEqual(set(g) - {"device", "scope"}, {"time", "credential", "via", "peer", "method", "route",
                                                            "path", "status", "duration_ms"})
            self.assertRegex(g["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
            self.assertGreaterEqual(g["duration_ms"], 0)
            self.assertEqual(g["peer"], "127.0.0.1")
        self.assertEqual([g.get("device") for g in got], ["au0"] * 6 + ["nope", "au0", "au0"])
        with open(self.audit) as f:
            text = f.read()
        for secret in TOKENS.values():
            self.assertNotIn(secret, text)
        for word in ("Bearer", "PRIVATE KEY", "BEGIN"):
            self.assertNotIn(word, text)
        self.assertEqual(os.stat(self.audit).st_mode & 0o777, 0o600)

    def test_orchestrator_example_over_tls_with_translate_scope(self):
        d = self.d
        d.must("POST", "/v1/devices", {"id": "orc0", "translator": "external"}, status=201, token="admin")
        pem, key = M.CERTS["orch1"]
        orch = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "orchestrator.py"), "--url",
                                 f"https://127.0.0.1:{d.port}", "--device", "orc0", "--cacert", M.CA[0], "--cert", pem,
                                 "--key", key, "--poll-ms", "200", "--log-level", "WARNING"])
        try:
            d.must("PUT", "/v1/devices/orc0/workload", {"packet_size": 64, "page_size": "4k", "mapping": "dynamic",
                                                        "packets": 2000, "ring_size": 32}, token="admin")
            deadline = time.time() + 60
            while True:
                w = d.must("GET", "/v1/devices/orc0/workload", cert="dashboard")
                if w["state"] == "done":
                    break
                self.assertLess(time.time(), deadline, w)
                time.sleep(0.1)
            self.assertEqual((w["received"], w["verify_errors"], w["translator_answers"]), (2000, 0, 0))
            orch.send_signal(signal.SIGTERM)
            self.assertEqual(orch.wait(timeout=10), 0)
        finally:
            if orch.poll() is None:
                orch.kill()
            d.call("DELETE", "/v1/devices/orc0", token="admin")


class Reload(unittest.TestCase):
    def test_sighup_new_certificate_while_a_long_poll_waits(self):
        directory = tempfile.mkdtemp(dir=M.TMP)
        cert, key = os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")
        shutil.copy(M.SERVER[0], cert)
        shutil.copy(M.SERVER[1], key)
        tokens = os.path.join(directory, "tokens")
        shutil.copy(M.TOKEN_FILE, tokens)
        d = Daemon("--token-file", tokens, "--tls-client-scopes", M.SCOPES_FILE, "--audit-log", "none",
                   cert=cert, key=key, directory=directory)
        try:
            d.must("POST", "/v1/devices", {"id": "lp", "translator": "external"}, status=201)
            d.must("PUT", "/v1/devices/lp/mem-table", MEM)
            kept = d.connection("dashboard")
            self.assertEqual(d.call("GET", "/v1/devices", conn=kept)[0], 200)
            sock = kept.sock
            answer = {}

            def poll():
                answer["value"] = d.call("GET", "/v1/devices/lp/iotlb/misses?timeout_ms=30000", cert="orch1")
            t = threading.Thread(target=poll)
            t.start()
            time.sleep(0.5)
            # A new server certificate from a new CA, moved into place, then SIGHUP.
            new_ca = M.P.ca("ca-new", "the new CA")
            new_cert, new_key = M.P.server("server-new", new_ca)
            shutil.copy(new_cert, cert + ".tmp")
            shutil.copy(new_key, key + ".tmp")
            os.replace(key + ".tmp", key)
            os.replace(cert + ".tmp", cert)
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while True:
                try:
                    status = d.call("GET", "/v1/devices", cert="orch1", ca=new_ca[0])[0]
                    break
                except ssl.SSLError:
                    self.assertLess(time.time(), deadline, "the new certificate was not served")
                    time.sleep(0.1)
            self.assertEqual(status, 200)
            with self.assertRaises(ssl.SSLCertVerificationError):
                d.call("GET", "/healthz", cert="orch1", ca=M.CA[0])
            # The connection made before the reload goes on, on the same socket.
            self.assertEqual(d.call("GET", "/v1/devices", conn=kept)[0], 200)
            self.assertIs(kept.sock, sock)
            kept.close()
            # The long-poll in flight survived: a miss reaches it.
            self.assertTrue(t.is_alive())
            d.must("PUT", "/v1/devices/lp/vrings/1", RING, ca=new_ca[0])
            t.join(timeout=10)
            status, value, _ = answer["value"]
            self.assertEqual(status, 200, value)
            self.assertEqual([(m["vq"], m["type"]) for m in value["misses"]], [(1, "miss")])
            self.assertEqual(self.metric(d, new_ca, "iotlbd_credential_reloads_total", result="ok"), 1)
            # A refused reload (the key of another certificate) keeps what is in force.
            shutil.copy(M.CERTS["ops"][1], key)
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while self.metric(d, new_ca, "iotlbd_credential_reloads_total", result="failed") != 1:
                self.assertLess(time.time(), deadline)
                time.sleep(0.1)
            self.assertIn("does not match", d.log_text())
            self.assertEqual(d.call("GET", "/healthz", cert="orch1", ca=new_ca[0])[0], 200)
            # Tokens are re-read too.
            shutil.copy(new_key, key)
            with open(tokens, "a") as f:
                f.write("n3w-t0ken-5ecret-0004 read newcomer\n")
            self.assertEqual(d.call("GET", "/v1/devices", token="n3w-t0ken-5ecret-0004", ca=new_ca[0])[0], 401)
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 10
            while d.call("GET", "/v1/devices", token="n3w-t0ken-5ecret-0004", ca=new_ca[0])[0] != 200:
                self.assertLess(time.time(), deadline)
                time.sleep(0.1)
        finally:
            d.stop()

    @staticmethod
    def metric(d, ca, name, **labels):
        _, text, _ = d.call("GET", "/metrics", cert="ops", ca=ca[0])
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None


class Limits(unittest.TestCase):
    def test_failures_are_rate_limited_per_peer_not_verified_certificates(self):
        d = Daemon("--token-file", M.TOKEN_FILE, "--audit-log", "none", "--auth-failure-limit", "3/30")
        try:
            for _ in range(3):
                self.assertEqual(d.call("GET", "/v1/devices", token="guess")[0], 401)
            status, value, headers = d.call("GET", "/v1/devices", token="guess")
            self.assertEqual((status, error_code(value)), (429, "rate_limited"), value)
            self.assertTrue(1 <= int(headers["Retry-After"]) <= 10, headers)
            # The peer's tokens are not even looked at now, good ones included ...
            self.assertEqual(d.call("GET", "/v1/devices", token="read")[0], 429)
            # ... but a verified client certificate alone is never limited,
            self.assertEqual(d.call("GET", "/v1/devices", cert="ops")[0], 200)
            # and another address is another peer.
            self.assertEqual(d.call("GET", "/v1/devices", token="read", source="127.0.0.2")[0], 200)
            self.assertEqual(d.metric("iotlbd_auth_failures_total", reason="bad_token"), 3)
            self.assertEqual(d.metric("iotlbd_auth_rate_limited_total"), 2)
        finally:
            d.stop()

    def test_start_refused_with_a_clear_message(self):
        world = os.path.join(M.TMP, "world-readable.key")
        shutil.copy(M.SERVER[1], world)
        os.chmod(world, 0o644)
        bad_tokens = os.path.join(M.TMP, "bad-tokens")
        with open(bad_tokens, "w") as f:
            f.write("abc write someone\n")
        cases = [
            (["--tls-cert", M.SERVER[0], "--tls-key", M.CERTS["ops"][1]], "does not match"),
            (["--tls-cert", os.path.join(M.TMP, "missing.pem"), "--tls-key", M.SERVER[1]], "missing.pem: no such file"),
            (["--tls-cert", M.SERVER[0], "--tls-key", world], "readable by others"),
            (["--tls-cert", M.SERVER[0], "--tls-key", M.SERVER[1], "--tls-client-ca", M.SERVER[1]], "--tls-client-ca"),
            (["--token-file", bad_tokens], "unknown scope \"write\""),
            (["--tls-client-ca", M.CA[0]], "need --tls-cert"),
        ]
        for args, message in cases:
            with self.subTest(args=args):
                out = subprocess.run([IOTLBD, "--listen", f"127.0.0.1:{free_port()}", *args], capture_output=True,
                                     text=True, timeout=30)
                self.assertNotEqual(out.returncode, 0)
                self.assertIn(message, out.stderr)

    def test_unix_socket_stays_plain(self):
        sock = os.path.join(M.TMP, "api.sock")
        port = free_port()
        proc = subprocess.Popen([IOTLBD, "--listen", f"unix:{sock}", "--also-listen", f"127.0.0.1:{port}",
                                 "--tls-cert", M.SERVER[0], "--tls-key", M.SERVER[1], "--tls-client-ca", M.CA[0],
                                 "--log-level", "warning", "--audit-log", "none"])
        try:
            deadline = time.time() + 10
            while not os.path.exists(sock):
                self.assertLess(time.time(), deadline)
                time.sleep(0.05)
            out = subprocess.run(["curl", "-s", "--unix-socket", sock, "http://localhost/v1/devices"],
                                 capture_output=True, text=True, timeout=10)
            self.assertEqual(json.loads(out.stdout), {"devices": []})
            pem, key = M.CERTS["ops"]
            out = subprocess.run(["curl", "-s", "--cacert", M.CA[0], "--cert", pem, "--key", key,
                                  f"https://127.0.0.1:{port}/v1/devices"], capture_output=True, text=True, timeout=10)
            self.assertEqual(json.loads(out.stdout), {"devices": []})
        finally:
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=10), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
