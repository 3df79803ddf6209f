// How the engine's and the devices service's refusals are answered: each
// becomes the contract's status, code and field.
import HTTP
import IOTLB
import Service
import Vhost

extension APIError {
    /// Maps an engine refusal to its HTTP answer; `paths[i]` names the request's i-th entry
    /// ("entries[3]", or "" for a body that is one entry).
    init(_ e: EngineError, paths: [String] = []) {
        func at(_ i: Int, _ f: String) -> String {
            let p = i < paths.count ? paths[i] : "entries[\(i)]"
            return p.isEmpty ? f : "\(p).\(f)"
        }
        switch e {
        case .noMemTable:
            self.init(409, "no_mem_table", "the device has no memory table; PUT …/mem-table first")
        case .uaddrNotMapped(let i):
            self.init(422, "uaddr_not_mapped", "the range [uaddr, uaddr+size) is not wholly backed by the memory table",
                      field: at(i, "uaddr"))
        case .uaddrRangeOverflow(let i):
            self.init(422, "range_overflow", "uaddr+size passes 2^64-1", field: at(i, "uaddr"))
        case .invalidMemTable(let m):
            self = APIError(memTable: m)
        case .memoryUnavailable(let why):
            self.init(422, "invalid_mem_table", "the memory could not be mapped: \(why)")
        case .conflict(let m): self.init(409, "conflict", m)
        case .notFound(let m): self.init(404, "not_found", m)
        case .invalidField(let f, let m): self.init(400, "invalid_field", m, field: f)
        case .unavailable: self = .unavailable
        }
    }

    /// Maps a devices service refusal to its HTTP answer. `fieldPrefix` prefixes
    /// the fields named ("devices[2]." in a configuration file); with none, a
    /// duplicate id names no field.
    init(_ e: DeviceServiceError, fieldPrefix p: String = "") {
        let socketField = p + "vhost_user.socket"
        switch e {
        case .exists(let id):
            self.init(409, "conflict", "device \(id) exists", field: p.isEmpty ? nil : p + "id")
        case .socketRefused(let why):
            self = .invalidField(socketField, why)
        case .socketTaken(let path, let other):
            self.init(409, "conflict", "device \(other) uses \(path)", field: socketField)
        case .socketSetup(let s):
            self = s.inUse ? APIError(409, "conflict", s.description, field: socketField) : .invalidField(socketField, s.description)
        case .engine(let ee):
            self.init(ee)
            if let f = field, !p.isEmpty { field = p + f }
        case .portUnavailable(let why):
            self.init(422, "port_unavailable", why, field: p + "port.name")
        case .notFound(let id):
            self = .notFound("device \(id) not found")
        case .workloadBusy(let id):
            self.init(409, "conflict", "a workload is already running on \(id); DELETE it first")
        case .workloadUnsuitable(let why):
            self.init(409, "conflict", why)
        case .noWorkload(let id):
            self = .notFound("no workload on \(id)")
        }
    }

    init(memTable e: MemoryTableError) {
        switch e {
        case .empty:
            self.init(422, "invalid_mem_table", "a memory table needs at least one region", field: "regions")
        case .tooManyRegions(let n, let max):
            self.init(422, "invalid_mem_table", "\(n) regions, at most \(max) allowed", field: "regions")
        case .overflow(let i, let f):
            // A size-0 region or a guest-physical end past 2^64-1 is memory_size's fault.
            let start = f == .userspaceAddr ? "userspace_addr" : "guest_phys_addr"
            self.init(422, "range_overflow", "region is empty or \(start)+memory_size passes 2^64-1",
                      field: "regions[\(i)].\(f.jsonName)")
        case .gpaOverlap(let i, let o):
            self.init(422, "invalid_mem_table", "region \(i) overlaps region \(o) in guest-physical space",
                      field: "regions[\(i)].guest_phys_addr")
        case .uaddrOverlap(let i, let o):
            self.init(422, "invalid_mem_table", "region \(i) overlaps region \(o) in userspace address space",
                      field: "regions[\(i)].userspace_addr")
        case .tooLarge(let total, let max):
            self.init(422, "invalid_mem_table", "regions total \(hexText(total)) bytes, at most \(hexText(max)) allowed (--max-guest-memory)",
                      field: "regions")
        }
    }
}

extension MemoryRegion.Field {
    /// The field's name in a request's `regions[i]`.
    var jsonName: String {
        switch self {
        case .guestPhysAddr: "guest_phys_addr"
        case .memorySize: "memory_size"
        case .userspaceAddr: "userspace_addr"
        }
    }
}
