import CkptCore
import CkptFormats

/// Quantizes planned matrices a chunk of rows at a time, for writers that stream: each chunk is read in place
/// (aligned F32) or decoded into a staging buffer, its rows are checked for NaN/Inf, quantized, measured and packed
/// (or dequantized) across cores in one pass, and its results are handed on before the next chunk is read. The
/// buffers are kept from chunk to chunk and tensor to tensor, so memory stays at a few chunks whatever the model.
///
/// Rows go through ``QuantizedMatrix/quantizeRow(_:cols:groupSize:quantizer:codes:scratch:scales:offsets:words:values:)``,
/// as in ``QuantizedMatrix/quantize(_:rows:cols:settings:)``, and the statistics are summed row by row in the
/// same order: the results are those of the whole-matrix quantizer, bit for bit.
///
/// One tensor at a time (writers run their producers in order); Sendable only so those producers can hold it.
final class StreamingQuantizer: @unchecked Sendable {
    /// What a chunk carries besides scales and offsets.
    enum Output { case packed, dequantized }

    /// One chunk of rows' results, valid until the `emit` it is passed to returns.
    struct Chunk {
        let rows: Range<Int>
        /// `rows.count × wordsPerRow` packed codes (`.packed`).
        let words: UnsafePointer<UInt32>?
        /// `rows.count × cols` values as the runtime dequantizes them (`.dequantized`).
        let values: UnsafePointer<Float>?
        /// `rows.count × groups` stored scales, and offsets (biases or zero codes).
        let scales: UnsafePointer<Float>
        let offsets: UnsafePointer<Float>
    }

    /// Σ w², Σ (w − ŵ)² and max |w − ŵ| of a whole matrix.
    struct Statistics {
        var signalEnergy: Double = 0
        var errorEnergy: Double = 0
        var maxError: Float = 0
        var sqnr: Double { QuantizedMatrix.sqnr(signal: signalEnergy, error: errorEnergy) }
    }

    /// Elements per chunk (at least one row): 4 MiB of F32 input, a few milliseconds of work per core.
    static let chunkElements = 1 << 20

    enum Buffer: Int, CaseIterable {
        case staging, words, values, scales, offsets, signal, error, largest, bad, converted, zeroCodes, zeroColumn, zeroWords
    }

    private var buffers: [(pointer: UnsafeMutableRawPointer, bytes: Int)?] = Array(repeating: nil, count: Buffer.allCases.count)

    deinit {
        for case let (pointer, bytes)? in buffers { LargeAllocation.deallocate(pointer, count: bytes) }
    }

    /// A reused buffer of at least `count` elements, grown (contents dropped) when too small. Pointers from an
    /// earlier call for the same buffer are invalid after a call that grows it.
    func buffer<T>(_ which: Buffer, _ count: Int, as type: T.Type) throws(CkptError) -> UnsafeMutablePointer<T> {
        let bytes = max(1, count) * MemoryLayout<T>.stride
        if let current = buffers[which.rawValue], current.bytes >= bytes {
            return current.pointer.assumingMemoryBound(to: T.self)
        }
        if let current = buffers[which.rawValue] {
            LargeAllocation.deallocate(current.pointer, count: current.bytes)
            buffers[which.rawValue] = nil
        }
        let pointer = try LargeAllocation.allocate(bytes)
        buffers[which.rawValue] = (pointer, bytes)
        return pointer.bindMemory(to: T.self, capacity: max(1, count))
    }

