// GET /metrics: one snapshot command per device, on its worker; rendered once all came back.
import HTTP
import Metrics
import Platform
import Vhost

extension ControlPlane {
    /// Gathers every device's snapshot from its worker, then renders.
    func metrics(complete: @escaping @Sendable (Response) -> Void) {
        let all = devices.all()
        let gathered = Locked<[DeviceMetrics]>([])
        let left = Locked(all.count)
        let finish: @Sendable () -> Void = { [self] in
            let all = gathered.withLock { $0 }.sorted { $0.id < $1.id }
            let text = Exposition.render(all, longPollsWaiting: timer.pending, requests: requests,
                                         build: (BuildInfo.version, BuildInfo.commit))
                + authCounters.exposition(auditDropped: settings.audit?.dropped ?? 0, auditPending: settings.audit?.pending ?? 0,
                                          certificateNotAfter: certificateNotAfter.withLock { $0 })
            complete(Response(status: 200, headers: [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                              body: Array(text.utf8)))
        }
        if all.isEmpty { return finish() }
        for managed in all {
            let id = managed.id
            managed.handle.perform({ d -> DeviceMetrics? in
                guard let d else { return nil }
                let (b, sum) = d.resolutionHistogram()
                // The bounds go with the counts the device took, so the renderer needs no engine constant.
                var m = DeviceMetrics(id: id, stats: d.stats(), vqs: d.vrings(),
                                      buckets: zip(Device.resolutionBounds, b).map { ($0, $1) }, sumMicros: sum,
                                      resolutionCount: d.resolvedMisses)
                if [.tap, .peer].contains(d.config.port.kind) { m.port = d.portSnapshot() }
                m.dirtyLog = d.dirtyLogSnapshot()
                return m
            }, then: { m in
                if var m {
                    m.workload = managed.workload?.stats
                    m.frontEnd = managed.frontEnd?.status
                    gathered.withLock { $0.append(m) }
                }
                if left.withLock({ $0 -= 1; return $0 }) == 0 { finish() }
            })
        }
    }
}
