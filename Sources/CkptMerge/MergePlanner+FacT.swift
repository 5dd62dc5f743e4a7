import CkptCore
import CkptFormats

/// FacT (JieShibo/PETL-ViT): every ViT weight's update factorised through shared U [d, D] and V [D, d]. The
/// checkpoint holds no scale; it comes from the training config (`--fact-scale`).
///
/// Tensor-Train (TT): per block `attn.{q,k,v,proj}_FacTs` [d, d], `mlp.fc1_FacTs` [k·d, d], `mlp.fc2_FacTs` [d, k·d].
/// Tucker (TK): a shared core `FacTc` [d, d, d] and `FacTp` [d, 12·L]; block i uses columns 12i..12i+3 for
/// q, k, v, proj and 12i+4..12i+11 for fc1 (4) and fc2 (4).
enum FacTRules {
    static func isParameter(_ name: String) -> Bool { name.contains("FacT") }
}

extension MergePlanner {
    mutating func planFacT(_ file: Checkpoint) throws(CkptError) {
        guard let scale = request.factScale, scale.isFinite else {
            throw CkptError(.invalidArgument, "FacT checkpoints do not store their scale: pass --fact-scale (the `scale` of the training config)", path: file.path)
        }
        var byName: [String: TensorEntry] = [:]
        for entry in file.tensors where FacTRules.isParameter(entry.name) { byName[Self.normalised(entry.name)] = entry }
        func required(_ name: String) throws(CkptError) -> TensorEntry {
            guard let entry = byName[name] else {
                throw CkptError(.adapterConfig, "FacT checkpoint lacks '\(name)'", path: file.path)
            }
            return entry
        }
        let u = try required("FacTu.weight"), v = try required("FacTv.weight")
        guard u.shape.rank == 2, v.shape.rank == 2, u.shape.dims[0] == v.shape.dims[1], u.shape.dims[1] == v.shape.dims[0] else {
            throw CkptError(.shapeMismatch, "FacTu \(u.shape) and FacTv \(v.shape) must be [d, D] and [D, d]", path: file.path, tensor: u.name)
        }
        let rank = u.shape.dims[0]
        guard rank > 0, u.shape.dims[1] > 0 else {
            throw CkptError(.shapeMismatch, "FacTu \(u.shape) must have a positive rank and width", path: file.path, tensor: u.name)
        }
        var used: Set<String> = ["FacTu.weight", "FacTv.weight"]
        let isTucker = byName["FacTc"] != nil || byName["FacTp"] != nil
        let blocks = blockIndices()
        guard !blocks.isEmpty else {
            throw CkptError(.unmatchedKey, "FacT needs ViT blocks (blocks.N.attn.qkv …) but the base has none ckpt recognises", path: request.base.path)
        }
        let factors = FacTFactors(u: u, v: v, scale: scale)
        if isTucker {
            let core = try required("FacTc"), p = try required("FacTp")
            used.formUnion(["FacTc", "FacTp"])
            guard core.shape.dims == [rank, rank, rank], p.shape.rank == 2, p.shape.dims[0] == rank, p.shape.dims[1] == 12 * blocks.count else {
                throw CkptError(
                    .shapeMismatch, "FacT-TK needs FacTc [d, d, d] and FacTp [d, 12·blocks] with d = \(rank) and \(blocks.count) blocks; got \(core.shape), \(p.shape)",
                    path: file.path, tensor: p.name)
            }
            for (slot, block) in blocks.enumerated() {
                let tucker = FacTTucker(factors: factors, core: core, p: p, block: slot)
                try addFacT(block, "attn.qkv", u: u, path: file.path, tensors: [core.name, p.name]) { () throws(CkptError) in try tucker.qkv() }
                try addFacT(block, "attn.proj", u: u, path: file.path, tensors: [core.name, p.name]) { () throws(CkptError) in try tucker.proj() }
                try addFacT(block, "mlp.fc1", u: u, path: file.path, tensors: [core.name, p.name], mlpChunks: 4) { () throws(CkptError) in try tucker.fc1() }
                try addFacT(block, "mlp.fc2", u: u, path: file.path, tensors: [core.name, p.name], mlpChunks: 4) { () throws(CkptError) in try tucker.fc2() }
            }
        } else {
            for block in blocks {
                let prefix = "blocks.\(block)."
                let names = ["attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"].map { prefix + $0 + "_FacTs.weight" }
                let present = names.filter { byName[$0] != nil }
                guard !present.isEmpty else { continue }
                guard present.count == names.count else {
                    throw CkptError(.adapterConfig, "FacT-TT block \(block) is incomplete: has \(present.joined(separator: ", "))", path: file.path)
                }
                used.formUnion(names)
                let s = names.map { byName[$0]! }
                for core in s[0..<4] where core.shape.dims != [rank, rank] {
                    throw CkptError(.shapeMismatch, "FacT-TT core \(core.shape) must be [d, d] with d = \(rank)", path: file.path, tensor: core.name)
                }
                guard s[4].shape.rank == 2, s[4].shape.dims[1] == rank, s[4].shape.dims[0] >= rank, s[4].shape.dims[0] % rank == 0, s[5].shape.rank == 2,
                    s[5].shape.dims[0] == rank, s[5].shape.dims[1] == s[4].shape.dims[0]
                else {
                    throw CkptError(
                        .shapeMismatch, "FacT-TT MLP cores \(s[4].shape), \(s[5].shape) must be [k·d, d] and [d, k·d] with d = \(rank)", path: file.path,
                        tensor: s[4].name)
                }
                let tt = FacTTensorTrain(factors: factors, sq: s[0], sk: s[1], sv: s[2], sp: s[3], s1: s[4], s2: s[5])
                try addFacT(block, "attn.qkv", u: u, path: file.path, tensors: Array(names[0..<3])) { () throws(CkptError) in try tt.qkv() }
                try addFacT(block, "attn.proj", u: u, path: file.path, tensors: [names[3]]) { () throws(CkptError) in try tt.proj() }
                try addFacT(block, "mlp.fc1", u: u, path: file.path, tensors: [names[4]], mlpChunks: s[4].shape.dims[0] / rank) { () throws(CkptError) in try tt.fc1() }
                try addFacT(block, "mlp.fc2", u: u, path: file.path, tensors: [names[5]], mlpChunks: s[4].shape.dims[0] / rank) { () throws(CkptError) in try tt.fc2() }
            }
        }
        let leftover = byName.keys.filter { !used.contains($0) }.sorted()
        if !leftover.isEmpty {
            throw CkptError(.unmatchedKey, "FacT tensors ckpt cannot place: \(leftover.prefix(6).joined(separator: ", "))", path: file.path, tensor: leftover[0])
        }
        try planReplacements(from: file, rule: "replace", skip: FacTRules.isParameter)
    }

