#if canImport(Glibc)
import Glibc
#endif
import CkptCore
import CkptFormats
import CkptKernels

/// Start-up check of OpenBLAS's kernel set: when OpenBLAS fell back to its generic kernels on a CPU with AVX2 or
/// AVX-512 (see ``OpenBLASCore/decide(cpu:corename:version:environment:)``), run this binary again, once, with
/// OPENBLAS_CORETYPE naming the right kernels. OpenBLAS reads that variable only when it loads, so setting it in
/// this process would be too late; exec keeps the pid, arguments, open files and the rest of the environment.
enum BLASStartup {
    static func reexecIfNeeded() {
        guard case .reexec(let core) = OpenBLASCore.decideForThisProcess() else { return }
        setenv(OpenBLASCore.coretypeVariable, core, 1)
        setenv(OpenBLASCore.markerVariable, core, 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // Only reached when exec failed (no /proc, say): carry on with the slow kernels and say how to fix it.
        let reason = String(cString: strerror(errno))
        unsetenv(OpenBLASCore.coretypeVariable)
        unsetenv(OpenBLASCore.markerVariable)
        printError("ckpt: note: OpenBLAS runs its generic \(OpenBLASCore.corename) kernels on this CPU and ckpt could not re-run "
            + "itself with \(OpenBLASCore.coretypeVariable)=\(core) (\(reason)); set it yourself for full speed")
    }

    /// The `"blas"` object of `run --json` and `eval --json`.
    static func json(_ report: OpenBLASCore.Report = OpenBLASCore.report()) -> String {
        "{\"library\":\(JSONWriter.quoted(report.library)),\"core\":\(JSONWriter.quoted(report.core)),"
            + "\"requested_core\":\(report.requestedCore.map { JSONWriter.quoted($0) } ?? "null"),\"chosen_by\":\(JSONWriter.quoted(report.chosenBy.rawValue)),"
            + "\"threads\":\(report.threads),\"cpu\":\(JSONWriter.quoted(report.cpu)),\"simd\":\(JSONWriter.quoted(report.simd)),"
            + "\"kernels\":\(JSONWriter.quoted(report.kernels))}"
    }

    /// "OpenBLAS SkylakeX kernels" (with who chose them when it was not OpenBLAS), for the text reports' timing line.
    static func text(_ report: OpenBLASCore.Report = OpenBLASCore.report()) -> String {
        let who = switch report.chosenBy {
        case .openblas: ""
        case .user: ", set by OPENBLAS_CORETYPE"
        case .ckpt: ", chosen by ckpt"
        }
        return "OpenBLAS \(TerminalText.escaped(report.core)) kernels\(who)"
    }
}
