// libFuzzer target: PNG.decode(bytes:path:) (chunks + CRCs, IHDR, PLTE, zlib inflate of the IDAT stream, the five
// filters, Adam7, every colour type and bit depth). A decoded image must hold exactly width × height × channels
// bytes; every byte is read so ASan sees any write the decoder made past its buffers.
import CkptCore
import CkptFormats

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    // A private copy, so a read past the input is a heap overflow ASan reports.
    let copy = Array(UnsafeBufferPointer(start: data, count: size))
    do {
        let image = try copy.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
            try PNG.decode(bytes: raw, path: "fuzz.png")
        }
        precondition(image.width > 0 && image.height > 0 && (image.channels == 1 || image.channels == 3), "bad geometry")
        precondition(image.pixels.count == image.width * image.height * image.channels,
                     "\(image.pixels.count) pixel bytes for \(image.width)×\(image.height)×\(image.channels)")
        var acc: UInt64 = 0xCBF29CE484222325
        image.pixels.withUnsafeBytes { fuzzTouch($0, into: &acc) }
        fuzzSink(acc)
        // The header-only path must agree with the full decode.
        let header = try copy.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
            try PNG.header(bytes: raw, path: "fuzz.png")
        }
        precondition(header.width == image.width && header.height == image.height && header.outputChannels == image.channels,
                     "PNG.header disagrees with PNG.decode")
        fuzzReport("decoded \(image.width)×\(image.height)×\(image.channels)")
    } catch {
        let text = "\(error)"
        fuzzReport("error: " + text)
    }
    return 0
}
