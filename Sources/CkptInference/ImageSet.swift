import CkptCore
import CkptFormats

/// Images to run a model on, with optional labels, and the one preprocessing rule `run` and `eval` apply.
///
/// Accepted inputs:
/// - PNG files (one image each; grey or RGB after decoding);
/// - `.npz`/`.npy` with `images` (or the file's only array) as uint8 `[N,H,W]`, `[N,H,W,1]`, `[N,H,W,3]`, `[H,W]` or
///   `[H,W,3]`, and in an npz optionally `labels` (integers `[N]`);
/// - F32 `[N,C,H,W]` or `[C,H,W]` at the model's input size: taken as already normalised, no preprocessing.
///
/// Preprocessing of uint8 images to the model size S: integer nearest-neighbour upsampling when S is an exact
/// multiple of both sides with the same factor (28 → 224 repeats each pixel 8×8), otherwise bilinear
/// (half-pixel centres, `align_corners=False`, edge-clamped, no antialiasing) on u/255; grey replicated to every
/// channel; then x = (u/255 − mean[c]) / std[c] in F32.
///
/// Memory: one image in flight per worker, not the whole set. PNG files are checked from their header when the set
/// is loaded (size, channels) and decoded only when an image is filled; arrays stay where the reader put them (a
/// view of the mapped file when stored uncompressed) and each image is converted from its own slice.
public struct ImageSet: Sendable {
    enum Pixels: Sendable {
        /// A PNG file, validated from its header; decoded when filled.
        case png(height: Int, width: Int, channels: Int)
        /// uint8 HWC images, one after the other.
        case bytes(TensorBytes, height: Int, width: Int, channels: Int)
        /// Normalised float CHW images of `dtype`, one after the other.
        case normalised(TensorBytes, dtype: DType, height: Int, width: Int, channels: Int)
    }

    struct Group: Sendable {
        let pixels: Pixels
        let count: Int
        let source: String
    }

    var groups: [Group]
    public private(set) var labels: [Int]?
    public var count: Int { groups.reduce(0) { $0 + $1.count } }
    /// Where each image came from ("file.png", "data.npz[12]").
    public func name(_ index: Int) -> String {
        var i = index
        for group in groups {
            if i < group.count { return group.count == 1 && FilePaths.fileExtension(of: group.source) == "png" ? group.source : "\(group.source)[\(i)]" }
            i -= group.count
        }
        return "#\(index)"
    }

    /// Largest image side accepted from a file (the preprocessing buffers scale with it).
    public static let maximumSide = 8192
    /// Largest PNG accepted, in pixels (16 Mi: 4096², or 8192 × 2048): bounds one decoded image to
    /// 16 Mi × 8 bytes of 16-bit RGBA samples plus its 8-bit copy, checked from the header before decoding.
    public static let maximumPNGPixels = 16 << 20

    /// The images of `paths` in order. Labels (for `eval`) must come from a single file; with `ignoringLabels`
    /// (calibration) any file's labels are dropped.
    public static func load(_ paths: [String], ignoringLabels: Bool = false) throws(CkptError) -> ImageSet {
        var groups: [Group] = []
        var labels: [Int]? = nil
        for path in paths {
            let (group, loadedLabels) = try loadOne(path)
            let groupLabels = ignoringLabels ? nil : loadedLabels
            if paths.count > 1, groupLabels != nil {
                throw CkptError(.invalidArgument, "labelled data must be the only input", path: path)
            }
            labels = groupLabels
            groups.append(group)
        }
        guard !groups.isEmpty else { throw CkptError(.invalidArgument, "no images given") }
        if let empty = groups.first(where: { $0.count == 0 }) {
            throw CkptError(.invalidData, "holds no images (an empty array)", path: empty.source)
        }
        return ImageSet(groups: groups, labels: labels)
    }