    /// Block indices of the base, in order, found through its (fused or separate) attention weights.
    func blockIndices() -> [Int] {
        var found: [Int] = []
        var index = 0
        while (try? resolver.resolve("blocks.\(index).attn.qkv.weight")) ?? nil != nil {
            found.append(index)
            index += 1
        }
        return found
    }

    /// `mlpChunks` is k of the MLP deltas ([k·D, D] for fc1, [D, k·D] for fc2): the target must have exactly that
    /// size, checked here, before a delta is computed (a core of 2^20 chunks would otherwise build terabytes).
    private mutating func addFacT(
        _ block: Int, _ module: String, u: TensorEntry, path: String, tensors: [String], mlpChunks: Int = 0,
        _ compute: @escaping @Sendable () throws(CkptError) -> FloatMatrix
    ) throws(CkptError) {
        let name = "blocks.\(block).\(module).weight"
        // The delta's logical shape follows from U [d, D] and the module: check it against the base before writing.
        let width = u.shape.dims[1]
        if let placements = try resolver.resolve(name) {
            for placement in placements {
                let shape = self.tensors[placement.target]!.shape
                let columns = shape.dims.dropFirst().reduce(1, *), rows = shape.dims.first ?? 0
                let expectedColumns = module == "mlp.fc2" ? columns : width
                let fits = shape.rank == 2 && columns == expectedColumns && (module != "mlp.fc2" || (columns % width == 0 && rows == width))
                    && (module != "attn.qkv" || placement.sourceRows != nil || placement.targetRows != nil || rows == 3 * width)
                    && (module != "attn.proj" || rows == width) && (module != "mlp.fc1" || rows == mlpChunks * width)
                    && (module != "mlp.fc2" || columns == mlpChunks * width)
                guard fits else {
                    throw CkptError(
                        .shapeMismatch, "FacT works on D = \(width) (FacTu's input size), but '\(placement.target)' has shape \(shape)",
                        path: path, tensor: u.name)
                }
            }
        }
        let line = MergePlanEntry(target: name, rule: "fact", source: path, sourceTensors: tensors, scaling: request.factScale)
        guard try contribute(to: name, .computed(description: "FacT delta for \(name)", compute), weight: 1, entry: line) else {
            unmatched.append((path, name, resolver.nearestNames(to: name)))
            return
        }
    }
}

