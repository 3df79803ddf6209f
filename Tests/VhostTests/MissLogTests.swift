// The miss log's waiters, answered off the posting thread.
import IOTLB
import Platform
import Testing
@testable import Vhost

@Suite struct MissLogTests {
    @Test("a poller is answered on the completion thread, from the log as it is then")
    func answersAreBuiltWhereTheyAreDelivered() {
        let completions = ControlExecutor(name: "misslog-test")
        defer { completions.stop() }
        let log = MissLog(completions: completions)
        let answers = Locked<[MissAnswer]>([])
        let got = WakeSignal()
        let w = log.poll(after: 0, limit: 10) { a in
            answers.withLock { $0.append(a) }
            got.signal()
        }
        #expect(!w.isFinished)
        // Hold the completion thread, then post and resolve before it runs: the
        // woken poller finds nothing outstanding and waits again (no empty answer).
        let hold = WakeSignal()
        completions.run { hold.wait(timeoutNanos: 5_000_000_000) }
        let first = log.post(vq: 1, kind: .miss, iova: IOVA(0x1000), perm: .read, now: 0)
        log.remove(seq: first)
        hold.signal()
        let second = log.post(vq: 1, kind: .miss, iova: IOVA(0x2000), perm: .read, now: 0)
        #expect(got.wait(timeoutNanos: 5_000_000_000))
        let all = answers.withLock { $0 }
        #expect(all.count == 1)
        guard case .events(let events, let last)? = all.first else {
            Issue.record("not answered with events: \(all)")
            return
        }
        #expect(events.map(\.seq) == [second] && last == second)
    }
}
