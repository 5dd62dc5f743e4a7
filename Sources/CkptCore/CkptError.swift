/// The one error type of ckpt. Every error names the file, the tensor (when there is one) and the rule broken,
/// so a failure on a multi-GB checkpoint can be diagnosed from the message alone.
public struct CkptError: Error, CustomStringConvertible, Sendable, Equatable {
    /// What kind of rule was broken. Stable names: tests and scripts match on them.
    public enum Code: String, Sendable, CaseIterable {
        case io
        case notFound
        case headerTooSmall
        case headerTooLarge
        case invalidHeaderLength
        case invalidUTF8
        case invalidJSON
        case invalidHeader
        case unknownDType
        case invalidOffset
        case incompleteBuffer
        case overflow
        case misalignedSlice
        case tensorInvalidInfo
        case duplicateName
        case invalidMetadata
        case badMagic
        case unsupportedVersion
        case unsupportedDType
        case objectArray
        case shortData
        case trailingData
        case crcMismatch
        case unsafeMemberName
        case inflateOverrun
        case zipFormat
        case shardIndex
        case unsupportedConversion
        case invalidArgument
        case sameInputOutput
        case tooLarge
        /// A FIFO, device, socket or directory where a file is read.
        case notRegularFile
        // Adapter merging.
        case adapterConfig
        case pickleRefused
        case unmatchedKey
        case notMergeable
        case shapeMismatch
        case nonFinite
        // Inference and evaluation.
        case modelConfig
        case missingTensor
        case invalidData
    }

    public var code: Code
    public var message: String
    public var path: String?
    public var tensor: String?
    /// The underlying cause (an errno text, a zlib message), when there is one.
    public var cause: String?

    public init(_ code: Code, _ message: String, path: String? = nil, tensor: String? = nil, cause: String? = nil) {
        self.code = code
        self.message = message
        self.path = path
        self.tensor = tensor
        self.cause = cause
    }

    /// Returns the error with `path` filled in where it was still unknown.
    public func at(path: String) -> CkptError {
        var copy = self
        if copy.path == nil { copy.path = path }
        return copy
    }

    /// Returns the error with `tensor` filled in where it was still unknown.
    public func at(tensor: String) -> CkptError {
        var copy = self
        if copy.tensor == nil { copy.tensor = tensor }
        return copy
    }

    /// The one-line form shown to users. Paths, names and messages come from files, so control and bidi
    /// characters are shown escaped (``TerminalText/escaped(_:)``): a description never carries raw ESC or NUL.
    public var description: String {
        var text = ""
        if let path { text += "\(TerminalText.escaped(path)): " }
        if let tensor { text += "tensor '\(TerminalText.escaped(tensor))': " }
        text += TerminalText.escaped(message)
        if let cause { text += " (\(TerminalText.escaped(cause)))" }
        text += " [\(code.rawValue)]"
        return text
    }
}
