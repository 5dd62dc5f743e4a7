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

    /// A small JSON file (configuration, index), or nil when nothing exists at `path`. Anything there that is not
    /// a regular file (a folder named config.json, a FIFO) is an error, not a missing file.
    public static func readFile(_ path: String, maximumBytes: Int = 1 << 20) throws(CkptError) -> JSONValue? {
        guard FileIdentity.of(path) != nil else { return nil }
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

/// Typed reads of one JSON object of a configuration file (config.json, adapter_config.json, an index…).
///
/// The rule for every reader: an absent key keeps its default (the accessor returns nil), and so does `null`
/// where `nullable` says the upstream library accepts it; a key that is present with the wrong type or an invalid
/// value is an error with `code`, naming the file and the dotted key path (`key 'quantization.mode': expected a
/// string, found number`). No lookup silently falls back to a default.
public struct ConfigObject: Sendable {
    public let value: JSONValue
    /// The file the object comes from.
    public let path: String?
    /// The object's dotted key path in the file ("" for the top level).
    public let keyPath: String
    public let code: CkptError.Code

    /// The top level of a configuration file, which must be an object. `name` is how messages name the file.
    public init(file json: JSONValue, path: String?, code: CkptError.Code, name: String = "the file") throws(CkptError) {
        guard case .object = json else { throw CkptError(code, "\(name) is a JSON \(json.typeName), expected an object", path: path) }
        self.init(json, path: path, keyPath: "", code: code)
    }

    init(_ value: JSONValue, path: String?, keyPath: String, code: CkptError.Code) {
        self.value = value
        self.path = path
        self.keyPath = keyPath
        self.code = code
    }

    /// The dotted path of `key` in this object.
    public func keyPath(_ key: String) -> String { keyPath.isEmpty ? key : keyPath + "." + key }

    /// An error about `key` of this object: `key 'a.b': <rule>`.
    public func error(_ key: String, _ rule: String, code: CkptError.Code? = nil) -> CkptError {
        CkptError(code ?? self.code, "key '\(keyPath(key))': \(rule)", path: path)
    }

    /// The members of this object, in file order.
    public var members: [(key: String, value: JSONValue)] {
        if case .object(let members) = value { return members }
        return []
    }

    /// The value of `key`: nil when absent, or null and `nullable`; null otherwise is the wrong type.
    public func raw(_ key: String, nullable: Bool = false, expected: String) throws(CkptError) -> JSONValue? {
        switch value[key] {
        case nil: return nil
        case .null?: if nullable { return nil }; throw error(key, "expected \(expected), found null")
        case let found?: return found
        }
    }

    private func wrongType(_ key: String, _ expected: String, _ found: JSONValue) -> CkptError {
        error(key, "expected \(expected), found \(found.typeName)")
    }

    public func string(_ key: String, nullable: Bool = false) throws(CkptError) -> String? {
        guard let found = try raw(key, nullable: nullable, expected: "a string") else { return nil }
        return try string(member: key, found)
    }

    /// `value`, the value of this object's member `key` (taken from ``members``), as a string.
    public func string(member key: String, _ value: JSONValue) throws(CkptError) -> String {
        guard case .string(let text) = value else { throw wrongType(key, "a string", value) }
        return text
    }

    /// A string that must be one of `allowed`.
    public func string(_ key: String, oneOf allowed: [String], nullable: Bool = false) throws(CkptError) -> String? {
        guard let text = try string(key, nullable: nullable) else { return nil }
        guard allowed.contains(text) else {
            throw error(key, "'\(text)' is not one of \(allowed.map { "'\($0)'" }.joined(separator: ", "))")
        }
        return text
    }

    public func bool(_ key: String, nullable: Bool = false) throws(CkptError) -> Bool? {
        guard let found = try raw(key, nullable: nullable, expected: "true or false") else { return nil }
        guard case .bool(let flag) = found else { throw wrongType(key, "true or false", found) }
        return flag
    }

    /// An integer written without fraction or exponent, within `range`.
    public func integer(_ key: String, in range: ClosedRange<Int> = 0...Int.max, nullable: Bool = false) throws(CkptError) -> Int? {
        guard let found = try raw(key, nullable: nullable, expected: "an integer") else { return nil }
        guard case .number(let text) = found else { throw wrongType(key, "an integer", found) }
        guard let n = Int(text) else { throw error(key, "expected an integer, found \(text)") }
        guard range.contains(n) else {
            throw error(key, range.upperBound == .max ? "\(n) is less than \(range.lowerBound)" : "\(n) is not in \(range.lowerBound)…\(range.upperBound)")
        }
        return n
    }

    /// A finite number within `range`.
    public func number(_ key: String, in range: ClosedRange<Double> = -Double.greatestFiniteMagnitude...Double.greatestFiniteMagnitude,
                       nullable: Bool = false) throws(CkptError) -> Double? {
        guard let found = try raw(key, nullable: nullable, expected: "a number") else { return nil }
        return try Self.number(found, at: keyPath(key), in: range, path: path, code: code)
    }

    public func object(_ key: String, nullable: Bool = false) throws(CkptError) -> ConfigObject? {
        guard let found = try raw(key, nullable: nullable, expected: "an object") else { return nil }
        guard case .object = found else { throw wrongType(key, "an object", found) }
        return ConfigObject(found, path: path, keyPath: keyPath(key), code: code)
    }

    public func array(_ key: String, nullable: Bool = false) throws(CkptError) -> [JSONValue]? {
        guard let found = try raw(key, nullable: nullable, expected: "an array") else { return nil }
        guard case .array(let items) = found else { throw wrongType(key, "an array", found) }
        return items
    }

    /// An array whose every element is a string.
    public func strings(_ key: String, nullable: Bool = false) throws(CkptError) -> [String]? {
        guard let items = try array(key, nullable: nullable) else { return nil }
        var result: [String] = []
        for (i, item) in items.enumerated() {
            guard case .string(let text) = item else { throw error("\(key)[\(i)]", "expected a string, found \(item.typeName)") }
            result.append(text)
        }
        return result
    }

    /// An array of finite numbers (with `count` elements, when given).
    public func numbers(_ key: String, count: Int? = nil, nullable: Bool = false) throws(CkptError) -> [Double]? {
        guard let items = try array(key, nullable: nullable) else { return nil }
        if let count, items.count != count { throw error(key, "expected \(count) numbers, found \(items.count)") }
        var result: [Double] = []
        for (i, item) in items.enumerated() {
            result.append(try Self.number(item, at: keyPath("\(key)[\(i)]"), path: path, code: code))
        }
        return result
    }

    /// A string or an array of strings (Python's `Union[str, list[str]]`, as PEFT's `target_modules`), as an array.
    public func stringOrStrings(_ key: String, nullable: Bool = false) throws(CkptError) -> [String]? {
        guard let found = try raw(key, nullable: nullable, expected: "a string or an array of strings") else { return nil }
        switch found {
        case .string(let text): return [text]
        case .array: return try strings(key)
        default: throw wrongType(key, "a string or an array of strings", found)
        }
    }

    /// A release number such as `0.20.0`, `0.13.3.dev0` or `1.2+local`: a string starting with `major.minor`
    /// and optionally `.patch` (ASCII digits); what follows (a PEP 440 pre/dev/local suffix) is ignored.
    /// Returns `[major, minor, patch]` (patch 0 when absent).
    public func version(_ key: String, nullable: Bool = false) throws(CkptError) -> [Int]? {
        guard let text = try string(key, nullable: nullable) else { return nil }
        var parts: [Int] = []
        var rest = Substring(text)
        while parts.count < 3 {
            let digits = rest.prefix { $0.isASCII && $0.isNumber }
            guard !digits.isEmpty, digits.count <= 9, let n = Int(digits) else { break }
            parts.append(n)
            rest = rest.dropFirst(digits.count)
            guard rest.first == ".", rest.dropFirst().first.map({ $0.isASCII && $0.isNumber }) == true else { break }
            rest = rest.dropFirst()
        }
        guard parts.count >= 2 else { throw error(key, "'\(text)' is not a version number (major.minor[.patch])") }
        return parts.count == 2 ? parts + [0] : parts
    }

    /// Each member of this object as `(key, value)` with the value required to be an object.
    public func objectMembers() throws(CkptError) -> [(key: String, value: ConfigObject)] {
        var result: [(key: String, value: ConfigObject)] = []
        for (key, member) in members {
            guard case .object = member else { throw wrongType(key, "an object", member) }
            result.append((key, ConfigObject(member, path: path, keyPath: keyPath(key), code: code)))
        }
        return result
    }

    static func number(
        _ value: JSONValue, at keyPath: String,
        in range: ClosedRange<Double> = -Double.greatestFiniteMagnitude...Double.greatestFiniteMagnitude, path: String?, code: CkptError.Code
    ) throws(CkptError) -> Double {
        guard case .number(let text) = value else {
            throw CkptError(code, "key '\(keyPath)': expected a number, found \(value.typeName)", path: path)
        }
        guard let n = Double(text), n.isFinite else { throw CkptError(code, "key '\(keyPath)': \(text) is not a finite number", path: path) }
        guard range.contains(n) else {
            throw CkptError(code, "key '\(keyPath)': \(text) is not in \(compact(range.lowerBound))…\(compact(range.upperBound))", path: path)
        }
        return n
    }

    /// A bound as people write it: `16777216`, not `16777216.0`.
    private static func compact(_ x: Double) -> String {
        x == x.rounded() && abs(x) < 1e15 ? String(Int(x)) : "\(x)"
    }
}
