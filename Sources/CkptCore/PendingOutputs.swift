#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Synchronization

/// Every temporary output file and every output folder this process created and has not yet published, so that
/// an interrupted run (Ctrl-C, SIGTERM, SIGHUP, SIGXFSZ) removes them as an error does, instead of leaving
/// `.name.ckpt-tmp-XXXXXX` files and half-made folders behind. A SIGKILL still can: nothing runs then.
public enum PendingOutputs {
    private struct State {
        var files: Set<String> = []
        var folders: [String] = []
    }

    private static let state = Mutex(State())

    public static func add(file path: String) { state.withLock { _ = $0.files.insert(path) } }
    public static func remove(file path: String) { state.withLock { _ = $0.files.remove(path) } }
    /// A folder the run created; it is removed on interruption if it is empty by then.
    public static func add(folder path: String) { state.withLock { $0.folders.append(path) } }
    public static func remove(folder path: String) { state.withLock { $0.folders.removeAll { $0 == path } } }

    /// The write end of the pipe the signal handler reports through (a handler may only make async-signal-safe
    /// calls, and `write` is one; the lock around the pending paths is not).
    nonisolated(unsafe) private static var signalPipe: Int32 = -1

    /// Installs handlers for SIGINT, SIGTERM, SIGHUP and SIGXFSZ (an output past `ulimit -f`), whichever thread
    /// receives one (OpenBLAS's included), that wake a cleanup thread: it removes the pending outputs, then lets the
    /// signal end the process as it would have, so the exit status still says which signal. Later calls do nothing.
    public static func installSignalCleanup() { _ = signalCleanup }

    /// Runs once, on first use (a static's initialiser is run exactly once, thread-safely).
    private static let signalCleanup: Void = {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else { return }
        _ = fcntl(ends[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(ends[1], F_SETFD, FD_CLOEXEC)
        signalPipe = ends[1]
        var thread = pthread_t()
        let reader = UnsafeMutableRawPointer(bitPattern: Int(ends[0]) + 1)
        guard pthread_create(&thread, nil, { argument in
            let fd = Int32(Int(bitPattern: argument) - 1)
            var received: UInt8 = 0
            while read(fd, &received, 1) != 1 {}
            PendingOutputs.removeAll()
            let signalNumber = Int32(received)
            signal(signalNumber, SIG_DFL)
            raise(signalNumber)
            _exit(128 + signalNumber)
        }, reader) == 0 else { return }
        pthread_detach(thread)
        for signalNumber in [SIGINT, SIGTERM, SIGHUP, SIGXFSZ] {
            var current = sigaction()
            sigaction(signalNumber, nil, &current)
            // A shell that runs ckpt in the background ignores SIGINT for it; keep that.
            if let handler = current.__sigaction_handler.sa_handler, unsafeBitCast(handler, to: Int.self) == 1 { continue }  // SIG_IGN
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { signalNumber in
                var byte = UInt8(truncatingIfNeeded: signalNumber)
                _ = write(PendingOutputs.signalPipe, &byte, 1)
            }
            sigemptyset(&action.sa_mask)
            sigaction(signalNumber, &action, nil)
        }
    }()

    /// Unlinks the pending files, then removes the pending folders that are empty, newest first. Holds the lock
    /// to the end, so no writer registers a new file meanwhile.
    static func removeAll() {
        state.withLock { current in
            for path in current.files { unlink(path) }
            for folder in current.folders.reversed() { rmdir(folder) }
            current = State()
        }
    }
}
