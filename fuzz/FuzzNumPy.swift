// libFuzzer target: NumPy.read (.npy) on arbitrary bytes, then load (byte swap / Fortran transpose) + convert
// every tensor. Void descrs of 1 and 2 bytes resolve to float8 / bfloat16, as the CLI's --void-dtype does.
import CkptCore
import CkptFormats

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let options = Checkpoint.ReadOptions(voidDTypes: [2: .bf16, 1: .f8E4M3])
    fuzzRun(data, size) { (storage: ByteStorage) throws(CkptError) in
        try NumPy.read(storage: storage, path: "fuzz.npy", options: options)
    }
    return 0
}
