import CkptCore

/// A parsed JSON value. Objects keep their members in file order, duplicates included, so callers can reject
/// duplicate keys (Foundation's parser silently keeps one). Numbers keep their source text so integers up to
/// UInt64.max are read exactly.
public indirect enum JSONValue: Equatable, Sendable {
    case object([(key: String, value: JSONValue)])
    case array([JSONValue])
    case string(String)
    case number(String)
    case bool(Bool)
    case null

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case let (.object(a), .object(b)):
            return a.count == b.count && zip(a, b).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        case let (.array(a), .array(b)): return a == b
        case let (.string(a), .string(b)): return a == b
        case let (.number(a), .number(b)): return a == b
        case let (.bool(a), .bool(b)): return a == b
        case (.null, .null): return true
        default: return false
        }
    }

    public var typeName: String {
        switch self {
        case .object: "object"
        case .array: "array"
        case .string: "string"
        case .number: "number"
        case .bool: "boolean"
        case .null: "null"
        }
    }

    /// The value as a non-negative integer written without sign, fraction or exponent, if it is one.
    public var unsignedInteger: UInt64? {
        guard case .number(let text) = self, !text.isEmpty else { return nil }
        var value: UInt64 = 0
        for byte in text.utf8 {
            guard byte >= 0x30 && byte <= 0x39 else { return nil }
            let (times10, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times10.addingReportingOverflow(UInt64(byte - 0x30))
            if o1 || o2 { return nil }
            value = sum
        }
        return value
    }

    /// For an object, the first key that appears twice (compared byte for byte), if any.
    public var repeatedKey: String? {
        guard case .object(let members) = self else { return nil }
        var seen = Set<NameKey>()
        return members.first { !seen.insert(NameKey($0.key)).inserted }?.key
    }

    /// Keys compare as ``NameKey``s (byte for byte, as Python's dict does): Swift's `==` would equate canonically
    /// equivalent spellings ("café" NFC and NFD), so one module's entry could answer for another's.
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        let wanted = NameKey(key)
        return members.last(where: { NameKey($0.key) == wanted })?.value
    }
}

/// Recursive-descent JSON parser (RFC 8259) over UTF-8 bytes, with a nesting limit so hostile input cannot
/// exhaust the stack.
public struct JSONParser {
    public static let maximumDepth = 128

    private let bytes: UnsafeRawBufferPointer
    private var index = 0
    private var depth = 0

    private init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    /// Parses one JSON value surrounded by optional whitespace. Errors have code `invalidJSON` and a byte offset.
    public static func parse(_ bytes: UnsafeRawBufferPointer) throws(CkptError) -> JSONValue {
        var parser = JSONParser(bytes)
        parser.skipWhitespace()
        let value = try parser.parseValue()
        parser.skipWhitespace()
        if parser.index != bytes.count { throw parser.failure("unexpected data after the JSON value") }
        return value
    }

