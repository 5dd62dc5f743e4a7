import CkptCore
import Dispatch
import Synchronization

/// Runs a producer of byte chunks on a background thread and hands the chunks to the calling thread through a
/// small ring of buffers, so producing the next chunk (quantizing it, say) overlaps writing the previous one.
///
/// The producer's chunks are copied into the ring: a chunk passed to a sink is only valid until the sink returns.
/// At most ``slotCount`` × ``slotBytes`` bytes are in flight.
final class ChunkPipeline: @unchecked Sendable {
    // Shared state: the slot buffers (each owned by one side at a time, handed over through the semaphores), the
    // item queue and the cancel flag (both synchronised).
    enum Item: Sendable {
        case bytes(slot: Int, count: Int)
        /// Marks the end of the producer's unit `index` (a tensor), for padding and progress.
        case end(index: Int)
        case finished(CkptError?)
    }

    static let slotCount = 4
    static let slotBytes = 4 << 20

    private let slots: [UnsafeMutableRawPointer]
    private let freeSlots = DispatchSemaphore(value: ChunkPipeline.slotCount)
    private let readyItems = DispatchSemaphore(value: 0)
    private let queue = Mutex<(items: [Item], head: Int)>(([], 0))
    private let cancelled = Atomic<Bool>(false)
    private var nextSlot = 0  // producer side only
    private var sent = 0  // producer side only: bytes since the last end marker
    /// Producer-side scratch space of ``stagingBytes`` (decoding inputs to F32), allocated on first use.
    private var stagingBuffer: UnsafeMutableRawPointer?
    static let stagingBytes = 4 << 20

    private init() {
        slots = (0..<ChunkPipeline.slotCount).map { _ in LargeAllocation.allocate(ChunkPipeline.slotBytes) }
    }

    deinit {
        for slot in slots { LargeAllocation.deallocate(slot, count: ChunkPipeline.slotBytes) }
        if let stagingBuffer { LargeAllocation.deallocate(stagingBuffer, count: ChunkPipeline.stagingBytes) }
    }

    /// Producer side: ``stagingBytes`` of scratch memory, the same buffer on every call.
    var staging: UnsafeMutableRawPointer {
        if stagingBuffer == nil { stagingBuffer = LargeAllocation.allocate(ChunkPipeline.stagingBytes) }
        return stagingBuffer!
    }

    private func push(_ item: Item) {
        queue.withLock { $0.items.append(item) }
        readyItems.signal()
    }

    private func pop() -> Item {
        readyItems.wait()
        return queue.withLock { state in
            let item = state.items[state.head]
            state.head += 1
            if state.head == state.items.count { state.items.removeAll(keepingCapacity: true); state.head = 0 }
            return item
        }
    }

    /// Producer side: waits for a free slot (the consumer may still be writing the others).
    private func takeSlot() throws(CkptError) -> Int {
        freeSlots.wait()
        if cancelled.load(ordering: .relaxed) {
            freeSlots.signal()
            throw CkptError(.io, "stopped: the output could not be written")
        }
        return nextSlot
    }

    private func hand(_ slot: Int, _ count: Int) {
        push(.bytes(slot: slot, count: count))
        nextSlot = (nextSlot + 1) % ChunkPipeline.slotCount
        sent += count
    }

    /// Producer side: copies `chunk` into free slots.
    func send(_ chunk: UnsafeRawBufferPointer) throws(CkptError) {
        var offset = 0
        while offset < chunk.count {
            let slot = try takeSlot()
            let count = min(ChunkPipeline.slotBytes, chunk.count - offset)
            slots[slot].copyMemory(from: chunk.baseAddress! + offset, byteCount: count)
            hand(slot, count)
            offset += count
        }
    }

    /// Producer side: lends a free slot of ``slotBytes`` to `body`, which writes its bytes there directly (no copy)
    /// and returns how many it wrote.
    func fill(_ body: (UnsafeMutableRawBufferPointer) throws(CkptError) -> Int) throws(CkptError) {
        let slot = try takeSlot()
        let count: Int
        do {
            count = try body(UnsafeMutableRawBufferPointer(start: slots[slot], count: ChunkPipeline.slotBytes))
        } catch {
            freeSlots.signal()
            throw error
        }
        precondition(count >= 0 && count <= ChunkPipeline.slotBytes, "filled \(count) bytes of a \(ChunkPipeline.slotBytes)-byte slot")
        hand(slot, count)
    }

    /// Runs `produce` (which calls `send` and `end`) on a background thread while this thread passes every chunk to
    /// `consume` and every end marker to `ended`, in order. The first error of either side is thrown once the
    /// producer has stopped; the consumer's error stops the producer at its next chunk.
    static func run(
        produce: @escaping @Sendable (ChunkPipeline) throws(CkptError) -> Void,
        consume: (UnsafeRawBufferPointer) throws(CkptError) -> Void,
        ended: (Int) throws(CkptError) -> Void
    ) throws(CkptError) {
        let pipeline = ChunkPipeline()
        DispatchQueue.global().async {
            do throws(CkptError) {
                try produce(pipeline)
                pipeline.push(.finished(nil))
            } catch {
                pipeline.push(.finished(error))
            }
        }
        var failure: CkptError?
        while true {
            let item = pipeline.pop()
            switch item {
            case .bytes(let slot, let count):
                if failure == nil {
                    do throws(CkptError) {
                        try consume(UnsafeRawBufferPointer(start: pipeline.slots[slot], count: count))
                    } catch {
                        failure = error
                        pipeline.cancelled.store(true, ordering: .relaxed)
                    }
                }
                pipeline.freeSlots.signal()
            case .end(let index):
                if failure == nil {
                    do throws(CkptError) { try ended(index) } catch {
                        failure = error
                        pipeline.cancelled.store(true, ordering: .relaxed)
                    }
                }
            case .finished(let producerError):
                // The consumer's error comes first: the producer's is then only the cancellation it caused.
                if let error = failure ?? producerError { throw error }
                return
            }
        }
    }

    /// Producer side: marks the end of unit `index`, returning the bytes sent for it.
    @discardableResult
    func end(_ index: Int) -> Int {
        push(.end(index: index))
        defer { sent = 0 }
        return sent
    }
}
