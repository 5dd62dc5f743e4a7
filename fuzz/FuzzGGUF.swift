// libFuzzer target: GGUF.read on arbitrary bytes, then load (dequantize) + convert every tensor.
import CkptCore
import CkptFormats

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    fuzzRun(data, size) { (storage: ByteStorage) throws(CkptError) in
        try GGUF.read(storage: storage, path: "fuzz.gguf")
    }
    return 0
}