    /// A small JSON file (configuration, index), or nil when it does not exist.
    public static func readFile(_ path: String, maximumBytes: Int = 1 << 20) throws(CkptError) -> JSONValue? {
        guard let identity = FileIdentity.of(path), !identity.isDirectory else { return nil }
        let storage = try ByteStorage(mapping: path)
        guard storage.count <= maximumBytes else {
            throw CkptError(.tooLarge, "JSON file is larger than \(maximumBytes) bytes", path: path)
        }
        do {
            return try storage.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try parse(raw) }
        } catch {
            throw error.at(path: path)
        }
    }

    public static func parse(_ text: String) throws(CkptError) -> JSONValue {
        try Array(text.utf8).withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try parse(raw) }
    }

    private func failure(_ message: String) -> CkptError {
        CkptError(.invalidJSON, "\(message) at byte \(index) of the JSON text")
    }

    private var current: UInt8? { index < bytes.count ? bytes[index] : nil }

    private mutating func skipWhitespace() {
        while let byte = current, byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D { index += 1 }
    }

    private mutating func expect(_ literal: StaticString) throws(CkptError) {
        let count = literal.utf8CodeUnitCount
        guard index + count <= bytes.count else { throw failure("truncated literal") }
        for i in 0..<count where bytes[index + i] != literal.utf8Start[i] {
            throw failure("invalid literal")
        }
        index += count
    }

    private mutating func parseValue() throws(CkptError) -> JSONValue {
        guard let byte = current else { throw failure("unexpected end of input") }
        switch byte {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default: throw failure("unexpected character")
        }
    }

    private mutating func enter() throws(CkptError) {
        depth += 1
        if depth > JSONParser.maximumDepth { throw failure("nesting deeper than \(JSONParser.maximumDepth)") }
    }

    private mutating func parseObject() throws(CkptError) -> JSONValue {
        try enter()
        defer { depth -= 1 }
        index += 1
        var members: [(key: String, value: JSONValue)] = []
        skipWhitespace()
        if current == UInt8(ascii: "}") { index += 1; return .object(members) }
        while true {
            skipWhitespace()
            guard current == UInt8(ascii: "\"") else { throw failure("expected a string key") }
            let key = try parseString()
            skipWhitespace()
            guard current == UInt8(ascii: ":") else { throw failure("expected ':'") }
            index += 1
            skipWhitespace()
            let value = try parseValue()
            members.append((key, value))
            skipWhitespace()
            guard let next = current else { throw failure("unterminated object") }
            index += 1
            if next == UInt8(ascii: "}") { return .object(members) }
            guard next == UInt8(ascii: ",") else { throw failure("expected ',' or '}'") }
        }
    }

    private mutating func parseArray() throws(CkptError) -> JSONValue {
        try enter()
        defer { depth -= 1 }
        index += 1
        var elements: [JSONValue] = []
        skipWhitespace()
        if current == UInt8(ascii: "]") { index += 1; return .array(elements) }
        while true {
            skipWhitespace()
            elements.append(try parseValue())
            skipWhitespace()
            guard let next = current else { throw failure("unterminated array") }
            index += 1
            if next == UInt8(ascii: "]") { return .array(elements) }
            guard next == UInt8(ascii: ",") else { throw failure("expected ',' or ']'") }
        }
    }

    private mutating func parseNumber() throws(CkptError) -> JSONValue {
        let start = index
        if current == UInt8(ascii: "-") { index += 1 }
        guard let first = current, first >= 0x30 && first <= 0x39 else { throw failure("invalid number") }
        if first == 0x30 {
            index += 1
        } else {
            while let d = current, d >= 0x30 && d <= 0x39 { index += 1 }
        }
        if current == UInt8(ascii: ".") {
            index += 1
            guard let d = current, d >= 0x30 && d <= 0x39 else { throw failure("invalid number fraction") }
            while let d = current, d >= 0x30 && d <= 0x39 { index += 1 }
        }
        if current == UInt8(ascii: "e") || current == UInt8(ascii: "E") {
            index += 1
            if current == UInt8(ascii: "+") || current == UInt8(ascii: "-") { index += 1 }
            guard let d = current, d >= 0x30 && d <= 0x39 else { throw failure("invalid number exponent") }
            while let d = current, d >= 0x30 && d <= 0x39 { index += 1 }
        }
        let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)
        return .number(text)
    }

    private mutating func hexQuad() throws(CkptError) -> UInt32 {
        guard index + 4 <= bytes.count else { throw failure("truncated \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let c = bytes[index]
            let digit: UInt8
            switch c {
            case 0x30...0x39: digit = c - 0x30
            case 0x41...0x46: digit = c - 0x41 + 10
            case 0x61...0x66: digit = c - 0x61 + 10
            default: throw failure("invalid \\u escape")
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    private mutating func parseString() throws(CkptError) -> String {
        index += 1  // opening quote
        let start = index
        // Fast path: no escapes.
        while let byte = current, byte != UInt8(ascii: "\""), byte != UInt8(ascii: "\\") {
            if byte < 0x20 { throw failure("unescaped control character in string") }
            index += 1
        }
        guard let stop = current else { throw failure("unterminated string") }
        var scalars = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self)
        if stop == UInt8(ascii: "\"") {
            index += 1
            return scalars
        }
        var utf8: [UInt8] = Array(scalars.utf8)
        while true {
            guard let byte = current else { throw failure("unterminated string") }
            index += 1
            if byte == UInt8(ascii: "\"") { break }
            if byte < 0x20 { throw failure("unescaped control character in string") }
            if byte != UInt8(ascii: "\\") {
                utf8.append(byte)
                continue
            }
            guard let escape = current else { throw failure("unterminated escape") }
            index += 1
            switch escape {
            case UInt8(ascii: "\""): utf8.append(0x22)
            case UInt8(ascii: "\\"): utf8.append(0x5C)
            case UInt8(ascii: "/"): utf8.append(0x2F)
            case UInt8(ascii: "b"): utf8.append(0x08)
            case UInt8(ascii: "f"): utf8.append(0x0C)
            case UInt8(ascii: "n"): utf8.append(0x0A)
            case UInt8(ascii: "r"): utf8.append(0x0D)
            case UInt8(ascii: "t"): utf8.append(0x09)
            case UInt8(ascii: "u"):
                var code = try hexQuad()
                if code >= 0xD800 && code < 0xDC00 {
                    guard index + 2 <= bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u")
                    else { throw failure("lone leading surrogate in \\u escape") }
                    index += 2
                    let low = try hexQuad()
                    guard low >= 0xDC00 && low < 0xE000 else { throw failure("invalid surrogate pair") }
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                } else if code >= 0xDC00 && code < 0xE000 {
                    throw failure("lone trailing surrogate in \\u escape")
                }
                utf8.append(contentsOf: String(Character(Unicode.Scalar(code)!)).utf8)
            default: throw failure("invalid escape")
            }
        }
        scalars = String(decoding: utf8, as: UTF8.self)
        return scalars
    }
}

/// JSON text output.
public enum JSONWriter {
    /// Appends `text` as a JSON string literal. `asciiOnly` escapes non-ASCII as \uXXXX (Python's `json.dumps`
    /// default); otherwise UTF-8 passes through (serde_json). Control characters use the short escapes where JSON
    /// has them, else lower-case \u00xx, as both libraries do.
    public static func appendString(_ text: String, to output: inout String, asciiOnly: Bool = false) {
        output.append("\"")
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": output.append("\\\"")
            case "\\": output.append("\\\\")
            case "\n": output.append("\\n")
            case "\r": output.append("\\r")
            case "\t": output.append("\\t")
            case "\u{08}": output.append("\\b")
            case "\u{0C}": output.append("\\f")
            default:
                if scalar.value < 0x20 {
                    output.append("\\u" + hex4(scalar.value))
                } else if asciiOnly && scalar.value > 0x7E {
                    if scalar.value > 0xFFFF {
                        let v = scalar.value - 0x10000
                        output.append("\\u" + hex4(0xD800 + (v >> 10)) + "\\u" + hex4(0xDC00 + (v & 0x3FF)))
                    } else {
                        output.append("\\u" + hex4(scalar.value))
                    }
                } else {
                    output.unicodeScalars.append(scalar)
                }
            }
        }
        output.append("\"")
    }

    /// Serialises `value` with `indent` spaces per level (0: compact), keeping member order and number text.
    public static func serialize(_ value: JSONValue, indent: Int = 2) -> String {
        var out = ""
        append(value, to: &out, indent: indent, level: 0)
        return out
    }

    private static func append(_ value: JSONValue, to out: inout String, indent: Int, level: Int) {
        let newline = indent > 0 ? "\n" : ""
        let pad = { (l: Int) in String(repeating: " ", count: indent * l) }
        switch value {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let text): out += text
        case .string(let s): appendString(s, to: &out)
        case .array(let items):
            if items.isEmpty { out += "[]"; return }
            out += "[" + newline
            for (i, item) in items.enumerated() {
                out += pad(level + 1)
                append(item, to: &out, indent: indent, level: level + 1)
                out += (i + 1 < items.count ? "," : "") + newline
            }
            out += pad(level) + "]"
        case .object(let members):
            if members.isEmpty { out += "{}"; return }
            out += "{" + newline
            for (i, member) in members.enumerated() {
                out += pad(level + 1)
                appendString(member.key, to: &out)
                out += indent > 0 ? ": " : ":"
                append(member.value, to: &out, indent: indent, level: level + 1)
                out += (i + 1 < members.count ? "," : "") + newline
            }
            out += pad(level) + "}"
        }
    }

    public static func quoted(_ text: String, asciiOnly: Bool = false) -> String {
        var output = ""
        appendString(text, to: &output, asciiOnly: asciiOnly)
        return output
    }

    private static func hex4(_ value: UInt32) -> String {
        let digits = Array("0123456789abcdef")
        return String((0..<4).reversed().map { digits[Int((value >> (UInt32($0) * 4)) & 0xF)] })
    }
}
