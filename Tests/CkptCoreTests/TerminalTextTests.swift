import CkptCore
import Testing

@Suite("terminal text")
struct TerminalTextTests {
    static let classes: [(name: String, raw: String, shown: String)] = [
        ("NUL", "a\u{0}b", "a\\x00b"),
        ("ESC (colour)", "\u{1b}[31mred", "\\x1b[31mred"),
        ("OSC title with BEL", "\u{1b}]0;pwned\u{07}", "\\x1b]0;pwned\\x07"),
        ("CR", "ok\rfake", "ok\\x0dfake"),
        ("BS", "ab\u{08}c", "ab\\x08c"),
        ("line feed and tab inside a name", "a\nb\tc", "a\\x0ab\\x09c"),
        ("DEL", "x\u{7f}", "x\\x7f"),
        ("C1 controls (CSI, NEL)", "\u{9b}31m\u{85}", "\\x9b31m\\x85"),
        ("bidi override", "abc\u{202e}fdp.exe", "abc\\u202efdp.exe"),
        ("bidi embeddings and isolates", "\u{202a}\u{202b}\u{202c}\u{202d}\u{2066}\u{2067}\u{2068}\u{2069}",
         "\\u202a\\u202b\\u202c\\u202d\\u2066\\u2067\\u2068\\u2069"),
        ("line and paragraph separators", "a\u{2028}b\u{2029}", "a\\u2028b\\u2029"),
    ]

    @Test("each class of control and bidi character is shown escaped", arguments: classes)
    func escapesEachClass(name: String, raw: String, shown: String) {
        #expect(TerminalText.escaped(raw) == shown, "\(name)")
        #expect(TerminalText.escaped(shown) == shown, "\(name): escaping is idempotent")
        #expect(!TerminalText.escaped(raw).unicodeScalars.contains(where: TerminalText.isUnsafe), "\(name)")
    }

    @Test("ordinary text, non-ASCII letters, emoji and backslashes are unchanged")
    func ordinaryTextUnchanged() {
        for text in ["blocks.0.attn.qkv.weight", "café (NFC)", "cafe\u{301} (NFD)", "日本語の重み", "ветер", "עברית", "😀 👩‍👩‍👧",
                     "C:\\path\\x1b", "", "a b"] {
            #expect(TerminalText.escaped(text) == text)
            #expect(TerminalText.sanitized(text) == text)
        }
    }

    @Test("sanitized keeps the layout characters it is told to and escapes the rest JSON-style")
    func sanitizedKeepsLayout() {
        #expect(TerminalText.sanitized("a\nb\tc\u{1b}[0m\u{202e}\u{7f}") == "a\nb\tc\\u001b[0m\\u202e\\u007f")
        #expect(TerminalText.sanitized("\r50%\n", keeping: ["\n", "\r"]) == "\r50%\n")
        #expect(TerminalText.sanitized("\r50%") == "\\u000d50%")
    }

    @Test("an error's description carries no raw control bytes; its fields keep the original text")
    func errorDescriptionEscaped() {
        let error = CkptError(.invalidHeader, "bad \u{1b}[2J", path: "/tmp/a\u{0}b", tensor: "t\u{202e}x", cause: "c\u{07}")
        #expect(error.description == "/tmp/a\\x00b: tensor 't\\u202ex': bad \\x1b[2J (c\\x07) [invalidHeader]")
        #expect(error.tensor == "t\u{202e}x")
    }
}
