import CkptCore

/// The resolution schedule of a synthesis: stages of (input size, steps), run in order on every image.
///
/// Each stage optimises the image at its own size (a multiple of the model's patch size; the engine resizes the
/// position embedding bicubically). Between stages the image is resized bilinearly (`align_corners=False`, no
/// antialiasing) to the next stage's size and Adam's moments start from zero; the learning-rate schedule (warm-up +
/// cosine) spans the steps of all stages. Written `SIZE:STEPS[,SIZE:STEPS…]`, e.g. `112:80,224:20`.
public struct SynthesisSchedule: Sendable, Equatable, CustomStringConvertible {
    /// One stage: `steps` optimisation steps at `size` × `size` pixels.
    public struct Stage: Sendable, Equatable {
        public var size: Int
        public var steps: Int

        public init(size: Int, steps: Int) {
            self.size = size
            self.steps = steps
        }
    }

    public let stages: [Stage]

    /// The most stages a schedule may have.
    public static let maximumStages = 8
    /// The most steps, over all stages.
    public static let maximumSteps = 1_000_000
    /// The largest stage size (the engine's limit).
    public static let maximumSize = 4096

    /// Refuses an empty schedule, more than ``maximumStages`` stages, a size outside 1…4096, a stage of fewer than
    /// one step, or more than ``maximumSteps`` steps in all.
    public init(stages: [Stage]) throws(CkptError) {
        guard !stages.isEmpty else { throw CkptError(.invalidArgument, "a schedule needs at least one stage") }
        guard stages.count <= Self.maximumStages else {
            throw CkptError(.invalidArgument, "a schedule has at most \(Self.maximumStages) stages, got \(stages.count)")
        }
        var total = 0
        for stage in stages {
            guard (1...Self.maximumSize).contains(stage.size) else {
                throw CkptError(.invalidArgument, "stage size \(stage.size) is not in 1…\(Self.maximumSize)")
            }
            guard (1...Self.maximumSteps).contains(stage.steps) else {
                throw CkptError(.invalidArgument, "stage \(stage.size):\(stage.steps) needs 1…\(Self.maximumSteps) steps")
            }
            total += stage.steps
            guard total <= Self.maximumSteps else {
                throw CkptError(.invalidArgument, "a schedule has at most \(Self.maximumSteps) steps in all")
            }
        }
        self.stages = stages
    }

    /// Parses `SIZE:STEPS[,SIZE:STEPS…]` (decimal integers, no spaces), then checks it as ``init(stages:)`` does.
    public init(parsing text: String) throws(CkptError) {
        var stages: [Stage] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let fields = part.split(separator: ":", omittingEmptySubsequences: false)
            guard fields.count == 2, let size = Self.decimal(fields[0]), let steps = Self.decimal(fields[1]) else {
                throw CkptError(.invalidArgument, "schedule '\(text)': expected SIZE:STEPS[,SIZE:STEPS…] (e.g. 112:80,224:20), got '\(part)'")
            }
            stages.append(Stage(size: size, steps: steps))
        }
        try self.init(stages: stages)
    }

    /// One stage of `steps` at `size`.
    public static func single(size: Int, steps: Int) throws(CkptError) -> SynthesisSchedule {
        try SynthesisSchedule(stages: [Stage(size: size, steps: steps)])
    }

    /// Steps of the default schedule at half the patch grid, then at the model's size: 112:40,224:6 for a 224 px
    /// ViT. Chosen so 32 images of ViT-S/14 finish in under 10 minutes on 2 shared cores (formats/synthesis.md).
    public static let defaultLowSteps = 40, defaultFullSteps = 6
    /// Images of a default run.
    public static let defaultImages = 32

    /// The default schedule for a model with `imageSize` inputs and `patchSize` patches: `lowSteps` steps at half the
    /// patch grid (⌊g/2⌋ patches a side), then `fullSteps` at the model's size; one stage when the grid is
    /// under 4 patches a side.
    public static func standard(
        imageSize: Int, patchSize: Int, lowSteps: Int = defaultLowSteps, fullSteps: Int = defaultFullSteps
    ) throws(CkptError) -> SynthesisSchedule {
        let grid = imageSize / max(1, patchSize)
        guard grid >= 4 else { return try single(size: imageSize, steps: lowSteps + fullSteps) }
        return try SynthesisSchedule(stages: [Stage(size: grid / 2 * patchSize, steps: lowSteps), Stage(size: imageSize, steps: fullSteps)])
    }

    /// Refuses a stage whose size is not a multiple of `patchSize` (the engine's token grid must be whole).
    public func check(patchSize: Int) throws(CkptError) {
        for stage in stages where stage.size < patchSize || stage.size % patchSize != 0 {
            throw CkptError(.invalidArgument, "schedule \(description): stage size \(stage.size) is not a multiple of the model's patch size \(patchSize)")
        }
    }

    /// Steps over all stages.
    public var totalSteps: Int { stages.reduce(0) { $0 + $1.steps } }

    /// The distinct stage sizes, in the order they first appear.
    public var sizes: [Int] {
        var seen: [Int] = []
        for stage in stages where !seen.contains(stage.size) { seen.append(stage.size) }
        return seen
    }

    /// The global index of each stage's first step.
    public var firstSteps: [Int] {
        var first: [Int] = [], total = 0
        for stage in stages {
            first.append(total)
            total += stage.steps
        }
        return first
    }

    /// The stage that global step `step` (0-based) belongs to.
    public func stageIndex(ofStep step: Int) -> Int {
        var end = 0
        for (index, stage) in stages.enumerated() {
            end += stage.steps
            if step < end { return index }
        }
        return stages.count - 1
    }

    /// `SIZE:STEPS,…`, the form ``init(parsing:)`` reads.
    public var description: String { stages.map { "\($0.size):\($0.steps)" }.joined(separator: ",") }

    private static func decimal(_ text: Substring) -> Int? {
        guard !text.isEmpty, text.count <= 9, text.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
        return Int(text)
    }
}