    /// Quantizes `item` chunk by chunk, calling `emit` with each chunk's results in row order. Throws `nonFinite`
    /// (naming the first NaN/Inf element) before emitting the chunk that holds one.
    func quantize(
        _ item: PlannedTensor, settings: QuantizationSettings, output: Output, _ emit: (Chunk) throws(CkptError) -> Void
    ) throws(CkptError) -> Statistics {
        let (rows, cols) = (item.rows, item.cols)
        let groupSize = settings.groupSize ?? cols
        precondition(cols % groupSize == 0 && rows > 0 && cols > 0)
        let groups = cols / groupSize
        let wordsPerRow = BitPacking.wordCount(codes: cols, bits: settings.bits)
        let chunkRows = max(1, min(rows, Self.chunkElements / cols))
        let staging = try buffer(.staging, chunkRows * cols, as: Float.self)
        nonisolated(unsafe) let words = output == .packed ? try buffer(.words, chunkRows * wordsPerRow, as: UInt32.self) : nil
        nonisolated(unsafe) let values = output == .dequantized ? try buffer(.values, chunkRows * cols, as: Float.self) : nil
        nonisolated(unsafe) let scales = try buffer(.scales, chunkRows * groups, as: Float.self)
        nonisolated(unsafe) let offsets = try buffer(.offsets, chunkRows * groups, as: Float.self)
        nonisolated(unsafe) let signal = try buffer(.signal, chunkRows, as: Double.self)
        nonisolated(unsafe) let error = try buffer(.error, chunkRows, as: Double.self)
        nonisolated(unsafe) let largest = try buffer(.largest, chunkRows, as: Float.self)
        nonisolated(unsafe) let bad = try buffer(.bad, chunkRows, as: Bool.self)
        let quantizer = GroupQuantizer(settings)
        let minimumRows = QuantizedMatrix.minimumRows(cols: cols, method: settings.method)
        var total = Statistics()
        var firstRow = 0
        try item.entry.forEachF32Chunk(elements: chunkRows * cols, staging: staging) { (weights: UnsafePointer<Float>, count: Int) throws(CkptError) in
            let n = count / cols
            nonisolated(unsafe) let w = weights
            Parallel.forEachChunk(count: n, minimumChunk: minimumRows) { range in
                withUnsafeTemporaryAllocation(of: UInt8.self, capacity: cols) { codes in
                    withUnsafeTemporaryAllocation(of: Float.self, capacity: groupSize) { scratch in
                        for r in range {
                            let result = QuantizedMatrix.quantizeRow(
                                w + r * cols, cols: cols, groupSize: groupSize, quantizer: quantizer,
                                codes: codes.baseAddress!, scratch: scratch.baseAddress!,
                                scales: scales + r * groups, offsets: offsets + r * groups,
                                words: words.map { $0 + r * wordsPerRow }, values: values.map { $0 + r * cols })
                            bad[r] = result == nil
                            if let result {
                                signal[r] = result.signal
                                error[r] = result.error
                                largest[r] = result.largest
                            }
                        }
                    }
                }
            }
            // Row order, as QuantizedMatrix sums its rows.
            for r in 0..<n {
                if bad[r] {
                    let row = weights + r * cols
                    let j = (0..<cols).first { !row[$0].isFinite }!
                    throw item.entry.nonFiniteError(element: (firstRow + r) * cols + j, value: row[j])
                }
                // Finite weights, non-finite error: the row's stored values overflow (NaN/Inf in the file).
                guard error[r].isFinite else {
                    throw item.entry.unrepresentableError(
                        "row \(firstRow + r)", values: UnsafeBufferPointer(start: weights + r * cols, count: cols), scheme: settings.schemeName)
                }
                total.signalEnergy += signal[r]
                total.errorEnergy += error[r]
                total.maxError = max(total.maxError, largest[r])
            }
            try emit(Chunk(
                rows: firstRow..<firstRow + n, words: words.map { UnsafePointer($0) }, values: values.map { UnsafePointer($0) },
                scales: scales, offsets: offsets))
            firstRow += n
        }
        return total
    }

    /// Plain rounding chunk by chunk, or GPTQ when `compensation` is given.
    func quantize(
        _ item: PlannedTensor, settings: QuantizationSettings, compensation: GPTQCompensation?, output: Output,
        _ emit: (Chunk) throws(CkptError) -> Void
    ) throws(CkptError) -> Statistics {
        if let compensation { return try quantizeCompensated(item, settings: settings, compensation: compensation, output: output, emit) }
        return try quantize(item, settings: settings, output: output, emit)
    }

