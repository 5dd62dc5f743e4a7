import CkptCore

#if canImport(Glibc)
import Glibc
#endif

/// Number and table formatting for terminal output (printf-style, without Foundation).
enum Formatting {
    static func printf(_ format: String, _ value: Double) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { vsnprintf(&buffer, buffer.count, format, $0) }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// `1234567` → `1,234,567`.
    static func grouped(_ value: Int) -> String {
        let digits = String(value.magnitude)
        var out = ""
        for (i, c) in digits.enumerated() {
            if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
            out.append(c)
        }
        return value < 0 ? "-" + out : out
    }

    /// A JSON number, or null for NaN/±Inf (JSON has no literal for them).
    static func jsonNumber(_ value: Double) -> String {
        value.isFinite ? "\(value)" : "null"
    }

    static func shape(_ shape: Shape) -> String { shape.description }

    /// Left-aligned columns; numeric columns (indices in `rightAligned`) aligned right. Cells are shown
    /// ``TerminalText/escaped(_:)`` (names come from files; a tab or line break in one would break the table).
    static func table(_ header: [String], _ cells: [[String]], rightAligned: Set<Int> = []) -> String {
        let rows = cells.map { $0.map(TerminalText.escaped) }
        var widths = header.map(\.count)
        for row in rows {
            for (i, cell) in row.enumerated() { widths[i] = max(widths[i], cell.count) }
        }
        func line(_ cells: [String]) -> String {
            var parts: [String] = []
            for (i, cell) in cells.enumerated() {
                let pad = String(repeating: " ", count: widths[i] - cell.count)
                let last = i == cells.count - 1
                parts.append(rightAligned.contains(i) ? pad + cell : (last ? cell : cell + pad))
            }
            return parts.joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }
}
