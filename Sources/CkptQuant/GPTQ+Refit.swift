import CCkptOpenBLAS

/// Group-parameter refit after GPTQ (`--refit`): GPTQ fixes each group's scale and offset when the group's first
/// column is reached and then only chooses codes. Once every code of a row is chosen, the row's output error
/// `(w − ŵ)ᵀ H (w − ŵ)` (H the damped input Gram GPTQ factored) is a quadratic in the row's group parameters,
/// `ŵ_j = s_g·m_j + b_g` with `m_j` the code (affine grid) or the code minus the group's zero code (zero-point
/// grids, which keep their integer zero codes and refit the scales alone). It is minimised jointly over all the
/// row's groups with the codes fixed. A row keeps its new parameters only when its error, recomputed with the
/// parameters as stored (rounded to the scale dtype), is lower than before.
extension GPTQ {
    /// Rows per least-squares batch: bounds the per-row normal matrices (`rows × P²`, P up to 2·48) to a few MiB.
    static let refitBatchRows = 64

    /// The damped Gram in float64, row-major, original column order, and the sums of its entries over each pair of
    /// groups (`groups × groups`, the bias–bias block of every row's normal matrix).
    struct RefitGram {
        let hessian: [Double]
        let groupSums: [Double]

        init(damped gram: [Float], size: Int, groupSize: Int) {
            hessian = gram.map(Double.init)
            let groups = size / groupSize
            var sums = [Double](repeating: 0, count: groups * groups)
            for j in 0..<size {
                for k in 0..<size { sums[(j / groupSize) * groups + k / groupSize] += hessian[j * size + k] }
            }
            groupSums = sums
        }
    }

