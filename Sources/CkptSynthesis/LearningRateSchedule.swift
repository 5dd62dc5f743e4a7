#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CkptCore

/// PSAQ-ViT's pixel learning-rate schedule for one round of `total` iterations: a linear warm-up over the first
/// `warmup` iterations, `base·(t+1)/warmup`, then a half cosine, `0.5·(1 + cos(π(t−warmup)/(total−warmup)))·base`.
/// PSAQ-ViT runs two rounds of 500 iterations, each with this schedule from t = 0 again, while the Adam state
/// carries on across the rounds.
public struct LearningRateSchedule: Sendable, Equatable {
    public let base: Double
    public let warmup: Int
    public let total: Int

    /// Refuses a negative warm-up, a warm-up not shorter than the round, or a non-finite or negative rate.
    public init(base: Double, warmup: Int, total: Int) throws(CkptError) {
        guard base.isFinite, base >= 0 else {
            throw CkptError(.invalidArgument, "learning rate \(base) is not a finite non-negative number")
        }
        guard warmup >= 0, total > warmup else {
            throw CkptError(.invalidArgument, "warm-up of \(warmup) iterations does not fit a round of \(total)")
        }
        self.base = base
        self.warmup = warmup
        self.total = total
    }

    /// The learning rate at iteration `t` of the round (0-based). Past the round's end the cosine keeps going,
    /// as PSAQ-ViT's formula does.
    public func rate(at t: Int) -> Double {
        if t < warmup { return base * Double(t + 1) / Double(warmup) }
        return 0.5 * (1 + cos(Double.pi * Double(t - warmup) / Double(total - warmup))) * base
    }
}