    static func loadOne(_ path: String) throws(CkptError) -> (Group, [Int]?) {
        if FilePaths.fileExtension(of: path) == "png" {
            // The header only: limits are checked before any pixel is inflated.
            let storage = try ByteStorage(mapping: path)
            let header = try storage.withUnsafeBytes { (bytes: UnsafeRawBufferPointer) throws(CkptError) in
                try PNG.header(bytes: bytes, path: path)
            }
            try checkPNG(header, path: path)
            return (Group(pixels: .png(height: header.height, width: header.width, channels: header.outputChannels), count: 1, source: path), nil)
        }
        let checkpoint = try Checkpoint.open(path)
        let imagesEntry: TensorEntry
        if let named = checkpoint.tensors.first(where: { $0.name == "images" }) {
            imagesEntry = named
        } else if checkpoint.tensors.count == 1 {
            imagesEntry = checkpoint.tensors[0]
        } else {
            throw CkptError(.missingTensor, "no array \"images\" (found \(checkpoint.tensors.map(\.name).prefix(8).joined(separator: ", ")))", path: path)
        }
        let dims = imagesEntry.shape.dims
        let pixels: Pixels
        let count: Int
        switch imagesEntry.dtype {
        case .u8:
            var n = 1, h = 0, w = 0, c = 1
            switch dims.count {
            case 2: (h, w) = (dims[0], dims[1])
            case 3 where dims[2] == 3: (h, w, c) = (dims[0], dims[1], 3)
            case 3: (n, h, w) = (dims[0], dims[1], dims[2])
            case 4 where dims[3] == 1 || dims[3] == 3: (n, h, w, c) = (dims[0], dims[1], dims[2], dims[3])
            default:
                throw CkptError(.invalidData, "uint8 images must be [N,H,W], [N,H,W,1|3], [H,W] or [H,W,3], found \(imagesEntry.shape)",
                    path: path, tensor: imagesEntry.name)
            }
            guard h > 0, w > 0, h <= maximumSide, w <= maximumSide else {
                throw CkptError(.invalidData, "image sides must be 1…\(maximumSide), found \(imagesEntry.shape)", path: path, tensor: imagesEntry.name)
            }
            pixels = .bytes(try imagesEntry.load(), height: h, width: w, channels: c)
            count = n
        case .f32, .f16, .bf16, .f64:
            var n = 1
            var chw = dims
            if dims.count == 4 { n = dims[0]; chw = Array(dims.dropFirst()) }
            guard chw.count == 3, chw[0] > 0, chw[1] > 0, chw[2] > 0, chw[1] <= maximumSide, chw[2] <= maximumSide else {
                throw CkptError(.invalidData, "float images must be normalised [N,C,H,W] or [C,H,W], found \(imagesEntry.shape)",
                    path: path, tensor: imagesEntry.name)
            }
            pixels = .normalised(try imagesEntry.load(), dtype: imagesEntry.dtype, height: chw[1], width: chw[2], channels: chw[0])
            count = n
        default:
            throw CkptError(.unsupportedDType, "images must be uint8 (raw pixels) or float (normalised), found \(imagesEntry.dtype.name)",
                path: path, tensor: imagesEntry.name)
        }
        var labels: [Int]? = nil
        if let entry = checkpoint.tensors.first(where: { $0.name == "labels" }) {
            guard entry.shape.dims == [count] else {
                throw CkptError(.invalidData, "labels must be [\(count)] (one per image), found \(entry.shape)", path: path, tensor: entry.name)
            }
            guard [DType.u8, .i8, .u16, .i16, .u32, .i32, .u64, .i64].contains(entry.dtype) else {
                throw CkptError(.unsupportedDType, "labels must be integers, found \(entry.dtype.name)", path: path, tensor: entry.name)
            }
            let bytes = try entry.load()
            var decoded = [Double](repeating: 0, count: count)
            bytes.withUnsafeBytes { raw in
                decoded.withUnsafeMutableBufferPointer { out in
                    guard count > 0 else { return }
                    DTypeConversion.decodeToDouble(entry.dtype, count: count, source: raw.baseAddress!, destination: out.baseAddress!)
                }
            }
            if let bad = decoded.firstIndex(where: { !($0 >= 0 && $0 < 2_147_483_648.0) }) {
                throw CkptError(.invalidData, "label \(decoded[bad]) of image \(bad) is not a class index (0 … 2³¹−1)", path: path, tensor: entry.name)
            }
            labels = decoded.map { Int($0) }
        }
        return (Group(pixels: pixels, count: count, source: path), labels)
    }

    /// Writes image `index` as normalised F32 [C, size, size] for a model with `config`.
    public func fill(_ index: Int, size: Int, config: ViTConfig, into out: UnsafeMutablePointer<Float>) throws(CkptError) {
        var i = index
        var groupIndex = 0
        while i >= groups[groupIndex].count { i -= groups[groupIndex].count; groupIndex += 1 }
        let group = groups[groupIndex]
        let channels = config.channels
        func checkChannels(_ c: Int) throws(CkptError) {
            guard c == 1 || c == channels else {
                throw CkptError(.invalidData, "image has \(c) channels; the model takes \(channels) (grey images are replicated)", path: group.source)
            }
        }
        switch group.pixels {
        case .normalised(let bytes, let dtype, let h, let w, let c):
            guard h == size, w == size, c == channels else {
                throw CkptError(.invalidData, "normalised float images are used as given and must be [\(channels), \(size), \(size)], found [\(c), \(h), \(w)]",
                    path: group.source)
            }
            let n = c * h * w, width = dtype.byteWidth!
            let slice = (i * n * width)..<((i + 1) * n * width)
            var bad: Int? = nil
            bytes.withUnsafeBytes { raw in
                DTypeConversion.convert(from: dtype, to: .f32, count: n, source: raw.baseAddress! + slice.lowerBound, destination: out)
                bad = (0..<n).first { !out[$0].isFinite }
            }
            bytes.storage.doneReading(bytes.range.lowerBound + slice.lowerBound..<bytes.range.lowerBound + slice.upperBound)
            if let bad {
                throw CkptError(.nonFinite, "pixel \(bad) of image \(i) is \(out[bad]); normalised images must be finite", path: group.source)
            }
        case .bytes(let bytes, let h, let w, let c):
            try checkChannels(c)
            let n = h * w * c
            bytes.withUnsafeBytes { raw in
                let image = raw.baseAddress!.assumingMemoryBound(to: UInt8.self) + i * n
                Self.resizeNormalise(image, height: h, width: w, channels: c, size: size, mean: config.mean, std: config.std,
                    modelChannels: channels, into: out)
            }
            bytes.storage.doneReading(bytes.range.lowerBound + i * n..<bytes.range.lowerBound + (i + 1) * n)
        case .png(let h, let w, let c):
            try checkChannels(c)
            let image = try PNG.decode(path: group.source, maximumSide: Self.maximumSide, maximumPixels: Self.maximumPNGPixels)
            // The file was validated from its header at load; it must not have changed since.
            guard image.height == h, image.width == w, image.channels == c else {
                throw CkptError(.invalidData, "PNG changed while it was being read (now \(image.width)×\(image.height))", path: group.source)
            }
            image.pixels.withUnsafeBufferPointer { buffer in
                Self.resizeNormalise(buffer.baseAddress!, height: h, width: w, channels: c, size: size, mean: config.mean, std: config.std,
                    modelChannels: channels, into: out)
            }
        }
    }

