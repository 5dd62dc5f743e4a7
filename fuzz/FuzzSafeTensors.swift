// libFuzzer target: SafeTensors.read on arbitrary bytes, then load + convert every tensor.
import CkptCore
import CkptFormats

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    fuzzRun(data, size) { (storage: ByteStorage) throws(CkptError) in
        try SafeTensors.read(storage: storage, path: "fuzz.safetensors")
    }
    return 0
}
