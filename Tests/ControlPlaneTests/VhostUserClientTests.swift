// vhost-user client mode: the front-end listens (QEMU's server=on, DPDK's
// server=1, OVS-DPDK's dpdkvhostuserclient), iotlbd connects, and reconnects
// with a bounded back-off whenever the connection is lost or was never there.
import CUnixSocket
import Glibc
import Testing
import Vhost
import VhostUser
import ControlPlane
import Platform
import JSON

// Part of the serialized "vhost-user backend" suite: leftoversOfFrontEnds
// tells eventfds apart by kernel ids, which are reused, so no other test may
// make eventfds while one of these checks.
extension VhostUserTests {
    func vhostUser(_ d: LiveDaemon, _ id: String) throws -> JSON {
        try d.expect(200, "GET", "/v1/devices/\(id)")["vhost_user"] ?? .null
    }

    @Test("iotlbd connects to a listening front-end, carries traffic, and reconnects after the front-end went away and came back")
    func connectsAndReconnects() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("client")
        unlink(path)
        // Created before anything listens: it keeps trying.
        let created = try d.expect(201, "POST", "/v1/devices",
                                   #"{"id":"vc","iotlb":false,"vhost_user":{"socket":"client.sock","mode":"client"}}"#)
        #expect(created["vhost_user"]?["mode"] == .string("client"))
        #expect(created["vhost_user"]?["socket"] == .string(path))
        #expect(try eventually { (try vhostUser(d, "vc")["reconnect_attempts"]?.intValue ?? 0) >= 3 })
        #expect(try vhostUser(d, "vc")["connected"] == .bool(false))
        #expect(access(path, F_OK) != 0, "client mode makes no socket file")

        var eventIDs: Set<Int> = []
        for round in 0..<2 {
            let listener = cunixsock_listen(path)
            #expect(listener >= 0)
            do {
                let fe = try VhostUserFrontEnd.accepting(listener)
                try Self.plainTraffic(fe, frames: 32, seed: UInt64(40 + round))
                let v = try vhostUser(d, "vc")
                #expect(v["connected"] == .bool(true))
                #expect(v["connections"] == .int(Int64(round + 1)))
                eventIDs.formUnion(fe.eventIDs)
                // The front-end goes away: its socket file too (as QEMU's does).
                close(listener)
                unlink(path)
            }
            #expect(try eventually {
                let dev = try d.expect(200, "GET", "/v1/devices/vc")
                return dev["vhost_user"]?["connected"] == .bool(false) && dev["mem_table"] == .null
            })
            let attempts = try vhostUser(d, "vc")["reconnect_attempts"]?.intValue ?? 0
            #expect(try eventually { (try vhostUser(d, "vc")["reconnect_attempts"]?.intValue ?? 0) > attempts },
                    "it tries again while nothing listens")
        }
        #expect(leftoversOfFrontEnds(eventIDs: eventIDs) == [])
        // Deleting the device stops the attempts; nothing is made at the path.
        try d.expect(204, "DELETE", "/v1/devices/vc")
        #expect(access(path, F_OK) != 0)
    }

    @Test("the back-off doubles from 50 ms and stays at 2 s at most")
    func backoffIsBounded() throws {
        let d = try LiveDaemon()
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vb","vhost_user":{"socket":"never.sock","mode":"client"}}"#)
        // Attempts at 0, 0.05, 0.15, 0.35, 0.75, 1.55, 3.15 s (waits doubling from 50 ms), then every 2 s: 5.15, 7.15 s.
        usleep(1_300_000)
        let early = try vhostUser(d, "vb")["reconnect_attempts"]?.intValue ?? 0
        #expect((4...6).contains(early), "\(early) attempts after 1.3 s")
        usleep(4_000_000)
        let later = try vhostUser(d, "vb")["reconnect_attempts"]?.intValue ?? 0
        #expect((7...9).contains(later), "\(later) attempts after 5.3 s (waits capped at 2 s)")
        #expect(try vhostUser(d, "vb")["last_error"]?.stringValue?.contains("No such file") == true)
        // A listener appears: connected within the 2 s bound.
        let listener = cunixsock_listen(Self.socketPath("never"))
        defer { close(listener); unlink(Self.socketPath("never")) }
        let fe = try VhostUserFrontEnd.accepting(listener, seconds: 3)
        #expect(try fe.get64(.getFeatures) & VhostUserFeature.version1 != 0)
        #expect(try vhostUser(d, "vb")["connected"] == .bool(true))
    }

    @Test("a front-end that accepts and drops at once is retried with growing waits, not in a tight loop")
    func dropAtOnceBacksOff() throws {
        let d = try LiveDaemon()
        let path = Self.socketPath("dropper")
        unlink(path)
        let listener = cunixsock_listen(path)
        defer { close(listener); unlink(path) }
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vd","vhost_user":{"socket":"dropper.sock","mode":"client"}}"#)
        var accepted = 0
        let end = monotonicNanos() + 3_000_000_000
        while monotonicNanos() < end {
            var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 50) == 1 else { continue }
            let c = cunixsock_accept(listener)
            if c >= 0 { accepted += 1; close(c) }
        }
        // Waits of 50, 100, 200, 400, 800, 1600 ms: 6 connections in 3 s (60 at a fixed 50 ms).
        #expect((4...8).contains(accepted), "\(accepted) connections in 3 s")
        #expect((try vhostUser(d, "vd")["connections"]?.intValue ?? 0) >= accepted)
    }

    @Test("server-mode devices answer mode server and 0 reconnect attempts")
    func serverModeFields() throws {
        let d = try LiveDaemon()
        let j = try d.expect(201, "POST", "/v1/devices", #"{"id":"vs","vhost_user":{"socket":"server.sock"}}"#)
        #expect(j["vhost_user"]?["mode"] == .string("server"))
        #expect(j["vhost_user"]?["reconnect_attempts"] == .int(0))
    }
}

extension JSON {
    var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }
}