    /// The PNG limits of `run`, `eval` and calibration, from the header alone.
    static func checkPNG(_ header: PNG.Header, path: String) throws(CkptError) {
        guard header.width <= maximumSide, header.height <= maximumSide else {
            throw CkptError(.tooLarge, "image is \(header.width)×\(header.height); at most \(maximumSide) per side", path: path)
        }
        guard header.width * header.height <= maximumPNGPixels else {
            throw CkptError(
                .tooLarge, "image is \(header.width)×\(header.height) = \(header.width * header.height) pixels; at most \(maximumPNGPixels) (16 Mi)",
                path: path)
        }
    }

    /// u8 HWC → normalised F32 CHW at size × size (the rule in the type's documentation).
    static func resizeNormalise(
        _ image: UnsafePointer<UInt8>, height h: Int, width w: Int, channels c: Int, size s: Int, mean: [Float], std: [Float],
        modelChannels: Int, into out: UnsafeMutablePointer<Float>
    ) {
        let plane = s * s
        if s % h == 0, s % w == 0, s / h == s / w {
            let k = s / h
            for ch in 0..<modelChannels {
                let source = c == 1 ? 0 : ch
                let m = mean[ch], sd = std[ch]
                // The same two F32 roundings as (u / 255 − mean) / std in numpy.
                var table = [Float](repeating: 0, count: 256)
                for u in 0..<256 { table[u] = (Float(u) / 255 - m) / sd }
                for y in 0..<s {
                    let sourceRow = image + (y / k) * w * c + source
                    let row = out + ch * plane + y * s
                    for x in 0..<s { row[x] = table[Int(sourceRow[(x / k) * c])] }
                }
            }
            return
        }
        // Bilinear with half-pixel centres: src = (dst + 0.5)·in/out − 0.5, clamped at 0, neighbours clamped.
        func axis(_ input: Int) -> [(Int, Int, Float)] {
            let scale = Float(input) / Float(s)
            return (0..<s).map { dst in
                let real = max(scale * (Float(dst) + 0.5) - 0.5, 0)
                let i0 = min(Int(real), input - 1)
                let i1 = min(i0 + 1, input - 1)
                return (i0, i1, real - Float(i0))
            }
        }
        let ys = axis(h), xs = axis(w)
        for ch in 0..<modelChannels {
            let source = c == 1 ? 0 : ch
            let m = mean[ch], sd = std[ch]
            for y in 0..<s {
                let (y0, y1, ly) = ys[y]
                let row = out + ch * plane + y * s
                for x in 0..<s {
                    let (x0, x1, lx) = xs[x]
                    func at(_ yy: Int, _ xx: Int) -> Float { Float(image[(yy * w + xx) * c + source]) / 255 }
                    let top = at(y0, x0) * (1 - lx) + at(y0, x1) * lx
                    let bottom = at(y1, x0) * (1 - lx) + at(y1, x1) * lx
                    row[x] = (top * (1 - ly) + bottom * ly - m) / sd
                }
            }
        }
    }
}

extension ViTEngine {
    /// Final-norm CLS features [count × D] of the first `count` images of `images`, preprocessed for this engine.
    /// With `hook`, it sees (or rewrites: fake quantization) the activation sites' values.
    public func features(images: ImageSet, count: Int? = nil, hook: (any ActivationHook)? = nil) throws(CkptError) -> [Float] {
        let n = min(count ?? images.count, images.count)
        let size = imageSize, config = model.config
        return try features(count: n, fill: { (i: Int, out: UnsafeMutablePointer<Float>) throws(CkptError) in
            try images.fill(i, size: size, config: config, into: out)
        }, hook: hook)
    }
}
