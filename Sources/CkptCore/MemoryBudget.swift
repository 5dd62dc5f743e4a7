#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What a command may allocate, checked before it allocates: sizes computed from files and flags are compared
/// with the memory this process can have, and a plan that does not fit is a `tooLarge` error naming what asked
/// for it — not an `out of memory` trap after gigabytes of work.
///
/// The budget is the machine's physical memory, lowered by the address-space and data limits
/// (`RLIMIT_AS`, `RLIMIT_DATA`, e.g. from `prlimit` or `ulimit -v`) less what the process already uses.
public enum MemoryBudget {
    /// Bytes still available to this process.
    public static func available() -> Int {
        let page = max(1, sysconf(Int32(_SC_PAGESIZE)))
        var budget = Int.max
        let pages = sysconf(Int32(_SC_PHYS_PAGES))
        if pages > 0 { budget = pages.multipliedReportingOverflow(by: page).overflow ? Int.max : pages * page }
        let (virtualPages, dataPages) = currentUsage()
        for (resource, used) in [(RLIMIT_AS, virtualPages), (RLIMIT_DATA, dataPages)] {
            var limit = rlimit()
            // RLIM_INFINITY is all ones: above Int.max, so skipped by the second test.
            guard getrlimit(__rlimit_resource_t(resource.rawValue), &limit) == 0,
                  limit.rlim_cur < UInt64(Int.max) else { continue }
            let usedBytes = used.multipliedReportingOverflow(by: page).overflow ? Int.max : used * page
            budget = min(budget, max(0, Int(limit.rlim_cur) - usedBytes))
        }
        return budget
    }

    /// Throws `tooLarge` when `bytes` exceed ``available()``. `what` says what the memory is for.
    public static func require(_ bytes: Int, for what: @autoclosure () -> String, path: String? = nil) throws(CkptError) {
        let budget = available()
        guard bytes > budget else { return }
        throw CkptError(
            .tooLarge, "\(what()) needs \(describe(bytes)) of memory; \(describe(budget)) is available", path: path)
    }

    /// A byte count for people: "4.4 TB", "512.0 MiB".
    public static func describe(_ bytes: Int) -> String {
        if bytes == Int.max { return "more than 9.2 EB" }
        let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(bytes), unit = 0
        while value >= 1024, unit < units.count - 1 { value /= 1024; unit += 1 }
        if unit == 0 { return "\(bytes) bytes" }
        let tenths = Int((value * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) \(units[unit])"
    }

    /// Pages of address space and of data (heap + stack) the process uses now, from /proc/self/statm.
    private static func currentUsage() -> (virtual: Int, data: Int) {
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return (0, 0) }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 256)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return (0, 0) }
        // size resident shared text lib data dt
        let fields = buffer[..<n].split(separator: 0x20).map { Int(String(decoding: $0, as: UTF8.self).filter(\.isNumber)) ?? 0 }
        return (fields.first ?? 0, fields.count > 5 ? fields[5] : 0)
    }
}

/// Overflow-checked size arithmetic for counts that come from files and flags.
public enum CheckedSize {
    /// The product of `factors`, or an `overflow` error naming `what`.
    public static func product(_ factors: [Int], _ what: @autoclosure () -> String) throws(CkptError) -> Int {
        var result = 1
        for f in factors {
            guard f >= 0 else { throw CkptError(.overflow, "\(what()): negative factor \(f)") }
            let (p, overflow) = result.multipliedReportingOverflow(by: f)
            if overflow { throw CkptError(.overflow, "\(what()): \(factors.map(String.init).joined(separator: " × ")) overflows") }
            result = p
        }
        return result
    }

    /// The sum of `terms`, or an `overflow` error naming `what`.
    public static func sum(_ terms: [Int], _ what: @autoclosure () -> String) throws(CkptError) -> Int {
        var result = 0
        for t in terms {
            let (s, overflow) = result.addingReportingOverflow(t)
            if overflow { throw CkptError(.overflow, "\(what()): \(terms.map(String.init).joined(separator: " + ")) overflows") }
            result = s
        }
        return result
    }
}
