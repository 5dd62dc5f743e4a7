import ArgumentParser
import CkptCore

@main
struct Ckpt: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ckpt",
        abstract: "Convert, inspect and compare ML checkpoints (safetensors, sharded safetensors, .npy, .npz).",
        version: "0.1.0",
        subcommands: [InspectCommand.self, ConvertCommand.self, DiffCommand.self, MergeCommand.self, QuantizeCommand.self, RunCommand.self, EvalCommand.self, SynthesizeCommand.self, GradientCommand.self]
    )

    /// Before anything else: re-run on OpenBLAS's right kernels if it fell back to generic ones (at most once).
    static func main() {
        BLASStartup.reexecIfNeeded()
        main(nil)
    }
}

/// Exit status for failures (bad files, I/O): distinct from `diff`'s 1 = "differ".
let errorExitCode: Int32 = 2

/// Runs a command body, turning ckpt errors into one clear line on stderr and exit status 2.
func runReportingErrors(_ body: () throws -> Void) throws {
    // An interrupted run removes its temporary files and new folders as a failed one does.
    PendingOutputs.installSignalCleanup()
    OpenBLASThreadPool.stopUntilNeeded()
    do {
        try body()
    } catch let error as CkptError {
        printError("ckpt: error: \(error)")
        throw ExitCode(errorExitCode)
    }
}

/// Writes a line to stderr. Names in `text` should already be ``TerminalText/escaped(_:)``; any control or bidi
/// character left is escaped here all the same, so no file can reach the terminal through an error or a note.
func printError(_ text: String) {
    StandardError.write(TerminalText.sanitized(text) + "\n")
}

/// Every report the CLI prints goes through here (it shadows `Swift.print` in this module): control and bidi
/// characters other than the line breaks and tabs the CLI writes itself are escaped (JSON-compatibly, so `--json`
/// output still parses to the exact names). Names interpolated into text reports are escaped where they are
/// formatted; this is the safety net for any that are not.
func print(_ text: String) {
    Swift.print(TerminalText.sanitized(text))
}

#if canImport(Glibc)
import Glibc
#endif
