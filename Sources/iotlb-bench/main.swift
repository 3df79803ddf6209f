// iotlb-bench: the figures behind BENCHMARKS.md. Release build:
//   swift build -c release && .build/release/iotlb-bench all
import ArgumentParser

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iotlb-bench",
        abstract: "Benchmarks of the vhost engine and its device IOTLB.",
        discussion: """
            datapath: built-in guest traffic, IOTLB on and off run alternately (A B A B …) so their \
            ratio is measured side by side; also counts heap allocations and retain/release on the \
            datapath thread per frame. lookup: IOTLB translate cost. control: the HTTP API on loopback. \
            pressure: dynamic mappings against the IOTLB size. isolation: traffic while a client loops \
            large reads on another device. phase: the host's phase now (a cache line's round trip \
            between two threads), for scripts that run other programs. \
            Progress goes to stderr, a Markdown table to stdout; --json FILE also writes the results as JSON (FILE "-": to stdout instead of the table).
            """,
        subcommands: [DatapathBench.self, LookupBench.self, ControlBench.self, PressureBench.self, IsolationBench.self,
                      PhaseProbe.self],
        defaultSubcommand: DatapathBench.self)
}

Bench.main()
