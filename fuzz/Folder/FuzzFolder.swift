// Shared by the folder-based targets (config, merge): a fixed per-process scratch folder (under /dev/shm when it
// exists, so no execution touches a disk), raw file writes, and small valid checkpoints built with the library's
// own safetensors writer. Only linked into fuzz-config and fuzz-merge (see run.sh).
#if canImport(Glibc)
import Glibc
#endif
import CkptCore
import CkptFormats

enum FuzzFolder {
    /// `/dev/shm/ckpt-fuzz-<pid>` (or under /tmp), created on first use and removed at exit.
    nonisolated(unsafe) private static var rootPath: String?
    nonisolated(unsafe) private static var written: [String] = []
    nonisolated(unsafe) private static var folders: [String] = []

    static var root: String {
        if let rootPath { return rootPath }
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        let path = "\(base)/ckpt-fuzz-\(getpid())"
        makeFolder(path)
        rootPath = path
        atexit { FuzzFolder.removeAll() }
        return path
    }

    /// `root/<name>/`, created on first use.
    static func folder(_ name: String) -> String {
        let path = root + "/" + name
        if !folders.contains(path) { makeFolder(path) }
        return path
    }

    private static func makeFolder(_ path: String) {
        if mkdir(path, 0o755) != 0 && errno != EEXIST { fatalError("fuzz: cannot create \(path): errno \(errno)") }
        folders.append(path)
    }

