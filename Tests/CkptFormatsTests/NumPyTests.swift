import CkptCore
import CkptFormats
import Testing

@Suite("npy")
struct NumPyTests {
    @Test("writing a fixture back reproduces numpy's np.save bytes", arguments: [
        "f32_c_2d", "f64_scalar", "bool_1d", "int8", "uint16", "int64", "f16_special", "empty_0x3", "complex64", "complex128", "uint64",
    ])
    func byteIdentical(name: String) throws {
        let path = Support.fixture("npy/\(name).npy")
        let entry = try Checkpoint.open(path).tensors[0]
        let dir = Support.temporaryDirectory()
        try NumPy.write(try OutputTensor.from(entry), to: dir + "/out.npy")
        #expect(try Support.read(dir + "/out.npy") == (try Support.read(path)))
    }

    @Test("Fortran-order and big-endian arrays load as C-order little-endian values")
    func layouts() throws {
        let fortran = try Checkpoint.open(Support.fixture("npy/f64_fortran_3d.npy")).tensors[0]
        let values = try fortran.load().withUnsafeBytes { raw in (0..<24).map { raw.loadUnaligned(fromByteOffset: $0 * 8, as: Double.self) } }
        // numpy: np.load(...).ravel(order="C") starts -3.0, -2.5, -2.0, -1.5, -1.0, -0.5 (a step of 0.5), while the file
        // holds the Fortran order -3, 3, -1, 5, …: ckpt must return the C order.
        #expect(Array(values.prefix(6)) == [-3.0, -2.5, -2.0, -1.5, -1.0, -0.5])
        #expect(values == (0..<24).map { -3.0 + 0.5 * Double($0) })
        let header = try Support.read(Support.fixture("npy/f64_fortran_3d.npy")).withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in
            try NumPy.parseHeader(raw)
        }
        #expect(header.fortranOrder && header.shape == [2, 3, 4])
        let bigEndian = try Checkpoint.open(Support.fixture("npy/i4_big_endian.npy")).tensors[0]
        #expect(bigEndian.dtype == .i32)
    }

    @Test("header literal parsing: 1-tuples, Python 2 longs, v2/v3 headers")
    func headers() throws {
        func header(_ text: String, version: UInt8 = 1) throws(CkptError) -> NumPy.Header {
            var body = Array(text.utf8)
            body += [UInt8](repeating: 0x20, count: 64 - (10 + body.count + 1) % 64) + [0x0A]
            let bytes = NumPy.magic + [version, 0] + Support.le16(body.count) + body
            return try bytes.withBytes { (raw: UnsafeRawBufferPointer) throws(CkptError) in try NumPy.parseHeader(raw) }
        }
        #expect(try header("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }").shape == [5])
        #expect(try header("{'shape': (2L, 3L), 'fortran_order': False, 'descr': '>i8'}").shape == [2, 3])
        #expect(try header("{'descr': '<f4', 'fortran_order': False, 'shape': (), }").shape == [])
        #expect(try header("{'descr': '<u2', 'fortran_order': True, 'shape': (3, 2), }").elementType == .numeric(.u16, swapBytes: false))
        #expect(try header("{'descr': '|V2', 'fortran_order': False, 'shape': (3,), }").elementType == .void(2))
        for bad in [
            "{'descr': '<f4', 'fortran_order': 0, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3.5,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': 3, }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1}",
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }",
            "{'descr': '<M8[ns]', 'fortran_order': False, 'shape': (3,), }",
            "{'descr': '<f16', 'fortran_order': False, 'shape': (3,), }",
        ] {
            #expect(throws: CkptError.self, "\(bad)") { try header(bad) }
        }
    }

    @Test("descr table round-trips every dtype numpy can name")
    func descrs() throws {
        for dtype in DType.allCases where NumPy.hasNativeDescr(dtype) {
            let descr = try NumPy.descr(for: dtype)
            #expect(try NumPy.elementType(descr) == .numeric(dtype, swapBytes: false), "\(dtype)")
        }
        #expect(try NumPy.descr(for: .bf16) == "<V2")
        #expect(throws: CkptError.self) { try NumPy.descr(for: .f4) }
    }

    @Test("void arrays need a dtype, given on the command line or by the npz manifest")
    func voidArrays() throws {
        let path = Support.fixture("npy/bf16_ml_dtypes.npy")
        #expect(Support.errorCode { () throws(CkptError) in try Checkpoint.open(path) } == .unsupportedDType)
        let checkpoint = try Checkpoint.open(path, options: .init(voidDTypes: [2: .bf16]))
        #expect(checkpoint.tensors[0].dtype == .bf16)
        #expect(Support.errorCode { () throws(CkptError) in try Checkpoint.open(path, options: .init(voidDTypes: [2: .f8E4M3])) } == .unsupportedDType)
    }
}
