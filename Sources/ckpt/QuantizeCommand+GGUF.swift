import ArgumentParser
import CkptCore
import CkptFormats
import CkptQuant

extension QuantizeCommand {
    /// The GGUF block type: --gguf-type, else the one --bits implies.
    func ggmlType() throws -> GGMLType {
        let names = GGUFQuantizedWriter.supportedTypes.map(\.name).joined(separator: ", ")
        if let ggufType {
            guard let type = GGUFQuantizedWriter.supportedTypes.first(where: { $0.name == ggufType.uppercased() }) else {
                throw ValidationError("--gguf-type \(ggufType): choose \(names)")
            }
            if let bitsOption, bitsOption != type.bits {
                throw ValidationError("--bits \(bitsOption) contradicts --gguf-type \(type.name) (\(type.bits)-bit blocks); give one of them")
            }
            return type
        }
        switch bits {
        case 8: return .q8_0
        case 6: return .q6_K
        case 5: return .q5_0
        case 4: return .q4_0
        default: throw ValidationError("--bits \(bits) has no GGUF block type; give --gguf-type (\(names))")
        }
    }

    func quantizeToGGUF(_ checkpoint: Checkpoint, selection: TensorSelection, inputs: [FileIdentity], inputIsFolder: Bool) throws -> QuantizationReport {
        let type = try ggmlType()
        let plan = QuantizationPlan.make(checkpoint, selection: selection, format: .gguf, blockSize: GGUFQuantizedWriter.minimumBlockSize(type))
        try QuantizationPlan.requireQuantized(plan, path: input)
        let config = inputIsFolder ? try inputConfig() : nil
        return try GGUFQuantizedWriter.write(checkpoint, plan: plan, type: type, config: config, to: output, inputs: inputs)
    }
}
