// Configuration that outlives the process: the state file of --state-dir,
// GET /v1/config, --config. (integration/test_restarts.py does the same with the
// real binary and kill -9.)
import ControlPlane
import Foundation
import Glibc
import JSON
import Testing

// In the serialized "vhost-user backend" suite: it makes vhost-user devices
// (eventfds), see VhostUserClientTests.swift.
extension VhostUserTests {
    static func stateScratch(_ tag: String) -> String {
        var t = Array("/tmp/iotlbd-config-\(tag)-XXXXXX".utf8CString)
        return String(cString: mkdtemp(&t)!)
    }

    static func fileBytes(_ path: String) -> [UInt8]? { FileManager.default.contents(atPath: path).map { Array($0) } }

    /// Devices with every kind of configuration the state keeps.
    func configure(_ d: LiveDaemon) throws {
        try d.deviceWithMemory("h", extra: #","queues":4,"iotlb_max_entries":64,"translator":"external""#)
        try d.expect(200, "PUT", "/v1/devices/h/vrings/1",
                     #"{"num":256,"desc_addr":"0x800000","avail_addr":"0x801000","used_addr":"0x802000"}"#)
        try d.expect(200, "PUT", "/v1/devices/h/vrings/2",
                     #"{"num":64,"desc_addr":"0x900000","avail_addr":"0x901000","used_addr":"0x902000","enabled":false,"event_idx":true,"in_order":true}"#)
        try d.expect(200, "POST", "/v1/devices/h/iotlb/updates", #"{"iova":"0x800000","size":"0x3000","uaddr":"0x7f0000800000","perm":"rw"}"#)
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vs","iotlb":false,"vhost_user":{"socket":"state-s.sock"}}"#)
        try d.expect(201, "POST", "/v1/devices", #"{"id":"vc","vhost_user":{"socket":"state-c.sock","mode":"client"}}"#)
        try d.expect(201, "POST", "/v1/devices", #"{"id":"gone"}"#)
        try d.expect(204, "DELETE", "/v1/devices/gone")
        try d.expect(201, "POST", "/v1/devices", #"{"id":"w"}"#)
        try d.expect(200, "PUT", "/v1/devices/w/workload", #"{"packet_size":128,"page_size":"4k","mapping":"dynamic","ring_size":32,"packets":500}"#)
    }

    /// What a restart must keep: the configuration, and what the devices show of it.
    func observed(_ d: LiveDaemon) throws -> [String] {
        var out = [try d.expect(200, "GET", "/v1/config").text]
        let h = try d.expect(200, "GET", "/v1/devices/h")
        out.append(h["mem_table"]!.text)
        for n in 0..<4 {
            let v = h["vrings"]![n]!
            out.append(["num", "desc_addr", "avail_addr", "used_addr", "enabled", "event_idx", "in_order"].map { v[$0]!.text }.joined(separator: ","))
        }
        out.append(try d.expect(200, "GET", "/v1/devices").text)
        return out
    }

    @Test("--state-dir: every change is in the state file; a new daemon on it has the same devices, memory tables, vrings and workloads, not the IOTLB")
    func restoresFromStateDir() throws {
        let dir = Self.stateScratch("state")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let before: [String]
        do {
            let d = try LiveDaemon(stateDirectory: dir)
            try configure(d)
            before = try observed(d)
            let doc = try d.expect(200, "GET", "/v1/config")
            #expect(doc["format"] == .string("iotlbd-config"))
            #expect(doc["version"] == .int(1))
            #expect(doc["devices"]?[0]?["vrings"]?[1]?["event_idx"] == .bool(true))
            #expect(doc["devices"]?[0]?["vrings"]?[1]?["in_order"] == .bool(true))
            #expect(doc["devices"]?[0]?["vrings"]?[0]?["in_order"] == nil, "written only when set")
            #expect(doc["devices"]?[3]?["workload"]?["mapping"] == .string("dynamic"))
            // The file is the document, written before the answers came.
            let file = try JSON.parse(Self.fileBytes(dir + "/config.json") ?? [])
            #expect(file == doc)
            #expect(access(dir + "/config.json.tmp", F_OK) != 0)
        }
        let d = try LiveDaemon(stateDirectory: dir)
        #expect(try observed(d) == before)
        // The IOTLB is soft state: empty, and the ring's miss is posted again for the translator.
        #expect(try d.expect(200, "GET", "/v1/devices/h/iotlb/entries")["entries"] == .array([]))
        #expect(try d.expect(200, "GET", "/v1/devices/h/vrings/1")["state"] == .string("waiting_iotlb"))
        #expect(try d.expect(200, "GET", "/v1/devices/w/workload")["state"] != nil)
        // The server socket is served again, the client device connects again.
        #expect(eventually { access(testSocketDirectory + "/state-s.sock", F_OK) == 0 })
        #expect(try eventually {
            (try d.expect(200, "GET", "/v1/devices/vc")["vhost_user"]?["reconnect_attempts"]?.intValue ?? 0) > 0
        })
        try d.expect(204, "DELETE", "/v1/devices/vs")
        let after = try JSON.parse(Self.fileBytes(dir + "/config.json") ?? [])
        #expect(after["devices"] == (try d.expect(200, "GET", "/v1/config"))["devices"])
    }

    @Test("a damaged or foreign state file is refused, naming the file and the field, and left as it is")
    func refusesDamagedState() throws {
        let dir = Self.stateScratch("damaged")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let file = dir + "/config.json"
        let cases: [(String, String)] = [
            (#"{"format":"iotlbd-config","version":1,"devices":[{"id":"a","queues":"two"}]}"#, "devices[0].queues"),
            (#"{"format":"iotlbd-config","version":1,"devices":[{"id":"a","vhost_user":{"socket":"/etc/x.sock"}}]}"#,
             "devices[0].vhost_user.socket"),
            (#"{"format":"iotlbd-config","version":1,"devices":[{"id":"a","mem_table":{"regions":[{"guest_phys_addr":0,"memory_size":0,"userspace_addr":0}]}}]}"#,
             "devices[0].mem_table"),
            (#"{"format":"iotlbd-config","version":1,"devices":[{"id":"a"},{"id":"b","vrings":[{"index":7,"num":8,"desc_addr":0,"avail_addr":0,"used_addr":0}]}]}"#,
             "devices[1].vrings[0].index"),
            (#"{"format":"iotlbd-config","version":1,"devices":[{"id":"a"},{"id":"a"}]}"#, "devices[1].id"),
            (#"{"format":"iotlbd-config","version":2,"devices":[]}"#, "version"),
            (#"{"devices":[]}"#, "format"),
            (#"{"format":"iotlbd-config","version":1,"devices":[],"extra":1}"#, "extra"),
            (#"{"format":"iotlbd-config","version":1,"devices":[{"id":"a","mem_table":"#, "line 1"),
        ]
        for (text, field) in cases {
            #expect(FileManager.default.createFile(atPath: file, contents: Data(text.utf8)))
            do {
                _ = try LiveDaemon(stateDirectory: dir)
                Issue.record("started on \(text)")
            } catch {
                let message = "\(error)"
                #expect(message.contains(file), "\(message)")
                #expect(message.contains(field), "\(message) should name \(field)")
            }
            #expect(Self.fileBytes(file) == Array(text.utf8), "the state file is left as it is")
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == ["config.json"])
        }
        // What the refused start made is gone: no device socket stays behind.
        #expect(access(testSocketDirectory + "/x.sock", F_OK) != 0)
    }

    @Test("GET /v1/config round trip: a new daemon started with it (--config) answers the same document; with --state-dir it seeds the state file once")
    func configRoundTrip() throws {
        let dir = Self.stateScratch("roundtrip")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let exported: JSON
        do {
            let d = try LiveDaemon()
            try configure(d)
            try d.expect(204, "DELETE", "/v1/devices/vs")
            try d.expect(204, "DELETE", "/v1/devices/vc")
            exported = try d.expect(200, "GET", "/v1/config")
        }
        let file = dir + "/exported.json"
        #expect(FileManager.default.createFile(atPath: file, contents: Data(exported.serialized())))
        do {
            let d = try LiveDaemon(configFile: file)
            #expect(try d.expect(200, "GET", "/v1/config") == exported)
            try d.expect(200, "GET", "/v1/devices/h/vrings/2")
        }
        // --config with an empty --state-dir: loaded, then written to the state file.
        let state = dir + "/state"
        do {
            let d = try LiveDaemon(stateDirectory: state, configFile: file)
            #expect(try JSON.parse(Self.fileBytes(state + "/config.json") ?? []) == exported)
            try d.expect(204, "DELETE", "/v1/devices/w")
        }
        // Next time the state file wins over --config.
        let d = try LiveDaemon(stateDirectory: state, configFile: file)
        #expect(try d.expect(200, "GET", "/v1/config")["devices"]?.arrayCount == 1)
        try d.expectError(404, "not_found", "GET", "/v1/devices/w")
    }
}

extension JSON {
    var arrayCount: Int? {
        if case .array(let a) = self { return a.count }
        return nil
    }
}
