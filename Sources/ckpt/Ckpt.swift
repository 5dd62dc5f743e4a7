import ArgumentParser
import CkptCore

@main
struct Ckpt: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ckpt",
        abstract: "Convert, inspect and compare ML checkpoints (safetensors, sharded safetensors, .npy, .npz).",
        version: "0.1.0",
        subcommands: [InspectCommand.self, ConvertCommand.self, DiffCommand.self, MergeCommand.self, QuantizeCommand.self, RunCommand.self, EvalCommand.self]
    )
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

func printError(_ text: String) {
    StandardError.write(text + "\n")
}

#if canImport(Glibc)
import Glibc
#endif
