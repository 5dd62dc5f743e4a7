import CkptCore

/// Linear-interpolation quantiles of float32 data by selection (no sort), computed as the reference library does
/// them bit for bit.
///
/// RepQ-ViT takes its clipping ranges from `torch.quantile(x.reshape(-1), q)` and, where torch refuses the input
/// (more than 2^24 elements: "quantile() input tensor is too large"), from `np.percentile(x, q·100)`. The two
/// agree on the method (linear interpolation between the order statistics around rank `q·(n−1)`) but not on the
/// arithmetic, and both are reproduced exactly (see ``Rule``). The order statistics come from an introselect on a
/// scratch copy: O(n) expected, O(n log n) worst case (the depth limit falls back to sorting a sub-range).
public enum Quantile {
    /// Above this many values `torch.quantile` throws and RepQ-ViT falls back to `np.percentile`.
    public static let torchLimit = 1 << 24

    /// Whose arithmetic computes rank and interpolation.
    public enum Rule: Sendable {
        /// `torch.quantile` (CPU, 2.x): `q` is a float32 scalar tensor, the rank `q·(n−1)` a float32 product,
        /// `weight = rank − floor(rank)` in float32, and the interpolation torch's `lerp` with a fused multiply-add:
        /// `below + weight·(above − below)` for weight < 0.5, else `above + (weight − 1)·(above − below)`.
        /// The float32 rank is coarse for large `n` (its ulp is 1 from n − 1 ≥ 2^23, so the weight is then 0).
        case torch
        /// `np.percentile(x, q·100)` (numpy 2.x, method "linear"): `q = (q·100)/100` in double, the rank
        /// `(n−1)·q` in double, the weight `rank − floor(rank)` in double, then cast to float32 for
        /// `below + (above − below)·weight` (weight < 0.5) or `above − (above − below)·(1 − weight)`, unfused.
        case numpy

        /// The rule RepQ-ViT ends up using for `count` values.
        public static func repQViT(count: Int) -> Rule { count <= Quantile.torchLimit ? .torch : .numpy }
    }

    /// Where quantile `q` lies among `count` sorted values: the two ranks and the interpolation weight.
    public struct Position: Sendable, Equatable {
        public let below: Int
        public let above: Int
        public let rule: Rule
        /// The weight as the rule's arithmetic holds it (double; exactly a float32 for ``Rule/torch``).
        public let weight: Double

        public init(q: Double, count: Int, rule: Rule) {
            precondition(count > 0 && q >= 0 && q <= 1)
            self.rule = rule
            switch rule {
            case .torch:
                let rank = Float(q) * Float(count - 1)
                let lower = Int(rank)  // rank ≥ 0: truncation is floor, as `toType(kLong)`
                below = lower
                above = Int(rank.rounded(.up))
                weight = Double(rank - Float(lower))
            case .numpy:
                let rank = Double(count - 1) * ((q * 100) / 100)
                let lower = rank.rounded(.down)
                below = Int(lower)
                above = min(below + 1, count - 1)
                weight = rank - lower
            }
        }

        /// The quantile from the order statistics at ``below`` and ``above``.
        @inline(__always) public func interpolate(_ low: Float, _ high: Float) -> Float {
            switch rule {
            case .torch:
                let w = Float(weight)
                return w < 0.5 ? low.addingProduct(w, high - low) : high.addingProduct(w - 1, high - low)
            case .numpy:
                let difference = high - low
                return weight < 0.5 ? low + difference * Float(weight) : high - difference * Float(1 - weight)
            }
        }
    }

    /// The quantiles `qs` of `values` (finite floats), each by the rule RepQ-ViT uses for this many values unless
    /// `rule` is given. Copies the values into one scratch buffer (checked against the memory budget).
    public static func linear(_ values: UnsafeBufferPointer<Float>, _ qs: [Double], rule: Rule? = nil) throws(CkptError) -> [Float] {
        guard !values.isEmpty else { throw CkptError(.invalidArgument, "the quantile of no values") }
        for q in qs where !(q >= 0 && q <= 1) { throw CkptError(.invalidArgument, "quantile \(q) is not in 0…1") }
        let bytes = try CheckedSize.product([values.count, MemoryLayout<Float>.stride], "quantile scratch")
        let raw = try LargeAllocation.allocate(bytes)
        defer { LargeAllocation.deallocate(raw, count: bytes) }
        let scratch = raw.bindMemory(to: Float.self, capacity: values.count)
        scratch.initialize(from: values.baseAddress!, count: values.count)
        return linear(inPlace: UnsafeMutableBufferPointer(start: scratch, count: values.count), qs, rule: rule)
    }