/// U, V and the scale shared by every FacT delta.
struct FacTFactors: Sendable {
    let u: TensorEntry
    let v: TensorEntry
    let scale: Double

    /// scale · V · S · U for a core S [d, d].
    func sandwich(_ s: FloatMatrix) throws(CkptError) -> FloatMatrix {
        let u = try self.u.floatMatrix(), v = try self.v.floatMatrix()
        let su = try MatrixMath.product(s, u)
        return try MatrixMath.product(v, su, alpha: Float(scale))
    }
}

/// FacT-TT deltas (formulas: adapters.md §3.1; the MLP chunks follow the official reshape to [.., k, D]).
struct FacTTensorTrain: Sendable {
    let factors: FacTFactors
    /// The per-block cores: `attn.{q,k,v,proj}_FacTs`, `mlp.fc1_FacTs`, `mlp.fc2_FacTs`.
    let sq: TensorEntry, sk: TensorEntry, sv: TensorEntry, sp: TensorEntry, s1: TensorEntry, s2: TensorEntry

    func qkv() throws(CkptError) -> FloatMatrix {
        let q = try factors.sandwich(sq.floatMatrix()), k = try factors.sandwich(sk.floatMatrix()), v = try factors.sandwich(sv.floatMatrix())
        return try MatrixMath.stackRows([q, k, v])
    }

    func proj() throws(CkptError) -> FloatMatrix { try factors.sandwich(sp.floatMatrix()) }

    /// fc1 output j·D + c comes from chunk j of S1's rows.
    func fc1() throws(CkptError) -> FloatMatrix {
        let core = try s1.floatMatrix(), d = core.columns
        guard core.rows % d == 0 else { throw CkptError(.shapeMismatch, "fc1_FacTs \(core.shape) must be [k·d, d]", tensor: s1.name) }
        var chunks: [FloatMatrix] = []
        for j in 0..<core.rows / d { chunks.append(try factors.sandwich(try MatrixMath.rows(core, j * d..<(j + 1) * d))) }
        return try MatrixMath.stackRows(chunks)
    }

    /// fc2 input j·D + c goes through chunk j of S2's columns.
    func fc2() throws(CkptError) -> FloatMatrix {
        let core = try s2.floatMatrix(), d = core.rows
        guard core.columns % d == 0 else { throw CkptError(.shapeMismatch, "fc2_FacTs \(core.shape) must be [d, k·d]", tensor: s2.name) }
        var chunks: [FloatMatrix] = []
        for j in 0..<core.columns / d { chunks.append(try factors.sandwich(try MatrixMath.columns(core, j * d..<(j + 1) * d))) }
        return try MatrixMath.stackColumns(chunks)
    }
}

/// FacT-TK deltas: cores C_j = FacTc ×₃ FacTp[:, col], used transposed for attention and fc1 as the official
/// forward multiplies `x @ C`.
struct FacTTucker: Sendable {
    let factors: FacTFactors
    let core: TensorEntry
    let p: TensorEntry
    let block: Int

    /// C[a, b] = Σ_c FacTc[a, b, c] · FacTp[c, column].
    func slice(_ column: Int) throws(CkptError) -> FloatMatrix {
        let c = try core.floatMatrix(), p = try self.p.floatMatrix()
        let d = p.rows, columns = p.columns
        var result = try FloatMatrix.zeros(try Shape([d, d]))
        for a in 0..<d {
            for b in 0..<d {
                var sum: Float = 0
                for k in 0..<d { sum += c.values[(a * d + b) * d + k] * p.values[k * columns + column] }
                result.values[a * d + b] = sum
            }
        }
        return result
    }

    func attention(_ j: Int) throws(CkptError) -> FloatMatrix { try factors.sandwich(try MatrixMath.transpose(slice(12 * block + j))) }

