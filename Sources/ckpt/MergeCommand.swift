import ArgumentParser
import CkptCore
import CkptFormats
import CkptMerge

struct MergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Merge PETL adapters (PEFT LoRA/DoRA, SSF, BitFit, FacT) into base weights: one plain checkpoint.",
        discussion: """
            Each adapter changes base tensors relative to the original base, so several adapters combine as the \
            exact weighted sum W + Σ wᵢ·ΔWᵢ. Arithmetic is F32 (F64 for norms and SSF biases), rounded once to the \
            output dtype (default: each base tensor's). Adapter keys are matched across prefixes, timm/HF naming and \
            fused/separate q/k/v; an adapter tensor that matches nothing is an error. SSF parameters inside BASE are \
            folded too. Tensors of methods that cannot be folded (VPT prompts, Convpass, AdaptFormer and prefix \
            tokens in BASE or in --ssf/--bitfit/--fact files) are refused unless --keep-unmerged; PEFT prompt-learning \
            adapters are always refused. OUT is written atomically; nothing is written on error.
            """)

    @Argument(help: "Base checkpoint (.safetensors, .npz, a folder or *.index.json of shards).")
    var base: String

    @Argument(help: "Output path; its extension (or being a folder) picks the format.")
    var output: String

    @Option(
        name: .customLong("lora"),
        help: ArgumentHelp("A PEFT LoRA/DoRA adapter folder, optionally with a weight (DIR:0.5). Repeat to combine adapters.", valueName: "DIR[:WEIGHT]"))
    var loras: [String] = []

    @Option(help: ArgumentHelp("SSF scale/shift parameters (and a trained head) in a file of their own.", valueName: "FILE"))
    var ssf: String?

    @Option(help: ArgumentHelp("BitFit (or LN-tuning) tensors that replace the base's.", valueName: "FILE"))
    var bitfit: String?

    @Option(help: ArgumentHelp("A FacT-TT or FacT-TK checkpoint (FacTu/FacTv/… plus head).", valueName: "FILE"))
    var fact: String?

    @Option(help: ArgumentHelp("FacT's scale s (not stored in FacT checkpoints; the `scale` of its training config).", valueName: "S"))
    var factScale: Double?

    @Flag(help: "Carry tensors of non-mergeable methods (prompts, adapters) into OUT unchanged instead of refusing.")
    var keepUnmerged = false

    @Flag(help: "Print the plan (target, rule, scaling, rank) and write nothing.")
    var dryRun = false

    @OptionGroup var write: OutputOptions

    @OptionGroup var json: JSONOutputOption

    func parsedAdapters() throws -> [(path: String, weight: Double)] {
        try loras.map { spec in
            if let colon = spec.lastIndex(of: ":"), let weight = Double(spec[spec.index(after: colon)...]) {
                guard weight.isFinite else { throw ValidationError("--lora \(spec): the weight must be a finite number") }
                return (String(spec[..<colon]), weight)
            }
            return (spec, 1.0)
        }
    }

    func validate() throws {
        try write.check(output: output)
        _ = try parsedAdapters()
        if fact != nil && factScale == nil {
            throw ValidationError("--fact needs --fact-scale: FacT checkpoints do not store their scale (see the training config's `scale`)")
        }
        if factScale != nil && fact == nil { throw ValidationError("--fact-scale applies to --fact only") }
    }

    func run() throws {
        try runReportingErrors {
            var request = MergeRequest(base: try Checkpoint.open(base))
            request.loras = try parsedAdapters().map { (spec: (path: String, weight: Double)) throws(CkptError) in
                try PeftAdapter.open(spec.path, weight: spec.weight)
            }
            request.ssf = try ssf.map { (path: String) throws(CkptError) in try Checkpoint.open(path) }
            request.bitfit = try bitfit.map { (path: String) throws(CkptError) in try Checkpoint.open(path) }
            request.fact = try fact.map { (path: String) throws(CkptError) in try Checkpoint.open(path) }
            request.factScale = factScale
            request.keepUnmerged = keepUnmerged
            request.outputDType = try write.targetDType()
            let plan = try MergePlanner.plan(request)
            if !dryRun {
                var inputs = request.base.files
                for adapter in request.loras { inputs += adapter.tensors.files + [adapter.configPath] }
                for file in [request.ssf, request.bitfit, request.fact].compactMap({ $0 }) { inputs += file.files }
                let carriesMetadata = request.base.format == .safetensors || request.base.format == .shardedSafetensors
                try write.write(
                    try plan.outputTensors(), metadata: carriesMetadata ? request.base.metadata : [:], to: output,
                    inputs: inputs.compactMap(FileIdentity.of), label: "merge")
            }
            if json.enabled {
                print(MergeReport.json(plan, output: dryRun ? nil : output))
            } else {
                // The full plan for --dry-run; a one-line summary once written.
                print(dryRun ? MergeReport.table(plan, output: nil) : MergeReport.summary(plan, output: output))
                for note in plan.notes { printError("ckpt: note: \(TerminalText.escaped(note))") }
            }
        }
    }
}

