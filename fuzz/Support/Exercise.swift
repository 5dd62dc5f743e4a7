// Shared by every fuzz target: drives a parsed checkpoint through every lazy code path
// (load = CRC check / inflate / byte swap / transpose, then dtype conversion), touching every byte that comes
// back so AddressSanitizer sees any read outside the buffers the library hands out.
import CkptCore
import CkptFormats

/// Folds every byte of `raw` into a running value so no read can be optimised away.
@inline(never)
func fuzzTouch(_ raw: UnsafeRawBufferPointer, into acc: inout UInt64) {
    guard raw.count > 0 else { return }
    var h = acc
    for byte in raw { h = (h &* 0x100000001B3) ^ UInt64(byte) }
    acc = h
}

@inline(never)
func fuzzSink(_ value: UInt64) {
    // An opaque store: keeps the checksum (and the reads behind it) alive.
    withExtendedLifetime(value) {}
}

/// Loads every tensor, then streams it through OutputTensor, converting floating tensors.
func fuzzExercise(_ checkpoint: Checkpoint) {
    var acc: UInt64 = 0xCBF29CE484222325
    _ = checkpoint.totalBytes
    _ = checkpoint.totalParameters
    for entry in checkpoint.tensors {
        acc ^= UInt64(truncatingIfNeeded: entry.byteCount)
        acc ^= UInt64(truncatingIfNeeded: entry.shape.elements)
        if let bytes = try? entry.load() {
            // A loaded tensor must be exactly the size it declares.
            precondition(bytes.count == entry.byteCount, "load() returned \(bytes.count) bytes for \(entry.byteCount)")
            bytes.withUnsafeBytes { fuzzTouch($0, into: &acc) }
        }
        // Pass-through (no conversion), then one conversion when the dtype allows it (to F16, or to F32 for F16
        // input so the conversion kernels still run). One conversion only: each allocates an ~8 MiB chunk buffer
        // (OutputTensor.chunkBytes), which dominates the cost of an execution under ASan.
        var targets: [DType?] = [nil]
        if entry.dtype.isConvertibleFloat {
            targets.append(entry.dtype == .f16 ? .f32 : .f16)
        }
        for target in targets {
            guard let output = try? OutputTensor.from(entry, convertingTo: target) else { continue }
            fuzzWrite(output, into: &acc)
        }
    }
    fuzzSink(acc)
}

/// Streams `output`, touching every byte and checking the count written. A CkptError is an accepted outcome for
/// malformed input (its description is rendered, so that code runs too).
func fuzzWrite(_ output: OutputTensor, into acc: inout UInt64) {
    var written = 0
    do {
        try output.write { (chunk: UnsafeRawBufferPointer) throws(CkptError) in
            written += chunk.count
            fuzzTouch(chunk, into: &acc)
        }
        precondition(written == output.byteCount, "write produced \(written) of \(output.byteCount) bytes")
    } catch {
        _ = "\(error)"
    }
}

/// Runs `parse` on a private copy of the input (ByteStorage copies, so the fuzzer's buffer is never retained).
@inline(__always)
func fuzzRun(_ data: UnsafePointer<UInt8>, _ size: Int,
             _ parse: (ByteStorage) throws(CkptError) -> Checkpoint) {
    do {
        let storage = try ByteStorage(copying: UnsafeRawBufferPointer(start: data, count: size))
        let checkpoint = try parse(storage)
        fuzzExercise(checkpoint)
    } catch {
        // Rejected input: fine. Render the error so its description code is exercised too.
        _ = "\(error)"
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// FUZZ_VERBOSE=1: print each input's outcome (to check that seeds parse: `fuzz-config -runs=1 fuzz/seeds/config/*`).
let fuzzVerbose = getenv("FUZZ_VERBOSE") != nil

func fuzzReport(_ outcome: @autoclosure () -> String) {
    if fuzzVerbose { print("fuzz: \(outcome())") }
}