    /// ``linear(_:_:rule:)`` on values the caller lets it permute (their multiset is unchanged).
    static func linear(inPlace values: UnsafeMutableBufferPointer<Float>, _ qs: [Double], rule: Rule? = nil) -> [Float] {
        let rule = rule ?? .repQViT(count: values.count)
        let positions = qs.map { Position(q: $0, count: values.count, rule: rule) }
        let ranks = Array(Set(positions.flatMap { [$0.below, $0.above] })).sorted()
        let found = orderStatistics(values, ranks: ranks)
        let byRank = Dictionary(uniqueKeysWithValues: zip(ranks, found))
        return positions.map { $0.interpolate(byRank[$0.below]!, byRank[$0.above]!) }
    }

    // MARK: selection

    /// The values of rank `ranks` (ascending, distinct, each in `0..<values.count`) in ascending order of the
    /// values, as `sorted()[rank]` would give them; permutes `values`.
    static func orderStatistics(_ values: UnsafeMutableBufferPointer<Float>, ranks: [Int]) -> [Float] {
        guard !ranks.isEmpty, let base = values.baseAddress else { return [] }
        precondition(ranks.first! >= 0 && ranks.last! < values.count)
        var depth = 2
        var n = values.count
        while n > 1 { depth += 2; n >>= 1 }
        select(base, 0, values.count, ranks[...], depth: depth)
        return ranks.map { base[$0] }
    }

    /// Places the values of every rank in `ranks` (all in `lo..<hi`) at their sorted positions: a three-way
    /// partition around a median-of-three (ninther above 4096 values) pivot, recursing only into the parts that
    /// hold wanted ranks; sorts the range when it is small or the depth budget is spent.
    private static func select(_ a: UnsafeMutablePointer<Float>, _ lo: Int, _ hi: Int, _ ranks: ArraySlice<Int>, depth: Int) {
        var lo = lo, hi = hi, ranks = ranks, depth = depth
        while !ranks.isEmpty {
            let n = hi - lo
            if n <= 24 || depth == 0 {
                var range = UnsafeMutableBufferPointer(start: a + lo, count: n)
                range.sort()
                return
            }
            depth -= 1
            let pivot = n > 4096
                ? median3(median3(a[lo], a[lo + n / 8], a[lo + n / 4]), median3(a[lo + 3 * n / 8], a[lo + n / 2], a[lo + 5 * n / 8]),
                          median3(a[lo + 3 * n / 4], a[lo + 7 * n / 8], a[hi - 1]))
                : median3(a[lo], a[lo + n / 2], a[hi - 1])
            // Dutch national flag: [lo, lt) < pivot, [lt, i) == pivot, (gt, hi) > pivot.
            var lt = lo, i = lo, gt = hi - 1
            while i <= gt {
                let v = a[i]
                if v < pivot {
                    a[i] = a[lt]; a[lt] = v
                    lt += 1; i += 1
                } else if v > pivot {
                    a[i] = a[gt]; a[gt] = v
                    gt -= 1
                } else {
                    i += 1
                }
            }
            let left = ranks.prefix { $0 < lt }
            let right = ranks.drop { $0 <= gt }
            // Recurse into the smaller side, loop on the larger.
            if lt - lo < hi - gt - 1 {
                if !left.isEmpty { select(a, lo, lt, left, depth: depth) }
                lo = gt + 1; ranks = right
            } else {
                if !right.isEmpty { select(a, gt + 1, hi, right, depth: depth) }
                hi = lt; ranks = left
            }
        }
    }

    @inline(__always) private static func median3(_ x: Float, _ y: Float, _ z: Float) -> Float {
        max(min(x, y), min(max(x, y), z))
    }
}