    /// Refits rows `range` in place (`scales`/`offsets` are `rows × groups`, codes `rows × cols`, both in the
    /// original column order). Runs on the caller's thread with single-threaded OpenBLAS.
    static func refitRows(
        _ range: Range<Int>, original: UnsafePointer<Float>, cols: Int, groupSize: Int, gram: RefitGram, quantizer: GroupQuantizer,
        codes: UnsafePointer<UInt8>, scales: UnsafeMutablePointer<Float>, offsets: UnsafeMutablePointer<Float>
    ) {
        let groups = cols / groupSize
        let affine = quantizer.settings.grid == .mlxAffine
        let unknowns = affine ? 2 * groups : groups  // scales first, then biases
        let batch = min(refitBatchRows, range.count)
        let weights = UnsafeMutablePointer<Double>.allocate(capacity: batch * cols)
        let multipliers = UnsafeMutablePointer<Double>.allocate(capacity: batch * cols)
        let errors = UnsafeMutablePointer<Double>.allocate(capacity: batch * cols)
        let product = UnsafeMutablePointer<Double>.allocate(capacity: batch * cols)  // X·H for the X at hand
        let weightedInputs = UnsafeMutablePointer<Double>.allocate(capacity: batch * cols)  // W·H
        let normal = UnsafeMutablePointer<Double>.allocate(capacity: batch * unknowns * unknowns)
        let solution = UnsafeMutablePointer<Double>.allocate(capacity: batch * unknowns)
        var before = [Double](repeating: 0, count: batch), after = before
        var refitted = [GroupParameters](repeating: GroupParameters(scale: 0, offset: 0), count: batch * groups)
        var solved = [Bool](repeating: false, count: batch)
        defer {
            weights.deallocate(); multipliers.deallocate(); errors.deallocate(); product.deallocate()
            weightedInputs.deallocate(); normal.deallocate(); solution.deallocate()
        }
        gram.hessian.withUnsafeBufferPointer { hessianBuffer in
            let h = hessianBuffer.baseAddress!
            /// `product = x · H` for `n` rows of `x`.
            func timesH(_ x: UnsafePointer<Double>, _ n: Int, into out: UnsafeMutablePointer<Double>) {
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(cols), Int32(cols),
                    1, x, Int32(cols), h, Int32(cols), 0, out, Int32(cols))
            }
            /// Row i's error `Σ e·(eH)` from `errors` and `product`.
            func rowError(_ i: Int) -> Double {
                var sum = 0.0
                for j in 0..<cols { sum += errors[i * cols + j] * product[i * cols + j] }
                return sum
            }
            var start = range.lowerBound
            while start < range.upperBound {
                let n = min(batch, range.upperBound - start)
                // The row's weights, code multipliers and current error.
                for i in 0..<n {
                    let r = start + i
                    for j in 0..<cols {
                        let p = GroupParameters(scale: scales[r * groups + j / groupSize], offset: offsets[r * groups + j / groupSize])
                        let q = Float(codes[r * cols + j])
                        let w = Double(original[r * cols + j])
                        weights[i * cols + j] = w
                        multipliers[i * cols + j] = Double(affine ? q : q - p.offset)
                        errors[i * cols + j] = w - Double(quantizer.stored(quantizer.value(q, p)))
                    }
                }
                timesH(errors, n, into: product)
                for i in 0..<n { before[i] = rowError(i) }
                timesH(weights, n, into: weightedInputs)
                // Normal equations A θ = c. c: Σ_{j∈g} m_j (wH)_j for the scales, Σ_{j∈g} (wH)_j for the biases.
                normal.initialize(repeating: 0, count: n * unknowns * unknowns)
                for i in 0..<n {
                    for g in 0..<groups {
                        var byScale = 0.0, byBias = 0.0
                        for j in g * groupSize..<(g + 1) * groupSize {
                            byScale += multipliers[i * cols + j] * weightedInputs[i * cols + j]
                            byBias += weightedInputs[i * cols + j]
                        }
                        solution[i * unknowns + g] = byScale
                        if affine { solution[i * unknowns + groups + g] = byBias }
                    }
                }
                // A's scale rows: for each group g, (m restricted to g)·H gives Σ_{j∈g} m_j H_jk for every k.
                for g in 0..<groups {
                    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(cols), Int32(groupSize),
                        1, multipliers + g * groupSize, Int32(cols), h + g * groupSize * cols, Int32(cols), 0, product, Int32(cols))
                    for i in 0..<n {
                        let a = normal + i * unknowns * unknowns
                        for hGroup in 0..<groups {
                            var scaleScale = 0.0, scaleBias = 0.0
                            for k in hGroup * groupSize..<(hGroup + 1) * groupSize {
                                scaleScale += product[i * cols + k] * multipliers[i * cols + k]
                                scaleBias += product[i * cols + k]
                            }
                            a[g * unknowns + hGroup] = scaleScale
                            if affine {
                                a[g * unknowns + groups + hGroup] = scaleBias
                                a[(groups + hGroup) * unknowns + g] = scaleBias
                            }
                        }
                    }
                }
                for i in 0..<n {
                    let r = start + i
                    let a = normal + i * unknowns * unknowns, c = solution + i * unknowns
                    if affine {
                        for g in 0..<groups {
                            for hGroup in 0..<groups { a[(groups + g) * unknowns + groups + hGroup] = gram.groupSums[g * groups + hGroup] }
                        }
                    }
                    // A pull of 1e-9 of each diagonal towards the current parameters keeps a group whose codes are
                    // all equal (scale and bias then collinear) solvable; an unknown that never reaches the output
                    // (a zero diagonal) stays as it is.
                    for p in 0..<unknowns {
                        let g = p % groups
                        let current = Double(p < groups ? scales[r * groups + g] : offsets[r * groups + g])
                        if a[p * unknowns + p] > 0 {
                            let pull = 1e-9 * a[p * unknowns + p]
                            a[p * unknowns + p] += pull
                            c[p] += pull * current
                        } else {
                            for o in 0..<unknowns { a[p * unknowns + o] = 0; a[o * unknowns + p] = 0 }
                            a[p * unknowns + p] = 1
                            c[p] = current
                        }
                    }
                    solved[i] = choleskySolve(a, c, unknowns)
                    for g in 0..<groups {
                        let scale = solved[i] ? Float(c[g]) : scales[r * groups + g]
                        let offset = solved[i] && affine ? Float(c[groups + g]) : offsets[r * groups + g]
                        refitted[i * groups + g] = affine
                            ? GroupParameters(scale: quantizer.stored(scale), offset: quantizer.stored(offset))
                            : GroupParameters(scale: quantizer.stored(scale), offset: offset)
                    }
                    for j in 0..<cols {
                        let value = quantizer.stored(quantizer.value(Float(codes[r * cols + j]), refitted[i * groups + j / groupSize]))
                        errors[i * cols + j] = weights[i * cols + j] - Double(value)
                    }
                }
                timesH(errors, n, into: product)
                for i in 0..<n {
                    after[i] = rowError(i)
                    let r = start + i
                    guard solved[i], after[i].isFinite, after[i] < before[i] else { continue }
                    for g in 0..<groups {
                        scales[r * groups + g] = refitted[i * groups + g].scale
                        offsets[r * groups + g] = refitted[i * groups + g].offset
                    }
                }
                start += n
            }
        }
    }

    /// Solves the symmetric positive definite `a x = b` (`n × n`, row-major) in place (`b` becomes x); false if `a`
    /// is not positive definite or the solution is not finite.
    static func choleskySolve(_ a: UnsafeMutablePointer<Double>, _ b: UnsafeMutablePointer<Double>, _ n: Int) -> Bool {
        var size = Int32(n), one: Int32 = 1, info: Int32 = 0
        let upper: CChar = 85  // "U": LAPACK's upper triangle (column-major) is the row-major lower one; A is symmetric
        withUnsafePointer(to: upper) { uplo in
            dpotrf_(uplo, &size, a, &size, &info, 1)
            if info == 0 { dpotrs_(uplo, &size, &one, a, &size, b, &size, &info, 1) }
        }
        return info == 0 && (0..<n).allSatisfy { b[$0].isFinite }
    }
}