    func qkv() throws(CkptError) -> FloatMatrix { try MatrixMath.stackRows([try attention(0), try attention(1), try attention(2)]) }
    func proj() throws(CkptError) -> FloatMatrix { try attention(3) }

    /// M = Cm[:, :, first..<first+4].reshape(d, 4d) row-major: M[a, b·4 + j] = C_{first+j}[a, b].
    func interleaved(first: Int) throws(CkptError) -> FloatMatrix {
        var slices: [FloatMatrix] = []
        for j in 0..<4 { slices.append(try slice(12 * block + 4 + first + j)) }
        let d = slices[0].rows
        var m = try FloatMatrix.zeros(try Shape([d, 4 * d]))
        for a in 0..<d {
            for b in 0..<d {
                for j in 0..<4 { m.values[a * 4 * d + b * 4 + j] = slices[j].values[a * d + b] }
            }
        }
        return m
    }

    func fc1() throws(CkptError) -> FloatMatrix {
        let m = try interleaved(first: 0), d = m.rows
        var chunks: [FloatMatrix] = []
        for p in 0..<4 { chunks.append(try factors.sandwich(try MatrixMath.transpose(try MatrixMath.columns(m, p * d..<(p + 1) * d)))) }
        return try MatrixMath.stackRows(chunks)
    }

    func fc2() throws(CkptError) -> FloatMatrix {
        let m = try interleaved(first: 4), d = m.rows
        var chunks: [FloatMatrix] = []
        for p in 0..<4 { chunks.append(try factors.sandwich(try MatrixMath.columns(m, p * d..<(p + 1) * d))) }
        return try MatrixMath.stackColumns(chunks)
    }
}

/// Small dense helpers for factor products (row-major F32).
enum MatrixMath {
    static func product(_ a: FloatMatrix, _ b: FloatMatrix, alpha: Float = 1) throws(CkptError) -> FloatMatrix {
        precondition(a.columns == b.rows)
        var c = try FloatMatrix.zeros(try Shape([a.rows, b.columns]))
        a.values.withUnsafeBufferPointer { ap in
            b.values.withUnsafeBufferPointer { bp in
                c.values.withUnsafeMutableBufferPointer { cp in
                    MergeKernels.addProduct(
                        into: cp.baseAddress!, rows: a.rows, columns: b.columns, inner: a.columns, alpha: alpha, a: ap.baseAddress!,
                        lda: a.columns, transposeA: false, b: bp.baseAddress!, ldb: b.columns, transposeB: false, ldc: b.columns)
                }
            }
        }
        return c
    }

    static func transpose(_ m: FloatMatrix) throws(CkptError) -> FloatMatrix {
        var t = try FloatMatrix.zeros(try Shape([m.columns, m.rows]))
        for r in 0..<m.rows { for c in 0..<m.columns { t.values[c * m.rows + r] = m.values[r * m.columns + c] } }
        return t
    }

    static func rows(_ m: FloatMatrix, _ range: Range<Int>) throws(CkptError) -> FloatMatrix {
        FloatMatrix(values: Array(m.values[range.lowerBound * m.columns..<range.upperBound * m.columns]), shape: try Shape([range.count, m.columns]))
    }

    static func columns(_ m: FloatMatrix, _ range: Range<Int>) throws(CkptError) -> FloatMatrix {
        var result = try FloatMatrix.zeros(try Shape([m.rows, range.count]))
        for r in 0..<m.rows { for (k, c) in range.enumerated() { result.values[r * range.count + k] = m.values[r * m.columns + c] } }
        return result
    }

    static func stackRows(_ parts: [FloatMatrix]) throws(CkptError) -> FloatMatrix {
        FloatMatrix(values: parts.flatMap(\.values), shape: try Shape([try CheckedSize.sum(parts.map(\.rows), "stacked rows"), parts[0].columns]))
    }

    static func stackColumns(_ parts: [FloatMatrix]) throws(CkptError) -> FloatMatrix {
        let rows = parts[0].rows, total = try CheckedSize.sum(parts.map(\.columns), "stacked columns")
        var result = try FloatMatrix.zeros(try Shape([rows, total]))
        var offset = 0
        for part in parts {
            for r in 0..<rows { for c in 0..<part.columns { result.values[r * total + offset + c] = part.values[r * part.columns + c] } }
            offset += part.columns
        }
        return result
    }
}