    /// Quantizes `item` with GPTQ error compensation (``GPTQ``), or takes the result sequential calibration already
    /// computed, and calls `emit` once with every row: the updates run across the whole row, so the matrix is
    /// decoded whole (one tensor at a time). The statistics compare the stored values with the original weights,
    /// as for plain rounding.
    func quantizeCompensated(
        _ item: PlannedTensor, settings: QuantizationSettings, compensation: GPTQCompensation, output: Output,
        _ emit: (Chunk) throws(CkptError) -> Void
    ) throws(CkptError) -> Statistics {
        let (rows, cols) = (item.rows, item.cols)
        let wordsPerRow = BitPacking.wordCount(codes: cols, bits: settings.bits)
        let weights = try buffer(.staging, rows * cols, as: Float.self)
        let matrix: CompensatedMatrix
        switch compensation {
        case .factor(let gptq):
            matrix = try gptq.quantize(item, settings: settings, loadingInto: weights)
        case .quantized(let quantized):
            precondition(quantized.settings == settings && quantized.rows == rows && quantized.cols == cols)
            try QuantizationPlan.loadFinite(item, into: weights)
            matrix = quantized
        }
        let values = try buffer(.values, rows * cols, as: Float.self)
        matrix.dequantize(into: values, rounded: false)
        let words = output == .packed ? try buffer(.words, rows * wordsPerRow, as: UInt32.self) : nil
        let quantizer = GroupQuantizer(settings)
        var total = Statistics()
        for k in 0..<rows * cols {
            let w = weights[k]
            total.signalEnergy += Double(w * w)
            let d = abs(w - quantizer.stored(values[k]))
            total.errorEnergy += Double(d * d)
            total.maxError = max(total.maxError, d)
        }
        if !total.signalEnergy.isFinite || !total.errorEnergy.isFinite {
            guard let exact = QuantizedMatrix.exactStatistics(weights, count: rows * cols, stored: { quantizer.stored(values[$0]) }) else {
                let row = (0..<rows * cols).first { !quantizer.stored(values[$0]).isFinite }! / cols
                throw item.entry.unrepresentableError(
                    "row \(row)", values: UnsafeBufferPointer(start: weights + row * cols, count: cols), scheme: settings.schemeName)
            }
            total = Statistics(signalEnergy: exact.signal, errorEnergy: exact.error, maxError: exact.largest)
        }
        return try matrix.codes.withUnsafeBufferPointer { codes throws(CkptError) in
            if let words {
                for r in 0..<rows { BitPacking.pack(codes.baseAddress! + r * cols, count: cols, bits: settings.bits, into: words + r * wordsPerRow) }
            }
            try matrix.scales.withUnsafeBufferPointer { scales throws(CkptError) in
                try matrix.offsets.withUnsafeBufferPointer { offsets throws(CkptError) in
                    try emit(Chunk(
                        rows: 0..<rows, words: words.map { UnsafePointer($0) }, values: output == .dequantized ? UnsafePointer(values) : nil,
                        scales: scales.baseAddress!, offsets: offsets.baseAddress!))
                }
            }
            return total
        }
    }

    /// `count` F32 values as `dtype`'s bytes, for `body`: in place for F32, otherwise converted into a reused buffer.
    func converted(
        _ values: UnsafePointer<Float>, count: Int, to dtype: DType, _ body: (UnsafeRawBufferPointer) throws(CkptError) -> Void
    ) throws(CkptError) {
        if dtype == .f32 {
            try body(UnsafeRawBufferPointer(start: values, count: count * 4))
            return
        }
        let width = dtype.byteWidth!
        let out = try buffer(.converted, count * width, as: UInt8.self)
        DTypeConversion.convertParallel(from: .f32, to: dtype, count: count, source: values, destination: out)
        try body(UnsafeRawBufferPointer(start: out, count: count * width))
    }
}
