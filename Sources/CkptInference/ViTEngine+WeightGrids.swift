import CkptMerge
import CkptQuant

extension ViTEngine {
    /// Block `index`'s qkv grid, recorded under the query weight's name for all 3·D rows, split into the query,
    /// key and value weights' grids when the checkpoint stores them apart (a fused qkv keeps its one grid).
    func splitQKVGrid(_ index: Int, _ grids: inout [String: WeightGrid]) {
        guard model.tensorName(.qkv(index), .weight) == nil, let fused = grids[qkvName(index)] else { return }
        let d = model.config.dim
        for (part, role) in [ViTName.Role.query(index), .key(index), .value(index)].enumerated() {
            if let name = model.tensorName(role, .weight) { grids[name] = fused.rows((part * d)..<((part + 1) * d)) }
        }
    }
}
