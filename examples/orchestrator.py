#!/usr/bin/env python3
"""An external translator for iotlbd, written as a real orchestrator would be.

It long-polls a device's IOTLB misses with a cursor, asks the device's
guest IOMMU view (what a VMM's vIOMMU knows) for each missed IOVA, and
answers with an IOTLB update. It survives restarts of itself (a new run
starts from the outstanding misses: nothing is lost) and of the daemon
(connection errors are retried with backoff; a cursor ahead of the
daemon's, after a daemon restart, is reset). SIGTERM or SIGINT stops it
cleanly, exit status 0.

    examples/orchestrator.py --url http://127.0.0.1:8080 --device nic0
    examples/orchestrator.py --url unix:/run/iotlbd/api.sock --device nic0
    examples/orchestrator.py --url https://iotlbd.example:8443 --device nic0 \
        --cacert ca.pem --cert orch1.pem --key orch1.key

Over TLS it shows iotlbd a client certificate (--cert, --key) and trusts
only --cacert for the server's; the credential needs scope translate (it
reads misses and the guest IOMMU view, and posts updates), from the
certificate's line in iotlbd's --tls-client-scopes or a --token-file token.
"""
import argparse
import http.client
import json
import logging
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger("orchestrator")


class Stop(Exception):
    pass


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (iotlbd --listen unix:PATH)."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Client:
    """iotlbd's API at an http:// or https:// URL, or at unix:PATH (a Unix socket)."""

    def __init__(self, url, token=None, timeout=70, tls=None):
        self.unix_path = url[len("unix:"):] if url.startswith("unix:") else None
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.tls = tls  # an ssl.SSLContext for https:// URLs
        self.kept = None  # https: one connection kept open (a TLS handshake per request would dominate)

    def call(self, method, path, body=None):
        if self.unix_path is not None:
            return self.call_unix(method, path, body)
        if self.url.startswith("https:"):
            return self.call_https(method, path, body)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.tls) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                return e.code, json.loads(payload)
            except ValueError:
                return e.code, {"error": {"code": "http", "message": payload.decode(errors="replace")}}


    def call_https(self, method, path, body=None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        data = None if body is None else json.dumps(body).encode()
        for attempt in (1, 2):  # a kept connection the server closed (idle time-out) is made again, once
            fresh = self.kept is None
            if fresh:
                u = urllib.parse.urlsplit(self.url)
                self.kept = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=self.timeout,
                                                        context=self.tls)
            try:
                self.kept.request(method, path, body=data, headers=headers)
                resp = self.kept.getresponse()
                payload = resp.read()
                break
            except (http.client.HTTPException, ConnectionError) as e:
                self.kept.close()
                self.kept = None
                if fresh or attempt == 2:
                    raise ConnectionError(f"{self.url}: {e}") from e
            except OSError:
                self.kept.close()
                self.kept = None
                raise
        try:
            return resp.status, json.loads(payload or b"null")
        except ValueError:
            return resp.status, {"error": {"code": "http", "message": payload.decode(errors="replace")}}

    def call_unix(self, method, path, body=None):
        headers = {"Content-Type": "application/json", "Host": "localhost"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        conn = UnixHTTPConnection(self.unix_path, self.timeout)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except http.client.HTTPException as e:
            raise ConnectionError(f"unix:{self.unix_path}: {e}") from e
        finally:
            conn.close()
        try:
            return resp.status, json.loads(payload or b"null")
        except ValueError:
            return resp.status, {"error": {"code": "http", "message": payload.decode(errors="replace")}}


def answer(client, device, miss, warned):
    """Looks the missed IOVA up in the guest IOMMU and posts the update. True when answered.
    `warned`: the seqs already reported unanswerable (each is reported once)."""
    status, page = client.call("GET", f"/v1/devices/{device}/guest-iommu/translate?iova={miss['iova']}")
    if status != 200:
        if miss["seq"] not in warned:
            warned.add(miss["seq"])
            log.warning("seq %s: guest IOMMU has no mapping for %s (%s); asking again",
                        miss["seq"], miss["iova"], page.get("error", {}).get("code"))
        return False
    entry = {k: page[k] for k in ("iova", "size", "uaddr", "perm")}
    status, result = client.call("POST", f"/v1/devices/{device}/iotlb/updates", entry)
    if status != 200:
        log.warning("seq %s: update refused: %s", miss["seq"], result)
        return False
    log.info("seq %s vq %s %s %s -> %s (%s bytes, resolved %s)", miss["seq"], miss["vq"], miss["type"], miss["iova"],
             page["uaddr"], page["size"], result.get("resolved_misses"))
    return True


def tls_context(args):
    """TLS 1.2 or later, the server checked against --cacert, --cert/--key shown to it."""
    if not args.url.startswith("https:"):
        return None
    ctx = ssl.create_default_context(cafile=args.cacert)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


def run(args, stopping):
    token = open(args.token_file).read().strip() if args.token_file else None
    client = Client(args.url, token, tls=tls_context(args))
    cursor = 0
    reported = 0  # the last access failure logged
    warned = set()
    backoff = 0.05
    answered = 0
    while not stopping():
        try:
            status, body = client.call(
                "GET", f"/v1/devices/{args.device}/iotlb/misses?after={cursor}&timeout_ms={args.poll_ms}")
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            log.warning("daemon unreachable (%s); retrying in %.2fs", e, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            continue
        backoff = 0.05
        if status == 404:
            log.info("device %s not there (yet); waiting", args.device)
            cursor = 0
            time.sleep(0.2)
            continue
        if status != 200:
            log.error("long-poll answered %s: %s", status, body)
            time.sleep(0.5)
            continue
        misses, last = body["misses"], body["last_seq"]
        if not misses and last < cursor:
            log.info("daemon restarted (cursor %s > %s); starting over", cursor, last)
            cursor = 0
            continue
        pending = None  # the first miss left unanswered: asked for again from there
        for m in misses:
            if m["type"] == "miss":
                if answer(client, args.device, m, warned):
                    answered += 1
                elif pending is None:
                    pending = m["seq"]
            elif m["type"] == "access_fail" and m["seq"] > reported:
                reported = m["seq"]
                log.error("seq %s: access failure on vq %s at %s (%s): the vring must be set again",
                          m["seq"], m["vq"], m["iova"], m["perm"])
        if pending is None:
            cursor = last
        else:
            # The guest may map it a moment later (a ring set before its pages are
            # mapped): ask again rather than wait for a miss that is already posted.
            cursor = pending - 1
            time.sleep(0.05)
    log.info("stopping after %d answers", answered)


def main():
    p = argparse.ArgumentParser(description="Answer iotlbd IOTLB misses from the guest IOMMU view.")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="iotlbd base URL: http://HOST:PORT, https://HOST:PORT (with --cacert, --cert, --key), "
                        "or unix:PATH for iotlbd --listen unix:PATH")
    p.add_argument("--device", required=True, help="device id whose misses to answer")
    p.add_argument("--token-file", help="file with the bearer token, if iotlbd runs with --token-file")
    p.add_argument("--cacert", help="https: the CA certificate(s) the server's certificate must chain to (PEM)")
    p.add_argument("--cert", help="https: this client's certificate (PEM), for iotlbd --tls-client-ca")
    p.add_argument("--key", help="https: the private key of --cert (PEM)")
    p.add_argument("--poll-ms", type=int, default=1000, help="long-poll time-out in ms (default 1000)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args()
    if (args.cert is None) != (args.key is None):
        p.error("--cert and --key go together")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = {"now": False}

    def on_signal(signum, _frame):
        log.info("signal %d: finishing the current poll", signum)
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run(args, lambda: stop["now"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
