/// Text from files (tensor names, metadata values, labels, paths) made safe to show on a terminal.
///
/// A name can hold bytes a terminal acts on: ESC starts colour and title sequences (`ESC ] 0 ; … BEL` rewrites the
/// window title), CR and BS overwrite what was printed, NUL truncates in C tools, the C1 controls U+0080–U+009F
/// are 8-bit escape introducers, and the bidi overrides and isolates reorder what the user reads ("Trojan
/// Source"). Such characters are shown as visible escapes instead; everything else, non-ASCII letters included,
/// is left as it is. Backslashes are not doubled, so escaping twice changes nothing.
public enum TerminalText {
    /// Whether `scalar` can change a terminal's state or the order text is shown in: C0 controls (NUL…US, tab and
    /// line feed included), DEL, C1 controls, the bidi embeddings/overrides U+202A–U+202E and isolates
    /// U+2066–U+2069, and the line/paragraph separators U+2028/U+2029.
    public static func isUnsafe(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0x00...0x1F, 0x7F...0x9F, 0x202A...0x202E, 0x2066...0x2069, 0x2028, 0x2029: true
        default: false
        }
    }

    /// A name or value from a file, every unsafe scalar shown as Python's `repr` shows it: `\x1b`, `\x00`,
    /// `\x0a` (a line break inside a name is not a line break of the output), `\x85`, `\u202e`.
    public static func escaped(_ text: String) -> String {
        guard text.unicodeScalars.contains(where: isUnsafe) else { return text }
        var out = ""
        for scalar in text.unicodeScalars {
            guard isUnsafe(scalar) else {
                out.unicodeScalars.append(scalar)
                continue
            }
            out += scalar.value <= 0xFF ? "\\x" + hex(scalar.value, digits: 2) : "\\u" + hex(scalar.value, digits: 4)
        }
        return out
    }

    /// The last line of defence for text the CLI writes (stdout reports, stderr errors and notes): unsafe scalars
    /// other than the layout characters in `keeping` become JSON-style `\u001b` escapes. That notation is visible
    /// in plain text and, where the text is a JSON document, a valid escape inside its strings (the only place
    /// such a scalar can occur in JSON), so `--json` output still parses to the exact original names.
    public static func sanitized(_ text: String, keeping layout: Set<Unicode.Scalar> = ["\n", "\t"]) -> String {
        guard text.unicodeScalars.contains(where: { isUnsafe($0) && !layout.contains($0) }) else { return text }
        var out = ""
        for scalar in text.unicodeScalars {
            if isUnsafe(scalar) && !layout.contains(scalar) {
                out += "\\u" + hex(scalar.value, digits: 4)
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    private static func hex(_ value: UInt32, digits: Int) -> String {
        let text = String(value, radix: 16)
        return String(repeating: "0", count: max(0, digits - text.count)) + text
    }
}
