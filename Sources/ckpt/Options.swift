import ArgumentParser
import CkptCore
import CkptFormats

/// How to read inputs: shared by every command that opens checkpoints.
struct ReadOptions: ParsableArguments {
    @Option(
        name: .customLong("void-dtype"),
        help: ArgumentHelp(
            "Read NumPy void arrays ('<V2', '<V1', as ml_dtypes writes bfloat16/float8) as this dtype; repeat for several sizes.",
            valueName: "DTYPE"))
    var voidDTypes: [String] = []

    func validate() throws {
        _ = try resolved()
    }

    func resolved() throws -> Checkpoint.ReadOptions {
        var bySize: [Int: DType] = [:]
        for name in voidDTypes {
            guard let dtype = DType(userName: name), let width = dtype.byteWidth else {
                throw ValidationError("--void-dtype \(name): not a whole-byte dtype name (e.g. BF16, F8_E4M3)")
            }
            if let other = bySize[width], other != dtype {
                throw ValidationError("--void-dtype given twice for \(width)-byte voids (\(other.name) and \(dtype.name))")
            }
            bySize[width] = dtype
        }
        return Checkpoint.ReadOptions(voidDTypes: bySize)
    }
}

struct JSONOutputOption: ParsableArguments {
    @Flag(name: .customLong("json"), help: "Print one JSON object instead of a table.")
    var enabled = false
}
