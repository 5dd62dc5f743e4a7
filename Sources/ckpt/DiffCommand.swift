import ArgumentParser
import CkptAnalysis
import CkptCore
import CkptFormats

struct DiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff",
        abstract: "Compare two checkpoints tensor by tensor.",
        discussion: """
            For each tensor in both: max abs error, relative error ‖a−b‖/‖a‖, cosine similarity and SQNR (dB), \
            computed in double precision whatever the dtypes. Exit status: 0 when both hold the same names and \
            shapes and every max abs error is within --tolerance (NaN/Inf must match exactly), 1 when they differ, \
            2 or more on errors.
            """)

    @Argument(help: "Reference checkpoint.")
    var a: String

    @Argument(help: "Checkpoint to compare with the reference.")
    var b: String

    @Option(help: "Largest max-abs error still counted as equal.")
    var tolerance: Double = 0

    @OptionGroup var json: JSONOutputOption
    @OptionGroup var read: ReadOptions

    func validate() throws {
        guard tolerance >= 0, tolerance.isFinite else { throw ValidationError("--tolerance must be a finite number ≥ 0") }
    }

    func run() throws {
        var equal = false
        try runReportingErrors {
            let options = try read.resolved()
            let first = try Checkpoint.open(a, options: options)
            let second = try Checkpoint.open(b, options: options)
            let result = try Comparison.compare(first, second)
            equal = result.isEqual(tolerance: tolerance)
            print(json.enabled ? jsonText(result, equal: equal) : tableText(result, equal: equal))
        }
        if !equal { throw ExitCode(1) }
    }

    func jsonText(_ result: CheckpointComparison, equal: Bool) -> String {
        let tensors = result.tensors.map { t in
            "{\"name\": \(JSONWriter.quoted(t.name)), \"dtype_a\": \"\(t.dtypeA.name)\", \"dtype_b\": \"\(t.dtypeB.name)\", "
                + "\"shape_a\": [\(t.shapeA.dims.map(String.init).joined(separator: ", "))], \"shape_b\": [\(t.shapeB.dims.map(String.init).joined(separator: ", "))], "
                + "\"max_abs_error\": \(Formatting.jsonNumber(t.maxAbsError)), \"relative_error\": \(Formatting.jsonNumber(t.relativeError)), "
                + "\"cosine\": \(Formatting.jsonNumber(t.cosine)), \"sqnr_db\": \(Formatting.jsonNumber(t.sqnrDB)), "
                + "\"nonfinite_mismatches\": \(t.nonFiniteMismatches), \"equal\": \(t.isEqual(tolerance: tolerance))}"
        }
        let onlyA = result.onlyInA.map { JSONWriter.quoted($0) }.joined(separator: ", ")
        let onlyB = result.onlyInB.map { JSONWriter.quoted($0) }.joined(separator: ", ")
        return "{\"equal\": \(equal), \"tolerance\": \(tolerance), \"tensors\": [\(tensors.joined(separator: ", "))], \"only_in_a\": [\(onlyA)], \"only_in_b\": [\(onlyB)]}"
    }

    func tableText(_ result: CheckpointComparison, equal: Bool) -> String {
        func number(_ x: Double, _ format: String) -> String {
            x.isNaN ? "nan" : x == .infinity ? "inf" : x == -.infinity ? "-inf" : Formatting.printf(format, x)
        }
        let rows = result.tensors.map { t -> [String] in
            let types = t.dtypeA == t.dtypeB ? t.dtypeA.name : "\(t.dtypeA.name)→\(t.dtypeB.name)"
            var status = t.isEqual(tolerance: tolerance) ? "=" : "≠"
            if !t.shapesMatch { status = "≠ shape \(t.shapeA) vs \(t.shapeB)" } else if t.nonFiniteMismatches > 0 { status += " \(t.nonFiniteMismatches) NaN/Inf mismatches" }
            return [t.name, types, number(t.maxAbsError, "%.3e"), number(t.relativeError, "%.3e"), number(t.cosine, "%.6f"), number(t.sqnrDB, "%.1f"), status]
        }
        var lines = [Formatting.table(["name", "dtype", "max_abs", "rel_err", "cosine", "sqnr_db", ""], rows, rightAligned: [2, 3, 4, 5])]
        if !result.onlyInA.isEmpty { lines.append("only in \(TerminalText.escaped(a)): " + result.onlyInA.map(TerminalText.escaped).joined(separator: ", ")) }
        if !result.onlyInB.isEmpty { lines.append("only in \(TerminalText.escaped(b)): " + result.onlyInB.map(TerminalText.escaped).joined(separator: ", ")) }
        let differing = result.tensors.filter { !$0.isEqual(tolerance: tolerance) }.count
        lines.append(
            "\(result.tensors.count) tensors compared, \(differing) differ beyond tolerance \(tolerance), "
                + "\(result.onlyInA.count + result.onlyInB.count) names on one side only: " + (equal ? "EQUAL" : "DIFFERENT"))
        return lines.joined(separator: "\n")
    }
}
