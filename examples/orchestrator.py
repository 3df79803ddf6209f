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
"""
import argparse
import http.client
import json
import logging
import signal
import socket
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
    """iotlbd's API at an http:// URL, or at unix:PATH (a Unix socket)."""

    def __init__(self, url, token=None, timeout=70):
        self.unix_path = url[len("unix:"):] if url.startswith("unix:") else None
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method, path, body=None):
        if self.unix_path is not None:
            return self.call_unix(method, path, body)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                return e.code, json.loads(payload)
            except ValueError:
                return e.code, {"error": {"code": "http", "message": payload.decode(errors="replace")}}


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


def answer(client, device, miss):
    """Looks the missed IOVA up in the guest IOMMU and posts the update. True when answered."""
    status, page = client.call("GET", f"/v1/devices/{device}/guest-iommu/translate?iova={miss['iova']}")
    if status != 200:
        log.warning("seq %s: guest IOMMU has no mapping for %s (%s); leaving it outstanding",
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


def run(args, stopping):
    token = open(args.token_file).read().strip() if args.token_file else None
    client = Client(args.url, token)
    cursor = 0
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
        for m in misses:
            if m["type"] == "miss" and answer(client, args.device, m):
                answered += 1
            elif m["type"] == "access_fail":
                log.error("seq %s: access failure on vq %s at %s (%s): the vring must be set again",
                          m["seq"], m["vq"], m["iova"], m["perm"])
        cursor = last
    log.info("stopping after %d answers", answered)


def main():
    p = argparse.ArgumentParser(description="Answer iotlbd IOTLB misses from the guest IOMMU view.")
    p.add_argument("--url", default="http://127.0.0.1:8080",
                   help="iotlbd base URL: http://HOST:PORT, or unix:PATH for iotlbd --listen unix:PATH")
    p.add_argument("--device", required=True, help="device id whose misses to answer")
    p.add_argument("--token-file", help="file with the bearer token, if iotlbd runs with --token-file")
    p.add_argument("--poll-ms", type=int, default=1000, help="long-poll time-out in ms (default 1000)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args()
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
