/// Dense LSB-first bit packing of small unsigned codes into 32-bit words, the layout MLX (affine, all bit widths)
/// and compressed-tensors (`pack_to_int32`, since 0.17.0) share: element `j` of a row occupies bits
/// `j*bits ..< (j+1)*bits` of the row's little-endian word stream, straddling word boundaries for 3/5/6/7 bits.
public enum BitPacking {
    /// Words one row of `count` codes occupies: `ceil(count*bits/32)` (MLX rows are whole words already).
    @inlinable
    public static func wordCount(codes count: Int, bits: Int) -> Int { (count * bits + 31) / 32 }

    /// Packs `count` codes (each < 2^bits) into `wordCount(codes:count, bits:)` words, zero-filling the tail.
    @inlinable
    public static func pack(_ codes: UnsafePointer<UInt8>, count: Int, bits: Int, into words: UnsafeMutablePointer<UInt32>) {
        let n = wordCount(codes: count, bits: bits)
        if bits == 4 || bits == 8 {
            // Eight (four) codes at a time: one 64-bit load, then halve the gaps between them (4-bit: bytes c0..c7
            // become c0 | c1<<4 | … | c7<<28), instead of a shift and an OR per code.
            let full = count / (32 / bits)
            let raw = UnsafeRawPointer(codes)
            if bits == 4 {
                for w in 0..<full {
                    var x = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * w, as: UInt64.self))
                    x = (x | (x &>> 4)) & 0x00FF_00FF_00FF_00FF
                    x = (x | (x &>> 8)) & 0x0000_FFFF_0000_FFFF
                    x = (x | (x &>> 16)) & 0xFFFF_FFFF
                    words[w] = UInt32(truncatingIfNeeded: x)
                }
            } else {
                for w in 0..<full { words[w] = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * w, as: UInt32.self)) }
            }
            if full < n {
                var word: UInt32 = 0
                var shift: UInt32 = 0
                for j in full * (32 / bits)..<count {
                    word |= UInt32(codes[j]) &<< shift
                    shift &+= UInt32(bits)
                }
                words[full] = word
            }
            return
        }
        if 32 % bits == 0 {
            // Whole codes per word: no straddling, one shift per code.
            let perWord = 32 / bits
            for w in 0..<n {
                var word: UInt32 = 0
                let start = w * perWord
                let end = min(count, start + perWord)
                var shift: UInt32 = 0
                for j in start..<end {
                    word |= UInt32(codes[j]) &<< shift
                    shift &+= UInt32(bits)
                }
                words[w] = word
            }
            return
        }
        // A 64-bit accumulator: flush a word whenever 32 bits are complete.
        var accumulator: UInt64 = 0
        var filled = 0
        var w = 0
        for j in 0..<count {
            accumulator |= UInt64(codes[j]) &<< UInt64(filled)
            filled += bits
            if filled >= 32 {
                words[w] = UInt32(truncatingIfNeeded: accumulator)
                w += 1
                accumulator &>>= 32
                filled -= 32
            }
        }
        if w < n { words[w] = UInt32(truncatingIfNeeded: accumulator) }
    }

    /// Unpacks `count` codes from a row's words (the inverse of ``pack(_:count:bits:into:)``).
    @inlinable
    public static func unpack(_ words: UnsafePointer<UInt32>, count: Int, bits: Int, into codes: UnsafeMutablePointer<UInt8>) {
        let mask = UInt64((1 << bits) - 1)
        var accumulator: UInt64 = 0
        var available = 0
        var w = 0
        for j in 0..<count {
            if available < bits {
                accumulator |= UInt64(words[w]) &<< UInt64(available)
                w += 1
                available += 32
            }
            codes[j] = UInt8(truncatingIfNeeded: accumulator & mask)
            accumulator &>>= UInt64(bits)
            available -= bits
        }
    }
}