    /// Writes `bytes` to `path` (created or truncated).
    static func write(_ path: String, _ bytes: UnsafeRawBufferPointer) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { fatalError("fuzz: cannot write \(path): errno \(errno)") }
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            guard n > 0 else { fatalError("fuzz: short write to \(path): errno \(errno)") }
            offset += n
        }
        close(fd)
        if !written.contains(path) { written.append(path) }
    }

    static func write(_ path: String, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { write(path, $0) }
    }

    static func write(_ path: String, _ text: String) { write(path, Array(text.utf8)) }

    static func remove(_ path: String) { unlink(path) }

    /// Deletes every file and folder this process made (called at exit; a crash leaves the folder behind).
    static func removeAll() {
        for path in written { unlink(path) }
        // Outputs the library wrote (merge results, staging files) are not in `written`: sweep each folder.
        for folder in folders.reversed() {
            if let names = try? FilePaths.contents(of: folder) {
                for name in names { unlink(folder + "/" + name) }
            }
            rmdir(folder)
        }
    }

    // MARK: - Companion weights

    /// One tensor of a companion checkpoint: F32 values are filled deterministically (small, finite) unless
    /// `bytes` gives the raw little-endian contents.
    struct Tensor {
        var name: String
        var dtype: DType = .f32
        var shape: [Int]
        var bytes: [UInt8]? = nil
    }

    /// Deterministic values in [-0.25, 0.25), different for every tensor name.
    static func values(_ count: Int, seed: String) -> [Float] {
        var h: UInt64 = 0xCBF29CE484222325
        for byte in seed.utf8 { h = (h ^ UInt64(byte)) &* 0x100000001B3 }
        return (0..<count).map { _ in
            h = h &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int64(h >> 40) - (1 << 23)) / Float(1 << 25)
        }
    }

    static func le<T: FixedWidthInteger>(_ values: [T]) -> [UInt8] {
        values.flatMap { value in withUnsafeBytes(of: value.littleEndian) { Array($0) } }
    }

    static func f32Bytes(_ values: [Float]) -> [UInt8] { le(values.map(\.bitPattern)) }

    static func f16Bytes(_ values: [Float]) -> [UInt8] { le(values.map { Float16($0).bitPattern }) }

    /// Writes a safetensors file with the library's writer (what `ckpt convert` would produce).
    static func writeSafetensors(_ path: String, _ tensors: [Tensor], metadata: [String: String] = [:]) {
        do {
            let outputs = try tensors.map { (t: Tensor) throws(CkptError) -> OutputTensor in
                let shape = try Shape(t.shape)
                let data = t.bytes ?? f32Bytes(values(shape.elements, seed: t.name))
                return try OutputTensor.bytes(name: t.name, dtype: t.dtype, shape: shape, data)
            }
            try SafeTensors.write(outputs, metadata: metadata, to: path)
        } catch {
            fatalError("fuzz: cannot build companion file \(path): \(error)")
        }
        if !written.contains(path) { written.append(path) }
    }

    // MARK: - Tiny models

    /// A timm DINOv2-style ViT (LayerScale) of width 24, depth 2, patch 4, grid 4×4, 5 classes: the tensor names
    /// and shapes of fixtures/adapters/peft/tiny/base.safetensors, which the PEFT fixtures were trained on.
    static func tinyViT() -> [Tensor] {
        var t: [Tensor] = []
        for i in 0..<2 {
            let p = "blocks.\(i)."
            t += [
                Tensor(name: p + "attn.proj.bias", shape: [24]), Tensor(name: p + "attn.proj.weight", shape: [24, 24]),
                Tensor(name: p + "attn.qkv.bias", shape: [72]), Tensor(name: p + "attn.qkv.weight", shape: [72, 24]),
                Tensor(name: p + "ls1.gamma", shape: [24]), Tensor(name: p + "ls2.gamma", shape: [24]),
                Tensor(name: p + "mlp.fc1.bias", shape: [48]), Tensor(name: p + "mlp.fc1.weight", shape: [48, 24]),
                Tensor(name: p + "mlp.fc2.bias", shape: [24]), Tensor(name: p + "mlp.fc2.weight", shape: [24, 48]),
                Tensor(name: p + "norm1.bias", shape: [24]), Tensor(name: p + "norm1.weight", shape: [24]),
                Tensor(name: p + "norm2.bias", shape: [24]), Tensor(name: p + "norm2.weight", shape: [24]),
            ]
        }
        t += [
            Tensor(name: "cls_token", shape: [1, 1, 24]), Tensor(name: "head.bias", shape: [5]), Tensor(name: "head.weight", shape: [5, 24]),
            Tensor(name: "norm.bias", shape: [24]), Tensor(name: "norm.weight", shape: [24]),
            Tensor(name: "patch_embed.proj.bias", shape: [24]), Tensor(name: "patch_embed.proj.weight", shape: [24, 3, 4, 4]),
            Tensor(name: "pos_embed", shape: [1, 17, 24]),
        ]
        return t
    }

    /// A GPT-2 (transformers Conv1D, [in, out] weights) of width 32: fixtures/adapters/peft/tiny/embedding_fanin/gpt2/base.safetensors.
    static func tinyGPT2() -> [Tensor] {
        var t: [Tensor] = []
        for i in 0..<2 {
            let p = "h.\(i)."
            t += [
                Tensor(name: p + "attn.c_attn.bias", shape: [96]), Tensor(name: p + "attn.c_attn.weight", shape: [32, 96]),
                Tensor(name: p + "attn.c_proj.bias", shape: [32]), Tensor(name: p + "attn.c_proj.weight", shape: [32, 32]),
                Tensor(name: p + "ln_1.bias", shape: [32]), Tensor(name: p + "ln_1.weight", shape: [32]),
                Tensor(name: p + "ln_2.bias", shape: [32]), Tensor(name: p + "ln_2.weight", shape: [32]),
                Tensor(name: p + "mlp.c_fc.bias", shape: [64]), Tensor(name: p + "mlp.c_fc.weight", shape: [32, 64]),
                Tensor(name: p + "mlp.c_proj.bias", shape: [32]), Tensor(name: p + "mlp.c_proj.weight", shape: [64, 32]),
            ]
        }
        t += [
            Tensor(name: "ln_f.bias", shape: [32]), Tensor(name: "ln_f.weight", shape: [32]),
            Tensor(name: "wpe.weight", shape: [32, 32]), Tensor(name: "wte.weight", shape: [64, 32]),
        ]
        return t
    }

    /// A BERT encoder of width 32: fixtures/adapters/peft/tiny/embedding_fanin/bert/base.safetensors.
    static func tinyBERT() -> [Tensor] {
        var t: [Tensor] = [
            Tensor(name: "embeddings.LayerNorm.bias", shape: [32]), Tensor(name: "embeddings.LayerNorm.weight", shape: [32]),
            Tensor(name: "embeddings.position_embeddings.weight", shape: [32, 32]),
            Tensor(name: "embeddings.token_type_embeddings.weight", shape: [2, 32]),
            Tensor(name: "embeddings.word_embeddings.weight", shape: [64, 32]),
        ]
        for i in 0..<2 {
            let p = "encoder.layer.\(i)."
            t += [
                Tensor(name: p + "attention.output.LayerNorm.bias", shape: [32]), Tensor(name: p + "attention.output.LayerNorm.weight", shape: [32]),
                Tensor(name: p + "attention.output.dense.bias", shape: [32]), Tensor(name: p + "attention.output.dense.weight", shape: [32, 32]),
                Tensor(name: p + "attention.self.key.bias", shape: [32]), Tensor(name: p + "attention.self.key.weight", shape: [32, 32]),
                Tensor(name: p + "attention.self.query.bias", shape: [32]), Tensor(name: p + "attention.self.query.weight", shape: [32, 32]),
                Tensor(name: p + "attention.self.value.bias", shape: [32]), Tensor(name: p + "attention.self.value.weight", shape: [32, 32]),
                Tensor(name: p + "intermediate.dense.bias", shape: [64]), Tensor(name: p + "intermediate.dense.weight", shape: [64, 32]),
                Tensor(name: p + "output.LayerNorm.bias", shape: [32]), Tensor(name: p + "output.LayerNorm.weight", shape: [32]),
                Tensor(name: p + "output.dense.bias", shape: [32]), Tensor(name: p + "output.dense.weight", shape: [32, 64]),
            ]
        }
        return t
    }
}

/// Streams every output tensor (computing merged tensors), touching every byte and checking the count written.
func fuzzDrain(_ outputs: [OutputTensor]) {
    var acc: UInt64 = 0xCBF29CE484222325
    for output in outputs { fuzzWrite(output, into: &acc) }
    fuzzSink(acc)
}
