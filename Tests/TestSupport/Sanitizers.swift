#if canImport(Glibc)
import Glibc
#endif

/// Which sanitizer this test process runs under, if any: their runtimes
/// export these symbols (`make test-asan`, `make test-tsan`). Under either,
/// memory figures (RSS) say little and long churns run 10-30 times slower,
/// so a test may shorten its loops there; the plain run keeps them whole.
public enum Sanitizers {
    public static let address = exported("__asan_init")
    public static let thread = exported("__tsan_init")
    public static var any: Bool { address || thread }

    private static func exported(_ symbol: String) -> Bool {
        dlsym(UnsafeMutableRawPointer(bitPattern: 0), symbol) != nil  // RTLD_DEFAULT
    }
}
