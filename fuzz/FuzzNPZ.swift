// libFuzzer target: NPZ.read (zip of .npy members) on arbitrary bytes, then load (CRC check, inflate, npy
// layout) + convert every tensor.
import CkptCore
import CkptFormats

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let options = Checkpoint.ReadOptions(voidDTypes: [2: .bf16, 1: .f8E4M3])
    fuzzRun(data, size) { (storage: ByteStorage) throws(CkptError) in
        try NPZ.read(storage: storage, path: "fuzz.npz", options: options)
    }
    return 0
}
