#if canImport(Glibc)
import Glibc
#endif
import CkptCore

/// Progress on stderr for long work, only when stderr is a terminal (quiet in pipes, logs and CI).
public final class ProgressReporter: @unchecked Sendable {
    private let label: String
    private let totalBytes: Int
    private let totalTensors: Int
    private var bytes = 0
    private var tensors = 0
    private var lastDraw = 0.0

    /// Nil unless stderr is a terminal.
    public static func forTerminal(label: String, totalBytes: Int, totalTensors: Int) -> ProgressReporter? {
        isatty(2) == 1 ? ProgressReporter(label: label, totalBytes: totalBytes, totalTensors: totalTensors) : nil
    }

    init(label: String, totalBytes: Int, totalTensors: Int) {
        self.label = TerminalText.escaped(label)
        self.totalBytes = totalBytes
        self.totalTensors = totalTensors
    }

    public func advance(bytes count: Int) {
        bytes += count
        draw(force: false)
    }

    public func finishedTensor() {
        tensors += 1
        draw(force: tensors == totalTensors)
        if tensors == totalTensors { StandardError.write("\n") }
    }

    private func draw(force: Bool) {
        let seconds = MonotonicClock.seconds()
        guard force || seconds - lastDraw > 0.1 else { return }
        lastDraw = seconds
        let percent = totalBytes > 0 ? bytes * 100 / totalBytes : 100
        StandardError.write("\r\(label): \(tensors)/\(totalTensors) tensors, \(ByteCountFormat.human(bytes)) of \(ByteCountFormat.human(totalBytes)) (\(percent)%)")
    }
}

/// Byte sizes for people ("1.5 GB") and from people ("500MB", "2GiB", "1000000").
public enum ByteCountFormat {
    public static func human(_ count: Int) -> String {
        let units = ["B", "KB", "MB", "GB", "TB"]
        var value = Double(count)
        var unit = 0
        while value >= 1000 && unit < units.count - 1 {
            value /= 1000
            unit += 1
        }
        if unit == 0 { return "\(count) B" }
        let tenths = Int((value * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) \(units[unit])"
    }

    /// Parses sizes the way Hugging Face tools do: decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB, or plain bytes.
    public static func parse(_ text: String) -> Int? {
        let trimmed = text.trimmingWhitespace.uppercased()
        let units: [(String, Int)] = [
            ("KIB", 1 << 10), ("MIB", 1 << 20), ("GIB", 1 << 30), ("TIB", 1 << 40),
            ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000), ("TB", 1_000_000_000_000), ("B", 1),
        ]
        for (suffix, scale) in units where trimmed.hasSuffix(suffix) {
            let number = String(trimmed.dropLast(suffix.count)).trimmingWhitespace
            if let whole = Int(number) {
                let (value, overflow) = whole.multipliedReportingOverflow(by: scale)
                return overflow || whole <= 0 ? nil : value
            }
            if let fraction = Double(number), fraction > 0, fraction * Double(scale) < 9e18 {
                return Int(fraction * Double(scale))
            }
            return nil
        }
        if let whole = Int(trimmed), whole > 0 { return whole }
        return nil
    }
}

extension String {
    var trimmingWhitespace: String {
        var slice = Substring(self)
        while let first = slice.first, first.isWhitespace { slice.removeFirst() }
        while let last = slice.last, last.isWhitespace { slice.removeLast() }
        return String(slice)
    }
}