/// The plan as a table or JSON.
enum MergeReport {
    /// Tab-separated: names are shown ``TerminalText/escaped(_:)``, so a tab inside one cannot shift the columns.
    static func table(_ plan: MergePlan, output: String?) -> String {
        var lines = ["target\trule\tscaling\trank\tweight\tsource"]
        for entry in plan.entries {
            var target = entry.target
            if let rows = entry.rows { target += "[\(rows.lowerBound):\(rows.upperBound)]" }
            lines.append(
                [
                    target, entry.rule, entry.scaling.map(MergePlanEntry.format) ?? "-", entry.rank.map(String.init) ?? "-", entry.weight.map(MergePlanEntry.format) ?? "-",
                    entry.sourceTensors.first.map { "\(FilePaths.fileName(of: entry.source)):\($0)" } ?? entry.source,
                ].map(TerminalText.escaped).joined(separator: "\t"))
        }
        let written = output.map { "wrote \(TerminalText.escaped($0)): " } ?? "dry run, nothing written: "
        lines.append("\(written)\(plan.outputNames.count) tensors, \(plan.changedTensorCount) changed by \(plan.entries.count) plan entries")
        return lines.joined(separator: "\n")
    }

    static func summary(_ plan: MergePlan, output: String) -> String {
        var counts: [String: Int] = [:]
        for entry in plan.entries { counts[entry.rule, default: 0] += 1 }
        let rules = counts.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        return "wrote \(TerminalText.escaped(output)): \(plan.outputNames.count) tensors, \(plan.changedTensorCount) changed (\(rules.isEmpty ? "no adapter changes" : rules))"
    }

    static func json(_ plan: MergePlan, output: String?) -> String {
        func string(_ text: String) -> String { JSONWriter.quoted(text) }
        let entries = plan.entries.map { entry -> String in
            var fields = [
                "\"target\": \(string(entry.target))", "\"rule\": \(string(entry.rule))", "\"source\": \(string(entry.source))",
                "\"source_tensors\": [\(entry.sourceTensors.map(string).joined(separator: ", "))]",
            ]
            if let scaling = entry.scaling { fields.append("\"scaling\": \(Formatting.jsonNumber(scaling))") }
            if let rank = entry.rank { fields.append("\"rank\": \(rank)") }
            if let weight = entry.weight { fields.append("\"weight\": \(Formatting.jsonNumber(weight))") }
            if let rows = entry.rows { fields.append("\"rows\": [\(rows.lowerBound), \(rows.upperBound)]") }
            if let note = entry.note { fields.append("\"note\": \(string(note))") }
            return "{" + fields.joined(separator: ", ") + "}"
        }
        var fields = [
            "\"output\": \(output.map(string) ?? "null")", "\"dry_run\": \(output == nil)", "\"tensors\": \(plan.outputNames.count)",
            "\"changed\": \(plan.changedTensorCount)", "\"plan\": [\(entries.joined(separator: ", "))]",
            "\"notes\": [\(plan.notes.map(string).joined(separator: ", "))]",
        ]
        fields.append("\"outputs\": [\(plan.outputNames.map(string).joined(separator: ", "))]")
        return "{" + fields.joined(separator: ", ") + "}"
    }
}
