#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A random structured attention target for one (image, block, head) of SARDFQ's Attention Priors Alignment: a
/// Gaussian mixture over the g × g patch grid, normalised into a probability vector like an attention row.
///
/// The recipe (the paper's exact sampling is not public; this is the reference notes' reading, §1.3):
/// k ~ U{1…5} components, centres μ ~ U([0, g−1]²), isotropic widths σ ~ U[1, 4]·g/14 patches, weights
/// π ~ Dirichlet(1); `G(p) = Σ πᵢ exp(−‖p − μᵢ‖²/(2σᵢ²))` and `prior = G/ΣG`. Patch p = (row, column) has index
/// `row·g + column`, the token order of a ViT's patch embedding (token 1 + index).
public struct AttentionPrior: Sendable, Equatable {
    /// One mixture component, in patch units.
    public struct Component: Sendable, Equatable {
        public var row: Double
        public var column: Double
        public var sigma: Double
        public var weight: Double

        public init(row: Double, column: Double, sigma: Double, weight: Double) {
            self.row = row
            self.column = column
            self.sigma = sigma
            self.weight = weight
        }
    }

    /// The grid side g (14 for a 224 input with 16-pixel patches).
    public let grid: Int
    public let components: [Component]
    /// The prior over the g² patches, row-major; positive, sums to 1.
    public let probabilities: [Double]

    /// The most mixture components a random prior draws (K_APA = 5).
    public static let maximumComponents = 5

    /// The prior of given components on a `grid × grid` patch grid.
    public init(grid: Int, components: [Component]) {
        precondition(grid > 0 && !components.isEmpty, "a prior needs a grid and at least one component")
        var g = [Double](repeating: 0, count: grid * grid)
        for row in 0..<grid {
            for column in 0..<grid {
                var sum = 0.0
                for c in components {
                    let dy = Double(row) - c.row, dx = Double(column) - c.column
                    sum += c.weight * exp(-(dy * dy + dx * dx) / (2 * c.sigma * c.sigma))
                }
                g[row * grid + column] = sum
            }
        }
        let total = g.reduce(0, +)
        precondition(total > 0, "the mixture vanishes on the grid")
        self.grid = grid
        self.components = components
        probabilities = g.map { $0 / total }
    }

    /// The prior of (image, block, head), drawn once per image (step 0) from the stream
    /// (seed, image, ``SynthesisRandom/Purpose/attentionPrior``, step 0, index block·4096 + head): it does not
    /// depend on how many blocks, heads or images are drawn.
    public static func random(seed: UInt64, image: Int, block: Int, head: Int, grid: Int) -> AttentionPrior {
        precondition(block >= 0 && head >= 0 && head < 4096, "block or head index out of range")
        var random = SynthesisRandom(seed: seed, image: image, purpose: .attentionPrior, step: 0, index: block * 4096 + head)
        let k = random.int(in: 1...maximumComponents)
        var components: [Component] = []
        for _ in 0..<k {
            let row = random.uniform(0, Double(grid - 1))
            let column = random.uniform(0, Double(grid - 1))
            let sigma = random.uniform(1, 4) * Double(grid) / 14
            components.append(Component(row: row, column: column, sigma: sigma, weight: 0))
        }
        let weights = random.dirichlet(count: k)
        for i in 0..<k { components[i].weight = weights[i] }
        return AttentionPrior(grid: grid, components: components)
    }

    /// The probabilities converted to `T`, for ``loss(attentionRow:prior:weight:addingInto:)``.
    public func probabilities<T: SynthesisFloat>(as _: T.Type) -> [T] { probabilities.map { T($0) } }

    /// The APA loss of one (block, head). `attentionRow` is the CLS row of the post-softmax attention,
    /// `P[0, 0..<t]` with t = g² + 1 tokens; its patch part is renormalised, `aⱼ = P[0, 1+j] / Σₖ P[0, 1+k]`, and
    /// `L = meanⱼ (aⱼ − priorⱼ)²`. Adds `weight · ∂L/∂P[0, ·]` into `rowGradient` (length t; entry 0, the CLS→CLS
    /// probability, gets 0 since a does not depend on it). Returns L (unweighted).
    @inlinable
    public static func loss<T: SynthesisFloat>(
        attentionRow: UnsafeBufferPointer<T>, prior: UnsafeBufferPointer<T>, weight: T,
        addingInto rowGradient: UnsafeMutableBufferPointer<T>
    ) -> T {
        let n = prior.count
        precondition(n > 0 && attentionRow.count == n + 1 && rowGradient.count == n + 1, "the attention row must have 1 + \(n) entries")
        var mass: T = 0
        for j in 0..<n { mass += attentionRow[1 + j] }
        let inverseMass = 1 / mass
        let count = T(n)
        var loss: T = 0
        // ∂L/∂aⱼ = 2(aⱼ − πⱼ)/n; through the renormalisation ∂L/∂Pⱼ = (∂L/∂aⱼ − Σₖ ∂L/∂aₖ·aₖ)/mass.
        var projection: T = 0
        for j in 0..<n {
            let a = attentionRow[1 + j] * inverseMass
            let d = a - prior[j]
            loss += d * d
            projection += 2 * d / count * a
        }
        for j in 0..<n {
            let a = attentionRow[1 + j] * inverseMass
            let g = 2 * (a - prior[j]) / count
            rowGradient[1 + j] += weight * (g - projection) * inverseMass
        }
        return loss / count
    }

    /// SARDFQ's APA block weights for a model of `blocks` blocks: block index b (0-based) is layer l = b + 1; the
    /// deeper half, 2l ≥ L, gets weight l/L, the others 0.
    public static func blockWeights(blocks: Int) -> [Double] {
        (0..<max(0, blocks)).map { b in
            let l = b + 1
            return 2 * l >= blocks ? Double(l) / Double(blocks) : 0
        }
    }
}
